"""Tune trials: controller steps answered by the probe actors, fine-tunes through Ray Train.

A controller step asks one resident probe actor to prune with the allocation, recalibrate and
measure ΔG, and reports at once: no model reload and no Ray Train launch. A fine-tune trial
(r* and the comparison arms) gets its pruned model from an actor, fine-tunes it in a
``TorchTrainer`` launched inside the trial (DDP across workers, checkpoints through
``ray.train.Checkpoint``), then reports top-1, MACs, params and ΔG after fine-tuning.
"""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune

from ..core.config import TrainConfig
from ..core.method import GC_GRID, gc_ratio, ratio_for_macs
from ..core.pruning import ModelCard
from .probes import actor_name
from .training import Scaling, fit


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs besides its config; passed once with ``tune.with_parameters``."""

    run_id: str
    actors: int
    tau: float
    r_max: float
    card: dict
    finetune: dict  # TrainConfig as a dict
    data_ref: Any  # ObjectRef of (train set, test set), fitted to the model
    train_storage: str
    scaling: Scaling = Scaling()
    finetune_all: bool = False


def _actor(ctx: TrialContext, key: int) -> ray.actor.ActorHandle:
    return ray.get_actor(actor_name(ctx.run_id, key % ctx.actors))


def pruning_trial(config: dict, ctx: TrialContext) -> None:
    """The Tune function trainable for every trial the ``RatioSearcher`` suggests."""
    started = time.time()
    if config["kind"] == "step":
        actor = _actor(ctx, config["step"])
        rec = ray.get(actor.measure.remote(config["ratios"]))
        accepted = rec["delta_g"] <= ctx.tau
        tune.report({"kind": "step", "arm": "step", "step": config["step"], "r": config["r"],
                     "delta_g": rec["delta_g"], "accepted": accepted, "macs": rec["macs"], "params": rec["params"],
                     "pid": rec["pid"], "actor": rec["actor"], "ray_train": False, "started": started,
                     "finished": time.time()})
        if ctx.finetune_all and accepted:
            _finetune(config, ctx, started, ratios=config["ratios"], r=config["r"])
        return
    ratios, r = _arm_ratios(config, ctx)
    _finetune(config, ctx, started, ratios=ratios, r=r)


def _arm_ratios(config: dict, ctx: TrialContext) -> tuple[Any, float]:
    """The pruning of each arm; GC and uniform are decided here from training data only."""
    arm = config["arm"]
    if arm == "adaptive":
        return config["ratios"], config["r"]
    if arm == "baseline":
        return 0.0, 0.0
    actors = [_actor(ctx, i) for i in range(ctx.actors)]
    if arm == "gc":
        grid = [float(g) for g in GC_GRID if g <= ctx.r_max]
        recs = ray.get([actors[i % len(actors)].measure.remote(r) for i, r in enumerate(grid)])
        r = gc_ratio({g: rec["delta_g"] for g, rec in zip(grid, recs)})
        return r, r
    if arm == "uniform":
        target = config.get("target_macs")
        if not target:
            return 0.0, 0.0
        r = ratio_for_macs(target, lambda q: ray.get(actors[0].size.remote(q))["macs"], ctx.r_max)
        return r, r
    raise ValueError(f"unknown arm {arm!r}")


def _finetune(config: dict, ctx: TrialContext, started: float, ratios: Any, r: float) -> None:
    actor = _actor(ctx, zlib.crc32(config["arm"].encode()))
    pruned = ray.get(actor.prune.remote(ratios))
    base = {"kind": "finetune", "arm": config["arm"], "step": config.get("step"), "r": r,
            "macs": pruned["macs"], "params": pruned["params"], "delta_g_before": pruned["delta_g"],
            "started": started}
    if config["kind"] == "finetune":
        tune.report({**base, "delta_g": pruned["delta_g"], "ray_train": False, "phase": "pruned"})
    state, metrics = fit(ModelCard.from_dict(ctx.card), pruned["history"], pruned["state_dict"], ctx.data_ref,
                         TrainConfig.from_dict(ctx.finetune), ctx.scaling, ctx.train_storage,
                         name=f"finetune-{config['arm']}-{r:.4f}-{os.getpid()}",
                         progress=(ctx.run_id, f"fine-tune {config['arm']}" + (f" step {config['step']}"
                                                                               if config["kind"] == "step" else "")))
    dg_after = ray.get(actor.delta_of.remote(pruned["history"], state))
    tune.report({**base, "delta_g": pruned["delta_g"], "ray_train": True, "phase": "finetuned",
                 "top1": metrics["top1"], "top1_before_finetune": metrics["top1_before"], "delta_g_after": dg_after,
                 "checkpoint_path": metrics["checkpoint_path"], "train_device": metrics["device"],
                 "finished": time.time()})
