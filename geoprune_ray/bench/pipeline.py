"""Pipeline-level figures: the cost of one Ray Train launch, the pipeline's wall time by stage, its
search overhead against the final fine-tune, the peak memory of all its processes (and, on a GPU,
the GPU's busy fraction), where it ran (the probe actors' GPU ids, the fine-tune's device), and the
distribution overhead: the pipeline's wall time against the same spec run in one process
(``core.reference.adaptive_prune``), measured in the same bench run."""

from __future__ import annotations

import importlib
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import psutil
import ray
import torch

from ..core.artifact import ModelCard
from ..core.config import TrainConfig
from ..core.models import build_model
from ..core.spec import JobSpec
from ..distributed.pipeline import run_job
from ..app.report import render_report
from ..distributed.launch import FINETUNE_POLL_S, fit
from ..distributed.scaling import Scaling
from .core import synthetic_set


def _pss_bytes() -> int:
    """The summed proportional set size of this process and its descendants (shared pages: the object store, torch's
    libraries, counted once overall), from psutil (``smaps_rollup`` on Linux)."""
    total = 0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.Error, AttributeError):  # ended meanwhile, not ours to read, or no PSS on this system
            pass
    return total


def _gpu_busy() -> Optional[float]:
    """The GPU's utilisation (%) over the last sample period as NVML reports it; None without a GPU or NVML."""
    try:
        return float(torch.cuda.utilization()) if torch.cuda.is_available() else None
    except Exception:  # NVML missing (no nvidia-ml-py): no figure rather than a failed bench
        return None


class PeakMemory:
    """Samples the summed PSS of this process and all its descendants (an embedded Ray's GCS, raylet,
    workers and actors are all started below the driver) every ``interval`` seconds, and the GPU's
    utilisation where there is one. (Reading every process's smaps costs system time: on 2 cores,
    sampling every 0.5 s cost the driver 43 s of system time in a 220 s run, and even every 3 s it
    slows what it measures; ``pss=False`` samples the GPU alone.)"""

    def __init__(self, interval: float = 3.0, pss: bool = True):
        self.pss = pss
        self.peak = 0
        self.gpu_samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)

    @property
    def gpu_busy(self) -> Optional[float]:
        return sum(self.gpu_samples) / len(self.gpu_samples) / 100 if self.gpu_samples else None

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            if self.pss:
                self.peak = max(self.peak, _pss_bytes())
            busy = _gpu_busy()
            if busy is not None:
                self.gpu_samples.append(busy)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def train_launch_cost(repeats: int = 2) -> dict[str, Any]:
    """Wall time of a Ray Train run that trains nothing (0 epochs, 64 test images): the fixed cost of a launch, split
    into start-up (controller, worker group and process group, up to the worker's first line), the worker's own
    work, and the end (the final checkpoint's upload, teardown, the result back in the caller); its workers are polled
    as a fine-tune's are (``launch.FINETUNE_POLL_S``)."""
    card = ModelCard("convnet", 10, 3, 0.25, (3, 8, 8), (0.5,) * 3, (0.25,) * 3)
    data = synthetic_set(64, 10, (3, 8, 8))
    data_ref = ray.put((data, data))
    state_ref = ray.put(build_model("convnet", 10, 3, 0.25).state_dict())
    runs = []
    with tempfile.TemporaryDirectory(prefix="geoprune-bench-") as storage:
        for i in range(repeats):
            start = time.time()
            _, _, metrics = fit(card, state_ref, data_ref, TrainConfig(epochs=0, batch_size=64),
                                Scaling(1, False, 0.5), storage, name=f"launch-{i}", poll_s=FINETUNE_POLL_S)
            end = time.time()
            runs.append({"launch_s": end - start, "startup_s": metrics["worker_entered"] - start,
                         "worker_s": metrics["worker_reported"] - metrics["worker_entered"],
                         "end_s": end - metrics["worker_reported"]})
    best = min(runs, key=lambda r: r["launch_s"])
    return {**best, "repeats": [r["launch_s"] for r in runs]}


