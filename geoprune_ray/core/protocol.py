"""The protocol (METHOD.md §7), once: every step both paths take, and the summary they write.

baseline → G_noise, probes → τ → sensitivity → τ_L → controller → every arm's ratios → fine-tune
each arm → evaluate. ``core.reference.adaptive_prune`` runs these steps in one process;
``distributed.pipeline`` runs the same functions and supplies only how the work is mapped (probe
actors, sensitivity tasks, Tune trials, Ray Train workers). What differs between the two paths is
where a measurement runs, never what is measured or how a decision is taken.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from .artifact import ModelCard
from .config import MethodConfig, TrainConfig
from .data import Dataset
from .deploy import DEFAULT as DEFAULT_DEPLOY
from .geometry import GeometryMeter
from . import arms as arm_registry
from .arms import ArmPlan, MeasureMany, Settling
from .method import Controller, PruneTarget, allocate, initial_ratio, layer_budgets, tau, weighted_ratio
from .pruning import macs_params, prune_copy
from .train import evaluate, train

log = logging.getLogger("geoprune_ray")
SCHEMA_VERSION = 1
# Imported from here before issue 14; kept for one release (the arms live in ``core.arms``).
ARMS = arm_registry.default_arms()
ARM_LABELS = {name: arm.label for name, arm in arm_registry.ARMS.items()}


# ---------------------------------------------------------------- search: τ, τ_L, the controller


def probe_rows(ratios: Sequence[float], records: Sequence[Mapping[str, Any]], seed: int) -> list[dict[str, Any]]:
    """One row per probe (METHOD.md §4): its ratio, seed and what was measured, with how many channels it removed."""
    return [{"probe": m, "ratio": r, "seed": seed, **rec} for m, (r, rec) in enumerate(zip(ratios, records))]


def spearman(x: list[float], y: list[float]) -> Optional[float]:
    """Spearman's rank correlation (ties get average ranks); None when either side is constant."""
    import pandas as pd

    rho = pd.Series(x, dtype=float).corr(pd.Series(y, dtype=float), method="spearman")
    return None if math.isnan(rho) else float(rho)


def removed_nothing(probes: Sequence[Mapping[str, Any]], base_macs: int) -> int:
    """How many probes were too small to remove a channel anywhere (METHOD.md §4: they stay in the sample)."""
    return sum(1 for p in probes if p["macs"] >= base_macs)


def budget_from_probes(noise: float, probes: Sequence[Mapping[str, Any]], cfg: MethodConfig, base_macs: int) -> float:
    """τ from the probe sample; says how many probes removed no channel."""
    budget = tau(noise, [p["delta_g"] for p in probes], cfg.beta)
    empty = removed_nothing(probes, base_macs)
    if empty:
        log.info("%d of %d probes removed no channel (ΔG = 0): kept in τ's sample", empty, len(probes))
    return budget


def epsilon_of(noise: float, cfg: MethodConfig) -> float:
    return noise if cfg.epsilon is None else cfg.epsilon


def group_budgets(budget: float, sensitivities: Mapping[str, float], noise: float,
                  cfg: MethodConfig) -> dict[str, float]:
    """τ_L for every group (ε defaults to G_noise)."""
    return layer_budgets(budget, sensitivities, epsilon_of(noise, cfg))


def new_controller(cfg: MethodConfig, probes: Sequence[Mapping[str, Any]], budget: float) -> Controller:
    """The r controller, started at r_0 from the probes."""
    r0 = min(initial_ratio(probes, budget, cfg.r0_default), cfg.r_max)
    return Controller(budget, r0, cfg.r_max, cfg.delta, cfg.gamma, cfg.controller, cfg.t_max, cfg.bisect_min_delta)


def replay_controller(ctl: Controller, steps: list[dict[str, Any]], complete: bool = True) -> Controller:
    """The controller's trajectory, re-derived from the step trials (deterministic given their ΔG). A step without
    a trial counts as failed; with ``complete=False`` the replay stops there instead (an interrupted experiment)."""
    by_step: dict[int, dict] = {}
    for row in steps:
        if row.get("delta_g") is not None and not (isinstance(row["delta_g"], float) and math.isnan(row["delta_g"])):
            by_step.setdefault(int(row["step"]), row)
    while ctl.propose() is not None:
        row = by_step.get(len(ctl.steps))
        if row is None and not complete:
            break
        ctl.observe(row["delta_g"] if row else math.inf, log_step=False, macs=row and row["macs"],
                    params=row and row["params"], trial_id=row and row["trial_id"], failed=row is None)
    return ctl


