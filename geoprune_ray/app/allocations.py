"""Evidence where allocation matters (issue 16): the allocation arms at fixed compressions, over seeds.

A run whose job sets ``protocol.compressions`` has one arm per allocation and compression (``tau@2x``, ``lamp@4x``:
``core.arms``), all at the same MACs within ±1% (or their gap recorded), the same rounding and the same fine-tune.
From the per-seed evidence records (``app.evidence.collect``) this renders:
- per compression and allocation, mean ± sample std over seeds before and after fine-tuning;
- each allocation's paired difference against the method's τ_L weights, with per-seed signs;
- ΔG as a ranking of allocations: per seed, Spearman(ΔG before fine-tune, top-1 drop after fine-tune) over every
  allocation × compression model, with a one-sided permutation p-value (``scipy.stats.permutation_test``), the mean
  over seeds, and the same within each compression (descriptive only);
- the r* check: the compression the method chose beside the largest measured compression of its own allocation whose
  fine-tuned top-1 stays within 0.5 and 1.0 points of the fine-tuned baseline, and r*'s spread over seeds;
- ``allocations.png``: top-1 after fine-tuning against the MACs reduction, one line per allocation, r* marked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from ..core.arms import ALLOCATIONS
from .cells import measured_cells, pm

PERMUTATIONS = 9999  # resamples of the permutation test (seeded: the table re-renders identically)
WITHIN = (0.5, 1.0)  # the r* check's tolerances, in top-1 points below the fine-tuned baseline


def has_allocations(records: Sequence[dict[str, Any]]) -> bool:
    return any(a.get("compression") for r in records for a in r["arms"])


def _compression_arms(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in record["arms"] if a.get("compression")]


def compressions(records: Sequence[dict[str, Any]]) -> list[float]:
    return sorted({a["compression"] for r in records for a in _compression_arms(r)})


def _reference_top1(record: dict[str, Any]) -> float:
    """The fine-tuned baseline's top-1 (the Baseline arm after the shared fine-tune), else the baseline's own."""
    baseline = next((a for a in record["arms"] if a["arm"] == "baseline"), None)
    return baseline["top1"] if baseline else record["baseline"]["top1"]


def _reduction(record: dict[str, Any], arm: dict[str, Any]) -> float:
    return record["baseline"]["macs"] / (arm["macs_m"] * 1e6)


def spearman_test(x: Sequence[float], y: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    """Spearman's rho and its one-sided permutation p-value (rho > 0), None where it is undefined."""
    import numpy as np
    from scipy import stats

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None, None

    def rho(a, b):
        return stats.spearmanr(a, b).statistic

    res = stats.permutation_test((np.asarray(x, float), np.asarray(y, float)), rho, permutation_type="pairings",
                                 n_resamples=PERMUTATIONS, alternative="greater", rng=np.random.default_rng(0))
    return float(res.statistic), float(res.pvalue)


def delta_g_ranking(record: dict[str, Any], compression: Optional[float] = None) -> dict[str, Any]:
    """Spearman(ΔG before fine-tune, top-1 drop after fine-tune) over the record's allocation arms (at one
    ``compression``, or all of them): does ΔG rank different allocations at the same MACs by their accuracy?"""
    arms = [a for a in _compression_arms(record) if compression is None or a["compression"] == compression]
    ref = _reference_top1(record)
    rho, p = spearman_test([a["delta_g"] for a in arms], [ref - a["top1"] for a in arms])
    return {"n": len(arms), "rho": rho, "p": p}


def r_star_check(record: dict[str, Any]) -> dict[str, Any]:
    """The compression r* gave (the Adaptive GC arm) beside the largest measured compression whose fine-tuned top-1
    stays within each of ``WITHIN`` points of the fine-tuned baseline: ``within_T`` on the method's own allocation
    (its arms at fixed compressions and Adaptive GC itself), ``any_within_T`` on every pruned arm of the run (where a
    user free to pick any allocation would stop), with ``any_within_T_arm`` naming it."""
    ref = _reference_top1(record)
    adaptive = next(a for a in record["arms"] if a["arm"] == "adaptive")
    pruned = [(_reduction(record, a), a) for a in record["arms"] if a["arm"] != "baseline"]
    out = {"r_star": record["r_star"], "reduction": _reduction(record, adaptive), "top1": adaptive["top1"],
           "reference_top1": ref}
    for tol in WITHIN:
        ok = [(c, a) for c, a in pruned if a["top1"] >= ref - tol]
        own = [c for c, a in ok if a is adaptive or a.get("allocation") == "tau"]
        out[f"within_{tol:g}"] = max(own) if own else None
        best = max(ok, key=lambda ca: ca[0], default=(None, {"method": None}))
        out[f"any_within_{tol:g}"], out[f"any_within_{tol:g}_arm"] = best[0], best[1]["method"]
    return out


def _signs(values: Sequence[float]) -> str:
    return ", ".join(f"{d:+.2f}" for d in values)


