"""Ray Train launches of the pipeline: a baseline hands its weights over before Ray Train's teardown."""

import subprocess
import sys
import time

import pytest
import ray
import torch

from geoprune_ray.core.config import TrainConfig
from geoprune_ray.core.models import build_model
from geoprune_ray.core.pruning import ModelCard
from geoprune_ray.distributed.progress import Progress
from geoprune_ray.distributed.launch import fit, join_teardowns, load_checkpoint
from geoprune_ray.distributed.scaling import Scaling


@pytest.fixture(scope="module")
def launch(ray_cluster, digits, tmp_path_factory):
    train_set, test_set = digits
    card = ModelCard("convnet", 10, 3, 0.25, (3, 8, 8), train_set.mean, train_set.std)
    torch.manual_seed(0)
    return card, build_model("convnet", 10, 3, 0.25).state_dict(), ray.put((train_set, test_set)), \
        str(tmp_path_factory.mktemp("train"))


def test_a_baseline_hands_its_weights_over_before_the_teardown(launch):
    card, state, data_ref, storage = launch
    progress, teardowns, started = Progress("handover-test"), [], []
    try:
        launched = time.time()
        weights, history, metrics = fit(card, ray.put(state), data_ref, TrainConfig(epochs=1, batch_size=64, lr=0.1),
                                        Scaling(1, False, 0.5), storage, name="baseline",
                                        progress=("handover-test", "baseline"), teardowns=teardowns,
                                        on_started=started.append)
        returned = time.time()
        assert len(teardowns) == 1  # returned with Ray Train's run still to be joined
        # told once, with the time the worker started (what the pipeline holds back until then: its probe actors)
        assert len(started) == 1 and launched < started[0] < returned
        run = teardowns[0]
        join_teardowns(teardowns)
    finally:
        progress.close()
    assert teardowns == [] and run.error is None
    assert history == [] and metrics["epoch"] == 1 and metrics["top1"] > 20 and "checkpoint_path" not in metrics
    stored = load_checkpoint(run.result.checkpoint)  # the final checkpoint Ray Train kept holds the same weights
    assert stored["state_dict"].keys() == weights.keys()
    assert all(torch.equal(stored["state_dict"][k], weights[k]) for k in weights)
    assert any(not torch.equal(state[k], weights[k]) for k in weights)  # and they were trained


def test_a_run_that_fails_before_the_hand_over_raises(launch):
    card, state, data_ref, storage = launch
    wrong = build_model("convnet", 10, 3, 0.5).state_dict()  # another width: the worker cannot load it
    progress, teardowns = Progress("handover-fails"), []
    try:
        with pytest.raises(Exception, match="size mismatch"):
            fit(card, ray.put(wrong), data_ref, TrainConfig(epochs=1, batch_size=64, lr=0.1), Scaling(1, False, 0.5),
                storage, name="baseline-fails", progress=("handover-fails", "baseline"), teardowns=teardowns)
    finally:
        progress.close()
    assert teardowns == []


def test_processes_import_only_what_their_work_needs():
    """A Tune trial (a controller step's, or a fine-tune's that launches a run and reads its metrics) and Ray Train's
    controller (which unpickles the loop's config, an ``ArmJob`` in it, and the loop by reference to ``launch``)
    import no torch; the training module imports no torchvision (a convnet on in-memory data needs none). Each of
    those costs a Ray process 1-2 s of CPU at start-up."""
    code = ("import sys, geoprune_ray.distributed.trial, geoprune_ray.distributed.launch, "
            "geoprune_ray.distributed.scaling; assert 'torch' not in sys.modules, 'trial'; "
            "import geoprune_ray.distributed.training; assert 'torchvision' not in sys.modules, 'training'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr.splitlines()[-1]


def test_a_launch_starts_no_actor_the_pipeline_does_not_use(launch, monkeypatch):
    """No ``DatasetManager`` (no Ray datasets here), no placement-group cleaner, and, where the driver says the cluster
    has no autoscaler, no requests to Ray Data's autoscaling coordinator; the run still trains and reports. A Tune
    trial's launch reads only the metrics (``weights=False``: that process never imports torch)."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

    from geoprune_ray.distributed.launch import NO_AUTOSCALER_ENV
    from geoprune_ray.distributed.lean_train import LocalScalingPolicy, scaling_policy

    fixed = FixedScalingPolicy(ScalingConfig(num_workers=1))
    monkeypatch.delenv(NO_AUTOSCALER_ENV, raising=False)
    assert scaling_policy(fixed) is fixed  # a cluster that may autoscale keeps Ray Train's own policy
    monkeypatch.setenv(NO_AUTOSCALER_ENV, "1")
    assert type(scaling_policy(fixed)) is LocalScalingPolicy

    def dropped() -> list:  # from the GCS's actor table (the state API needs the dashboard, off in tests)
        return [a["ActorClassName"] for a in ray._private.state.actors().values()
                if a["ActorClassName"].split(".")[-1] in ("DatasetManager", "PlacementGroupCleaner")]

    before = len(dropped())
    card, state, data_ref, storage = launch
    weights, history, metrics = fit(card.to_dict(), ray.put(state), data_ref, TrainConfig(epochs=1, batch_size=64),
                                    Scaling(1, False, 0.5), storage, name="lean", weights=False)
    assert weights is None and history is None
    assert metrics["epoch"] == 1 and metrics["top1"] > 20 and metrics["checkpoint_path"]
    assert len(dropped()) == before  # none of these actors was created, alive or dead
