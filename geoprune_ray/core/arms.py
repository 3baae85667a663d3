"""The comparison's arms (METHOD.md §7), one registry: an arm is one decorated function in this file.

Each ``@register_arm`` function chooses its arm's pruning once the controller has stopped (from training data only:
the run's τ, r*, Adaptive GC's allocation and measurements of pruned copies of the base) and returns an ``ArmPlan``.
The registration carries the rest of what the arm is: its label in tables and plots, its colour, its fixed budget
(GC's τ = 0.07; Adaptive GC's is the run's τ), and whether its fine-tuned model is timed in the speed stage. The
registry's order is the order of the paper's table; a job runs the arms its spec names (``default_arms()`` when it
names none), Adaptive GC first. ``core.protocol.settle_arms`` settles them; the report, the evidence table, the
summary's arms rows and the job spec's check all read the registry.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Callable, Mapping, Optional

from .config import MethodConfig
from ..errors import GeopruneError
from .method import GC_BUDGET, GC_GRID, allocate, gc_ratio, match_macs

log = logging.getLogger("geoprune_ray")

# ``measure_many(list of ratios, size_only=False) → list of {"delta_g", "macs", "params", ...}`` (only MACs and
# params with ``size_only``): how a path measures pruned copies of the base model
MeasureMany = Callable[..., list[dict[str, Any]]]


@dataclass
class ArmPlan:
    """How an arm prunes, settled before any fine-tune starts (its ΔG and size measured on the base)."""

    arm: str
    r: float  # the arm's global ratio (r* for Adaptive GC, the uniform ratio otherwise)
    ratios: Any  # per-group dict, or one float for every group
    delta_g: float
    macs: int
    params: int
    budget: Optional[float] = None
    match: Optional[dict[str, Any]] = None  # Uniform L2: the MACs match (gap, adjusted groups)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ArmPlan":
        return cls(**data)


@dataclass(frozen=True)
class Settling:
    """What an arm's choice may use: the method's decisions, the base's size, a way to measure pruned copies, and
    Adaptive GC's plan (settled first)."""

    r_star: float
    adaptive_ratios: Mapping[str, float]  # Adaptive GC's per-group ratios at r* (empty: nothing pruned)
    budget: float  # τ
    channels: Mapping[str, int]
    cfg: MethodConfig
    measure_many: MeasureMany
    base_macs: int
    base_params: int
    at_r_star: Optional[Mapping[str, Any]] = None  # the controller's measured step at r* (``protocol.step_at``)
    adaptive: Optional[ArmPlan] = None
    budgets: Mapping[str, float] = field(default_factory=dict)  # the method's τ_L per group (its allocation's weights)
    # (importance, global ratio) → per-group ratios by torch-pruning's global ranking (``pruning.global_allocation``)
    global_ratios: Optional[Callable[[str, float], Mapping[str, float]]] = None


@dataclass(frozen=True)
class Arm:
    name: str
    label: str  # in every table and plot
    color: str  # matplotlib colour in the plots
    choose: Callable[[Settling], ArmPlan]
    budget: Optional[float] = None  # a fixed ΔG budget; None: the run's τ (Adaptive GC) or no budget
    timed: bool = True  # its fine-tuned model is timed against the base as deployed (the speed stage)


ARMS: dict[str, Arm] = {}
ADAPTIVE = "adaptive"  # the method itself: every job runs it, and the others are settled after it


def register_arm(name: str, label: str, color: str, budget: Optional[float] = None, timed: bool = True):
    """Register an arm's ``choose(Settling) → ArmPlan`` under ``name`` (the name job specs and tables use)."""

    def deco(choose: Callable[[Settling], ArmPlan]) -> Callable[[Settling], ArmPlan]:
        ARMS[name] = Arm(name, label, color, choose, budget, timed)
        return choose

    return deco


def arm_names() -> tuple[str, ...]:
    """Every registered arm, in the table's order."""
    return tuple(ARMS)


