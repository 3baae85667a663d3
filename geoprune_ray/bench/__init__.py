"""``geoprune bench``: speed figures measured side by side in one run (see BENCHMARKS.md when written).

Done so far: training throughput of the three paper models against a plain PyTorch loop, the data
path, one probe step and its parts (``core``), and the probe-actor pool's speed-up over sequential
probes with the same total threads (``pool``). Still to come (issue 5): the Ray Train launch cost,
the pipeline's wall time by stage and its search overhead, inference speed, peak memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


def run_bench(output: str, quick: bool, device: Optional[str] = None) -> dict[str, Any]:
    from ..distributed.pipeline import connect
    from .core import run_core
    from .pool import run_pool

    result: dict[str, Any] = {"quick": quick, "core": run_core(quick, device)}
    connect(None)
    result["pool"] = run_pool(quick)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (out / "bench.md").write_text(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    core, pool = result["core"], result["pool"]
    lines = [f"# geoprune bench ({'quick' if result['quick'] else 'full'}) on {core['device_name']}, "
             f"{core['threads']} threads", "",
             "| model | batch | plain loop img/s | project img/s | project / plain | project TFLOP/s |",
             "|---|---|---|---|---|---|"]
    for t in core["training"]:
        lines.append(f"| {t['arch']}@{t['width']} | {t['batch']} | {t['plain_img_s']:.1f} | {t['project_img_s']:.1f} | "
                     f"{t['ratio']:.3f} | {t['project_tflops']:.4f} |")
    d, p = core["data_path"], core["probe"]
    lines += ["", "| figure | value |", "|---|---|",
              f"| loader alone (img/s) | {d['loader_img_s']:.0f} |",
              f"| training step (img/s) | {d['train_img_s']:.1f} |",
              f"| loader's share of a step | {d['loader_share']:.4f} |",
              f"| probe step, {p['arch']}@{p['width']}, {p['calibration_images']} calibration images (s) | "
              f"{p['probe_s']:.3f} |",
              f"| … copy + prune (s) | {p['copy_and_prune_s']:.3f} |",
              f"| … BN recalibration (s) | {p['recalibrate_s']:.3f} |",
              f"| … features + ΔG (s) | {p['features_and_delta_g_s']:.3f} |",
              f"| probe pool: {pool['probes']} probes, {pool['actors']} actors vs 1 process with "
              f"{pool['threads_total']} threads: speed-up | {pool['speedup']:.2f}× |", ""]
    return "\n".join(lines)
