"""Resource arithmetic of a run: what it holds of the cluster (``Resources``), the GPU shares of probe actors,
training and sensitivity tasks, the Ray Train scaling of the baseline and of the arms' fine-tunes, how many
sensitivity tasks and side-by-side fine-tunes fit, and the wait for an autoscaled GPU node.

Pure functions of the cluster's figures where possible (``gpu_shares``, ``baseline_scaling``, ``prelaunch``, …: tested
without a cluster); the few that read the live cluster (``largest_node_cpus``, ``whole_nodes``) say so.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import NamedTuple, Optional

import ray

from ..errors import GeopruneError
from .probes import PoolSpec
from .scaling import Scaling

log = logging.getLogger("geoprune_ray")


@dataclasses.dataclass(frozen=True)
class Resources:
    """What the run holds of the cluster: GPU use and shares, and the Ray Train scaling the spec asks for."""

    cluster: dict
    use_gpu: bool
    gpus_per_actor: float
    gpus_per_worker: float
    scaling: Scaling
    fixed_gpus_per_worker: bool = False  # set in the job spec: the fine-tunes keep it
    gpus_per_task: float = 0.0  # each sensitivity task's, beside the actors


def largest_node_cpus() -> float:
    return max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)


def settled_free_cpus(want: float, wait_s: float = 10.0) -> float:
    """The CPUs free now, once up to ``wait_s`` has let ``want`` of them come free: Ray reports a finished trial's or
    a killed actor's CPUs free a moment after it ends, and a task sized at that moment would hold too few."""
    deadline = time.monotonic() + wait_s
    free = ray.available_resources().get("CPU", 0.0)
    while free < want and time.monotonic() < deadline:
        time.sleep(0.25)
        free = ray.available_resources().get("CPU", 0.0)
    return free


