"""Pipeline-level figures: the cost of one Ray Train launch, the pipeline's wall time by stage, its
search overhead against the final fine-tune, and the peak memory of all its processes."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch

from ..core.config import TrainConfig
from ..core.models import build_model
from ..core.pruning import ModelCard
from ..distributed.job import JobSpec
from ..distributed.pipeline import run_job
from ..distributed.training import Scaling, fit
from .core import synthetic_set


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2:].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def _pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages (the object store, torch's libraries) counted once overall."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """Samples the summed PSS of this process and all its descendants (an embedded Ray's GCS, raylet,
    workers and actors are all started below the driver) every ``interval`` seconds."""

    def __init__(self, interval: float = 0.5):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, sum(_pss_bytes(p) for p in _tree(os.getpid())))

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def train_launch_cost(repeats: int = 2) -> dict[str, Any]:
    """Wall time of a Ray Train run that trains nothing (0 epochs, 64 test images): the fixed cost of a launch."""
    card = ModelCard("convnet", 10, 3, 0.25, (3, 8, 8), (0.5,) * 3, (0.25,) * 3)
    data = synthetic_set(64, 10, (3, 8, 8))
    data_ref = ray.put((data, data))
    state = build_model("convnet", 10, 3, 0.25).state_dict()
    times = []
    with tempfile.TemporaryDirectory(prefix="geoprune-bench-") as storage:
        for i in range(repeats):
            start = time.perf_counter()
            fit(card, [], state, data_ref, TrainConfig(epochs=0, batch_size=64), Scaling(1, False, 0.5), storage,
                name=f"launch-{i}")
            times.append(time.perf_counter() - start)
    return {"launch_s": min(times), "repeats": times}


def reduced_job(quick: bool) -> dict[str, Any]:
    """The bench's own reduced pipeline: digits, the convnet, the Adaptive GC arm only."""
    return {"name": "bench", "model": {"name": "convnet", "width": 0.5}, "data": {"name": "digits"},
            "protocol": {"baseline_epochs": 4, "finetune_epochs": 4 if quick else 8, "batch_size": 64, "lr": 0.1,
                         "arms": ["adaptive"]},
            "resources": {"probe_actors": 2, "cpus_per_worker": 1.0},
            "method": {"calib_per_class": 60, "bn_batches": 4, "probes": 8}}


def adaptive_only(job: dict[str, Any]) -> dict[str, Any]:
    """A job spec with the comparison arms off: what the search-overhead and memory figures measure."""
    return {**job, "protocol": {**job.get("protocol", {}), "arms": ["adaptive"]}}


def pipeline_split(job: dict[str, Any]) -> dict[str, Any]:
    """Run ``job`` (in this process, on the connected Ray): wall time by stage, the search overhead
    (probes + sensitivity + controller steps) as a fraction of the final fine-tune, and peak memory."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="geoprune-bench-") as storage, PeakMemory() as memory:
        summary = run_job(JobSpec.from_dict(job), str(Path(storage) / "run"))
    t = summary["timings_s"]
    search = t["probes"] + t["sensitivity"] + t.get("step_trials", 0.0)
    finetune = t.get("finetune_trials", 0.0)
    return {"job": job, "wall_s": time.perf_counter() - started, "timings_s": t, "search_s": search,
            "final_finetune_s": finetune, "search_overhead": search / finetune if finetune else None,
            "peak_pss_gib": memory.peak / 2**30, "r_star": summary["controller"]["r_star"],
            "top1": summary["pruned"]["top1"], "macs_ratio": summary["pruned"]["macs_ratio"],
            "speed": summary.get("speed")}


def run_pipeline(quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    return {"train_launch": train_launch_cost(), "pipeline": pipeline_split(reduced_job(quick))}