def render(records: Sequence[dict[str, Any]]) -> list[str]:
    """The allocation section's markdown lines (empty when no record has allocation arms)."""
    if not has_allocations(records):
        return []
    levels = compressions(records)
    lines = ["", "## Allocations at fixed compression", "",
             "Each allocation prunes the same base to the same MACs (within ±1%, or the gap shown), with the same "
             "rounding and the same fine-tune as every arm. τ_L weights is the method's allocation (METHOD.md §5), "
             "bisected to the MACs instead of stopped by the controller. Mean ± sample std over seeds.", "",
             "| compression | allocation | MACs reduction | MACs gap | ΔG before fine-tune | top-1 before fine-tune (%) | "
             "top-1 after fine-tune (%) | ΔG after fine-tune |", "|---|---|---|---|---|---|---|---|"]
    for c in levels:
        for name, alloc in ALLOCATIONS.items():
            rows = [(r, a) for r in records for a in _compression_arms(r)
                    if a["allocation"] == name and a["compression"] == c]
            if rows:
                gaps = [100 * a.get("macs_gap", float("nan")) for _, a in rows]
                lines.append(f"| {c:g}× | {alloc.label} | {pm([_reduction(r, a) for r, a in rows])}× | "
                             f"{pm(gaps)}% | {measured_cells([a for _, a in rows])} "
                             f"{pm([a['delta_g_after'] for _, a in rows], 4)} |")
    lines += ["", "Paired against τ_L weights at the same compression (percentage points, the allocation minus τ_L "
              "weights; negative: τ_L weights ahead), per seed:", "",
              "| compression | allocation | before fine-tune | after fine-tune | τ_L weights ahead after |",
              "|---|---|---|---|---|"]
    for c in levels:
        for name, alloc in ALLOCATIONS.items():
            if name == "tau":
                continue
            pairs = []
            for r in records:
                arm = {a["allocation"]: a for a in _compression_arms(r) if a["compression"] == c}
                if name in arm and "tau" in arm:
                    pairs.append((arm[name], arm["tau"]))
            if not pairs:
                continue
            before = [a["top1_before_finetune"] - t["top1_before_finetune"] for a, t in pairs]
            after = [a["top1"] - t["top1"] for a, t in pairs]
            lines.append(f"| {c:g}× | {alloc.label} | {pm(before)} ({_signs(before)}) | {pm(after)} "
                         f"({_signs(after)}) | {sum(d < 0 for d in after)} of {len(after)} |")
    lines += ["", "ΔG as a ranking of allocations: Spearman(ΔG before fine-tune, top-1 drop after fine-tune), with a "
              f"one-sided permutation p-value ({PERMUTATIONS} permutations). Over all allocations and compressions "
              "it also sees that more compression hurts more; within one compression (n = 4, descriptive only) it "
              "asks only whether ΔG ranks allocations at the same MACs.", "",
              "| seed | all (n) | p | " + " | ".join(f"at {c:g}×" for c in levels) + " |",
              "|---|---|---|" + "---|" * len(levels)]
    overall = []
    per_level: dict[float, list[Optional[float]]] = {c: [] for c in levels}
    for r in records:
        every = delta_g_ranking(r)
        overall.append(every["rho"])
        cells = []
        for c in levels:
            rho = delta_g_ranking(r, c)["rho"]
            per_level[c].append(rho)
            cells.append("n/a" if rho is None else f"{rho:.2f}")
        lines.append(f"| {r['seed']} | {_fmt(every['rho'])} ({every['n']}) | {_fmt(every['p'], 4)} | "
                     + " | ".join(cells) + " |")
    lines.append(f"| mean | {pm(overall)} | | " + " | ".join(pm(per_level[c]) for c in levels) + " |")
    checks = [r_star_check(r) for r in records]
    lines += ["", "The r* check: the compression the controller's r* gave (Adaptive GC) beside the largest measured "
              "compression whose fine-tuned top-1 stays within 0.5 and 1.0 points of the fine-tuned baseline, of the "
              "method's allocation (its arms above and Adaptive GC) and of any pruned arm of the run (where a user "
              "free to pick the allocation would stop; the arm named). The measured compressions are r*'s, those "
              "above and GC's and Uniform L2's.", "",
              "| seed | r* | its MACs reduction | its top-1 after (%) | fine-tuned baseline (%) | method's largest within "
              "0.5 | method's largest within 1.0 | any arm's largest within 0.5 | any arm's largest within 1.0 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r, c in zip(records, checks):
        anyone = [_times(c[f"any_within_{t:g}"]) + (f" ({c[f'any_within_{t:g}_arm']})" if c[f"any_within_{t:g}_arm"]
                                                     else "") for t in WITHIN]
        lines.append(f"| {r['seed']} | {c['r_star']:.3f} | {c['reduction']:.2f}× | {c['top1']:.2f} | "
                     f"{c['reference_top1']:.2f} | {_times(c['within_0.5'])} | {_times(c['within_1'])} | "
                     + " | ".join(anyone) + " |")
    lines += ["", f"r* over seeds: {pm([c['r_star'] for c in checks], 3)} (MACs reduction "
              f"{pm([c['reduction'] for c in checks])}×)."]
    return lines


def render_r_star_stability(records: Sequence[dict[str, Any]]) -> list[str]:
    """How far baseline noise alone moves τ and r*: for each seed of the method (its calibration sample and probe
    ratios) run on several baselines (``protocol.baseline_seed``), the spread of r* over those baselines against
    its spread over seeds, and whether it exceeds one controller step. Empty unless some seed has several baselines."""
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by_seed.setdefault(r["seed"], []).append(r)
    if not any(len({r.get("baseline_seed", r["seed"]) for r in group}) > 1 for group in by_seed.values()):
        return []
    step = next((r["controller_delta"] for r in records if r.get("controller_delta")), 0.05)
    lines = ["", "## r* and baseline noise", "",
             "Runs that differ only in the baseline (its initialisation and data order, `protocol.baseline_seed`): "
             "the same method seed, so the same calibration sample and probe ratios.", "",
             "| job | seed | baseline seed | baseline top-1 (%) | τ | r* | Adaptive GC MACs reduction | top-1 after (%) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["seed"], r.get("baseline_seed", r["seed"]), r["job"])):
        adaptive = next(a for a in r["arms"] if a["arm"] == "adaptive")
        lines.append(f"| {r['job']} | {r['seed']} | {r.get('baseline_seed', r['seed'])} | "
                     f"{r['baseline']['top1']:.2f} | {r['tau']:.4f} | {r['r_star']:.3f} | "
                     f"{_reduction(r, adaptive):.2f}× | {adaptive['top1']:.2f} |")
    spreads = []
    for seed, group in sorted(by_seed.items()):
        if len(group) > 1:
            stars = [r["r_star"] for r in group]
            spreads.append(max(stars) - min(stars))
            lines.append("")
            lines.append(f"Seed {seed}, {len(group)} baselines: r* {pm(stars, 3)}, range {max(stars) - min(stars):.3f} "
                         f"({'more' if max(stars) - min(stars) > step else 'no more'} than one controller step, "
                         f"δ = {step:g}); τ {pm([r['tau'] for r in group], 4)}.")
    by_baseline: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by_baseline.setdefault(r.get("baseline_seed", r["seed"]), []).append(r)
    for baseline, group in sorted(by_baseline.items()):
        if len({r["seed"] for r in group}) > 1:  # one baseline, several method seeds (calibration sample, probes)
            stars = [r["r_star"] for r in group]
            lines.append(f"Baseline seed {baseline}, {len(group)} method seeds: r* {pm(stars, 3)}, range "
                         f"{max(stars) - min(stars):.3f}.")
    firsts = [next((r for r in group if r.get("baseline_seed", seed) == seed), group[0])["r_star"]
              for seed, group in sorted(by_seed.items())]  # each seed on its own baseline
    if len(firsts) > 1:
        lines.append(f"Over seeds (one baseline each): r* {pm(firsts, 3)}, range {max(firsts) - min(firsts):.3f}.")
    if spreads:
        lines.append(f"Baseline noise alone moves r* by up to {max(spreads):.3f}, "
                     f"{'more than' if max(spreads) > step else 'within'} one controller step.")
    return lines


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _times(value: Optional[float]) -> str:
    return "none" if value is None else f"{value:.2f}×"


def plot(records: Sequence[dict[str, Any]], path: str | Path) -> Optional[Path]:
    """``allocations.png``: top-1 after fine-tuning against the MACs reduction, one line per allocation (mean over
    seeds, sample std as error bars), Adaptive GC at r* marked per seed. None when there is nothing to plot."""
    if not has_allocations(records):
        return None
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, alloc in ALLOCATIONS.items():
        xs, ys, errs = [], [], []
        for c in compressions(records):
            top1 = [a["top1"] for r in records for a in _compression_arms(r)
                    if a["allocation"] == name and a["compression"] == c]
            if top1:
                xs.append(c)
                ys.append(statistics.fmean(top1))
                errs.append(statistics.stdev(top1) if len(top1) > 1 else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, color=alloc.color, label=alloc.label)
    stars = [(c["reduction"], c["top1"]) for c in map(r_star_check, records)]
    ax.scatter([s[0] for s in stars], [s[1] for s in stars], marker="*", s=160, color="black", zorder=5,
               label="Adaptive GC at r* (each seed)")
    refs = [_reference_top1(r) for r in records]
    ax.axhline(statistics.fmean(refs), color="gray", linestyle="--", linewidth=1, label="fine-tuned baseline")
    ax.set_xlabel("MACs reduction (×)")
    ax.set_ylabel("top-1 after fine-tuning (%)")
    ax.set_title("Allocations at the same MACs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


__all__ = ["compressions", "delta_g_ranking", "has_allocations", "plot", "r_star_check", "render",
           "render_r_star_stability", "spearman_test"]