def r_star_of(ctl: Controller) -> float:
    """r* of a stopped controller; warns when no step stayed within τ."""
    if ctl.r_star == 0.0:
        log.warning("no controller step stayed within τ = %.4f: the model is returned unpruned", ctl.budget)
    return ctl.r_star


def final_ratios(r_star: float, budgets: Mapping[str, float], channels: Mapping[str, int],
                 cfg: MethodConfig) -> dict[str, float]:
    return allocate(r_star, budgets, channels, cfg.r_max) if r_star > 0 else {}


def controller_record(ctl: Controller, cfg: MethodConfig) -> dict[str, Any]:
    r0 = ctl.steps[0]["r"] if ctl.steps else ctl.r
    return {"mode": cfg.controller, "r0": r0, "steps": ctl.steps, "stop_reason": ctl.stop_reason,
            "r_star": ctl.r_star}


# ---------------------------------------------------------------- arms: every arm's ratios, from training data


def step_at(ctl: Controller, r: float) -> Optional[dict[str, Any]]:
    """The controller's measured step at ratio ``r`` with its ΔG, MACs and params, if it has one: it pruned the base
    with ``allocate(r, …)``, the same allocation as the final ratios at r* (``final_ratios``)."""
    step = next((s for s in ctl.steps if s.get("measured") and s["r"] == r), None)
    if step is None or step.get("macs") is None or step.get("params") is None:
        return None
    return {"delta_g": step["delta_g"], "macs": step["macs"], "params": step["params"]}


def settle_arms(arms: Sequence[str], r_star: float, adaptive: Mapping[str, float], budget: float,
                channels: Mapping[str, int], cfg: MethodConfig, measure_many: MeasureMany,
                base_macs: int, base_params: int, at_r_star: Optional[Mapping[str, Any]] = None,
                budgets: Optional[Mapping[str, float]] = None,
                global_ratios: Optional[Callable[[str, float], Mapping[str, float]]] = None) -> dict[str, ArmPlan]:
    """Every arm's pruning (METHOD.md §7), each chosen by its entry in ``core.arms``: Adaptive GC first (its
    allocation at r*), then the others in the table's order, then the allocation arms at fixed compressions in the
    order given. ``at_r_star``: the controller's step at r* (``step_at``), which measured Adaptive GC's allocation
    already: it is not measured again. ``budgets`` (τ_L) and ``global_ratios`` (``pruning.global_allocation`` on the
    base) are what the allocation arms need."""
    s = Settling(r_star, adaptive, budget, channels, cfg, measure_many, base_macs, base_params, at_r_star,
                 budgets=budgets or {}, global_ratios=global_ratios)
    plans = {arm_registry.ADAPTIVE: arm_registry.ARMS[arm_registry.ADAPTIVE].choose(s)}
    s = replace(s, adaptive=plans[arm_registry.ADAPTIVE])
    order = [*(name for name in arm_registry.ARMS if name in arms), *(a for a in arms if a not in arm_registry.ARMS)]
    for name in order:
        if name not in plans:
            plans[name] = arm_registry.arm(name).choose(s)
    return {arm: plans[arm] for arm in arms}


# ---------------------------------------------------------------- fine-tune one arm


@dataclass
class ArmResult:
    """One arm after fine-tuning: accuracy before and after, size, ΔG before and after."""

    top1_before_finetune: float
    top1: float
    macs: int
    params: int
    delta_g: float
    delta_g_after: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ArmResume:
    """Where a fine-tune that was interrupted stands, from its checkpoint: the pruned model rebuilt from its history
    (``pruning.replay_pruning``) with the checkpoint's weights, what was measured before fine-tuning
    (``top1_before_finetune``, ``delta_g``) and the training state ``core.train.train`` resumes from."""

    model: nn.Module
    history: list
    before: Mapping[str, float]
    train_state: Mapping[str, Any]


