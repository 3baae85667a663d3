"""Reports rendered from a run directory's artifacts alone: ``report.md`` and PNG plots.

Each ``plot_*`` function takes the rows it draws (as read from the parquet files and
``summary.json``) and returns a matplotlib ``Figure``; ``render_report`` writes them under
``plots/`` and links them from ``report.md``. A batch report puts several runs side by side.
"""

from __future__ import annotations

import io
import math
from typing import Any, Iterable, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ..core import arms as arm_registry  # noqa: E402
from ..core.deploy import MIN_REPEATS, deployed_rows, slow_reason  # noqa: E402
from ..core.rundir import RunDir  # noqa: E402
from ..errors import GeopruneError  # noqa: E402

PLOTS = ("probes", "probe_accuracy", "trajectory", "groups", "accuracy_macs", "speed", "accuracy_latency", "timeline")


def _nothing_removed(count: Optional[int]) -> str:
    """METHOD.md §4: a probe too small to remove a channel stays in τ's sample (ΔG = 0); the report says how many."""
    if not count:
        return ""
    return f", {count} of which removed no channel (ΔG = 0, kept in the sample as METHOD.md §4 rules)"


def _fmt_rho(rho: Optional[float]) -> str:
    return "n/a" if rho is None else f"{rho:.3f}"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_probes(probes: Sequence[dict], g_noise: float, tau: float) -> Figure:
    """The ΔG probe sample against the probe ratio, with G_noise and τ marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p["ratio"] for p in probes], [p["delta_g"] for p in probes], color="tab:blue", zorder=3,
               label=f"probes (M = {len(probes)})")
    ax.axhline(g_noise, color="tab:gray", linestyle=":", label=f"G_noise = {g_noise:.4f}")
    ax.axhline(tau, color="tab:red", linestyle="--", label=f"τ = G_noise + β·std(ΔG) = {tau:.4f}")
    ax.set(xlabel="probe pruning ratio", ylabel="ΔG (after BN recalibration)", title="ΔG probe sample")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_probe_accuracy(probes: Sequence[dict], rho: Optional[float]) -> Figure:
    """Each probe's top-1 drop (test split, after BN recalibration, no fine-tuning) against its ΔG."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p["delta_g"] for p in probes], [p["top1_drop"] for p in probes], color="tab:blue", zorder=3,
               label=f"probes (M = {len(probes)})")
    ax.set(xlabel="ΔG (after BN recalibration)", ylabel="top-1 drop (points, before fine-tuning)",
           title="Probes: geometry change vs accuracy drop" + (f" (Spearman ρ = {rho:.3f})" if rho is not None else ""))
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_trajectory(steps: Sequence[dict], tau: float) -> Figure:
    """The controller's trajectory: r_t (top) and ΔG_t against τ (bottom), step by step."""
    steps = sorted((s for s in steps if _finite(s.get("delta_g"))), key=lambda s: s["step"])
    fig, (ax_r, ax_g) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    x = [s["step"] for s in steps]
    ax_r.plot(x, [s["r"] for s in steps], marker="o", color="tab:blue", label="r_t")
    ax_r.set(ylabel="pruning ratio r_t", title="Controller trajectory")
    ax_r.grid(alpha=0.3)
    accepted = [s for s in steps if s["accepted"]]
    rejected = [s for s in steps if not s["accepted"]]
    ax_g.plot(x, [s["delta_g"] for s in steps], color="tab:gray", alpha=0.5)
    ax_g.scatter([s["step"] for s in accepted], [s["delta_g"] for s in accepted], marker="o", color="tab:green",
                 zorder=3, label="accepted (ΔG ≤ τ)")
    ax_g.scatter([s["step"] for s in rejected], [s["delta_g"] for s in rejected], marker="x", color="tab:red",
                 zorder=3, label="rejected (ΔG > τ)")
    ax_g.axhline(tau, color="tab:red", linestyle="--", label=f"τ = {tau:.4f}")
    ax_g.set(xlabel="controller step t", ylabel="ΔG_t")
    ax_g.set_xticks(x)
    ax_g.legend(fontsize=8)
    ax_g.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_groups(groups: Sequence[dict]) -> Figure:
    """Per-group pruning ratios at r*, with each group's kept/total channels: which layers the method spares."""
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(groups) + 2), 4))
    x = range(len(groups))
    bars = ax.bar(x, [g["ratio"] for g in groups], color="tab:blue")
    for bar, g in zip(bars, groups):
        kept = g["channels"] - round(g["channels"] * g["ratio"])
        ax.annotate(f"{kept}/{g['channels']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7, rotation=90 if len(groups) > 12 else 0)
    ax.set_xticks(list(x), [g["group"] for g in groups], rotation=90 if len(groups) > 12 else 0, fontsize=7)
    top = max([g["ratio"] for g in groups] + [0.05])
    ax.set(xlabel="dependency group (root layer)", ylabel="pruning ratio", ylim=(0, top * 1.3),
           title="Per-group ratios at r* (labels: kept / total channels)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_accuracy_macs(finetuned: Sequence[dict]) -> Figure:
    """Top-1 after fine-tuning against MACs, for every fine-tuned trial (arms and, if any, accepted steps)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    by_label: dict[str, list[dict]] = {}
    for t in finetuned:
        by_label.setdefault(t.get("arm") or "step", []).append(t)
    for i, (label, rows) in enumerate(by_label.items()):
        name = arm_registry.label(label, "accepted step (fine-tuned)")
        ax.scatter([t["macs"] / 1e6 for t in rows], [t["top1"] for t in rows], s=50, zorder=3, alpha=0.8,
                   color=arm_registry.color(label, "tab:purple"), label=name)
        for t in rows:  # named in place: arms at the same point (GC at r = 0 and Baseline) stay visible
            ax.annotate(name if arm_registry.is_arm(label) else f"r={t['r']:.3f}", (t["macs"] / 1e6, t["top1"]),
                        xytext=(6, 4 + 9 * (i % 3)), textcoords="offset points", fontsize=7)
    ax.set(xlabel="MACs (M)", ylabel="top-1 after fine-tuning (%)", title="Accuracy vs compute")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_speed(speed: dict) -> Figure:
    """Measured throughput of the base and every timed model, one panel per batch size (medians)."""
    if speed.get("version", 1) < 2:
        return _plot_speed_v1(speed)
    rows = deployed_rows(speed)
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(3.4 * len(batches), 3.6), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        at = [r for r in rows if r["batch"] == batch]
        ax.bar(range(len(at)), [r["throughput"] for r in at],
               color=[arm_registry.color(r["model"], "black" if r["model"] == "base" else "tab:purple") for r in at])
        ax.set_xticks(range(len(at)), [_model_label(r["model"]) for r in at], rotation=30, ha="right", fontsize=7)
        for i, r in enumerate(at):
            ax.annotate(f"{r['speedup']:.2f}×", (i, r["throughput"]), ha="center", va="bottom", fontsize=7)
        ax.set(title=f"batch {batch}", ylabel="images / s")
        ax.grid(axis="y", alpha=0.3)
    first = rows[0] if rows else {}
    fig.suptitle(f"Inference as deployed ({speed['deploy']}): {speed['device_name']}, {first.get('precision')}, "
                 f"{first.get('engine')}{_threads_of(first)}; speed-up over the base above each bar", fontsize=9)
    fig.tight_layout()
    return fig


def _plot_speed_v1(speed: dict) -> Figure:
    """A run from before issue 15: the base against the Adaptive GC architecture."""
    rows = speed["rows"]
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.5))
    axes = list(axes) if len(rows) > 1 else [axes]
    for ax, row in zip(axes, rows):
        ax.bar([0, 1], [row["base_throughput"], row["pruned_throughput"]], color=["tab:gray", "tab:blue"])
        ax.set_xticks([0, 1], ["base", "pruned"])
        ax.set(title=f"batch {row['batch']}: speed-up {row['speedup']:.2f}×", ylabel="images / s")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Inference on {speed['device_name']} ({_threads(speed)}), medians of repeated timings", fontsize=10)
    fig.tight_layout()
    return fig


def plot_accuracy_latency(finetuned: Sequence[dict]) -> Figure:
    """Top-1 after fine-tuning against measured latency at batch 1, for every fine-tuned trial that was timed."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, t in enumerate(finetuned):
        name = arm_registry.label(t.get("arm") or "", None) if t["kind"] == "finetune" else f"step {t['step']}"
        color = arm_registry.color(t.get("arm") or "", "tab:purple") if t["kind"] == "finetune" else "tab:purple"
        ax.scatter([t["latency_ms"]], [t["top1"]], s=50, zorder=3, alpha=0.8, color=color)
        ax.annotate(name or t.get("arm"), (t["latency_ms"], t["top1"]), xytext=(6, 4 + 9 * (i % 3)),
                    textcoords="offset points", fontsize=7)
    ax.set(xlabel="latency at batch 1 (ms), as deployed", ylabel="top-1 after fine-tuning (%)",
           title="Accuracy vs measured latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _model_label(name: str) -> str:
    return arm_registry.label(name, name)


def _threads_of(row: dict) -> str:
    t = row.get("threads")
    return "" if t is None else f", {t} thread{'s' if t != 1 else ''}"


def _timeline_row(stage: str) -> str:
    """Controller steps share one row; each fine-tune, stage and span has its own."""
    return "controller steps" if stage.startswith("step ") else stage


def plot_timeline(timeline: Sequence[dict]) -> Figure:
    """The run's stages, spans and trials on one time axis (a Gantt chart): what ran at the same time."""
    rows: list[str] = []
    for item in timeline:
        if _timeline_row(item["stage"]) not in rows:
            rows.append(_timeline_row(item["stage"]))
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.2))
    for item in timeline:
        y = rows.index(_timeline_row(item["stage"]))
        arm = item["stage"].removeprefix("fine-tune ")
        color = arm_registry.color(arm, "tab:purple" if item["stage"].startswith("step ") else "tab:cyan")
        ax.barh(y, max(item["end"] - item["start"], 0.05), left=item["start"], color=color, height=0.6)
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set(xlabel="seconds from the start of the run", title="Stages on one time axis")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def timeline_table(timeline: Sequence[dict]) -> str:
    lines = ["| stage | start (s) | end (s) | seconds |", "|---|---|---|---|"]
    lines += [f"| {t['stage']} | {t['start']:.1f} | {t['end']:.1f} | {t['end'] - t['start']:.1f} |" for t in timeline]
    return "\n".join(lines)


def _threads(speed: dict) -> str:
    return f"{speed['threads']} CPU thread{'s' if speed['threads'] != 1 else ''}"


def _millions(value: float) -> str:
    return f"{value:.3f}" if value >= 1 else f"{value:.4f}"


def figures(summary: dict, probes: list[dict], groups: list[dict], trials: list[dict]) -> dict[str, Figure]:
    finetuned = [t for t in trials if _finite(t.get("top1")) and _finite(t.get("macs"))]
    figs = {"probes": plot_probes(probes, summary["g_noise"], summary["tau"]),
            **({"probe_accuracy": plot_probe_accuracy(probes, summary["probe_accuracy"]["spearman_delta_g_top1_drop"])}
               if summary.get("probe_accuracy") else {}),
            "trajectory": plot_trajectory([t for t in trials if t["kind"] == "step"], summary["tau"]),
            "groups": plot_groups(groups),
            "accuracy_macs": plot_accuracy_macs(finetuned)}
    if summary.get("speed") and (summary["speed"].get("version", 1) < 2 or summary["speed"]["rows"]):
        figs["speed"] = plot_speed(summary["speed"])
    timed = [t for t in finetuned if _finite(t.get("latency_ms"))]
    if timed:
        figs["accuracy_latency"] = plot_accuracy_latency(timed)
    if summary.get("timeline"):
        figs["timeline"] = plot_timeline(summary["timeline"])
    return figs


def read_run(run: RunDir) -> tuple[dict, list[dict], list[dict], list[dict]]:
    missing = [n for n in ("summary.json", "probes.parquet", "sensitivity.parquet", "trials.parquet")
               if not run.exists(n)]
    if missing:
        raise GeopruneError(f"{run.location} is not a finished geoprune run directory (no {', '.join(missing)})",
                            "pass the --storage folder of a run that finished, or resume it with 'geoprune resume'")
    return (run.read_json("summary.json"), run.read_table("probes.parquet"), run.read_table("sensitivity.parquet"),
            run.read_table("trials.parquet"))


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def arms_table(arms: Iterable[dict]) -> str:
    """The paper-style table: Method | Top-1 | Params (M) | MACs (M) | ΔG, with each arm's latency and throughput as
    deployed beside its MACs where the run timed them."""
    arms = list(arms)
    timed = any(row.get("latency_ms") is not None for row in arms)
    batch = next((row["speed_batch"] for row in arms if row.get("speed_batch")), None)
    head = "| Method | Top-1 (%) | Params (M) | MACs (M) | ΔG |"
    if timed:
        head += f" Latency b1 (ms) | img/s b{batch} | Speed-up b{batch} |"
    lines = [head, "|" + "---|" * head.count(" |")]
    for row in arms:
        line = (f"| {row['method']} | {row['top1']:.2f} | {_millions(row['params_m'])} | {_millions(row['macs_m'])} | "
                f"{row['delta_g']:.4f} |")
        if timed:
            line += (f" {row['latency_ms']:.3f} | {row['throughput']:.0f} | {row['speedup']:.2f}× |"
                     if row.get("latency_ms") is not None else " | | |")
        lines.append(line)
    return "\n".join(lines)


def _macs_match(arms: Iterable[dict]) -> list[str]:
    """How close Uniform L2 came to Adaptive GC's MACs (METHOD.md §7: ±1%), said whether or not it got there."""
    lines = []
    for row in arms:
        if row.get("macs_gap") is None:
            continue
        gap = row["macs_gap"]
        moved = f", {row['adjusted_groups']} group(s) moved off the one ratio" if row.get("adjusted_groups") else ""
        verdict = ("within ±1%" if abs(gap) <= 0.01 else
                   "**not within ±1%**: integer channel counts (and the rounding) allow no closer match")
        lines += [f"{row['method']} matched Adaptive GC's MACs to {100 * gap:+.2f}% ({verdict}{moved}).", ""]
    return lines


def speed_table(speed: dict) -> str:
    """Every timing of the speed stage: model, engine, precision, threads, batch, latency, throughput, the speed-up
    over the base and that speed-up as a fraction of the MACs reduction."""
    if speed.get("version", 1) < 2:
        return _speed_table_v1(speed)
    lines = ["| Model | Engine | Precision | Threads | Batch | Latency (ms) | img/s | Speed-up | MACs reduction | "
             "Speed-up / MACs reduction |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in speed["rows"]:
        lines.append(f"| {_model_label(r['model'])} | {r['engine']} | {r['precision']} | {r['threads'] or ''} | "
                     f"{r['batch']} | {r['latency_ms']:.3f} | {r['throughput']:.0f} | {r['speedup']:.2f}× | "
                     f"{_times(r.get('macs_reduction'))} | {_fraction(r.get('speedup_per_macs'))} |")
    return "\n".join(lines)


def speed_notes(speed: dict) -> list[str]:
    """One line per model whose speed-up as deployed falls well below its MACs reduction, and why."""
    notes = []
    for r in deployed_rows(speed):
        reason = slow_reason(r)
        if reason is not None:
            notes.append(f"- {_model_label(r['model'])}, batch {r['batch']}: {r['speedup']:.2f}× for "
                         f"{r['macs_reduction']:.2f}× fewer MACs ({r['speedup_per_macs']:.2f} of it): {reason}.")
    return notes


def _times(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}×"


def _fraction(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}"


def _speed_table_v1(speed: dict) -> str:
    lines = ["| Batch | Base latency (ms) | Pruned latency (ms) | Base img/s | Pruned img/s | Speed-up |",
             "|---|---|---|---|---|---|"]
    for r in speed["rows"]:
        lines.append(f"| {r['batch']} | {r['base_latency_ms']:.3f} | {r['pruned_latency_ms']:.3f} | "
                     f"{r['base_throughput']:.0f} | {r['pruned_throughput']:.0f} | {r['speedup']:.2f}× |")
    return "\n".join(lines)


def speed_section(speed: dict, macs_ratio: float) -> list[str]:
    """report.md's "Inference speed" section."""
    if speed.get("version", 1) < 2:
        return ["## Inference speed", "", f"Medians of repeated timings on {speed['device_name']} ({speed['device']}, "
                f"{_threads(speed)}); MACs ratio ×{macs_ratio:.3f}.", "", _speed_table_v1(speed), ""]
    if not speed["measured"]:
        return ["## Inference speed", "", f"Deploy target **{speed['deploy']}**: {speed['reason']}.", ""]
    threads = (f", {' and '.join(str(t) for t in speed['threads'])} CPU thread(s)" if speed.get("threads") else "")
    return ["## Inference speed", "",
            f"Deploy target **{speed['deploy']}** ({speed['precision']}), timed after the last fine-tune on "
            f"{speed['device_name']} ({speed['device']}{threads}): medians of at least {MIN_REPEATS} timed passes "
            "after warm-up, every model's passes taking turns. Speed-up is over the unpruned base; the last column "
            "is that speed-up as a fraction of the model's MACs reduction (1: the time fell as much as the MACs).",
            "", speed_table(speed), "", *speed_notes(speed),
            *[f"- {engine} not timed: {why}." for engine, why in (speed.get("skipped") or {}).items()], ""]


def markdown(summary: dict, trials: list[dict], groups: list[dict], plots: Sequence[str]) -> str:
    s, p, b, c = summary, summary["pruned"], summary["baseline"], summary["controller"]
    job = s["job"]
    lines = [f"# geoprune run {s['run_id']}: {job['name']}", "",
             f"**{s['model']['arch']}** (width {job['model']['width']}) on **{s['dataset']['name']}** "
             f"({s['dataset']['train_size']} train / {s['dataset']['test_size']} test images, "
             f"{s['dataset']['calibration_size']} calibration images).", "",
             "## Result", "",
             f"- r* = **{c['r_star']:.4f}** after {len(c['steps'])} controller steps ({c['stop_reason']}); "
             f"channel-weighted mean ratio {p['mean_ratio']:.4f}.",
             f"- G_noise = {s['g_noise']:.4f}, τ = {s['tau']:.4f} (β = {s['config']['method']['beta']}), from "
             f"{s['config']['method']['probes']} probes{_nothing_removed(s.get('probes_removing_nothing'))}.",
             *([f"- Probes on the test split (before fine-tuning): Spearman(ΔG, top-1 drop) = "
                f"{_fmt_rho(s['probe_accuracy']['spearman_delta_g_top1_drop'])}, against the unpruned model's "
                f"{s['probe_accuracy']['base_top1']:.2f}%."] if s.get("probe_accuracy") else []),
             f"- MACs {b['macs'] / 1e6:.3f} M → {p['macs'] / 1e6:.3f} M (×{p['macs_ratio']:.3f}); "
             f"params {b['params'] / 1e6:.4f} M → {p['params'] / 1e6:.4f} M (×{p['params_ratio']:.3f}).",
             f"- Top-1 {b['top1']:.2f}% (baseline) → {p['top1_before_finetune']:.2f}% (pruned) → "
             f"**{p['top1']:.2f}%** after fine-tuning.",
             f"- ΔG {p['delta_g_before_finetune']:.4f} before fine-tuning (≤ τ), "
             f"{p['delta_g_after_finetune']:.4f} after.", "",
             "## Comparison", "", arms_table(s["arms"]), "", *_macs_match(s["arms"]),
             "All arms share one fine-tune recipe: "
             f"{s['config']['finetune']['epochs']} epochs, batch {s['config']['finetune']['batch_size']}, "
             f"lr {s['config']['finetune']['lr']:g}. No decision looked at the test split.", ""]
    if s.get("speed"):
        lines += speed_section(s["speed"], p["macs_ratio"])
    steps = sorted((t for t in trials if t["kind"] == "step"), key=lambda t: t["step"])
    lines += ["## Controller steps", "", "| t | r_t | ΔG_t | accepted | MACs (M) |", "|---|---|---|---|---|"]
    for t in steps:
        dg = f"{t['delta_g']:.4f}" if _finite(t.get("delta_g")) else "failed"
        macs = f"{t['macs'] / 1e6:.3f}" if _finite(t.get("macs")) else ""
        lines.append(f"| {t['step']} | {t['r']:.4f} | {dg} | {'yes' if t.get('accepted') else 'no'} | {macs} |")
    lines += ["", "## Per-group ratios", "", "| group | channels | ΔG_L | τ_L | ratio | kept |", "|---|---|---|---|---|---|"]
    for g in groups:
        kept = g["channels"] - round(g["channels"] * g["ratio"])
        lines.append(f"| {g['group']} | {g['channels']} | {g['delta_g']:.4f} | {g['tau_l']:.3f} | {g['ratio']:.4f} | "
                     f"{kept} |")
    lines += ["", "## Plots", ""]
    captions = {"probes": "ΔG probe sample with G_noise and τ", "probe_accuracy": "Probes: ΔG vs top-1 drop",
                "trajectory": "Controller trajectory",
                "groups": "Per-group pruning ratios", "accuracy_macs": "Top-1 vs MACs of fine-tuned trials",
                "speed": "Inference throughput as deployed, every arm against the base",
                "accuracy_latency": "Top-1 vs measured latency of fine-tuned trials",
                "timeline": "Stages on one time axis"}
    lines += [f"![{captions[name]}](plots/{name}.png)" for name in plots]
    if s.get("timeline"):  # start and end of each stage: what overlapped (plots/timeline.png draws it)
        lines += ["", "## Stage times", "", timeline_table(s["timeline"])]
    elif s.get("timings_s"):
        lines += ["", "## Stage times", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in s["timings_s"].items()]
    prov = s["provenance"]
    lines += ["", "## Provenance", "", ", ".join(f"{k}: {v}" for k, v in prov.items() if not isinstance(v, dict)), ""]
    return "\n".join(lines)


def render_report(run: RunDir | str) -> str:
    """Write ``plots/*.png`` and ``report.md`` into the run directory; returns report.md's location."""
    run = RunDir(run) if isinstance(run, str) else run
    summary, probes, groups, trials = read_run(run)
    figs = figures(summary, probes, groups, trials)
    for name, fig in figs.items():
        run.write_bytes(f"plots/{name}.png", _png(fig))
    run.write_bytes("report.md", markdown(summary, trials, groups, list(figs)).encode())
    return run.uri("report.md")


# -- batches -------------------------------------------------------------------------------------

def batch_rows(runs: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per (run, arm): the combined table of a batch."""
    rows = []
    for name, summary in runs.items():
        base_macs = summary["baseline"]["macs"]
        for arm in summary["arms"]:
            rows.append({"run": name, "arch": summary["model"]["arch"], "dataset": summary["dataset"]["name"],
                         "method": arm["method"], "arm": arm["arm"], "top1": arm["top1"], "params_m": arm["params_m"],
                         "macs_m": arm["macs_m"], "macs_ratio": arm["macs_m"] * 1e6 / base_macs,
                         "delta_g": arm["delta_g"], "r_star": summary["controller"]["r_star"], "tau": summary["tau"]})
    return rows


def plot_batch(rows: Sequence[dict]) -> Figure:
    """Architectures side by side: top-1 against the fraction of MACs kept, one panel per run."""
    runs = list(dict.fromkeys(r["run"] for r in rows))
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.8), squeeze=False)
    for ax, name in zip(axes[0], runs):
        for r in (r for r in rows if r["run"] == name):
            ax.scatter([r["macs_ratio"]], [r["top1"]], s=50, color=arm_registry.color(r["arm"], "tab:purple"),
                       label=r["method"], zorder=3)
        ax.set(title=name, xlabel="MACs kept (fraction of baseline)", ylabel="top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def render_batch(out: RunDir, runs: dict[str, dict]) -> str:
    """``batch.md``, ``batch.parquet`` and ``plots/batch.png`` for runs (name → summary)."""
    rows = batch_rows(runs)
    out.write_table("batch.parquet", rows)
    out.write_bytes("plots/batch.png", _png(plot_batch(rows)))
    lines = ["# geoprune batch", "", "| Run | Model | Dataset | Method | Top-1 (%) | Params (M) | MACs (M) | MACs kept | ΔG |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['arch']} | {r['dataset']} | {r['method']} | {r['top1']:.2f} | "
                     f"{_millions(r['params_m'])} | {_millions(r['macs_m'])} | {r['macs_ratio']:.3f} | "
                     f"{r['delta_g']:.4f} |")
    lines += ["", "![top-1 vs MACs kept, per architecture](plots/batch.png)", ""]
    lines += [f"- {name}: [report]({name}/report.md)" for name in runs]
    out.write_bytes("batch.md", ("\n".join(lines) + "\n").encode())
    return out.uri("batch.md")
