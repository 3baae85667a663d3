import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from conftest import small_method
from geoprune_ray.core.geometry import (Calibration, GeometryMeter, class_geometry, delta_g, recalibrate_bn)
from geoprune_ray.errors import GeopruneError

_copy = copy.deepcopy


def _three_classes(shift=(0.0, 0.0)):
    """Two points per class, symmetric about the centroids (1,0), (0,1), (−1,−1)."""
    pts = [(1, 0.5), (1, -0.5), (0.5, 1), (-0.5, 1), (-1, -0.5), (-1, -1.5)]
    feats = torch.tensor(pts, dtype=torch.float64) + torch.tensor(shift, dtype=torch.float64)
    return feats, torch.tensor([0, 0, 1, 1, 2, 2])


def test_hand_built_geometry():
    feats, labels = _three_classes()
    # centroids (1,0), (0,1), (−1,−1) already have mean zero: G is their cosines
    s = -1 / math.sqrt(2)
    expected = torch.tensor([[1, 0, s], [0, 1, s], [s, s, 1]], dtype=torch.float64)
    assert torch.allclose(class_geometry(feats, labels, 3), expected, atol=1e-12)
    # centring removes a common offset of all features
    shifted, _ = _three_classes(shift=(3.0, -7.0))
    assert torch.allclose(class_geometry(shifted, labels, 3), expected, atol=1e-12)


def test_delta_g_is_rms_of_off_diagonal_change():
    g = torch.eye(3, dtype=torch.float64)
    h = g.clone()
    h[0, 1] = h[1, 0] = 0.3
    assert delta_g(g, g) == 0.0
    assert delta_g(h, g) == pytest.approx(math.sqrt(2 * 0.09 / 6))


def test_consistent_relabelling_gives_zero():
    torch.manual_seed(0)
    labels = torch.arange(5).repeat_interleave(20)
    f1 = torch.randn(100, 16) + labels[:, None].float()
    f2 = f1 + 0.3 * torch.randn(100, 16)
    perm = torch.tensor([3, 0, 4, 1, 2])
    g = class_geometry(f1, labels, 5)
    g_relabelled = class_geometry(f1, perm[labels], 5)
    # the same classes under new names: G is the same matrix with rows/columns renamed
    assert delta_g(g_relabelled[perm][:, perm], g) == pytest.approx(0.0, abs=1e-12)
    # ΔG between two models does not depend on what the classes are called
    assert delta_g(class_geometry(f2, perm[labels], 5), g_relabelled) == pytest.approx(
        delta_g(class_geometry(f2, labels, 5), g), abs=1e-12)


def test_absent_class_is_an_error():
    feats, labels = _three_classes()
    with pytest.raises(GeopruneError, match="absent from the calibration set"):
        class_geometry(feats, labels, 4)


def test_noise_floor_positive_and_shrinks_with_calibration_size(digits, digits_model):
    train_set, _ = digits
    floors = []
    for per_class in (16, 140):
        cfg = small_method(calib_per_class=per_class)
        meter = GeometryMeter(Calibration.from_dataset(train_set, cfg))
        meter.set_reference(_copy(digits_model))
        floors.append(meter.noise(splits=10, seed=0))
    assert floors[0] > floors[1] > 0, floors


def test_recalibration_averages_batches_and_restores_momentum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm2d(3, momentum=0.3), nn.Conv2d(3, 4, 1),
                          nn.BatchNorm2d(4))  # second BN keeps the default momentum
    data = torch.randn(64, 3, 4, 4) * 2 + 5
    recalibrate_bn(model, data.split(16))
    bn = model[1]
    # the running mean is the exact average over the batches (no EMA), dropout stayed off
    assert torch.allclose(bn.running_mean, data.mean(dim=(0, 2, 3)), atol=1e-5)
    assert bn.momentum == 0.3 and model[3].momentum == 0.1
    assert not model.training and not bn.training


def test_meter_recalibration_switch(digits, digits_model):
    train_set, _ = digits
    cal = Calibration.from_dataset(train_set, small_method())
    on, off = GeometryMeter(cal, True), GeometryMeter(cal, False)
    a, b = _copy(digits_model), _copy(digits_model)
    stats_before = b[1].running_mean.clone()
    on.set_reference(a)
    off.set_reference(b)
    assert torch.equal(b[1].running_mean, stats_before)  # off: the paper, literally
    assert not torch.equal(a[1].running_mean, stats_before)
    assert on.delta(_copy(a)) == 0.0 and off.delta(_copy(b)) == 0.0


def test_a_meter_adopts_a_reference_measured_once(digits, digits_model):
    """G₀ measured once (recalibrated weights, G₀, features) and adopted: the adopting meter measures the same ΔG,
    an unpruned copy gives 0 exactly, and the noise floor comes from the same features. A reference measured on
    another kind of device is not adopted: the meter measures its own."""
    train_set, _ = digits
    cal = Calibration.from_dataset(train_set, small_method())
    own, base = GeometryMeter(cal), _copy(digits_model)
    own.set_reference(base)
    reference = own.reference_of(base)
    adopter, adopted = GeometryMeter(cal), _copy(digits_model)
    assert adopter.use_reference(adopted, reference)
    assert all(torch.equal(adopted.state_dict()[k], v) for k, v in base.state_dict().items())  # recalibrated
    assert adopter.delta(_copy(adopted)) == 0.0
    pruned = _copy(adopted)
    with torch.no_grad():
        pruned[0].weight[:4] = 0  # a change the geometry sees
    assert adopter.delta(_copy(pruned)) == own.delta(_copy(pruned)) > 0
    assert adopter.noise(5, 0) == own.noise(5, 0)
    elsewhere = dataclasses.replace(reference, device="cuda")
    fresh, model = GeometryMeter(cal), _copy(digits_model)
    assert not fresh.use_reference(model, elsewhere) and not fresh.use_reference(_copy(digits_model), None)
    assert torch.equal(fresh.reference, own.reference)  # measured its own, the same way


def test_calibration_is_class_balanced_and_seeded(digits):
    train_set, _ = digits
    cal = Calibration.from_dataset(train_set, small_method(calib_per_class=30))
    assert torch.bincount(cal.labels, minlength=10).tolist() == [30] * 10
    again = Calibration.from_dataset(train_set, small_method(calib_per_class=30))
    assert torch.equal(cal.images, again.images)
    other = Calibration.from_dataset(train_set, small_method(calib_per_class=30, seed=1))
    assert not torch.equal(cal.images, other.images)
    assert cal.bn_images.shape[0] == 4 * 256  # bn_batches × bn_batch_size training images
