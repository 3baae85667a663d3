"""Geometry of class representations (METHOD.md §1-3) and BatchNorm recalibration (§2).

G_cd = cos(m_c, m_d) for the centred class centroids m_c of the penultimate features φ(x);
ΔG = RMS of the off-diagonal change of G. Measurements always follow a BN recalibration on a
fixed set of training batches (switchable off to reproduce the paper literally).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from ..errors import GeopruneError
from .config import MethodConfig
from .data import Dataset, balanced_indices, seeded_subset, stratified_halves
from .models import classifier_head


def normalize(images: Tensor, mean: Iterable[float], std: Iterable[float], dtype=torch.float32) -> Tensor:
    """uint8 (N, C, H, W) → normalised floats on the images' device."""
    mean_t, std_t = _moments(tuple(mean), tuple(std), images.device, dtype)
    return (images.to(dtype) - mean_t) / std_t


@functools.lru_cache(maxsize=64)
def _moments(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, dtype) -> tuple[Tensor, Tensor]:
    """The (1, C, 1, 1) mean and std, in 0-255 units, built once per device: a training step on a GPU would otherwise
    copy two small tensors from the host every step. (Made as normal tensors even when first asked for inside
    ``inference_mode``, so training may use them later.)"""
    with torch.inference_mode(False), torch.no_grad():
        mean_t = torch.tensor(mean, device=device, dtype=dtype).view(1, -1, 1, 1) * 255.0
        std_t = torch.tensor(std, device=device, dtype=dtype).view(1, -1, 1, 1) * 255.0
    return mean_t, std_t


@torch.no_grad()
def penultimate_features(model: nn.Module, head: nn.Linear, images: Tensor, mean, std,
                         batch_size: int = 500) -> Tensor:
    """φ(x): the input of the classifier ``head``, caught by a forward pre-hook, in eval mode."""
    caught: list[Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: caught.append(args[0].flatten(1).float()))
    was_training = model.training
    model.eval()
    try:
        for chunk in images.split(batch_size):
            model(normalize(chunk, mean, std))
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(caught)


def class_geometry(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """G ∈ R^{C×C}: cosines between the centred class centroids (float64)."""
    feats = features.double()
    sums = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64, device=feats.device)
    sums.index_add_(0, labels.to(feats.device), feats)
    counts = torch.bincount(labels.to(feats.device), minlength=num_classes).double()
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().flatten().tolist()
        raise GeopruneError(f"classes {missing} are absent from the calibration set",
                            "the calibration sample must hold every class")
    centroids = sums / counts[:, None]
    centred = centroids - centroids.mean(dim=0, keepdim=True)
    unit = centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.T


def delta_g(g_new: Tensor, g_ref: Tensor) -> float:
    """ΔG = sqrt(mean over c≠d of (G'_cd − G_cd)²)."""
    c = g_ref.shape[0]
    off = ~torch.eye(c, dtype=torch.bool, device=g_ref.device)
    return float(((g_new.to(g_ref) - g_ref)[off] ** 2).mean().sqrt())