def default_arms() -> tuple[str, ...]:
    """What a job runs when its spec names no arms: every arm, Adaptive GC first (fine-tunes start in this order)."""
    return (ADAPTIVE, *(name for name in ARMS if name != ADAPTIVE))


def arm(name: str) -> Arm:
    """The registered arm ``name``, or the allocation arm it names (``ALLOCATION@Cx``, ``compression_arm``)."""
    if name in ARMS:
        return ARMS[name]
    parsed = parse_compression_arm(name)
    if parsed is None:
        raise KeyError(name)
    return _compression_arm(*parsed)


def is_arm(name: str) -> bool:
    return name in ARMS or parse_compression_arm(name) is not None


def label(name: str, default: Optional[str] = None) -> Optional[str]:
    return arm(name).label if is_arm(name) else default


def color(name: str, default: str) -> str:
    return arm(name).color if is_arm(name) else default


# ---------------------------------------------------------------- the arms, in the table's order


@register_arm("baseline", "Baseline", "tab:gray")
def _baseline(s: Settling) -> ArmPlan:
    """Unpruned: the base model given the same fine-tune as every arm."""
    return ArmPlan("baseline", 0.0, 0.0, 0.0, s.base_macs, s.base_params)


@register_arm("gc", f"GC (τ = {GC_BUDGET:g})", "tab:orange", budget=GC_BUDGET)
def _gc(s: Settling) -> ArmPlan:
    """The paper's fixed-budget arm: the largest grid ratio whose uniform pruning keeps ΔG within τ = 0.07."""
    grid = [float(g) for g in GC_GRID if g <= s.cfg.r_max]
    recs = s.measure_many(grid)
    r = gc_ratio({g: rec["delta_g"] for g, rec in zip(grid, recs)}, GC_BUDGET)
    rec = recs[grid.index(r)] if r else {"delta_g": 0.0, "macs": s.base_macs, "params": s.base_params}
    return ArmPlan("gc", r, r, rec["delta_g"], rec["macs"], rec["params"], GC_BUDGET)


@register_arm(ADAPTIVE, "Adaptive GC", "tab:blue")
def _adaptive(s: Settling) -> ArmPlan:
    """The method: the per-group allocation at r* (its ΔG taken from the controller's step at r* when it has one)."""
    if s.at_r_star is not None and s.adaptive_ratios:
        rec = s.at_r_star
    else:
        (rec,) = s.measure_many([s.adaptive_ratios or 0.0])
    return ArmPlan(ADAPTIVE, s.r_star, dict(s.adaptive_ratios), rec["delta_g"], rec["macs"], rec["params"], s.budget)


@register_arm("uniform", "Uniform L2", "tab:green")
def _uniform(s: Settling) -> ArmPlan:
    """One L2 ratio for every group, moved to within ±1% of Adaptive GC's MACs (METHOD.md §7); where integer channel
    counts allow no closer match, the gap reached is recorded and a warning says so."""
    adaptive = s.adaptive
    if adaptive.macs >= s.base_macs:
        return ArmPlan("uniform", 0.0, 0.0, 0.0, s.base_macs, s.base_params, match={"gap": 0.0, "adjusted": {}})

    return matched_plan(s, "uniform", "Uniform L2", adaptive.macs, "Adaptive GC's MACs")


def matched_plan(s: Settling, name: str, label: str, target: float, what: str,
                 allocation: Optional[Callable[[float], Mapping[str, float]]] = None) -> ArmPlan:
    """The plan of an allocation (default one ratio for every group) bisected to ``target`` MACs within ±1%
    (``method.match_macs``), measured once; where integer channel counts allow no closer match, the gap reached is
    recorded and a warning says so."""

    def macs_of(ratios: Mapping[str, float] | float) -> float:
        return s.measure_many([ratios], size_only=True)[0]["macs"]

    m = match_macs(target, macs_of, s.channels, s.cfg.r_max, round_to=s.cfg.round_to, allocation=allocation)
    if not m.within:
        log.warning("%s reached %+.2f%% of %s, not ±1%%: integer channel counts allow no closer match (recorded in "
                    "the arms table)", label, 100 * m.gap, what)
    (rec,) = s.measure_many([m.ratios])
    return ArmPlan(name, m.ratio, m.ratios, rec["delta_g"], rec["macs"], rec["params"],
                   match={"gap": m.gap, "adjusted": m.adjusted, "within": m.within, "macs_target": target})


