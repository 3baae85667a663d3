"""A pool of probe actors: each keeps the base model, the calibration set and G₀ resident.

A probe (or a controller step, or a sensitivity trial) is one ``measure`` call on an actor:
copy, prune, recalibrate, ΔG: milliseconds of work with no model reload. Actors restart after a
crash and their in-flight calls are retried (``max_restarts``, ``max_task_retries``); every
record names the actor process that produced it.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import ray
import torch
from torch import nn

from ..core.geometry import Calibration, GeometryMeter, Reference, measure_reference, torch_threads
from ..core.method import PruneTarget, measure
from ..core.pruning import macs_params, prune_copy
from ..core.train import keep_heap
from ..errors import GeopruneError
from .holder import SharedObjects, actor_name, fetch, holder_name, share
from .progress import restarted

log = logging.getLogger("geoprune_ray")
MAX_RESTARTS = 3
START_TIMEOUT_S = 600.0  # long enough for an autoscaler to add a node; a request that never fits fails then


@ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
class ProbeActor:
    """Holds the base model, calibration set and reference geometry on its device."""

    def __init__(self, run_id: str, target: PruneTarget, bn_recalibration: bool, threads: int = 1):
        # Cheap: the process, its imports and (on a GPU) the CUDA context. The base model and calibration set are
        # fetched by ``load`` once the baseline exists, so actors start while it trains.
        keep_heap()
        torch.set_num_threads(threads)
        self.run_id, self.target, self.bn_recalibration = run_id, target, bn_recalibration
        self.device = device_for(ray.get_gpu_ids())
        if self.device.type == "cuda":
            torch.zeros(1, device=self.device)
        self.meter: Optional[GeometryMeter] = None
        ctx = ray.get_runtime_context()
        self.identity = {"pid": os.getpid(), "node": ctx.get_node_id()[:12], "device": str(self.device),
                         "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
                         "actor": ctx.get_actor_name() or ctx.get_actor_id()[:12],
                         "restarted": restarted()}

    def load(self, refs: Optional[dict[str, ray.ObjectRef]] = None) -> dict[str, Any]:
        """Fetch the base model and calibration set (from ``refs``, the pool's ``shared``, or by the run's name: a
        restarted actor fetches them again from the holder) and measure G₀, or adopt the one measured once for the run
        (``g0`` in ``info``); idempotent."""
        if self.meter is None:
            shared = fetch(self.run_id, refs)
            meter = GeometryMeter(shared["calibration"].to(self.device), self.bn_recalibration)
            self.base = copy.deepcopy(shared["base"]).to(self.device)
            adopted = meter.use_reference(self.base, shared.get("reference"))
            self.identity["g0"] = "adopted" if adopted else "measured"
            self.meter = meter
        return self.info()

    def info(self) -> dict[str, Any]:
        return dict(self.identity)

    def reference(self, base: nn.Module, calibration: Calibration) -> Reference:
        """The base's G₀, measured once for the run on the CPU with one torch thread (``geometry.measure_reference``)
        for every process on the CPU to adopt: this actor's own ``load`` too, which is queued behind this call."""
        return measure_reference(base, calibration, self.bn_recalibration)

    def noise(self, splits: int, seed: int) -> float:
        """G_noise of the base model on the resident calibration set."""
        self.load()
        return self.meter.noise(splits, seed)

    def measure(self, ratios: Mapping[str, float] | float, eval_set: Any = None, threads: int = 0) -> dict[str, Any]:
        """ΔG, MACs and params of the base pruned with ``ratios``, and who measured it; with ``eval_set``
        also the recalibrated copy's top-1 on it (``top1``). ``threads``: torch threads for this call only (a
        controller step runs alone on the pool, see ``ProbePool.step_threads``)."""
        self.load()
        with torch_threads(threads) as used:
            res = measure(self.base, self.meter, ratios, self.target, eval_set)
        extra = {} if res.top1 is None else {"top1": res.top1}
        return {"delta_g": res.delta_g, "macs": res.macs, "params": res.params, "seconds": res.seconds,
                "threads": used, **extra, **self.identity}

    def size(self, ratios: Mapping[str, float] | float) -> dict[str, int]:
        """MACs and params of the base pruned with ``ratios`` (no ΔG)."""
        self.load()
        pruned, _ = prune_copy(self.base, ratios, self.target.input_shape, self.target.num_classes,
                               self.target.importance, self.target.round_to)
        macs, params = macs_params(pruned, self.target.input_shape)
        return {"macs": macs, "params": params}


