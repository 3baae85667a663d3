"""The speed stage: every fine-tuned model timed against the base as the deploy target runs it (``core.speed``), in
one Ray task after the last fine-tune, never beside one.

On a CPU target the task holds the CPUs free on the largest node (every one of them on an embedded Ray, once the run's
own work has ended), and times 1 thread and all it holds; on a GPU target it holds one GPU. Before timing it waits
for the machine's other processes to go quiet (``core.speed.wait_for_quiet``). A GPU target on a cluster without GPUs is
recorded as not measured here. Each model is rebuilt from its fine-tune's checkpoint (the pruning history replayed,
the fine-tuned weights loaded).
"""

from __future__ import annotations

from typing import Any, Mapping

import ray

from ..core.deploy import deploy_target, not_measured

WAIT_S = 600.0  # how long the timing task may wait to be placed before the run records it as not measured


@ray.remote(max_retries=1)
def _time_task(card: dict, state: Any, checkpoints: Mapping[str, str], deploy: str, macs: Mapping[str, int],
               cpus: int) -> dict[str, Any]:
    from ..core.artifact import ModelCard
    from ..core.pruning import replay_pruning
    from ..core.speed import deploy_speed
    from .launch import load_checkpoint

    card = ModelCard.from_dict(card)
    base = card.build()
    base.load_state_dict(state)
    models = {}
    for name, path in checkpoints.items():
        saved = load_checkpoint(path)
        model = replay_pruning(card.build(), saved["history"], card.input_shape)
        model.load_state_dict(saved["state_dict"])
        models[name] = model
    return deploy_speed(base, models, card.input_shape, deploy, cpus=cpus, macs=macs)


def time_models(card: dict, state_ref: Any, checkpoints: Mapping[str, str], deploy: str, macs: Mapping[str, int],
                node_cpus: float, free_cpus: float, gpus: float, wait_s: float = WAIT_S) -> dict[str, Any]:
    """The run's speed record (``core.speed.deploy_speed``), timed in one task placed for ``deploy``: on a CPU target
    it holds the CPUs free now on the largest node (all of them once this run's own work has ended on an embedded
    Ray; fewer where other runs share the cluster), so it never waits on work it cannot see end. A task the cluster
    cannot place within ``wait_s`` is recorded as not measured, with why."""
    target = deploy_target(deploy)
    if target.device == "cuda" and not gpus:
        return not_measured(deploy)
    cpus = max(1, min(int(node_cpus), int(free_cpus)))
    options = {"num_cpus": 1, "num_gpus": 1} if target.device == "cuda" else {"num_cpus": cpus}
    ref = _time_task.options(**options).remote(card, state_ref, dict(checkpoints), deploy, dict(macs), cpus)
    ready, _ = ray.wait([ref], timeout=wait_s)
    if not ready:
        ray.cancel(ref, force=True)
        return not_measured(deploy, f"not measured: the cluster placed no task of {options} within {wait_s:.0f} s")
    return ray.get(ref)
