"""Channel rounding on and off, side by side (issue 15; BENCHMARKS.md, "Channel rounding").

    python -m geoprune_ray.bench.rounding --job jobs/quickstart.yaml --output runs/bench-rounding
    python -m geoprune_ray.bench.rounding --sweep resnet18 --output runs/bench-rounding-sweep

``--job`` runs the job twice through the pipeline on an embedded Ray, as ``geoprune run`` does: with its deploy
target's rounding, then with ``method.round_to: 1`` (none). Each run's speed stage times every arm against the base
as deployed; the table puts the two side by side, arm by arm, with the MACs reduction and top-1, and checks the
CPU targets: the Adaptive GC model's speed-up ≥ 0.8 × its MACs reduction at batches 64 and 256, on each thread
count and engine; no pruned arm slower than the base by more than 3% at any batch.

``--sweep ARCH`` measures what the rounding multiple itself does, with no training (speed depends on the
architecture, not the weights): the architecture pruned with one ratio in every group, each multiple of
``--multiples`` against none, timed as ``--deploy`` times (``cpu``: eager and ONNX Runtime, 1 thread and every core;
``cuda-bf16``: bf16/fp16 channels_last and fp32 on the GPU, up to the largest batch that fits):

    python -m geoprune_ray.bench.rounding --sweep resnet18 --deploy cuda-bf16 --ratio 0.25 --multiples 1,8,16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from ..core.deploy import SLOWER_BY  # no pruned arm slower than the base by more than this, at any batch

TARGET_FRACTION = 0.8  # the Adaptive GC model's speed-up as a fraction of its MACs reduction, at batches 64 and 256


def run_job_twice(job_path: str, out: Path) -> dict[str, Any]:
    """The job with its deploy target's rounding and with none: each run's summary (speed stage included)."""
    from ..app.report import render_report
    from ..core.spec import JobSpec, read_yaml
    from ..distributed.cluster import connect, disconnect
    from ..distributed.pipeline import run_job

    data = read_yaml(job_path)
    runs = {}
    connect(None)
    try:
        for name, method in (("rounded", {}), ("unrounded", {"round_to": 1})):
            spec = JobSpec.from_dict({**data, "name": f"{data.get('name', 'job')}-{name}",
                                      "method": {**data.get("method", {}), **method}})
            storage = out / name
            summary = run_job(spec, str(storage), report=render_report)
            runs[name] = {"storage": str(storage), "round_to": spec.method_config().round_to,
                          "arms": summary["arms"], "speed": summary["speed"], "baseline": summary["baseline"]}
    finally:
        disconnect()
    return {"job": job_path, "runs": runs, "checks": checks(runs["rounded"]["speed"])}


def checks(speed: dict[str, Any]) -> dict[str, Any]:
    """The CPU targets on one speed record: Adaptive GC's fraction of its MACs reduction at batches 64 and 256 (each
    engine and thread count), and the slowest pruned arm against the base at any batch."""
    rows = [r for r in speed.get("rows", []) if r["model"] != "base"]
    adaptive = [r for r in rows if r["model"] == "adaptive" and r["batch"] in (64, 256)]
    pruned = [r for r in rows if r["model"] != "baseline" and (r.get("macs_reduction") or 1) > 1]
    worst = min(pruned, key=lambda r: r["speedup"], default=None)
    aligned = [r["speedup"] / r["aligned_macs_reduction"] for r in adaptive if r.get("aligned_macs_reduction")]
    return {"adaptive_min_fraction": min((r["speedup_per_macs"] for r in adaptive), default=None),
            # the same against the MACs counted with channels padded to 8s, what the hardware can realise
            "adaptive_aligned_reduction": adaptive[0].get("aligned_macs_reduction") if adaptive else None,
            "adaptive_min_fraction_aligned": min(aligned, default=None),
            "adaptive_fraction_met": all(r["speedup_per_macs"] >= TARGET_FRACTION for r in adaptive),
            "slowest_pruned": worst and {k: worst[k] for k in ("model", "engine", "threads", "batch", "speedup")},
            "none_slower": all(r["speedup"] >= 1 - SLOWER_BY for r in pruned)}


def sweep(arch: str, width: float, input_size: int, channels: int, ratio: float, multiples: list[int],
          deploy: str, budget_s: float) -> dict[str, Any]:
    """``arch`` pruned with ``ratio`` in every group, rounded to each of ``multiples`` (1: none), each timed against
    the unpruned model as ``deploy`` times (``core.speed.deploy_speed``: a CPU, or a GPU where there is one)."""
    import torch

    from ..core.models import build_model
    from ..core.pruning import macs_params, prune_copy
    from ..core.speed import deploy_speed

    torch.manual_seed(0)
    shape = (channels, input_size, input_size)
    base = build_model(arch, 10, channels, width).eval()
    models = {f"round_to {m}": prune_copy(base, ratio, shape, 10, round_to=m)[0] for m in multiples}
    macs = {"base": macs_params(base, shape)[0], **{n: macs_params(p, shape)[0] for n, p in models.items()}}
    record = deploy_speed(base, models, shape, deploy, cpus=os.cpu_count() or 1, macs=macs, budget_s=budget_s)
    return {"arch": arch, "width": width, "input_shape": list(shape), "ratio": ratio, "macs": macs, **record}


def markdown(result: dict[str, Any]) -> str:
    """The side-by-side table (``--job``) or the sweep's (``--sweep``)."""
    lines = []
    if "runs" in result:
        on, off = result["runs"]["rounded"], result["runs"]["unrounded"]
        lines += [f"Job {result['job']}: rounded to {on['round_to']} (its deploy target) against not rounded, "
                  f"every arm timed as deployed ({on['speed'].get('device_name')}).", "",
                  "| arm | MACs reduction on / off | top-1 on / off (%) | engine | threads | batch | speed-up on / off | "
                  "fraction of the MACs reduction on / off |", "|---|---|---|---|---|---|---|---|"]
        arms_on = {a["arm"]: a for a in on["arms"]}
        arms_off = {a["arm"]: a for a in off["arms"]}
        base_m = on["baseline"]["macs"] / 1e6
        rows_off = {(r["model"], r["engine"], r["threads"], r["batch"]): r for r in off["speed"]["rows"]}
        for r in on["speed"]["rows"]:
            if r["model"] == "base":
                continue
            o = rows_off.get((r["model"], r["engine"], r["threads"], r["batch"]), {})
            a, b = arms_on[r["model"]], arms_off.get(r["model"], {})
            lines.append(f"| {a['method']} | {base_m / a['macs_m']:.2f}× / {base_m / b['macs_m']:.2f}× | "
                         f"{a['top1']:.2f} / {b.get('top1', float('nan')):.2f} | {r['engine']} | {r['threads']} | "
                         f"{r['batch']} | {r['speedup']:.2f}× / {o.get('speedup', float('nan')):.2f}× | "
                         f"{r['speedup_per_macs']:.2f} / {o.get('speedup_per_macs', float('nan')):.2f} |")
        for name, run in result["runs"].items():
            c = checks(run["speed"])
            slow = c["slowest_pruned"]
            lines += ["", f"{name}: Adaptive GC's smallest speed-up as a fraction of its MACs reduction at batches 64 "
                      f"and 256: {c['adaptive_min_fraction']:.2f} (target ≥ {TARGET_FRACTION}: "
                      f"{'met' if c['adaptive_fraction_met'] else 'NOT met'}; of its "
                      f"{c['adaptive_aligned_reduction'] or float('nan'):.2f}× reduction in MACs padded to 8s: "
                      f"{c['adaptive_min_fraction_aligned'] or float('nan'):.2f}); slowest pruned arm: {slow['model']} "
                      f"{slow['engine']} {slow['threads']} thread(s) batch {slow['batch']} at {slow['speedup']:.2f}× "
                      f"(target ≥ {1 - SLOWER_BY:.2f}: {'met' if c['none_slower'] else 'NOT met'})."]
    else:
        lines += [f"{result['arch']} (width {result['width']}, input {tuple(result['input_shape'])}) pruned with "
                  f"ratio {result['ratio']} in every group, timed as {result['deploy']} on "
                  f"{result.get('device_name')}; speed-up over the unpruned model and as a fraction of the MACs "
                  "reduction.", "",
                  "| rounding | MACs reduction | padded to 8s | engine | precision | threads | batch | latency (ms) | "
                  "speed-up | fraction |", "|---|---|---|---|---|---|---|---|---|---|"]
        if not result["measured"]:
            lines.append(f"| {result['reason']} |")
        for r in result["rows"]:
            if r["model"] != "base":
                lines.append(f"| {r['model']} | {r['macs_reduction']:.2f}× | {r['aligned_macs_reduction']:.2f}× | "
                             f"{r['engine']} | {r['precision']} | "
                             f"{r['threads'] or ''} | {r['batch']} | {r['latency_ms']:.3f} | {r['speedup']:.2f}× | "
                             f"{r['speedup_per_macs']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--job", help="a job spec: run with its rounding and without")
    what.add_argument("--sweep", metavar="ARCH", help="a zoo architecture: time each rounding multiple, no training")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--multiples", default="1,4,8,16,32")
    parser.add_argument("--deploy", default="cpu", help="with --sweep: the target to time as (cpu, cuda, cuda-bf16)")
    parser.add_argument("--budget-s", type=float, default=1.0, help="timing per setting past the 20 passes")
    parser.add_argument("--output", default=None, help="folder for rounding.json and rounding.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.output or tempfile.mkdtemp(prefix="geoprune-rounding-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.job:
        result = run_job_twice(args.job, out)
    else:
        result = sweep(args.sweep, args.width, args.input_size, args.channels, args.ratio,
                       [int(m) for m in args.multiples.split(",")], args.deploy, args.budget_s)
    (out / "rounding.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / "rounding.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
