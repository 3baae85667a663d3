"""Tune trials: controller steps answered by the probe actors, fine-tunes through Ray Train.

A controller step asks one resident probe actor to prune with the allocation, recalibrate and
measure ΔG, and reports at once: no model reload and no Ray Train launch. A fine-tune trial runs
one arm whose ratios the driver settled before the probe actors were given back: it launches a
``TorchTrainer`` inside the trial (DDP across workers), whose worker prunes the base, measures ΔG
and top-1 before, fine-tunes, and measures again. Fine-tune trials need no actor, so the arms run
side by side on what the search gave back.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import ray
from ray import tune

from ..core.config import TrainConfig
from ..core.method import PruneTarget
from ..core.pruning import ModelCard
from .probes import actor_name
from .training import ArmJob, Scaling, fit


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs besides its config; passed once with ``tune.with_parameters``."""

    run_id: str
    actors: int
    tau: float
    card: dict
    finetune: dict  # TrainConfig as a dict
    data_ref: Any  # ObjectRef of (train set, test set), fitted to the model
    state_ref: Any  # ObjectRef of the base model's state_dict
    calibration_ref: Any  # ObjectRef of the Calibration
    target: PruneTarget
    bn_recalibration: bool
    train_storage: str
    scaling: Scaling = Scaling()
    finetune_all: bool = False
    plans: Optional[dict] = None  # arm → ArmPlan dict, for the fine-tune experiment


def pruning_trial(config: dict, ctx: TrialContext) -> None:
    """The Tune function trainable for every controller step the ``RatioSearcher`` suggests."""
    started = time.time()
    actor = ray.get_actor(actor_name(ctx.run_id, config["step"] % ctx.actors))
    rec = ray.get(actor.measure.remote(config["ratios"]))
    accepted = rec["delta_g"] <= ctx.tau
    tune.report({"kind": "step", "arm": "step", "step": config["step"], "r": config["r"],
                 "delta_g": rec["delta_g"], "accepted": accepted, "macs": rec["macs"], "params": rec["params"],
                 "pid": rec["pid"], "actor": rec["actor"], "ray_train": False, "started": started,
                 "finished": time.time()})
    if ctx.finetune_all and accepted:
        _finetune(ctx, started, "adaptive", config["ratios"], config["r"], step=config["step"])


def finetune_trial(config: dict, ctx: TrialContext) -> None:
    """The Tune function trainable of one arm's fine-tune (the ``finetune`` experiment)."""
    plan = ctx.plans[config["arm"]]
    _finetune(ctx, time.time(), config["arm"], plan["ratios"], plan["r"])


def _finetune(ctx: TrialContext, started: float, arm: str, ratios: Any, r: float,
              step: Optional[int] = None) -> None:
    label = f"fine-tune {arm}" + (f" step {step}" if step is not None else "")
    _, _, metrics = fit(ModelCard.from_dict(ctx.card), ctx.state_ref, ctx.data_ref, TrainConfig.from_dict(ctx.finetune),
                        ctx.scaling, ctx.train_storage, name=f"finetune-{arm}-{r:.4f}-{os.getpid()}",
                        arm=ArmJob(ratios, ctx.calibration_ref, ctx.target, ctx.bn_recalibration),
                        progress=(ctx.run_id, label))
    tune.report({"kind": "finetune", "arm": arm, "step": step, "r": r, "macs": metrics["macs"],
                 "params": metrics["params"], "delta_g": metrics["delta_g"], "ray_train": True,
                 "top1": metrics["top1"], "top1_before_finetune": metrics["top1_before_finetune"],
                 "delta_g_after": metrics["delta_g_after"], "checkpoint_path": metrics["checkpoint_path"],
                 "train_device": metrics["device"], "train_gpu_ids": ",".join(metrics.get("gpu_ids") or []),
                 "pid": os.getpid(), "started": started, "finished": time.time()})
