"""Per-group sensitivity (METHOD.md §5) as Ray tasks: one task per chunk of dependency groups.

The tasks read the base model and calibration set from the object store copies the probe pool
already holds (``holder.share``), so they are not put twice; each task measures ΔG_L for
its groups with the same ``core.method.measure`` the in-process reference uses. The driver turns
the answers into τ_L and the allocation (``core.method``).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import ray
import torch
from torch import nn

from ..core.geometry import Calibration, GeometryMeter, Reference
from ..core.method import PruneTarget, measure
from ..core.train import keep_heap
from .probes import device_for


@ray.remote(max_retries=3)
def sensitivity_chunk(base: nn.Module, calibration: Calibration, target: PruneTarget, bn_recalibration: bool,
                      names: Sequence[str], ratio: float, reference: Optional[Reference] = None) -> list[dict[str, Any]]:
    keep_heap()
    torch.set_num_threads(1)
    device = device_for(ray.get_gpu_ids())
    meter = GeometryMeter(calibration.to(device), bn_recalibration)
    base = copy.deepcopy(base).to(device)
    meter.use_reference(base, reference)
    rows = []
    for name in names:
        res = measure(base, meter, {name: ratio}, target)
        rows.append({"group": name, "delta_g": res.delta_g, "seconds": res.seconds, "pid": os.getpid(),
                     "device": str(device)})
    return rows


def chunked(items: Sequence[str], chunks: int) -> list[list[str]]:
    chunks = max(1, min(chunks, len(items)))
    return [list(items[i::chunks]) for i in range(chunks)]


def submit_sensitivity(shared: Mapping[str, ray.ObjectRef], target: PruneTarget, bn_recalibration: bool,
                       names: Sequence[str], ratio: float, chunks: int, cpus: float = 0.5,
                       gpus: float = 0.0) -> list[ray.ObjectRef]:
    """Start the tasks that measure ΔG_L for every group in ``names``, ``chunks`` of them; ``shared``: the object
    refs of the base model and calibration set, and of the base's G₀ where it was measured once (``holder.share``; a
    probe pool's ``shared``)."""
    task = sensitivity_chunk.options(num_cpus=cpus, num_gpus=gpus)
    return [task.remote(shared["base"], shared["calibration"], target, bn_recalibration, chunk, ratio,
                        shared.get("reference")) for chunk in chunked(names, chunks)]


def by_group(results: Sequence[Sequence[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The tasks' rows keyed by group."""
    return {row["group"]: row for rows in results for row in rows}


def run_sensitivity(shared: Mapping[str, ray.ObjectRef], target: PruneTarget, bn_recalibration: bool,
                    names: Sequence[str], ratio: float, chunks: int, cpus: float = 0.5,
                    gpus: float = 0.0, gather: Callable[[list], list] = ray.get) -> dict[str, dict[str, Any]]:
    """ΔG_L for every group in ``names``, fanned out over ``chunks`` Ray tasks; keyed by group."""
    return by_group(gather(submit_sensitivity(shared, target, bn_recalibration, names, ratio, chunks, cpus, gpus)))
