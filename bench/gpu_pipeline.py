"""GPU run of the Ray pipeline: actors on GPU fractions, 1-GPU Ray Train fine-tunes, stage timings.

Run on the lent GPU machine with Ray's wheels on PYTHONPATH (../shared/device/README.md):

    RAY_AUTH_MODE=disabled python bench/gpu_pipeline.py --out $OUT

Digits (scikit-learn's, bundled) resized to 32×32 for the paper's ResNet-18 at half width: small
enough to fit a device call with Ray's wheels, real enough to exercise every GPU path.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray

from geoprune_ray.core.spec import JobSpec
from geoprune_ray.distributed.pipeline import run_job

JOB = {
    "name": "gpu-digits-resnet18",
    "model": {"name": "resnet18", "width": 0.5},
    "data": {"name": "digits"},
    "protocol": {"baseline_epochs": 30, "finetune_epochs": 10, "batch_size": 128, "lr": 0.1,
                 "arms": ["adaptive", "baseline", "gc", "uniform"]},
    "resources": {"probe_actors": 4, "cpus_per_actor": 1, "workers": 1, "cpus_per_worker": 2},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/gpu-pipeline")
    parser.add_argument("--smoke", action="store_true", help="a tiny CPU dry-run of this script")
    args = parser.parse_args()
    job = JOB
    if args.smoke:
        job = {**JOB, "model": {"name": "convnet", "width": 0.25},
               "protocol": {**JOB["protocol"], "baseline_epochs": 1, "finetune_epochs": 1, "arms": ["adaptive"]},
               "resources": {"probe_actors": 2, "cpus_per_actor": 0.25, "cpus_per_worker": 0.5},
               "method": {"probes": 4, "calib_per_class": 20, "bn_batches": 2}}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    start = time.time()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    init_s = time.time() - start
    print("cluster:", ray.cluster_resources())
    storage = Path(args.out) / "run"
    summary = run_job(JobSpec.from_dict(job), str(storage))
    total_s = time.time() - start
    probes = pq.read_table(storage / "probes.parquet").to_pandas()
    trials = pq.read_table(storage / "trials.parquet").to_pandas()
    report = {
        "ray_init_s": init_s, "total_s": total_s, "timings_s": summary["timings_s"],
        "resources": summary["resources"], "probe_devices": sorted(probes["device"].unique().tolist()),
        "probe_pids": sorted(int(p) for p in probes["pid"].unique()), "probe_seconds_mean": probes["seconds"].mean(),
        "train_devices": sorted(trials["train_device"].dropna().unique().tolist()),
        "g_noise": summary["g_noise"], "tau": summary["tau"], "r_star": summary["pruned"]["r_star"],
        "arms": summary["arms"], "steps": summary["controller"]["steps"],
    }
    (Path(args.out) / "gpu_pipeline.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: v for k, v in report.items() if k not in ("arms", "steps")}, indent=1, default=str))
    print("\n| Method | Top-1 | Params (M) | MACs (M) | ΔG |\n|---|---|---|---|---|")
    for row in summary["arms"]:
        print(f"| {row['method']} | {row['top1']:.2f} | {row['params_m']:.3f} | {row['macs_m']:.2f} | {row['delta_g']:.4f} |")
    print("\n| stage | seconds |\n|---|---|")
    for stage, seconds in summary["timings_s"].items():
        print(f"| {stage} | {seconds:.1f} |")
    print(f"| ray.init | {init_s:.1f} |\n| total | {total_s:.1f} |")


if __name__ == "__main__":
    main()
