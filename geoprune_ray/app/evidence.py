"""The evidence table: every comparison arm over seeds, from finished runs or from their per-seed JSON.

``collect`` reads one finished run (summary.json, probes.parquet, sensitivity.parquet) into one
plain record: the arms before and after the shared fine-tune, the probes' ΔG and top-1 drop,
τ, G_noise and the per-group ratios. ``render`` turns records (one per seed) into markdown:
mean ± sample std over seeds, the per-seed paired difference Adaptive GC − Uniform L2,
Spearman(ΔG, top-1 drop) over the probes, τ's coefficient of variation, and the ratios the method
chose per group; where the runs have allocation arms at fixed compressions, ``app.allocations``' section and
plot (``allocations.png``). ``geoprune evidence`` writes both; run on a folder of the JSONs it re-renders
the table, which is how the committed results are checked (tests/test_evidence.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from ..core.arms import arm_names
from . import allocations
from .cells import measured_cells, pm, stats
from ..core.rundir import RunDir
from ..errors import GeopruneError

EVIDENCE_VERSION = 1


def collect(location: str | Path) -> dict[str, Any]:
    """One finished run as a plain, JSON-ready record (the raw per-seed result)."""
    run = RunDir(str(location))
    missing = [n for n in ("summary.json", "probes.parquet", "sensitivity.parquet") if not run.exists(n)]
    if missing:
        raise GeopruneError(f"{location} is not a finished run (no {', '.join(missing)})",
                            "pass a run folder that 'geoprune run' finished, or a batch folder of them")
    summary = run.read_json("summary.json")
    probes = run.read_table("probes.parquet")
    groups = run.read_table("sensitivity.parquet")
    accuracy = summary.get("probe_accuracy") or {}
    job = summary["job"]
    return {
        "evidence_version": EVIDENCE_VERSION,
        "run_id": summary["run_id"],
        "job": job["name"],
        "seed": job["seed"],
        "baseline_seed": job["protocol"].get("baseline_seed") if job["protocol"].get("baseline_seed") is not None
        else job["seed"],
        "controller_delta": summary["config"]["method"].get("delta"),
        "model": {k: summary["model"][k] for k in ("arch", "width", "num_classes", "input_shape")
                  if k in summary["model"]},
        "dataset": summary["dataset"],
        "protocol": {"baseline_epochs": job["protocol"]["baseline_epochs"],
                     "finetune_epochs": job["protocol"]["finetune_epochs"],
                     "finetune_recipe": summary["config"]["finetune"]},
        "g_noise": summary["g_noise"],
        "tau": summary["tau"],
        "r_star": summary["controller"]["r_star"],
        "controller_steps": len(summary["controller"]["steps"]),
        "baseline": summary["baseline"],
        "arms": [{k: arm[k] for k in ("arm", "method", "r", "macs_m", "params_m", "top1_before_finetune", "top1",
                                      "delta_g", "delta_g_after", "macs_gap", "allocation", "compression")
                  if k in arm} for arm in summary["arms"]],
        "probes": [{"ratio": p["ratio"], "delta_g": p["delta_g"],
                    **({"top1": p["top1"], "top1_drop": p["top1_drop"]} if "top1_drop" in p else {})}
                   for p in probes],
        "probe_base_top1": accuracy.get("base_top1"),
        "spearman_delta_g_top1_drop": accuracy.get("spearman_delta_g_top1_drop"),
        "groups": [{"group": g["group"], "channels": g["channels"], "tau_l": g["tau_l"], "ratio": g["ratio"]}
                   for g in groups],
        "provenance": summary.get("provenance", {}),
    }


def run_folders(location: str | Path) -> list[Path]:
    """A run folder itself, or the finished runs inside a batch folder (one level down), sorted by name."""
    root = Path(location)
    if (root / "summary.json").is_file():
        return [root]
    runs = sorted(p for p in root.iterdir() if (p / "summary.json").is_file()) if root.is_dir() else []
    if not runs:
        raise GeopruneError(f"{location} holds no finished run",
                            "pass a batch folder ('geoprune batch ... --storage DIR'), a run folder, "
                            "or a folder of evidence JSON files")
    return runs


def load_records(location: str | Path) -> list[dict[str, Any]]:
    """The evidence JSON files (``*.json`` with an ``evidence_version``) in a folder, sorted by seed."""
    records = []
    for path in sorted(Path(location).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise GeopruneError(f"{path} is not readable JSON ({exc})", "regenerate it with 'geoprune evidence'") from None
        if isinstance(data, dict) and "evidence_version" in data:
            records.append(data)
    if not records:
        raise GeopruneError(f"{location} holds no evidence JSON", "run 'geoprune evidence BATCH_DIR --output DIR' first")
    return sorted(records, key=lambda r: (r["seed"], r["job"]))


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _arm(record: dict[str, Any], name: str) -> Optional[dict[str, Any]]:
    return next((a for a in record["arms"] if a["arm"] == name), None)


def render(records: Sequence[dict[str, Any]]) -> str:
    """The evidence table(s) in markdown; deterministic for the same records."""
    if not records:
        raise GeopruneError("no evidence records to render", "pass finished runs or their evidence JSON")
    first = records[0]
    model, data = first["model"], first["dataset"]
    recipe = first["protocol"]["finetune_recipe"]
    seeds = [r["seed"] for r in records]
    over = "seeds" if len(set(seeds)) == len(seeds) else "runs"  # runs sharing a seed: on other baselines
    lines = [f"Evidence: {model['arch']} at width {model['width']}, {data['name']} "
             f"({data['train_size']} train / {data['test_size']} test images), "
             f"{'seeds' if over == 'seeds' else 'runs of seeds'} {', '.join(map(str, seeds))} "
             f"(n = {len(records)}); mean ± sample std over {over}.",
             "",
             f"Every arm gets the same fine-tune: {_epochs(first['protocol']['finetune_epochs'])}, SGD + Nesterov "
             f"(momentum {recipe['momentum']}), peak LR {recipe['lr']}, {recipe['schedule']} schedule, "
             f"weight decay {recipe['weight_decay']}, label smoothing {recipe['label_smoothing']}, batch "
             f"{recipe['batch_size']}, augmentation {'on' if recipe['augment'] else 'off'}; the baseline was trained "
             f"for {_epochs(first['protocol']['baseline_epochs'])}. \"Before\" is after BN recalibration, before any "
             "fine-tuning; the Baseline row's \"after\" is the baseline given the same fine-tune.",
             "",
             "| arm | r | MACs (M) | MACs kept | params (M) | ΔG before fine-tune | top-1 before fine-tune (%) | "
             "top-1 after fine-tune (%) |",
             "|---|---|---|---|---|---|---|---|"]
    for name in arm_names():
        rows = [(a, r) for a, r in ((_arm(r, name), r) for r in records) if a is not None]
        if not rows:
            continue
        arms = [a for a, _ in rows]
        lines.append(f"| {arms[0]['method']} | {pm([a['r'] for a in arms], 3)} | {pm([a['macs_m'] for a in arms], 3)} | "
                     f"{pm([a['macs_m'] * 1e6 / r['baseline']['macs'] for a, r in rows], 3)} | "
                     f"{pm([a['params_m'] for a in arms], 4)} | {measured_cells(arms)}")
    paired = [(a, u) for a, u in ((_arm(r, "adaptive"), _arm(r, "uniform")) for r in records) if a and u]
    if paired:
        before = [a["top1_before_finetune"] - u["top1_before_finetune"] for a, u in paired]
        after = [a["top1"] - u["top1"] for a, u in paired]
        wins = sum(d > 0 for d in after)
        lines += ["", "Adaptive GC − Uniform L2 at the same MACs, paired by seed (percentage points): before fine-tune "
                  f"{pm(before)} (per seed {', '.join(f'{d:+.2f}' for d in before)}); after fine-tune "
                  f"{pm(after)} (per seed {', '.join(f'{d:+.2f}' for d in after)}); Adaptive GC ahead after "
                  f"fine-tuning in {wins} of {len(after)} seeds."]
    lines += ["", "| seed | G_noise | τ | r* | controller steps | Spearman(ΔG, top-1 drop) over probes | probes |",
              "|---|---|---|---|---|---|---|"]
    for r in records:
        rho = r.get("spearman_delta_g_top1_drop")
        lines.append(f"| {r['seed']} | {r['g_noise']:.4f} | {r['tau']:.4f} | {r['r_star']:.4f} | {r['controller_steps']} | "
                     f"{'n/a' if rho is None else f'{rho:.3f}'} | {len(r['probes'])} |")
    tau_mean, tau_std = stats([r["tau"] for r in records])
    cv = "n/a (one seed)" if tau_std is None else f"{tau_std / tau_mean:.3f}"
    lines += ["", f"τ over seeds: {pm([r['tau'] for r in records], 4)}, coefficient of variation {cv}. "
              f"Spearman(ΔG, top-1 drop): {pm([r.get('spearman_delta_g_top1_drop') for r in records], 3)}."]
    names = [g["group"] for g in first["groups"]]
    lines += ["", "Per-group pruning ratios Adaptive GC chose (mean ± std over seeds):", "",
              "| group | channels | τ_L | ratio |", "|---|---|---|---|"]
    for name in names:
        rows = [g for r in records for g in r["groups"] if g["group"] == name]
        lines.append(f"| {name} | {rows[0]['channels']} | {pm([g['tau_l'] for g in rows], 4)} | "
                     f"{pm([g['ratio'] for g in rows], 3)} |")
    lines += allocations.render(records)
    lines += allocations.render_r_star_stability(records)
    return "\n".join(lines) + "\n"


def write_evidence(source: str | Path, output: Optional[str | Path] = None) -> tuple[Path, list[dict[str, Any]]]:
    """From finished runs (a batch or run folder): write one JSON per run and evidence.md into ``output``
    (default: SOURCE/evidence). From a folder of evidence JSON: re-render evidence.md (into ``output``
    or that folder). Returns the markdown's path and the records."""
    src = Path(source)
    if not src.exists():
        raise GeopruneError(f"{source} does not exist", "pass a batch folder, a run folder or a folder of evidence JSON")
    from_runs = (src / "summary.json").is_file() or (src.is_dir() and any(
        (p / "summary.json").is_file() for p in src.iterdir()))
    if from_runs:
        records = sorted((collect(p) for p in run_folders(src)), key=lambda r: (r["seed"], r["job"]))
        out = Path(output) if output else src / "evidence"
    else:
        records = load_records(src)
        out = Path(output) if output else src
    text = render(records)
    out.mkdir(parents=True, exist_ok=True)
    run = RunDir(str(out))
    if from_runs:
        for record in records:
            run.write_json(f"{record['job']}.json", record)
    run.write_bytes("evidence.md", text.encode())
    allocations.plot(records, out / "allocations.png")
    return out / "evidence.md", records


__all__ = ["collect", "load_records", "render", "run_folders", "write_evidence"]
