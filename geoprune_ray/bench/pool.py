"""The probe-actor pool's speed-up over running the same probes one after another in one process
that has the same total number of threads."""

from __future__ import annotations

import copy
import time
from typing import Any

import ray
import torch

from ..core.config import MethodConfig
from ..core.geometry import Calibration, GeometryMeter
from ..core.method import PruneTarget, measure, probe_ratios
from ..core.models import build_model
from ..distributed.probes import PoolSpec, ProbePool
from .core import synthetic_set


def pool_speedup(arch: str = "resnet18", width: float = 0.25, probes: int = 8, actors: int = 2,
                 calib_per_class: int = 50, classes: int = 10, size: int = 32, gpus_per_actor: float = 0.0
                 ) -> dict[str, Any]:
    data = synthetic_set(classes * calib_per_class * 2, classes, (3, size, size))
    cfg = MethodConfig(calib_per_class=calib_per_class, bn_batches=4, bn_batch_size=128)
    calibration = Calibration.from_dataset(data, cfg)
    torch.manual_seed(0)
    base = build_model(arch, classes, 3, width)
    target = PruneTarget((3, size, size), classes)
    ratios = probe_ratios(probes, 0.5, 0)
    device = "cuda" if gpus_per_actor else "cpu"

    threads = torch.get_num_threads()
    torch.set_num_threads(actors)  # the same total threads as the pool's actors (one each)
    try:
        meter = GeometryMeter(calibration.to(device))
        model = copy.deepcopy(base).to(device)
        meter.set_reference(model)
        measure(model, meter, ratios[0], target)  # warm-up
        start = time.perf_counter()
        sequential = [measure(model, meter, r, target).delta_g for r in ratios]
        sequential_s = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)

    pool = ProbePool(base, calibration, target, True, PoolSpec(actors, 1.0, gpus_per_actor), run_id="bench")
    try:
        pool.map("measure", [(ratios[0],)] * actors)  # warm-up, one per actor
        start = time.perf_counter()
        records = pool.map("measure", [(r,) for r in ratios])
        pool_s = time.perf_counter() - start
    finally:
        pool.shutdown()
    diff = max(abs(a - b["delta_g"]) for a, b in zip(sequential, records))
    return {"arch": arch, "width": width, "probes": probes, "actors": actors, "threads_total": actors,
            "sequential_s": sequential_s, "pool_s": pool_s, "speedup": sequential_s / pool_s,
            "max_abs_delta_g_diff": diff, "pids": sorted({r["pid"] for r in records})}


def run_pool(quick: bool) -> dict[str, Any]:
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus:
        return pool_speedup(width=1.0, probes=16, actors=4, calib_per_class=500, classes=100,
                            gpus_per_actor=min(0.25, gpus / 4))
    return pool_speedup(probes=6 if quick else 12)