def side_by_side(res: Resources, arms: int) -> int:
    """How many fine-tunes run at once: every arm on GPUs; on CPUs at most one per core of the largest node (more
    would only share the same cores, each arm's Tune trial, Train controller and worker costing memory: four at once
    on 2 cores held 11.3 GiB against 7 or so for two)."""
    if res.scaling.use_gpu:
        return max(1, arms)
    node_cpus = largest_node_cpus()
    return max(1, min(arms, int(node_cpus // res.scaling.workers)))


def finetune_scaling(res: Resources, arms: int) -> Scaling:
    """The arms' fine-tunes run side by side once the search has given its share back: each takes an equal share of
    the GPUs (a fraction of one, or whole ones across several) and of a node's CPUs (at most what the spec asks), with,
    on CPUs, as many torch threads as the node's cores allow (one fine-tune alone uses the whole CPU, as the
    in-process path does)."""
    s = res.scaling
    concurrent = max(1, arms) * s.workers
    node_cpus = largest_node_cpus()
    trial_actors = 0.01 * max(1, arms)  # each fine-tune's Tune trial actor holds a sliver
    cpus = min(s.cpus_per_worker, max(0.01, (node_cpus - trial_actors) / concurrent))
    if s.use_gpu:
        gpus = res.cluster.get("GPU", 0.0)
        per_worker = res.gpus_per_worker if res.fixed_gpus_per_worker else min(1.0, gpus / concurrent)
        return dataclasses.replace(s, cpus_per_worker=cpus, gpus_per_worker=per_worker,
                                   threads=max(1, int(s.cpus_per_worker)))
    return dataclasses.replace(s, cpus_per_worker=cpus, threads=max(1, int(node_cpus // concurrent)))


def sensitivity_tasks(groups: int, actors: int, gpu: bool, node_cpus: Optional[float] = None) -> int:
    """How many Ray tasks share the sensitivity trials: one per two groups on GPUs; on CPUs no more than the cores the
    probe actors (a thread each) leave on the largest node, and at least one. Each task is a new process that imports
    torch and measures G₀ before its first trial: on 2 cores three of them cost more than the work they split."""
    tasks = max(1, math.ceil(groups / 2))
    if gpu:
        return tasks
    spare = int((largest_node_cpus() if node_cpus is None else node_cpus) - actors)
    return max(1, min(tasks, spare))


def prelaunch(res: "Resources", pool: PoolSpec, arm: Scaling, concurrent: int, free_cpus: float) -> int:
    """How many fine-tunes launch while the controller runs, beside the probe actors (they then wait for their arm's
    ratios): as many as fit in the CPUs free now, keeping a quarter CPU for the controller's step trials (a sliver
    each), so a waiting fine-tune can never starve the steps it waits for. On CPUs one at most: each fine-tune brings
    its trial, Ray Train controller and worker processes, and two launched beside the actors took the quickstart's
    peak memory from 7.2 to 8.4 GiB on 2 cores (bench run 7). On GPUs only where a fine-tune's share fits for sure:
    whole GPUs no actor is on, or the rest of the only GPU."""
    fits = int(max(0.0, free_cpus - 0.25) // (arm.cpus_per_worker * arm.workers + 0.01))
    if not arm.use_gpu:
        fits = min(fits, 1)
    else:
        gpus = res.cluster.get("GPU", 0.0)
        if gpus < 2:
            rest = gpus - pool.actors * pool.gpus_per_actor
            share = arm.gpus_per_worker * arm.workers
            fits = min(fits, math.floor(rest / share + 1e-6) if share else 0)  # 0.5 / 0.25 is 2, not 1.999…
        else:
            per_gpu = max(1, math.floor(1 / pool.gpus_per_actor)) if pool.gpus_per_actor else 1
            free_gpus = math.floor(gpus) - math.ceil(pool.actors / per_gpu)
            fits = min(fits, (free_gpus // arm.workers) if arm.gpus_per_worker >= 1 else 0)
    return max(0, min(concurrent, fits))


def wait_for_gpus(timeout_s: float) -> dict[str, float]:
    """Ask the autoscaler for a GPU node (workers that scale from 0) and wait until one has joined."""
    from ray.autoscaler.sdk import request_resources

    log.info("waiting up to %.0f s for the autoscaler to start a GPU node", timeout_s)
    request_resources(bundles=[{"GPU": 1}])
    deadline = time.monotonic() + timeout_s
    while not (cluster := ray.cluster_resources()).get("GPU") and time.monotonic() < deadline:
        time.sleep(5)
    request_resources(bundles=[])  # the running trials hold the node from here on
    return cluster


def whole_nodes(scaling: Scaling, reserved: float = 0.0) -> Scaling:
    """The baseline's workers: a GPU each (``scaling.gpus_per_worker``: a whole one, or what the probe actors starting
    beside it leave of theirs) and the CPUs that go with it, less the CPUs ``reserved`` for those actors."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    return baseline_scaling(scaling, max(0.0, ray.available_resources().get("CPU", 0) - reserved), largest_node_cpus(),
                            max((n.get("CPU", 0) / n["GPU"] for n in nodes if n.get("GPU")), default=0.0))


def baseline_scaling(scaling: Scaling, free_cpus: float, node_cpus: float, cpus_per_gpu: float) -> Scaling:
    """On CPUs: what is free now (all of an idle node's; what other pipelines leave of a shared one), so one
    baseline uses the node and a batch's baselines take turns. On GPUs: one GPU's share of its node's CPUs, so
    the baselines of a batch train side by side, one per GPU, instead of the first taking every CPU while the
    other GPUs wait."""
    cpus = min(node_cpus, free_cpus / scaling.workers)
    if scaling.use_gpu:
        cpus = min(cpus, cpus_per_gpu)
    cpus = max(scaling.cpus_per_worker, cpus)
    # The actors beside it hold a fraction of a CPU each and sit idle while it trains: it runs on every core it
    # holds any part of, as the in-process path does.
    gpus = min(1.0, scaling.gpus_per_worker or 1.0) if scaling.use_gpu else 0.0
    return Scaling(scaling.workers, scaling.use_gpu, cpus, gpus, threads=max(1, math.ceil(cpus - 1e-9)))


SPREAD_MARGIN = 1 / 16  # an actor's share exceeds 1/(k+1) of a GPU by this fraction of it, so k fit on a GPU, not k+1


class GpuShares(NamedTuple):
    actor: float  # each probe actor's
    worker: float  # each Ray Train worker's while the actors hold theirs (the baseline; ``finetune_all``'s fine-tunes)
    task: float  # each sensitivity task's, beside the actors


def gpu_shares(res, gpus: float) -> GpuShares:
    """GPU shares of the probe actors, of training while they hold theirs, and of the sensitivity tasks beside them,
    so the actors never starve the rest.

    Ray places fractional requests best-fit, packing them onto the fullest GPU that fits: four actors of 0.25 each
    would all land on the first GPU. With several GPUs the actors' shares are therefore sized so that no more than
    k = ceil(actors / GPUs) fit on one GPU (a share just over 1/(k+1)): one actor per GPU while there are as many GPUs
    as actors. Training then takes whole GPUs that hold no actor, or else what an actor leaves of its GPU; a
    sensitivity task takes half of that rest, so two run beside the actors on each GPU. One GPU (or less) is shared as
    before: the actors together take at most half of it. A share set in the job spec is kept as it is."""
    if not gpus:
        return GpuShares(0.0, 0.0, 0.0)
    actors = res.probe_actors
    if res.gpus_per_actor is not None or gpus < 2:
        per_actor = res.gpus_per_actor if res.gpus_per_actor is not None else min(0.25, gpus / 2 / actors)
        left = gpus - per_actor * actors
        default_worker, task = (1.0 if left >= 1 else left), per_actor
    else:
        per_gpu = math.ceil(actors / math.floor(gpus))  # actors that must share a GPU
        per_actor = round((1 + SPREAD_MARGIN) / (per_gpu + 1), 4)
        rest = math.floor((1 - per_gpu * per_actor) * 1e4) / 1e4  # what actors leave of a GPU they are on
        free_gpus = math.floor(gpus) - math.ceil(actors / per_gpu)  # GPUs no actor is on
        default_worker, task = (1.0 if free_gpus >= res.workers else rest), math.floor(rest / 2 * 1e4) / 1e4
    per_worker = res.gpus_per_worker if res.gpus_per_worker is not None else default_worker
    if per_worker <= 0 or per_worker > gpus:
        raise GeopruneError(f"the probe actors take {per_actor * actors:g} of {gpus:g} GPUs, "
                            f"leaving none for fine-tuning", "lower resources.gpus_per_actor or probe_actors")
    return GpuShares(per_actor, per_worker, task)
