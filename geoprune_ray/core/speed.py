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


def _once(model: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    t0 = time.perf_counter()
    model(x)
    sync(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def time_models(models: Sequence[nn.Module], input_shape: Sequence[int], batch: int, device: torch.device,
                min_repeats: int = 5, max_repeats: int = 50, budget_s: float = 2.0) -> list[dict[str, Any]]:
    """Median latency (ms) and throughput (img/s) of each model at ``batch``, timed in turns (one pass of each per
    round, after 2 warm-up passes each): ≥ ``min_repeats`` rounds, more while under ``budget_s`` seconds. Taking turns,
    a load that comes and goes on the machine (another process starting) slows every model alike."""
    models = [m.to(device).eval() for m in models]
    x = torch.randn(batch, *input_shape, device=device)
    for model in models:
        for _ in range(2):
            model(x)
    sync(device)
    times: list[list[float]] = [[] for _ in models]
    started = time.perf_counter()
    while len(times[0]) < min_repeats or (len(times[0]) < max_repeats and time.perf_counter() - started < budget_s):
        for model, taken in zip(models, times):
            taken.append(_once(model, x, device))
    out = []
    for taken in times:
        median = statistics.median(taken)
        out.append({"batch": batch, "latency_ms": median * 1e3, "throughput": batch / median, "repeats": len(taken),
                    "spread_ms": (max(taken) - min(taken)) * 1e3})
    return out


def compare_speed(base: nn.Module, pruned: nn.Module, input_shape: Sequence[int], device: str | torch.device,
                  batches: Sequence[int] = BATCHES, budget_s: float = 2.0) -> dict[str, Any]:
    """Base vs pruned, batch by batch, their passes taking turns so that drift in the machine hits both alike."""
    device = torch.device(device)
    rows = []
    for batch in batches:
        b, p = time_models([base, pruned], input_shape, batch, device, budget_s=2 * budget_s)
        rows.append({"batch": batch, "base_latency_ms": b["latency_ms"], "pruned_latency_ms": p["latency_ms"],
                     "base_throughput": b["throughput"], "pruned_throughput": p["throughput"],
                     "speedup": b["latency_ms"] / p["latency_ms"], "repeats": min(b["repeats"], p["repeats"])})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": str(device), "device_name": name, "threads": torch.get_num_threads(), "rows": rows}
