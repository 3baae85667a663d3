"""Ray Train without the parts of a launch this service does not use (``launch._trainer`` says which and why).

Imports Ray Train's internals, so only a process that launches a run imports it. Ray is pinned (2.60): the trainer
filters Ray Train's own lists and objects, so whatever a later Ray adds is kept. Ray Train's controller unpickles
``LocalScalingPolicy`` from here.
"""

from __future__ import annotations

import os
from typing import Any

from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from .launch import NO_AUTOSCALER_ENV


class LocalScalingPolicy(FixedScalingPolicy):
    """Ray Train's fixed scaling policy without its resource requests to Ray Data's autoscaling coordinator, an actor
    it creates for the cluster: a Ray with no autoscaler (an embedded one) gains nothing from them, and an idle actor
    still wakes about 100 times a second, which slows the epochs of a small CPU."""

    def after_controller_start(self, train_run_context: Any) -> None:
        pass

    def _maybe_send_resource_request(self) -> None:
        pass

    def _send_resource_request(self) -> None:
        pass


def scaling_policy(policy: Any) -> Any:
    """The policy a launch from this process runs under: Ray Train's own, or its fixed policy without the
    autoscaler's requests on a cluster that has no autoscaler (``NO_AUTOSCALER_ENV``)."""
    if os.environ.get(NO_AUTOSCALER_ENV) == "1" and type(policy) is FixedScalingPolicy:
        return LocalScalingPolicy(policy.scaling_config)
    return policy


class LeanTrainer(DataParallelTrainer):
    """A ``DataParallelTrainer`` without the ``PlacementGroupCleanerCallback``, the ``DatasetsCallback`` when it has no
    Ray datasets, and (``scaling_policy``) the autoscaler's requests where there is no autoscaler."""

    def _create_default_callbacks(self) -> list:
        unused = (PlacementGroupCleanerCallback,) + (() if self.datasets else (DatasetsCallback,))
        return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, unused)]

    def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Any:
        controller_init_kwargs["scaling_policy"] = scaling_policy(controller_init_kwargs["scaling_policy"])
        return super()._initialize_and_run_controller(**controller_init_kwargs)
