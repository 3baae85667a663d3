"""Ray Train launches of the pipeline: a baseline hands its weights over before Ray Train's teardown; a launch goes on
from the checkpoints of an interrupted run of its name."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from conftest import small_method

from geoprune_ray.core.artifact import ModelCard
from geoprune_ray.core.config import PruneTarget, TrainConfig
from geoprune_ray.core.geometry import Calibration
from geoprune_ray.core.models import build_model
from geoprune_ray.distributed.progress import Progress
from geoprune_ray.distributed.launch import fit, join_teardowns, load_checkpoint
from geoprune_ray.distributed.scaling import ArmJob, Scaling


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


def test_a_launch_under_a_finished_runs_name_resumes_only_a_run_of_its_own_config(launch):
    """Ray Train hands a launch the latest checkpoint stored under its name and storage, even that of a run that
    finished. The same run launched again trains nothing and ends with the same weights (a driver killed after the
    run but before it kept the result); another config under that name (here another learning rate) trains from the
    start instead of taking the finished run's weights for its own. A snapshot Ray Train cannot read (cut short by a
    driver killed while writing it), which would fail every launch under that name, is set aside first."""
    card, state, data_ref, storage = launch
    cut = Path(storage) / "again" / "checkpoint_manager_snapshot.json"
    cut.parent.mkdir()
    cut.write_text('{"ray_version": "%s", "checkpoint_res' % ray.__version__)
    scaling, cfg = Scaling(1, False, 0.5), TrainConfig(epochs=1, batch_size=64, lr=0.1)
    first, _, metrics = fit(card, ray.put(state), data_ref, cfg, scaling, storage, name="again")
    assert metrics["resumed_from_epoch"] == 0
    (aside,) = Path(storage).glob("again.unreadable-*")
    assert (aside / cut.name).read_text().endswith("checkpoint_res")  # kept as it was, to look at
    again, _, metrics = fit(card, ray.put(state), data_ref, cfg, scaling, storage, name="again")
    assert metrics["resumed_from_epoch"] == 1 and metrics["epoch"] == 1
    assert all(torch.equal(first[k], again[k]) for k in first)
    other, _, metrics = fit(card, ray.put(state), data_ref, TrainConfig(epochs=1, batch_size=64, lr=0.05), scaling,
                            storage, name="again")
    assert metrics["resumed_from_epoch"] == 0 and metrics["top1"] > 20
    assert any(not torch.equal(first[k], other[k]) for k in first)


def _registered(run: Path) -> int:
    """How many checkpoints Ray Train's controller has registered for the run stored in ``run`` (its snapshot)."""
    try:
        return len(json.loads((run / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):  # none yet, or caught while it is written
        return 0


def _train_workers() -> dict[str, int]:
    """The live Ray Train workers: actor id → pid (from the GCS's actor table)."""
    return {actor_id: a["Pid"] for actor_id, a in ray._private.state.actors().items()
            if a["ActorClassName"].endswith("RayTrainWorker") and a["State"] == "ALIVE"}


def _kill_the_worker_after_a_checkpoint(run: Path, launched: threading.Thread, others: set) -> int:
    """SIGKILL the run's Ray Train worker (not one of ``others``, alive before) once a checkpoint of it is
    registered; returns how many were then."""
    while launched.is_alive():
        done = _registered(run)
        if done:
            (pid,) = [pid for actor_id, pid in _train_workers().items() if actor_id not in others]
            os.kill(pid, signal.SIGKILL)
            return done
        time.sleep(0.05)
    raise AssertionError("the run ended before a checkpoint was registered")


def test_a_fine_tune_whose_worker_was_killed_goes_on_from_its_last_checkpoint(ray_cluster, digits, digits_model,
                                                                            tmp_path):
    """A fine-tune of 3 epochs whose worker is killed (SIGKILL) after its first checkpointed epoch: launched again
    under the same name and storage, as a Tune trial run again after a crash launches it, it goes on from the last
    checkpoint Ray Train registered. It rebuilds the pruned model from the checkpoint's history, reports the measures
    before fine-tuning that the checkpoint carries, trains only the epochs left, and ends as an uninterrupted run of
    the same config does.

    Tolerance: both runs train in a worker process with the same thread count, and the resumed one restores the
    optimizer and scheduler state exactly and reseeds the shuffle and augmentation per epoch, so the weights agree to
    float rounding; a CPU whose kernels reorder sums between processes could differ by rounding, which two epochs at
    this learning rate keep far below 1e-3. Top-1 on the 360 test images: within one image."""
    train_set, test_set = digits
    data_ref = ray.put((train_set.subset(torch.arange(16 * len(train_set)) % len(train_set)), test_set))  # ~2 s epochs
    card = ModelCard("convnet", 10, 3, 0.5, (3, 8, 8), train_set.mean, train_set.std)
    job = ArmJob(0.3, ray.put(Calibration.from_dataset(train_set, small_method())), PruneTarget((3, 8, 8), 10))
    cfg, scaling, storage = TrainConfig(epochs=3, batch_size=32, lr=0.02, schedule="cosine"), Scaling(1, False, 0.5), \
        str(tmp_path)
    state_ref = ray.put(digits_model.state_dict())
    progress, errors = Progress("resume-test"), []

    def crashed_launch() -> None:
        try:
            fit(card, state_ref, data_ref, cfg, scaling, storage, name="finetune-adaptive", arm=job,
                progress=("resume-test", "first"), weights=False)
        except Exception as exc:  # noqa: BLE001 - what the test checks
            errors.append(exc)

    try:
        others, first = set(_train_workers()), threading.Thread(target=crashed_launch)
        first.start()
        registered = _kill_the_worker_after_a_checkpoint(tmp_path / "finetune-adaptive", first, others)
        first.join()
        assert errors  # it died: it did not finish
        # the uninterrupted run beside it (2 CPUs, each run's worker takes half a CPU and one thread)
        results = {}
        beside = threading.Thread(target=lambda: results.update(whole=fit(
            card, state_ref, data_ref, cfg, scaling, storage, name="uninterrupted", arm=job, weights=False)[2]))
        beside.start()
        _, _, resumed = fit(card, state_ref, data_ref, cfg, scaling, storage, name="finetune-adaptive", arm=job,
                            progress=("resume-test", "second"), weights=False)
        beside.join()
        whole = results["whole"]
        events = ray.get(progress.board.since.remote(0))
    finally:
        progress.close()
    assert registered <= resumed["resumed_from_epoch"] <= 2 and whole["resumed_from_epoch"] == 0
    second = [e for e in events if e.get("label") == "second"]
    assert second[0]["kind"] == "resume" and second[0]["epoch"] == resumed["resumed_from_epoch"]
    assert [e["epoch"] for e in second[1:]] == list(range(resumed["resumed_from_epoch"] + 1, 4))  # only those left
    for key in ("top1_before_finetune", "delta_g", "macs", "params"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-6), key
    assert abs(resumed["top1"] - whole["top1"]) <= 100 / len(test_set) + 1e-9
    a, b = load_checkpoint(resumed["checkpoint_path"]), load_checkpoint(whole["checkpoint_path"])
    assert a["history"] == b["history"]  # the same pruning, rebuilt from the checkpoint's history
    for k, v in b["state_dict"].items():
        assert torch.allclose(a["state_dict"][k].float(), v.float(), rtol=1e-3, atol=1e-3), k
