"""What users prune for: measured inference latency and throughput of a model on a device.

Each figure is the median of repeated timed forward passes (after warm-up), at batch 1 and at a
large batch, so base and pruned models are compared on the same device, threads and inputs.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import torch
from torch import nn

BATCHES = (1, 256)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_model(model: nn.Module, input_shape: Sequence[int], batch: int, device: torch.device,
               min_repeats: int = 5, max_repeats: int = 50, budget_s: float = 2.0) -> dict[str, Any]:
    """Median latency (ms) and throughput (img/s) of ``model`` at ``batch``: ≥ ``min_repeats`` timings,
    more while under ``budget_s`` seconds, after 2 warm-up passes."""
    model = model.to(device).eval()
    x = torch.randn(batch, *input_shape, device=device)
    for _ in range(2):
        model(x)
    sync(device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_repeats or (len(times) < max_repeats and time.perf_counter() - started < budget_s):
        t0 = time.perf_counter()
        model(x)
        sync(device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"batch": batch, "latency_ms": median * 1e3, "throughput": batch / median, "repeats": len(times),
            "spread_ms": (max(times) - min(times)) * 1e3}


def compare_speed(base: nn.Module, pruned: nn.Module, input_shape: Sequence[int], device: str | torch.device,
                  batches: Sequence[int] = BATCHES, budget_s: float = 2.0) -> dict[str, Any]:
    """Base vs pruned, batch by batch, interleaved so that drift in the machine hits both alike."""
    device = torch.device(device)
    rows = []
    for batch in batches:
        b = time_model(base, input_shape, batch, device, budget_s=budget_s)
        p = time_model(pruned, input_shape, batch, device, budget_s=budget_s)
        rows.append({"batch": batch, "base_latency_ms": b["latency_ms"], "pruned_latency_ms": p["latency_ms"],
                     "base_throughput": b["throughput"], "pruned_throughput": p["throughput"],
                     "speedup": b["latency_ms"] / p["latency_ms"], "repeats": min(b["repeats"], p["repeats"])})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": str(device), "device_name": name, "threads": torch.get_num_threads(), "rows": rows}
