"""Tune trials of the one experiment: controller steps answered by the probe actors, the arms' fine-tunes through Ray
Train.

A controller step (whose trial may start before τ is known and wait on the run's progress board for its ratio) asks
one resident probe actor to prune with the allocation, recalibrate and
measure ΔG, and reports at once: no model reload and no Ray Train launch. A fine-tune trial runs
one arm: it launches a Ray Train run inside the trial (DDP across workers), whose worker loads
the base model, the data and the calibration set, waits for its arm's ratios on the run's
progress board (a fine-tune handed out while the controller runs waits there until the driver has
settled the arms), then prunes, measures ΔG and top-1 before, fine-tunes, and measures again.
Fine-tune trials need no actor, so the arms run side by side on what the search gave back.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import ray
from ray import tune

from ..core.config import PruneTarget
from .holder import actor_name
from .progress import board_name
from .scaling import ArmJob, Scaling

# What a trial imports up front is torch-free: a controller step's trial only calls a probe actor, so its process
# starts in about a second; a fine-tune's imports torch, torch-pruning and Ray Train when it launches its run.


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs besides its config; passed once with ``tune.with_parameters``."""

    run_id: str
    actors: int
    card: dict
    finetune: dict  # TrainConfig as a dict
    data_ref: Any  # ObjectRef of (train set, test set), fitted to the model
    state_ref: Any  # ObjectRef of the base model's state_dict
    calibration_ref: Any  # ObjectRef of the Calibration
    target: PruneTarget
    bn_recalibration: bool
    train_storage: str
    scaling: Scaling = Scaling()  # a step's own fine-tune (finetune_all), beside the actors
    finetune_all: bool = False
    arm_scaling: Optional[Scaling] = None  # an arm's fine-tune (default: ``scaling``)
    early: int = 0  # fine-tunes launched beside the steps
    reference_ref: Any = None  # ObjectRef of the base's Reference (G₀ measured once by the driver), or None


def search_trial(config: dict, ctx: TrialContext) -> None:
    """The experiment's Tune function trainable: a controller step or an arm's fine-tune, by ``config["kind"]``."""
    if config["kind"] == "finetune":
        finetune_trial(config, ctx)
    else:
        pruning_trial(config, ctx)


def pruning_trial(config: dict, ctx: TrialContext) -> None:
    """A controller step the ``RatioSearcher`` suggested."""
    launched = started = time.time()
    if config["r"] is None:  # handed out before τ was known: the searcher delivers the step on the progress board
        from .searcher import step_key

        board = ray.get_actor(board_name(ctx.run_id))
        config = {**config, **ray.get(board.value.remote(step_key(tune.get_context().get_trial_id())))}
        if config.get("no_step"):  # the controller had converged already (a resumed run): nothing to measure
            tune.report({"kind": "step", "arm": "step", "step": None, "r": None, "delta_g": float("nan")})
            return
        started = time.time()
    index = config["step"] % ctx.actors
    actor = ray.get_actor(actor_name(ctx.run_id, index))
    rec = ray.get(actor.measure.remote(config["ratios"], None, step_threads(ctx, config.get("pool_threads", ()), index)))
    accepted = rec["delta_g"] <= config["tau"]  # τ comes with the step: the experiment starts before it is known
    tune.report({"kind": "step", "arm": "step", "step": config["step"], "r": config["r"],
                 "delta_g": rec["delta_g"], "accepted": accepted, "macs": rec["macs"], "params": rec["params"],
                 "pid": rec["pid"], "actor": rec["actor"], "threads": rec["threads"], "ray_train": False,
                 "launched": launched, "started": started,
                 "finished": time.time()})
    if ctx.finetune_all and accepted:
        _finetune(ctx, started, "adaptive", ArmJob(config["ratios"], ctx.calibration_ref, ctx.target,
                                                   ctx.bn_recalibration, reference_ref=ctx.reference_ref), ctx.scaling,
                  step=config["step"], r=config["r"])


def step_threads(ctx: TrialContext, pool_threads: Sequence[int], index: int) -> int:
    """Torch threads for a step on probe actor ``index``: the pool's on its node (``pool_threads``, from
    ``ProbePool.step_threads`` through the searcher: steps come one at a time) where
    nothing else runs on those cores, i.e. no fine-tune was launched beside the steps or every such fine-tune has
    started up and waits for its plan; else 0, the actor's own. A fine-tune starting up beside a step with two
    threads made both slower on 2 cores (bench run 17)."""
    if not pool_threads:
        return 0
    if ctx.early:
        try:
            waiting = ray.get(ray.get_actor(board_name(ctx.run_id)).waiting_for_plans.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - no board, or it does not answer: the actor's own threads
            return 0
        if waiting < ctx.early:
            return 0
    return pool_threads[index]


def finetune_trial(config: dict, ctx: TrialContext) -> None:
    """One arm's fine-tune; its ratios come from the run's progress board."""
    arm = config["arm"]
    if config.get("after_search"):  # started beside the search: its Ray Train start-up would slow the search down
        from .searcher import SEARCHED

        ray.get(ray.get_actor(board_name(ctx.run_id)).value.remote(SEARCHED))
    job = ArmJob(None, ctx.calibration_ref, ctx.target, ctx.bn_recalibration, board=board_name(ctx.run_id), arm=arm,
                 reference_ref=ctx.reference_ref)
    _finetune(ctx, time.time(), arm, job, ctx.arm_scaling or ctx.scaling)


def _finetune(ctx: TrialContext, started: float, arm: str, job: ArmJob, scaling: Scaling,
              step: Optional[int] = None, r: Optional[float] = None) -> None:
    from ..core.config import TrainConfig
    from .launch import fit

    label = f"fine-tune {arm}" + (f" step {step}" if step is not None else "")
    # one name per arm (and step) in the run's storage: a trial run again after a crash finds its Ray Train run's
    # checkpoints under it and goes on from the last one (``training``: a checkpoint of another config is not used)
    name = f"finetune-{arm}" + (f"-step{step}" if step is not None else "")
    _, _, metrics = fit(ctx.card, ctx.state_ref, ctx.data_ref, TrainConfig.from_dict(ctx.finetune), scaling,
                        ctx.train_storage, name=name, arm=job, progress=(ctx.run_id, label), weights=False)
    tune.report({"kind": "finetune", "arm": arm, "step": step, "r": metrics.get("r", r), "macs": metrics["macs"],
                 "params": metrics["params"], "delta_g": metrics["delta_g"], "ray_train": True,
                 "top1": metrics["top1"], "top1_before_finetune": metrics["top1_before_finetune"],
                 "delta_g_after": metrics["delta_g_after"], "checkpoint_path": metrics["checkpoint_path"],
                 "resumed_from_epoch": metrics.get("resumed_from_epoch", 0),
                 "train_device": metrics["device"], "train_gpu_ids": ",".join(metrics.get("gpu_ids") or []),
                 "pid": os.getpid(), "launched": started, "started": metrics.get("plan_received", started),
                 "finished": time.time()})