@ray.remote(num_cpus=0.25)
class _ColdActor:
    """A new Ray actor that imports what a probe actor, a Tune trial or a Train worker of the pipeline imports."""

    def __init__(self) -> None:
        importlib.import_module("geoprune_ray.distributed.training")  # torch, torch-pruning, the method, Ray Train

    def ready(self) -> float:
        return time.time()


def _empty_trial(config: dict) -> None:
    from ray import tune

    tune.report({"entered": time.time()})


def ray_pieces(repeats: int = 2) -> dict[str, Any]:
    """What the pipeline's Ray pieces cost on their own, on this machine while it is otherwise idle: one Ray Train
    launch that trains nothing (split as ``train_launch_cost`` splits it), one Tune experiment of one empty trial (from
    ``fit`` to the trial's first line, and in all), and one new actor importing the pipeline's modules."""
    from ray import tune

    from ..distributed.pipeline import _tune_console_quiet

    tune_runs, actor_runs = [], []
    with tempfile.TemporaryDirectory(prefix="geoprune-bench-") as storage:
        for i in range(repeats):
            started = time.time()
            with _tune_console_quiet():
                results = tune.Tuner(tune.with_resources(_empty_trial, {"cpu": 0.01}),
                                     run_config=tune.RunConfig(name=f"empty-{i}", storage_path=storage,
                                                               verbose=0)).fit()
            ended = time.time()
            tune_runs.append({"to_trial_s": results[0].metrics["entered"] - started, "tune_s": ended - started})
    for _ in range(repeats):
        started = time.time()
        actor = _ColdActor.remote()
        ready = ray.get(actor.ready.remote())
        actor_runs.append(ready - started)
        ray.kill(actor)
    best_tune = min(tune_runs, key=lambda r: r["tune_s"])
    return {"train_launch": train_launch_cost(repeats), "tune_experiment": {**best_tune, "repeats": tune_runs},
            "cold_actor_s": min(actor_runs), "cold_actor_repeats": actor_runs}


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


