"""Where a pruned model is meant to run: ``deploy`` in a job spec (``--deploy`` for ``geoprune prune``); and how a
speed record (``core.speed.deploy_speed``) is read: its headline figures, and why a speed-up falls short. Torch-free,
so the report reads records without importing torch.

A target fixes two things:
- the channel multiple that kept counts are rounded to (METHOD.md §5: the nearest multiple, only in groups of at
  least 4 × ``round_to`` channels, the same in probes, sensitivity, controller steps, the final model and every arm),
  unless the method's own ``round_to`` is set (1 turns rounding off);
- what is timed after the last fine-tune: the device, and the precisions (the first is the deployed one).

The defaults come from measurements (BENCHMARKS.md §5, "Channel rounding and speed as deployed"):
- ``cpu``: 8. ResNet-18 (width 0.25, 32×32) pruned at ratio 0.4 on the 2-core AMD machine, batch 256: rounded to 8
  it ran 2.49× (eager, 1 thread) and 1.49× (ONNX Runtime) faster than the base, against 2.29×/1.23× rounded to 16,
  1.78×/1.07× rounded to 4 and 2.11×/0.98× unrounded (ONNX Runtime's blocked convolutions want channels in 8s).
- ``cuda``, ``cuda-bf16``: 16. Tensor cores take bf16/fp16 channels in multiples of 8, and on one H200 the Adaptive
  GC ResNet-18 of a Fashion-MNIST run was 1.04-1.11× the base in bf16 + channels_last rounded to 16 against
  0.91-1.05× rounded to 8 and 0.71-0.82× unrounded (issue 15's table; not yet measured by this code on a GPU:
  ``bench/device_check.sh speed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..errors import GeopruneError
from .config import MethodConfig


@dataclass(frozen=True)
class DeployTarget:
    name: str
    device: str  # "cpu" or "cuda"
    round_to: int
    precisions: tuple[str, ...]  # timed in this order; the first is the deployed one
    description: str


TARGETS: dict[str, DeployTarget] = {t.name: t for t in (
    DeployTarget("cpu", "cpu", 8, ("fp32",), "a CPU: fp32, eager PyTorch and ONNX Runtime"),
    DeployTarget("cuda", "cuda", 16, ("fp32", "bf16"), "an NVIDIA GPU in fp32 (bf16 timed beside it)"),
    DeployTarget("cuda-bf16", "cuda", 16, ("bf16", "fp16", "fp32"),
                 "an NVIDIA GPU in bf16 with channels_last (fp16 and fp32 timed beside it)"),
)}
DEFAULT = "cpu"
MIN_REPEATS = 20  # every speed figure is the median of at least this many timed passes, after warm-up
ALIGN = 8  # channels a vector unit or tensor core takes at once: AVX2's 8 fp32 lanes, ONNX Runtime's NCHWc blocks
# of 8, tensor cores' bf16/fp16 channels in 8s; a count off a multiple of 8 is computed padded up to one
SLOW_FRACTION = 0.8  # a speed-up below this fraction of the MACs reduction gets a one-line reason
SLOWER_BY = 0.03  # and so does a pruned model slower than the base by more than this (timing noise aside)


def deploy_target(name: str) -> DeployTarget:
    try:
        return TARGETS[name]
    except KeyError:
        raise GeopruneError(f"unknown deploy target {name!r}", f"use one of {', '.join(TARGETS)}") from None


DEPLOY_HINT = f"use one of {', '.join(TARGETS)}: where the pruned model will run, which sets the channel rounding"


def with_rounding(cfg: MethodConfig, deploy: str) -> MethodConfig:
    """``cfg`` with the multiple kept counts are rounded to: its own ``round_to`` where set (1: no rounding), else
    the deploy target's."""
    if cfg.round_to is not None:
        return cfg
    return cfg.model_copy(update={"round_to": deploy_target(deploy).round_to})


# ---------------------------------------------------------------- reading a speed record (``core.speed``)


def not_measured(deploy: str, reason: Optional[str] = None) -> dict[str, Any]:
    """The speed record of a run that could not time its models: by default, its cluster had no device of the
    target's kind."""
    target = deploy_target(deploy)
    return {"version": 2, "deploy": deploy, "device": None, "device_name": None, "precision": target.precisions[0],
            "measured": False, "rows": [],
            "reason": reason or f"not measured here: {deploy} runs on a {target.device.upper()} and this run had none"}


def deployed_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of the deployed precision, the first engine and the most threads: what the arms table, the plot and
    the notes show."""
    rows = [r for r in record.get("rows", []) if r["precision"] == record["precision"]]
    if not rows:
        return []
    engine, threads = rows[0]["engine"], max((r["threads"] or 0) for r in rows)
    return [r for r in rows if r["engine"] == engine and (r["threads"] or 0) == threads]


def headline(record: Mapping[str, Any], model: str) -> dict[str, Any]:
    """A model's figures as deployed, for its row in the arms table and trials.parquet: the deployed precision,
    the first engine and the most threads; latency at batch 1, throughput and speed-up at the largest batch."""
    rows = [r for r in deployed_rows(record) if r["model"] == model]
    if not rows:
        return {}
    small, large = min(rows, key=lambda r: r["batch"]), max(rows, key=lambda r: r["batch"])
    return {"latency_ms": small["latency_ms"], "throughput": large["throughput"], "speedup": large["speedup"],
            "speedup_per_macs": large.get("speedup_per_macs"), "speed_batch": large["batch"]}


def slow_reason(row: Mapping[str, Any]) -> Optional[str]:
    """One line on why a speed-up falls well below the MACs reduction, or a pruned model runs slower than the base
    (None when neither)."""
    fraction = row.get("speedup_per_macs")
    if fraction is None or row["model"] == "base":
        return None
    slower = row["speedup"] < 1 - SLOWER_BY and (row.get("macs_reduction") or 1) > 1  # the Baseline arm is unpruned
    if fraction >= SLOW_FRACTION and not slower:
        return None
    if row["batch"] <= 8:
        return f"latency-bound at batch {row['batch']}: fixed per-layer costs, not arithmetic, set the time"
    aligned, reduction = row.get("aligned_macs_reduction"), row.get("macs_reduction")
    if aligned is not None and reduction and aligned < 1 + SLOW_FRACTION * (reduction - 1):
        return (f"channel counts off multiples of {ALIGN} (in groups too small to round): padded to {ALIGN}s, as "
                f"the hardware computes them, the MACs fall {aligned:.2f}×, not {reduction:.2f}×")
    if row["latency_ms"] < 0.5:
        return "overhead-bound: a pass takes under 0.5 ms, so removed arithmetic barely shows"
    return ("the time saved is less than the MACs removed: memory traffic and the unpruned layers (stem, "
            "classifier) keep their cost")