def g_noise(features: Tensor, labels: Tensor, num_classes: int, splits: int = 5, seed: int = 0) -> float:
    """Noise floor: mean ΔG between two disjoint class-stratified halves, over ``splits`` seeded splits."""
    values = []
    for k in range(splits):
        a, b = stratified_halves(labels.cpu(), seed=seed + k)
        a, b = a.to(features.device), b.to(features.device)
        values.append(delta_g(class_geometry(features[a], labels[a], num_classes),
                              class_geometry(features[b], labels[b], num_classes)))
    return sum(values) / len(values)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Tensor]) -> nn.Module:
    """Re-estimate BN running statistics on ``batches`` (normalised inputs), then restore momentum.

    Only BN layers run in train mode (dropout stays off); statistics are the exact average over
    the batches (momentum None), and each layer's momentum is put back so fine-tuning works.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return model
    momenta = [bn.momentum for bn in layers]
    model.eval()
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        for batch in batches:
            model(batch)
    finally:
        for bn, momentum in zip(layers, momenta):
            bn.momentum = momentum
        model.eval()
    return model


@dataclass
class Calibration:
    """The calibration set D_cal and the fixed BN batches, resident on one device."""

    images: Tensor  # uint8 (N, C, H, W), class-balanced sample of the training split
    labels: Tensor
    bn_images: Tensor  # uint8, bn_batches × bn_batch_size training images in a fixed order
    bn_batch_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int

    @classmethod
    def from_dataset(cls, train_set: Dataset, cfg: MethodConfig, device: torch.device | str = "cpu") -> "Calibration":
        idx = balanced_indices(train_set.labels, train_set.num_classes, cfg.calib_per_class, cfg.calib_cap, cfg.seed)
        bn_idx = seeded_subset(len(train_set), cfg.bn_batches * cfg.bn_batch_size, cfg.seed + 1)
        return cls(train_set.images_at(idx).to(device), train_set.labels[idx].to(device),
                   train_set.images_at(bn_idx).to(device), cfg.bn_batch_size,
                   tuple(train_set.mean), tuple(train_set.std), train_set.num_classes)

    def to(self, device: torch.device | str) -> "Calibration":
        return Calibration(self.images.to(device), self.labels.to(device), self.bn_images.to(device),
                           self.bn_batch_size, self.mean, self.std, self.num_classes)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def bn_batches(self) -> Iterable[Tensor]:
        for chunk in self.bn_images.split(self.bn_batch_size):
            yield normalize(chunk, self.mean, self.std)


@dataclass
class Reference:
    """A base model's recalibrated weights, G₀ and features on the calibration set, measured once
    (``GeometryMeter.reference_of``) and adopted by other processes on the same kind of device
    (``GeometryMeter.use_reference``), which then skip the recalibration and the forward pass. Measured
    with the thread count those processes measure with, an unpruned copy still gives ΔG = 0 exactly."""

    state_dict: dict[str, Tensor]  # on the CPU
    geometry: Tensor
    features: Tensor
    device: str  # the device type it was measured on


class GeometryMeter:
    """Measures G and ΔG of models against a reference, after recalibrating their BatchNorm.

    Holds the calibration set and the reference geometry G₀, so a probe is: copy, prune,
    ``meter.delta(copy)``. The reference is measured on the base model after the same
    recalibration, so an unpruned copy gives ΔG = 0 exactly.
    """

    def __init__(self, calibration: Calibration, bn_recalibration: bool = True):
        self.calibration = calibration
        self.bn_recalibration = bn_recalibration
        self.reference: Optional[Tensor] = None
        self.reference_features: Optional[Tensor] = None

    def prepare(self, model: nn.Module) -> nn.Module:
        """Recalibrate (when enabled) in place and return the model in eval mode."""
        if self.bn_recalibration:
            recalibrate_bn(model, self.calibration.bn_batches())
        return model.eval()

    def features(self, model: nn.Module) -> Tensor:
        cal = self.calibration
        _, head = classifier_head(model, cal.num_classes)
        return penultimate_features(model, head, cal.images, cal.mean, cal.std)

    def geometry(self, model: nn.Module) -> Tensor:
        """Recalibrate ``model`` (in place) and return its G on the calibration set."""
        self.prepare(model)
        return class_geometry(self.features(model), self.calibration.labels, self.calibration.num_classes)

    def set_reference(self, base: nn.Module) -> Tensor:
        """Recalibrate the base model in place and store G₀ (and its features for the noise floor)."""
        self.prepare(base)
        self.reference_features = self.features(base)
        self.reference = class_geometry(self.reference_features, self.calibration.labels,
                                        self.calibration.num_classes)
        return self.reference

    def reference_of(self, base: nn.Module) -> Reference:
        """What ``set_reference(base)`` left, for other processes to adopt."""
        if self.reference is None:
            raise RuntimeError("set_reference() first")
        return Reference({k: v.detach().cpu() for k, v in base.state_dict().items()}, self.reference.cpu(),
                         self.reference_features.cpu(), self.calibration.device.type)

    def use_reference(self, base: nn.Module, reference: Optional[Reference]) -> bool:
        """Adopt ``reference`` (loading its recalibrated weights into ``base``) where it was measured on this meter's
        kind of device, else ``set_reference(base)``; True if adopted."""
        device = self.calibration.device
        if reference is None or reference.device != device.type:
            self.set_reference(base)
            return False
        base.load_state_dict(reference.state_dict)
        base.eval()
        self.reference = reference.geometry.to(device)
        self.reference_features = reference.features.to(device)
        return True

    def noise(self, splits: int, seed: int) -> float:
        if self.reference_features is None:
            raise RuntimeError("set_reference() first")
        return g_noise(self.reference_features, self.calibration.labels, self.calibration.num_classes, splits, seed)

    def delta(self, model: nn.Module) -> float:
        """ΔG of ``model`` (recalibrated in place) against the reference G₀."""
        if self.reference is None:
            raise RuntimeError("set_reference() first")
        return delta_g(self.geometry(model), self.reference)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[int]:
    """Run the block with ``threads`` torch threads (0: as they are), then restore the count; yields the count used."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def measure_reference(model: nn.Module, calibration: Calibration, bn_recalibration: bool) -> Reference:
    """A copy of ``model`` recalibrated, with its G₀ and features, measured on the CPU with one torch thread (as probe
    actors and sensitivity tasks measure, so their unpruned copies give ΔG = 0 exactly)."""
    with torch_threads(1):
        meter, base = GeometryMeter(calibration.to("cpu"), bn_recalibration), copy.deepcopy(model).cpu()
        meter.set_reference(base)
        return meter.reference_of(base)
