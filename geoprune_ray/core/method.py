"""The adaptive method (METHOD.md §4-6): probes → τ, sensitivity → τ_L → allocation, the r controller.

The math is small pure functions with the paper's names; the controller is a dataclass whose
state round-trips through ``to_dict``/``from_dict`` (Tune checkpoints it). ``measure`` is the one
unit of work every stage repeats (copy, prune, recalibrate, ΔG): the in-process reference and
the Ray actors both call it.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..errors import GeopruneError
from .config import PruneTarget
from .geometry import GeometryMeter
from .pruning import macs_params, prune_copy

log = logging.getLogger("geoprune_ray")

_RATIO_DIGITS = 6  # ratios are compared after rounding, so 0.1 + 0.05 − 0.025 finds 0.125 again


# ---------------------------------------------------------------- §4 probes and τ


def probe_ratios(count: int, r_probe_max: float, seed: int) -> list[float]:
    """The seeded ladder r_m = r_probe_max · (m − u_m) / M, m = 1..M, u_m ~ U[0, 1)."""
    u = torch.rand(count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return [r_probe_max * (m - float(u[m - 1])) / count for m in range(1, count + 1)]


def tau(noise: float, deltas: Sequence[float], beta: float = 1.0) -> float:
    """τ = G_noise + β · σ(ΔG_1..ΔG_M), σ the population standard deviation."""
    if len(deltas) < 2:
        raise GeopruneError("τ needs at least two probe measurements", "run at least 2 probes")
    return noise + beta * statistics.pstdev(deltas)


def initial_ratio(probes: Sequence[Mapping[str, float]], budget: float, default: float = 0.05) -> float:
    """r_0: the largest probe ratio whose ΔG ≤ τ, or ``default`` if none was."""
    within = [p["ratio"] for p in probes if p["delta_g"] <= budget]
    return round(max(within), _RATIO_DIGITS) if within else default


# ---------------------------------------------------------------- §5 sensitivity and allocation


def layer_budgets(budget: float, sensitivities: Mapping[str, float], epsilon: float) -> dict[str, float]:
    """τ_L = τ / (ΔG_L + ε): sensitive groups get tighter budgets."""
    if epsilon <= 0:
        raise GeopruneError(f"ε = {epsilon} must be positive", "leave epsilon unset (it defaults to G_noise)")
    return {name: budget / (dg + epsilon) for name, dg in sensitivities.items()}


def allocate(r: float, budgets: Mapping[str, float], channels: Mapping[str, int], r_max: float = 0.9) -> dict[str, float]:
    """r_L = clip(r · w_L, 0, r_max), w_L = τ_L / (Σ n_L τ_L / Σ n_L): channel-weighted mean r."""
    total = sum(channels[name] for name in budgets)
    mean_budget = sum(channels[name] * b for name, b in budgets.items()) / total
    return {name: min(max(r * b / mean_budget, 0.0), r_max) for name, b in budgets.items()}


def weighted_ratio(ratios: Mapping[str, float], channels: Mapping[str, int]) -> float:
    """The channel-weighted mean of per-group ratios."""
    total = sum(channels[n] for n in ratios)
    return sum(channels[n] * r for n, r in ratios.items()) / total


# ---------------------------------------------------------------- §6 the r controller


@dataclass
class Controller:
    """The r controller: accepted step → r + δ, rejected → r − γ; ``paper`` or ``bisect`` stopping.

    Drive it with ``while (r := c.propose()) is not None: c.observe(measure(r))``. A ratio
    measured before is answered from the trajectory, not measured again.
    """

    budget: float  # τ
    r: float  # the ratio to measure next (r_0 at the start)
    r_max: float = 0.9
    delta: float = 0.05
    gamma: float = 0.025
    mode: str = "paper"
    t_max: int = 12
    min_delta: float = 0.00625
    steps: list[dict[str, Any]] = field(default_factory=list)
    switches: int = 0
    done: bool = False
    stop_reason: str = ""

    def __post_init__(self) -> None:
        self.r = round(self.r, _RATIO_DIGITS)
        if not 0.0 < self.r <= self.r_max:
            raise GeopruneError(f"initial ratio {self.r} is outside (0, r_max={self.r_max}]",
                                "start the controller inside (0, r_max]")

    def propose(self) -> Optional[float]:
        """The next ratio to measure, or None once the controller has stopped."""
        return None if self.done else self.r

    def observe(self, delta_g: float, log_step: bool = True, **extra: Any) -> dict[str, Any]:
        """Record ΔG measured at ``propose()``'s ratio, advance, and return the recorded step (logged unless
        ``log_step`` is False: a replay of steps already logged)."""
        if self.done:
            raise RuntimeError("the controller has stopped; propose() returned None")
        step = self._advance(delta_g, True, log_step, **extra)
        while not self.done and (seen := self._measured(self.r)) is not None:
            self._advance(seen["delta_g"], False, log_step)
        return step

    def _measured(self, r: float) -> Optional[dict[str, Any]]:
        return next((s for s in self.steps if s["measured"] and s["r"] == r), None)

    def _advance(self, delta_g: float, measured: bool, log_step: bool = True, **extra: Any) -> dict[str, Any]:
        accepted = delta_g <= self.budget
        step = {"step": len(self.steps), "r": self.r, "delta_g": float(delta_g), "accepted": accepted,
                "measured": measured, **extra}
        if self.steps and self.steps[-1]["accepted"] != accepted:
            self.switches += 1
            if self.mode == "bisect":
                self.delta, self.gamma = self.delta / 2, self.gamma / 2
        self.steps.append(step)
        nxt = round(self.r + self.delta if accepted else self.r - self.gamma, _RATIO_DIGITS)
        if log_step:
            log.info("controller step %d: r=%.4f ΔG=%.4f τ=%.4f %s", step["step"], self.r, delta_g, self.budget,
                     "accepted" if accepted else "rejected")
        if self.mode == "paper" and self.switches >= 2:
            self._stop("second switch between accepted and rejected steps")
        elif self.mode == "bisect" and self.delta < self.min_delta:
            self._stop(f"step δ fell below {self.min_delta}")
        elif not 0.0 < nxt <= self.r_max:
            self._stop(f"next ratio {nxt} would leave (0, {self.r_max}]")
        elif len(self.steps) >= self.t_max:
            self._stop(f"reached T_max = {self.t_max} steps")
        else:
            self.r = nxt
        return step

    def _stop(self, reason: str) -> None:
        self.done, self.stop_reason = True, reason

    @property
    def r_star(self) -> float:
        """The largest measured ratio that was accepted (0 when none was)."""
        accepted = [s["r"] for s in self.steps if s["accepted"]]
        return max(accepted) if accepted else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Controller":
        state = dict(data)
        steps = [dict(s) for s in state.pop("steps", [])]
        switches, done, reason = state.pop("switches", 0), state.pop("done", False), state.pop("stop_reason", "")
        ctl = cls(**state)
        ctl.steps, ctl.switches, ctl.done, ctl.stop_reason = steps, switches, done, reason
        return ctl


# ---------------------------------------------------------------- §7 comparison arms


GC_BUDGET = 0.07  # the paper's fixed budget for the GC arm
GC_GRID = tuple(round(0.05 * k, 2) for k in range(1, 19))  # 0.05, 0.10, …, 0.90


def gc_ratio(deltas: Mapping[float, float], budget: float = GC_BUDGET) -> float:
    """GC arm: the largest grid ratio whose uniform ΔG ≤ the fixed budget (0 when none is)."""
    within = [r for r, dg in deltas.items() if dg <= budget]
    return max(within) if within else 0.0


def ratio_for_macs(target_macs: float, macs_at: Callable[[float], float], r_max: float = 0.9,
                   tolerance: float = 0.01, max_steps: int = 30) -> float:
    """Uniform arm, first part: bisect the uniform ratio whose MACs are within ``tolerance`` of ``target_macs``.

    ``macs_at(r)`` is decreasing in r; returns the closest ratio found if the tolerance is not met
    (channel counts are integers, so MACs move in steps: ``match_macs`` closes the rest).
    """
    lo, hi = 0.0, r_max
    best, best_err = 0.0, abs(macs_at(0.0) - target_macs) / target_macs
    for _ in range(max_steps):
        mid = (lo + hi) / 2
        macs = macs_at(mid)
        err = abs(macs - target_macs) / target_macs
        if err < best_err:
            best, best_err = mid, err
        if err <= tolerance:
            break
        lo, hi = (mid, hi) if macs > target_macs else (lo, mid)
    return best


@dataclass
class MacsMatch:
    """The uniform arm's pruning: one ratio for every group, then single groups moved by one channel step."""

    ratio: float  # the bisected uniform ratio
    ratios: dict[str, float]  # per group, what ``prune_copy`` takes (exact kept counts)
    macs: int
    gap: float  # (macs − target) / target
    adjusted: dict[str, int]  # group → kept-channel change against the uniform ratio (+ keeps more)
    within: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def match_macs(target_macs: float, macs_of: Callable[[Mapping[str, float] | float], float],
               channels: Mapping[str, int], r_max: float = 0.9, tolerance: float = 0.01,
               round_to: Optional[int] = None, max_moves: int = 200,
               allocation: Optional[Callable[[float], Mapping[str, float]]] = None) -> MacsMatch:
    """An allocation at a target's MACs: Uniform L2 at Adaptive GC's (METHOD.md §7), or any allocation at a fixed
    compression. Bisect the allocation's one ratio (``allocation(x)``: per-group ratios; default one ratio ``x`` for
    every group), then move single groups' kept counts by one channel (``round_to`` channels where rounding
    applies), largest groups first, until MACs are within ``tolerance``. A move is kept only when it brings MACs
    closer; when no move does, the gap stays and ``within`` is False (the caller warns)."""
    from .pruning import kept_channels, rounding_step

    allocation = allocation or (lambda x: {g: x for g in channels})
    ratio = ratio_for_macs(target_macs, lambda x: macs_of(allocation(x)), r_max, tolerance)
    chosen = allocation(ratio)
    kept = {g: kept_channels(n, chosen.get(g, 0.0), round_to) for g, n in channels.items()}
    base_kept = dict(kept)

    def as_ratios(counts: Mapping[str, int]) -> dict[str, float]:
        return {g: (channels[g] - k) / channels[g] for g, k in counts.items()}

    macs = macs_of(as_ratios(kept))
    err = (macs - target_macs) / target_macs
    order = sorted(channels, key=lambda g: (-channels[g], g))
    moves = 0
    while abs(err) > tolerance and moves < max_moves:
        moved = False
        for g in order:
            step = rounding_step(channels[g], round_to)
            k = kept[g] + (-step if err > 0 else step)  # too many MACs: keep fewer channels
            if not 1 <= k <= channels[g] or (channels[g] - k) / channels[g] > r_max:
                continue
            trial = {**kept, g: k}
            trial_macs = macs_of(as_ratios(trial))
            trial_err = (trial_macs - target_macs) / target_macs
            moves += 1
            if abs(trial_err) < abs(err):
                kept, macs, err, moved = trial, trial_macs, trial_err, True
                if abs(err) <= tolerance:
                    break
        if not moved:
            break
    adjusted = {g: kept[g] - base_kept[g] for g in order if kept[g] != base_kept[g]}
    return MacsMatch(ratio, as_ratios(kept), int(macs), err, adjusted, abs(err) <= tolerance)


# ---------------------------------------------------------------- the unit of work


@dataclass
class Measurement:
    delta_g: float
    macs: int
    params: int
    seconds: float
    top1: Optional[float] = None  # on ``eval_set``, after BN recalibration, before any fine-tuning


def measure(base: nn.Module, meter: GeometryMeter, ratios: Mapping[str, float] | float,
            target: PruneTarget, eval_set: Any = None) -> Measurement:
    """Prune a copy of ``base`` with ``ratios``, recalibrate its BN, and measure ΔG against G₀ (and, given
    ``eval_set``, the recalibrated copy's top-1 on it; ``seconds`` excludes that evaluation)."""
    start = time.perf_counter()
    pruned, _ = prune_copy(base, ratios, target.input_shape, target.num_classes, target.importance, target.round_to)
    dg = meter.delta(pruned)
    macs, params = macs_params(pruned, target.input_shape)
    seconds = time.perf_counter() - start
    top1 = None
    if eval_set is not None:
        from .train import evaluate

        top1 = evaluate(pruned, eval_set, meter.calibration.device)["top1"]
    return Measurement(dg, macs, params, seconds, top1)
