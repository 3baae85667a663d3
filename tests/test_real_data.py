"""The method's premises on real data: recalibration rescues pruned accuracy; ΔG grows with r."""

import copy

import pytest
import torch

from conftest import small_method
from geoprune_ray.core.config import TrainConfig
from geoprune_ray.core.geometry import Calibration, GeometryMeter, recalibrate_bn
from geoprune_ray.core.method import PruneTarget, measure
from geoprune_ray.core.models import build_model
from geoprune_ray.core.pruning import prune_copy
from geoprune_ray.core.train import evaluate, train


@pytest.fixture(scope="module")
def fashion_model(fashion):
    """A narrow convnet trained for one epoch on 20,000 Fashion-MNIST images (~76% top-1)."""
    train_set, _ = fashion
    torch.manual_seed(0)
    model = build_model("convnet", 10, width=0.25)
    subset = train_set.subset(torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[:20_000])
    train(model, subset, TrainConfig(epochs=1, batch_size=128, lr=0.1), "cpu")
    return model.eval()


@pytest.fixture(params=["digits", "fashion"])
def case(request):
    """(train, test, trained model, method settings) for each real dataset."""
    if request.param == "digits":
        train_set, test_set = request.getfixturevalue("digits")
        return train_set, test_set, request.getfixturevalue("digits_model"), small_method()
    train_set, test_set = request.getfixturevalue("fashion")
    return train_set, test_set, request.getfixturevalue("fashion_model"), small_method(calib_per_class=100)


def test_recalibration_raises_accuracy_after_pruning_30_percent(case):
    train_set, test_set, model, cfg = case
    pruned, _ = prune_copy(model, 0.3, train_set.shape, 10)
    without = evaluate(pruned, test_set, "cpu")["top1"]
    recalibrate_bn(pruned, Calibration.from_dataset(train_set, cfg).bn_batches())
    with_recal = evaluate(pruned, test_set, "cpu")["top1"]
    assert with_recal > without + 1.0, (without, with_recal)


def test_delta_g_grows_with_pruning_ratio(case):
    train_set, _, model, cfg = case
    meter = GeometryMeter(Calibration.from_dataset(train_set, cfg))
    base = copy.deepcopy(model)
    meter.set_reference(base)
    target = PruneTarget(train_set.shape, 10)
    values = [measure(base, meter, r, target).delta_g for r in (0.1, 0.3, 0.5, 0.7)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[0] > 0
