"""Shared fixtures: real data (digits always; Fashion-MNIST where installed) and small trained models."""

from __future__ import annotations

import os

import pytest
import torch

from geoprune_ray.core.config import MethodConfig, TrainConfig
from geoprune_ray.core.data import SYSTEM_FASHION_MNIST, load_dataset
from geoprune_ray.core.models import build_model
from geoprune_ray.core.train import train

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Small settings for the digits tests: the real method and paths, on a 1,437-image training split.
SMALL = dict(calib_per_class=60, bn_batches=4, bn_batch_size=256, probes=8)


def small_method(**overrides) -> MethodConfig:
    return MethodConfig(**{**SMALL, **overrides})


@pytest.fixture(scope="session")
def digits():
    """Digits fitted to 3 channels at their native 8×8 (the convnet's input)."""
    return load_dataset("digits", "train").fit(3, None), load_dataset("digits", "test").fit(3, None)


@pytest.fixture(scope="session")
def digits_model(digits):
    """A small convnet trained on digits (~99% top-1): the base model of the method tests."""
    train_set, _ = digits
    torch.manual_seed(0)
    model = build_model("convnet", 10, width=0.5)
    train(model, train_set, TrainConfig(epochs=8, batch_size=64, lr=0.1), "cpu")
    return model.eval()


def fashion_available() -> bool:
    return (SYSTEM_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file()


@pytest.fixture(scope="session")
def fashion():
    if not fashion_available():
        if os.environ.get("CI") == "true":
            pytest.fail("Fashion-MNIST is missing under CI: .ci/run must apt-get install dataset-fashion-mnist")
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return load_dataset("fashion-mnist", "train").fit(3, None), load_dataset("fashion-mnist", "test").fit(3, None)


def assert_refused(code: int, err: str, words) -> None:
    """The fault corpus's rule for bad input: exit 2, one line on stderr naming the problem, no traceback."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("geoprune: error:"), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for every Ray test of the session."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_weights(digits_model, tmp_path_factory):
    """The trained digits convnet as a state_dict file (a job's model.weights)."""
    path = tmp_path_factory.mktemp("weights") / "convnet_digits.pt"
    torch.save(digits_model.state_dict(), path)
    return path


# The digits pipeline job of the Ray tests: the trained convnet, every arm, small method settings.
PIPELINE_METHOD = {"calib_per_class": 60, "bn_batches": 4, "probes": 8}


def pipeline_job(weights, arms, name):
    return {"name": name, "model": {"name": "convnet", "width": 0.5, "weights": str(weights)},
            "data": {"name": "digits"},
            "protocol": {"finetune_epochs": 2, "batch_size": 64, "lr": 0.1, "arms": list(arms),
                         "speed": False},  # the speed stage is timed where a test checks it (full_run, resume)
            "resources": {"probe_actors": 2, "cpus_per_worker": 0.5}, "method": PIPELINE_METHOD}


@pytest.fixture(scope="session")
def full_run(ray_cluster, digits_weights, tmp_path_factory):
    """One finished pipeline run on digits with all four arms and the four allocations at 2× fewer MACs:
    (run directory, summary)."""
    from geoprune_ray.core.spec import JobSpec
    from geoprune_ray.distributed.pipeline import run_job
    from geoprune_ray.app.report import render_report

    storage = tmp_path_factory.mktemp("run") / "digits"
    job = pipeline_job(digits_weights, ["adaptive", "baseline", "gc", "uniform"], "digits-full")
    job["protocol"]["probe_accuracy"] = True  # each probe's top-1 too (the evidence's Spearman)
    job["protocol"]["speed"] = True  # every arm timed as deployed (test_report)
    job["protocol"]["compressions"] = [2]  # and every allocation at 2× fewer MACs (issue 16; test_evidence)
    spec = JobSpec.from_dict(job)
    return storage, run_job(spec, str(storage), report=render_report)