def finetune_arm(base: nn.Module, ratios: Mapping[str, float] | float, meter: GeometryMeter, target: PruneTarget,
                 train_set: Dataset, test_set: Dataset, cfg: TrainConfig, device: torch.device,
                 wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
                 on_epoch: Optional[Callable[[int, dict, dict], None]] = None, rank: int = 0, world_size: int = 1,
                 on_pruned: Optional[Callable[[nn.Module, list, dict], None]] = None,
                 resume: Optional[ArmResume] = None) -> tuple[nn.Module, list, ArmResult]:
    """Prune a copy of the (recalibrated) base, recalibrate, measure, fine-tune, measure again.

    ΔG before fine-tuning recalibrates the pruned copy's BN in place, so the fine-tune starts from sound
    statistics; ΔG after is measured on a copy, so the returned weights are the fine-tuned ones.
    ``wrap`` turns the model into what is trained (DDP on a Ray Train worker); ``on_pruned`` sees the pruned
    model, its history and what was measured before fine-tuning, before training (what a worker checkpoints each
    epoch). Given ``resume``, nothing is pruned or measured again: its model is fine-tuned from its epoch on, and
    the result reports the measures it carries (taken once, before the interruption)."""
    if resume is None:
        pruned, history = prune_copy(base, ratios, target.input_shape, target.num_classes, target.importance,
                                     target.round_to)
        pruned.to(device)
        before = {"delta_g": meter.delta(pruned)}
        before["top1_before_finetune"] = evaluate(pruned, test_set, device)["top1"]
    else:
        pruned, history, before = resume.model.to(device), resume.history, dict(resume.before)
    if on_pruned is not None:
        on_pruned(pruned, history, before)
    train(wrap(pruned), train_set, cfg, device, on_epoch=on_epoch, rank=rank, world_size=world_size,
          resume=resume.train_state if resume is not None else None)
    after = evaluate(pruned, test_set, device)["top1"]
    dg_after = meter.delta(copy.deepcopy(pruned))
    macs, params = macs_params(pruned, target.input_shape)
    return pruned, history, ArmResult(before["top1_before_finetune"], after, macs, params, before["delta_g"],
                                      dg_after)


# ---------------------------------------------------------------- the summary both paths write


def arm_row(plan: ArmPlan, result: Mapping[str, Any]) -> dict[str, Any]:
    """One row of the paper's table (Method | Top-1 | Params | MACs | ΔG), with what the arm was given."""
    row = {"method": arm_registry.arm(plan.arm).label, "arm": plan.arm, "r": plan.r, "top1": result["top1"],
           "top1_before_finetune": result["top1_before_finetune"], "params_m": result["params"] / 1e6,
           "macs_m": result["macs"] / 1e6, "delta_g": result["delta_g"], "delta_g_after": result["delta_g_after"],
           "budget": plan.budget}
    if plan.match is not None:
        row["macs_gap"] = plan.match.get("gap")
        row["adjusted_groups"] = len(plan.match.get("adjusted", {}))
    at = arm_registry.parse_compression_arm(plan.arm)
    if at is not None:
        row["allocation"], row["compression"] = at
    return row


def summary(card: ModelCard, train_set: Dataset, test_set: Dataset, calibration_size: int, cfg: MethodConfig,
            baseline_cfg: Optional[TrainConfig], finetune_cfg: TrainConfig, noise: float, budget: float,
            probes: Sequence[Mapping[str, Any]], ctl: Controller, channels: Mapping[str, int],
            adaptive: ArmPlan, result: Mapping[str, Any], base: Mapping[str, Any], timings: Mapping[str, float],
            provenance: Mapping[str, Any], deploy: str = DEFAULT_DEPLOY) -> dict[str, Any]:
    """The summary's common part: what the method decided and what the Adaptive GC model measures. ``deploy``: the
    target the channel counts were rounded for (``core.deploy``; ``cfg.round_to`` is the multiple used)."""
    ratios = adaptive.ratios if isinstance(adaptive.ratios, Mapping) else {}
    return {
        "schema_version": SCHEMA_VERSION,
        "model": card.to_dict(),
        "dataset": {"name": train_set.name, "train_size": len(train_set), "test_size": len(test_set),
                    "calibration_size": calibration_size},
        "config": {"method": cfg.to_dict(), "epsilon_used": epsilon_of(noise, cfg), "deploy": deploy,
                   "baseline": baseline_cfg.to_dict() if baseline_cfg else None, "finetune": finetune_cfg.to_dict()},
        "g_noise": noise,
        "tau": budget,
        "probes_removing_nothing": removed_nothing(probes, base["macs"]),
        "controller": controller_record(ctl, cfg),
        "baseline": dict(base),
        "pruned": {"r_star": ctl.r_star, "mean_ratio": weighted_ratio(ratios, channels) if ratios else 0.0,
                   "top1_before_finetune": result["top1_before_finetune"], "top1": result["top1"],
                   "macs": result["macs"], "params": result["params"],
                   "delta_g_before_finetune": result["delta_g"], "delta_g_after_finetune": result["delta_g_after"],
                   "macs_ratio": result["macs"] / base["macs"], "params_ratio": result["params"] / base["params"]},
        "timings_s": dict(timings),
        "provenance": dict(provenance),
    }
