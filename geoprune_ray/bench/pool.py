"""The probe-actor pool's speed-up over running the same probes one after another in one process
that has the same total number of threads.

Both sides run the same probes ``repeats`` times, interleaved (sequential, pool, sequential, …),
and the medians are compared, so a burst of background load hits both. Beside it, the machine's
own ceiling for this comparison: the same probes split over N plain OS processes (no Ray, one
thread each, started together behind a barrier) against the same N-thread process. The pool can
only beat threads by what separate processes gain on the hardware; ``pool_efficiency`` is the
pool's speed-up as a fraction of that ceiling.
"""

from __future__ import annotations

import copy
import math
import multiprocessing as mp
import queue
import statistics
import time
from typing import Any

import ray
import torch

from ..core.config import MethodConfig
from ..core.geometry import Calibration, GeometryMeter
from ..core.method import PruneTarget, measure, probe_ratios
from ..core.models import build_model
from ..distributed.probes import PoolSpec, ProbePool, spread
from .core import synthetic_set


def _setup(arch: str, width: float, calib_per_class: int, classes: int, size: int):
    data = synthetic_set(classes * calib_per_class * 2, classes, (3, size, size))
    cfg = MethodConfig(calib_per_class=calib_per_class, bn_batches=4, bn_batch_size=128)
    calibration = Calibration.from_dataset(data, cfg)
    torch.manual_seed(0)
    return build_model(arch, classes, 3, width), calibration, PruneTarget((3, size, size), classes)


def _process_worker(setup_args: tuple, ratios: list[float], barrier, results) -> None:
    """One plain process (no Ray), one thread: set up, wait for the others, time its share of the probes."""
    torch.set_num_threads(1)
    base, calibration, target = _setup(*setup_args)
    meter = GeometryMeter(calibration)
    meter.set_reference(base)
    measure(base, meter, ratios[0], target)  # warm-up, like the other two sides
    barrier.wait()
    start = time.perf_counter()
    for r in ratios:
        measure(base, meter, r, target)
    results.put(time.perf_counter() - start)


def process_ceiling(setup_args: tuple, ratios: list[float], processes: int) -> float:
    """Wall time of the probes split over ``processes`` plain one-thread processes started together."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    order = spread(len(ratios), processes)  # the pool's assignment
    shares = [[r for r, a in zip(ratios, order) if a == k] for k in range(processes)]
    procs = [ctx.Process(target=_process_worker, args=(setup_args, share, barrier, results)) for share in shares]
    for p in procs:
        p.start()
    times: list[float] = []
    deadline = time.monotonic() + 600
    while len(times) < len(procs):
        try:
            times.append(results.get(timeout=1.0))
        except queue.Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:  # a dead worker never reports: fail now, not in 10 min
                for p in procs:
                    p.kill()
                raise RuntimeError(f"the ceiling's worker processes failed (exit codes {failed or 'none, timed out'})")
    for p in procs:
        p.join()
    return max(times)


def cpu_share(actors: int) -> float:
    """Each actor's CPU request: a whole CPU where the free CPUs allow, else an equal share of them. Ray has been
    seen to keep a sliver (0.01 CPU) of a finished job's trial actor, and a pool that asks for every CPU of the
    machine would then wait for ever. The request only places the actors; each runs one thread either way."""
    return min(1.0, math.floor(100 * ray.available_resources().get("CPU", 0.0) / actors) / 100)


def pool_speedup(arch: str = "resnet18", width: float = 0.25, probes: int = 8, actors: int = 2,
                 calib_per_class: int = 50, classes: int = 10, size: int = 32, gpus_per_actor: float = 0.0,
                 repeats: int = 3) -> dict[str, Any]:
    setup_args = (arch, width, calib_per_class, classes, size)
    base, calibration, target = _setup(*setup_args)
    ratios = probe_ratios(probes, 0.5, 0)
    device = "cuda" if gpus_per_actor else "cpu"

    threads = torch.get_num_threads()
    meter = GeometryMeter(calibration.to(device))
    model = copy.deepcopy(base).to(device)
    meter.set_reference(model)
    cpus = cpu_share(actors)
    pool = ProbePool(base, calibration, target, True, PoolSpec(actors, cpus, gpus_per_actor), run_id="bench")
    sequential_s, pool_s = [], []
    try:
        pool.map("measure", [(ratios[0],)] * actors)  # warm-up, one per actor
        torch.set_num_threads(actors)  # the same total threads as the pool's actors (one each)
        measure(model, meter, ratios[0], target)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            sequential = [measure(model, meter, r, target).delta_g for r in ratios]
            sequential_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            records = pool.map("measure", [(r,) for r in ratios])
            pool_s.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
        pool.shutdown()
    diff = max(abs(a - b["delta_g"]) for a, b in zip(sequential, records))
    seq, par = statistics.median(sequential_s), statistics.median(pool_s)
    result = {"arch": arch, "width": width, "probes": probes, "actors": actors, "threads_total": actors,
              "cpus_per_actor": cpus, "repeats": repeats, "sequential_s": seq, "pool_s": par, "speedup": seq / par,
              "sequential_runs_s": sequential_s, "pool_runs_s": pool_s,
              "max_abs_delta_g_diff": diff, "pids": sorted({r["pid"] for r in records})}
    if device == "cpu":
        ceiling_s = statistics.median(process_ceiling(setup_args, ratios, actors) for _ in range(repeats))
        result.update({"processes_s": ceiling_s, "process_ceiling": seq / ceiling_s,
                       "pool_efficiency": (seq / par) / (seq / ceiling_s)})
    return result


def run_pool(quick: bool) -> dict[str, Any]:
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus:
        return pool_speedup(width=1.0, probes=16, actors=4, calib_per_class=500, classes=100,
                            gpus_per_actor=min(0.25, gpus / 4), repeats=3)
    return pool_speedup(probes=8 if quick else 12, repeats=3)
