"""GPU check of the core (no Ray): correctness on CUDA and stage timings, in one call.

Run on the lent GPU machine (see ../shared/device/README.md) with torch-pruning on PYTHONPATH and
Fashion-MNIST under $GEOPRUNE_DATA:

    python bench/gpu_core.py --out $OUT

It checks that (1) a probe at ratio 0 gives ΔG = 0 on CUDA, (2) ΔG measured on CUDA matches the
CPU measurement of the same pruned model, (3) ``adaptive_prune`` runs on CUDA (bf16 autocast,
channels_last) on digits and on Fashion-MNIST with the paper's ResNet-18, and prints the
numbers and stage timings as a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

from geoprune_ray.core.config import MethodConfig, TrainConfig, finetune_defaults
from geoprune_ray.core.data import load_dataset
from geoprune_ray.core.geometry import Calibration, GeometryMeter
from geoprune_ray.core.method import PruneTarget, measure
from geoprune_ray.core.models import build_model
from geoprune_ray.core.reference import adaptive_prune
from geoprune_ray.core.train import train

DEVICE = "cuda"


def probe_checks() -> dict:
    """ΔG at ratio 0 on CUDA, and CUDA vs CPU ΔG of one probe, on a digits baseline trained on CUDA."""
    train_set = load_dataset("digits", "train").fit(3, None)
    torch.manual_seed(0)
    base = build_model("convnet", 10, width=0.5)
    train(base, train_set, TrainConfig(epochs=8, batch_size=64, lr=0.1), DEVICE)
    cfg = MethodConfig()
    out = {}
    for device in (DEVICE, "cpu"):
        meter = GeometryMeter(Calibration.from_dataset(train_set, cfg, device))
        model = copy.deepcopy(base).to(device).float()
        model.to(memory_format=torch.contiguous_format)
        meter.set_reference(model)
        target = PruneTarget(train_set.shape, 10)
        out[f"dg_ratio0_{device}"] = measure(model, meter, 0.0, target).delta_g
        out[f"dg_ratio03_{device}"] = measure(model, meter, 0.3, target).delta_g
    out["dg_ratio03_abs_diff"] = abs(out[f"dg_ratio03_{DEVICE}"] - out["dg_ratio03_cpu"])
    return out


def run(model: str, dataset: str, width: float, epochs: int, ft_epochs: int, batch: int, lr: float) -> dict:
    torch.manual_seed(0)
    start = time.perf_counter()
    res = adaptive_prune(model, dataset, dataset, width=width, device=DEVICE,
                         baseline=TrainConfig(epochs=epochs, batch_size=batch, lr=lr),
                         finetune_cfg=finetune_defaults(epochs=ft_epochs, batch_size=batch))
    s = res.summary
    row = {"model": f"{model}@{width}", "dataset": dataset, "top1_base": s["baseline"]["top1"],
           "top1_pruned_before_ft": s["pruned"]["top1_before_finetune"], "top1_pruned": s["pruned"]["top1"],
           "macs_base_M": s["baseline"]["macs"] / 1e6, "macs_pruned_M": s["pruned"]["macs"] / 1e6,
           "params_base_M": s["baseline"]["params"] / 1e6, "params_pruned_M": s["pruned"]["params"] / 1e6,
           "g_noise": s["g_noise"], "tau": s["tau"], "r_star": s["pruned"]["r_star"],
           "dg_before_ft": s["pruned"]["delta_g_before_finetune"], "dg_after_ft": s["pruned"]["delta_g_after_finetune"],
           "steps": [(round(st["r"], 4), round(st["delta_g"], 4), st["accepted"]) for st in s["controller"]["steps"]],
           "seconds_total": time.perf_counter() - start, "timings_s": s["timings_s"],
           "probe_seconds_mean": sum(p["seconds"] for p in s["probes"]) / len(s["probes"])}
    return row, s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--skip-fashion", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu only to dry-run this script")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    report = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE, "torch": torch.__version__}

    row, summary = run("convnet", "digits", 0.5, 8, 4, 64, 0.1)
    report["digits"] = row
    report["probe_checks"] = probe_checks()

    if not args.skip_fashion:
        row, summary = run("resnet18", "fashion-mnist", 1.0, 5, 3, 512, 0.4)
        report["fashion_resnet18"] = row
        Path(args.out, "fashion_resnet18_summary.json").write_text(json.dumps(summary, indent=2, default=float))

    Path(args.out, "gpu_core.json").write_text(json.dumps(report, indent=2, default=float))
    print(json.dumps(report, indent=1, default=float))
    print("\n| check | value |\n|---|---|")
    for k, v in report["probe_checks"].items():
        print(f"| {k} | {v:.3g} |")
    for key in ("digits", "fashion_resnet18"):
        if key in report:
            r = report[key]
            print(f"| {key} top-1 base → pruned (before ft) | {r['top1_base']:.2f} → {r['top1_pruned']:.2f} "
                  f"({r['top1_pruned_before_ft']:.2f}) |")
            print(f"| {key} MACs M | {r['macs_base_M']:.2f} → {r['macs_pruned_M']:.2f} |")
            print(f"| {key} τ, r*, ΔG before/after ft | {r['tau']:.4f}, {r['r_star']:.3f}, "
                  f"{r['dg_before_ft']:.4f}/{r['dg_after_ft']:.4f} |")
            print(f"| {key} stage s | {', '.join(f'{k}={v:.1f}' for k, v in r['timings_s'].items())} |")


if __name__ == "__main__":
    main()