# ---------------------------------------------------------------- allocations at a fixed compression (issue 16)
#
# Does the method's allocation win where allocation matters, and against what users already have? An allocation
# turns one number into per-group ratios; ``ALLOCATION@Cx`` (``tau@2x``, ``lamp@4x``) is the arm that prunes the
# base with it to C× fewer MACs (within ±1%, or the gap recorded), with the run's rounding and the same fine-tune as
# every arm. Nothing in the method's own decisions changes: these arms are settled after Adaptive GC, from the same
# measurements.


@dataclass(frozen=True)
class Allocation:
    name: str
    label: str
    color: str
    ratios: Callable[[Settling, float], Mapping[str, float]]  # (settling, its one number) → per-group ratios


ALLOCATIONS: dict[str, Allocation] = {}


def register_allocation(name: str, label: str, color: str):
    """Register ``ratios(Settling, x) → per-group ratios`` as an allocation arms can compress with."""

    def deco(ratios: Callable[[Settling, float], Mapping[str, float]]):
        ALLOCATIONS[name] = Allocation(name, label, color, ratios)
        _compression_arm.cache_clear()
        return ratios

    return deco


def compression_arm(allocation: str, compression: float) -> str:
    """The arm name of ``allocation`` at ``compression``× fewer MACs: ``tau@2x``, ``lamp@2.5x``."""
    return f"{allocation}@{compression:g}x"


def parse_compression_arm(name: str) -> Optional[tuple[str, float]]:
    """(allocation, compression) of an arm name ``ALLOCATION@Cx`` (C > 1), None for any other name."""
    allocation, at, times = name.partition("@")
    if not at or allocation not in ALLOCATIONS or not times.endswith("x"):
        return None
    try:
        compression = float(times[:-1])
    except ValueError:
        return None
    return (allocation, compression) if 1 < compression < float("inf") else None


def _global(importance_name: str) -> Callable[[Settling, float], Mapping[str, float]]:
    def ratios(s: Settling, x: float) -> Mapping[str, float]:
        if s.global_ratios is None:
            raise GeopruneError("a global allocation needs the base model to rank channels",
                                "settle allocation arms through the pipeline, which passes global_ratios")
        return s.global_ratios(importance_name, x)
    return ratios


@lru_cache(maxsize=None)
def _compression_arm(allocation: str, compression: float) -> Arm:
    alloc = ALLOCATIONS[allocation]
    name = compression_arm(allocation, compression)

    def choose(s: Settling) -> ArmPlan:
        return matched_plan(s, name, alloc.label, s.base_macs / compression, f"the base's MACs ÷ {compression:g}",
                            allocation=lambda x: alloc.ratios(s, x))

    return Arm(name, f"{alloc.label} at {compression:g}×", alloc.color, choose)


register_allocation("tau", "τ_L weights", "tab:blue")(
    lambda s, x: allocate(x, s.budgets, s.channels, s.cfg.r_max))  # the method's allocation (METHOD.md §5)
register_allocation("uniform", "Uniform L2", "tab:green")(lambda s, x: {g: x for g in s.channels})
register_allocation("magnitude", "Global magnitude", "tab:red")(_global("l2"))  # GroupMagnitudeImportance(p=2)
register_allocation("lamp", "LAMP", "tab:brown")(_global("lamp"))  # LAMPImportance(p=2)