def pipeline_split(job: dict[str, Any], memory: bool = True) -> dict[str, Any]:
    """Run ``job`` (in this process, on the connected Ray): wall time by stage, the search overhead
    (probes + sensitivity + controller steps) as a fraction of the final fine-tune, (``memory``) peak memory, and where
    it ran: the resources it was given (the probe actors' GPU ids among them) and the adaptive fine-tune's device."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="geoprune-bench-") as storage, PeakMemory(pss=memory) as sampler:
        summary = run_job(JobSpec.from_dict(job), str(Path(storage) / "run"), report=render_report)  # as `run` does
    t = summary["timings_s"]
    search = t["probes"] + t["sensitivity"] + t.get("step_trials", 0.0)
    finetune = t.get("finetune_trials", 0.0)
    return {"job": job, "wall_s": time.perf_counter() - started, "timings_s": t, "search_s": search,
            "final_finetune_s": finetune, "search_overhead": search / finetune if finetune else None,
            "peak_pss_gib": sampler.peak / 2**30 if memory else None, "gpu_busy": sampler.gpu_busy, "r_star": summary["controller"]["r_star"],
            "tau": summary["tau"], "baseline_top1": summary["baseline"]["top1"], "top1": summary["pruned"]["top1"],
            "macs_ratio": summary["pruned"]["macs_ratio"], "speed": summary.get("speed"),
            "frontier": [{k: a.get(k) for k in ("arm", "method", "top1", "macs_m", "latency_ms", "speedup", "speed_batch")}
                         for a in summary.get("arms", [])],
            "timeline": summary.get("timeline"), "resources": summary["resources"],
            "train_device": summary["provenance"]["hardware"]["device"]}


def in_process(job: dict[str, Any]) -> dict[str, Any]:
    """The same spec, adaptive arm only, through ``adaptive_prune`` in this process (its own threads): the yardstick
    of the distribution overhead."""
    from ..core.reference import adaptive_prune

    spec = JobSpec.from_dict(job)
    baseline = spec.baseline_config() if spec.model.weights is None and spec.protocol.baseline_epochs > 0 else None
    started = time.perf_counter()
    result = adaptive_prune(spec.model.name, spec.data.name, spec.data.name, method=spec.method_config(),
                            baseline=baseline, finetune_cfg=spec.finetune_config(), width=spec.model.width,
                            weights=spec.model.weights, input_size=spec.model.input_size,
                            data_dir=spec.data.data_dir, download=spec.data.download, deploy=spec.deploy,
                            speed=spec.protocol.speed)  # the Ray side's speed stage times the same arm
    s = result.summary
    return {"wall_s": time.perf_counter() - started, "threads": torch.get_num_threads(), "timings_s": s["timings_s"],
            "r_star": s["controller"]["r_star"], "tau": s["tau"], "baseline_top1": s["baseline"]["top1"],
            "top1": s["pruned"]["top1"], "macs_ratio": s["pruned"]["macs_ratio"],
            "device": s["provenance"]["hardware"]["device"]}


def job_bench(job: dict[str, Any], ray_startup_s: float, pairs: int = 1) -> dict[str, Any]:
    """``geoprune bench --job``: the Ray pipeline (adaptive arm only, Ray's start-up included) against the same spec
    in one process, their ratio (the distribution overhead), the pipeline's wall time with every arm the spec names,
    and what the Ray pieces that make the gap cost on their own (``ray_pieces``).

    ``pairs`` > 1 measures both sides that many times, in the order Ray, one process, one process, Ray, … (each pair
    reversed), so that a machine whose speed drifts during the bench (±10% over minutes on the 2-core machines)
    slows both sides alike; the overhead is then the sum of the Ray walls over the sum of the one-process walls, and
    each pair's ratio is kept. The stage figures are the first run's of each side. Reading every process's memory map
    costs the machine time (on 2 cores it added 15-40 s to a 150 s run), so the compared walls run without the
    memory sampler; peak memory is sampled on the all-arms run (the run with the most processes), or, for a spec with
    one arm, on a further adaptive-only run."""
    all_arms = len(job.get("protocol", {}).get("arms") or ["adaptive"]) > 1
    ray_runs, local_runs = [], []
    for i in range(max(1, pairs)):
        for side in (("ray", "local") if i % 2 == 0 else ("local", "ray")):
            if side == "ray":
                ray_runs.append(pipeline_split(adaptive_only(job), memory=False))
            else:
                local_runs.append(in_process(adaptive_only(job)))
    pipeline, local = ray_runs[0], local_runs[0]
    ray_walls = [ray_startup_s + run["wall_s"] for run in ray_runs]
    local_walls = [run["wall_s"] for run in local_runs]
    result = {"pipeline": pipeline, "in_process": local, "ray_wall_s": sum(ray_walls) / len(ray_walls),
              "in_process_wall_s": sum(local_walls) / len(local_walls),
              "distribution_overhead": sum(ray_walls) / sum(local_walls),
              "pairs": [{"ray_wall_s": r, "in_process_wall_s": p, "ratio": r / p}
                        for r, p in zip(ray_walls, local_walls)]}
    measured = pipeline_split(job if all_arms else adaptive_only(job))
    pipeline["peak_pss_gib"] = measured["peak_pss_gib"]
    if all_arms:
        result["all_arms"] = measured
        result["all_arms_over_adaptive"] = measured["wall_s"] / pipeline["wall_s"]
    result["ray_pieces"] = ray_pieces()
    return result


def run_pipeline(quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    return {"train_launch": train_launch_cost(), "pipeline": pipeline_split(reduced_job(quick))}