@dataclass(frozen=True)
class PoolSpec:
    """How many probe actors and what each holds of the cluster."""

    actors: int = 2
    cpus_per_actor: float = 0.25
    gpus_per_actor: float = 0.0  # a fraction of a GPU each (e.g. 0.25: four actors per GPU)


class ProbePool:
    """Named probe actors started once per run; calls fan out in ``spread`` order and come back in order.

    ``ProbePool(base, calibration, ...)`` starts the actors and loads them; ``ProbePool.start(...)`` only starts
    them (processes, imports, CUDA contexts) and ``load(base, calibration)`` hands them the model later, so the
    start-up overlaps the baseline's training."""

    def __init__(self, base: nn.Module, calibration: Calibration, target: PruneTarget, bn_recalibration: bool,
                 spec: PoolSpec, run_id: str, start_timeout_s: float = START_TIMEOUT_S):
        self._start(target, bn_recalibration, spec, run_id, start_timeout_s)
        self.load(base, calibration)

    @classmethod
    def start(cls, target: PruneTarget, bn_recalibration: bool, spec: PoolSpec, run_id: str,
              start_timeout_s: float = START_TIMEOUT_S) -> "ProbePool":
        pool = cls.__new__(cls)
        pool._start(target, bn_recalibration, spec, run_id, start_timeout_s)
        return pool

    def _start(self, target: PruneTarget, bn_recalibration: bool, spec: PoolSpec, run_id: str,
               start_timeout_s: float) -> None:
        self.spec, self.run_id, self.start_timeout_s = spec, run_id, start_timeout_s
        self.names = [actor_name(run_id, i) for i in range(spec.actors)]
        self.holder = None
        for name in [holder_name(run_id), *self.names]:
            try:  # a resumed driver finds its actors gone with the old cluster, or still alive in a shared one
                ray.kill(ray.get_actor(name))
            except ValueError:
                pass
        options = {"num_cpus": spec.cpus_per_actor, "num_gpus": spec.gpus_per_actor, "lifetime": None}
        self.actors = [ProbeActor.options(name=name, **options).remote(run_id, target, bn_recalibration)
                       for name in self.names]
        self.started_at = time.monotonic()
        self.created = time.time()  # the time line's "actors" span starts here
        self.g0_measured: Optional[float] = None  # when actor 0 had measured G₀ (``hand(..., measure_g0=True)``)
        self._g0: Optional[ray.ObjectRef] = None  # actor 0's G₀ while it is not known to be measured

    def load(self, base: nn.Module, calibration: Calibration, reference: Optional[Reference] = None) -> None:
        """Hand the actors the base model and calibration set (and ``reference``) and wait until every one holds them
        (and G₀)."""
        self.hand(base, calibration, reference)
        self.wait_loaded()

    def hand(self, base: nn.Module, calibration: Calibration, reference: Optional[Reference] = None,
             measure_g0: bool = False) -> None:
        """Put the base model and calibration set (and the base's ``reference``, G₀ measured once) where the actors
        fetch them (``shared``: their object refs); returns at once. With ``measure_g0`` (and no ``reference``),
        actor 0 measures that reference while the caller goes on: ``shared["reference"]`` is the ref of its answer,
        which the other actors, the sensitivity tasks and the fine-tunes adopt."""
        # One copy of each in the object store, read by every actor (and the sensitivity tasks); the driver owns them.
        self.shared = share(base, calibration, reference)
        if measure_g0 and reference is None:
            self._g0 = self.actors[0].reference.remote(self.shared["base"], self.shared["calibration"])
            self.shared["reference"] = self._g0
        # for restarted actors; those loading now are handed the refs and never wait for this process to start
        self.holder = SharedObjects.options(name=holder_name(self.run_id)).remote(self.shared)

    def wait_loaded(self) -> None:
        """Wait until every actor has started and holds the base model, the calibration set and G₀."""
        # Placed and started within the start timeout, counted from their creation (a long baseline has used it up
        # long since the actors started: a running actor answers at once, so a few seconds always remain).
        started = [a.info.remote() for a in self.actors]
        timeout = max(min(5.0, self.start_timeout_s), self.start_timeout_s - (time.monotonic() - self.started_at))
        _, pending = ray.wait(started, num_returns=len(started), timeout=timeout)
        if pending:  # Ray would wait for ever for resources that never come free
            spec = self.spec
            free, total = ray.available_resources(), ray.cluster_resources()
            self.shutdown()
            gpus = f" and {spec.gpus_per_actor:g} GPU" if spec.gpus_per_actor else ""
            have = ", ".join(f"{free.get(k, 0):g} {k} free of {total[k]:g}" for k in ("CPU", "GPU") if total.get(k))
            raise GeopruneError(f"{len(pending)} of {len(started)} probe actors could not start within "
                                f"{self.start_timeout_s:g} s: each asks for {spec.cpus_per_actor:g} CPU{gpus}; the "
                                f"cluster has {have}",
                                "lower resources.cpus_per_actor or resources.probe_actors, or add nodes")
        if self._g0 is not None:  # G₀, measured by actor 0 (``hand``)
            ray.wait([self._g0], fetch_local=False)
            self.g0_measured, self._g0 = time.time(), None
        self.identities = ray.get([a.load.remote(self.shared) for a in self.actors])
        log.info("%d probe actors ready: %s", len(self.actors),
                 ", ".join(f"pid {i['pid']} on {i['device']}" for i in self.identities))

    def step_threads(self) -> tuple[int, ...]:
        """Torch threads for a controller step on each actor. Steps come one at a time, so a step's actor has the
        CPUs the whole pool used in the search stage (one thread per actor) on its node to itself, as the one-process
        path has its threads; 0 (its own setting) for an actor on a GPU."""
        nodes = [i["node"] for i in self.identities]
        return tuple(0 if i["device"] != "cpu" else nodes.count(i["node"]) for i in self.identities)

    def submit(self, method: str, args: Sequence[tuple]) -> list[ray.ObjectRef]:
        order = spread(len(args), len(self.actors))
        return [getattr(self.actors[order[i]], method).remote(*a) for i, a in enumerate(args)]

    def map(self, method: str, args: Sequence[tuple]) -> list[Any]:
        return ray.get(self.submit(method, args))

    def shutdown(self) -> None:
        """Give the actors' resources back (idempotent)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.holder is not None:
            ray.kill(self.holder)
        self.actors, self.holder = [], None


class PoolStarter:
    """Starts a run's probe pool once, when first asked: by the baseline's launch once its worker has started (the
    actors' start-up then overlaps the worker's own set-up and training instead of slowing its launch: each is a new
    process importing torch), or by the run when it needs the actors (no baseline to train, or it failed to say)."""

    def __init__(self, start: Callable[[], ProbePool]) -> None:
        self._start = start
        self.pool: Optional[ProbePool] = None

    def start(self) -> ProbePool:
        if self.pool is None:
            self.pool = self._start()
        return self.pool

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def device_for(gpu_ids: Sequence[Any]) -> torch.device:
    """The device of a process Ray gave ``gpu_ids``: CUDA where it exists, else the CPU (a cluster that declares GPUs
    its nodes do not have, e.g. ``ray start --num-gpus`` on a CPU machine, runs on the CPU instead of crashing)."""
    if gpu_ids and not torch.cuda.is_available():
        log.warning("Ray assigned GPU %s but CUDA is not available here: running on the CPU", list(gpu_ids))
    return torch.device("cuda" if gpu_ids and torch.cuda.is_available() else "cpu")


def spread(calls: int, actors: int) -> list[int]:
    """The actor of each call, in a snake order (0, 1, …, n−1, n−1, …, 0, 0, 1, …): probes come sorted by
    ratio and cost falls with the ratio, so each actor gets as many cheap calls as dear ones."""
    return [(i % actors) if (i // actors) % 2 == 0 else actors - 1 - (i % actors) for i in range(calls)]


def actor_restarts(rows: list[dict[str, Any]]) -> int:
    """How many times a probe actor restarted: the restarted processes (actor, pid) that answered, not their rows."""
    return len({(row["actor"], row["pid"]) for row in rows if row["restarted"]})
