"""In-process benchmarks: training throughput against a plain PyTorch loop, the data path, the parts
of one probe step. Every figure that compares is a ratio of two timings taken side by side in one
process, on synthetic tensors (data shape and class count of the paper's CIFAR-100 setting).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import MethodConfig, TrainConfig
from ..core.data import ImageSet
from ..core.geometry import Calibration, GeometryMeter, class_geometry, delta_g
from ..core.method import PruneTarget
from ..core.models import build_model
from ..core.pruning import macs_params, prune_copy
from ..core.speed import sync
from ..core.train import augment, iterate_batches, pick_device, train


def synthetic_set(n: int, classes: int, shape: tuple[int, int, int], seed: int = 0) -> ImageSet:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8)
    labels = torch.arange(n) % classes
    return ImageSet("synthetic", images, labels, tuple(str(c) for c in range(classes)),
                    (0.5,) * shape[0], (0.25,) * shape[0], True)


def plain_loop(model: nn.Module, data: ImageSet, batch: int, steps: int, device: torch.device, lr: float = 0.1) -> float:
    """A plain PyTorch training loop (nothing of the project's training code): img/s over ``steps`` batches.
    Same model, batch and precision as the project's loop: data resident on the device, random crop by
    padding and a flip, SGD with Nesterov momentum, bf16 autocast and channels_last on a GPU."""
    model = model.to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    images, labels = data.images.to(device), data.labels.to(device)
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    pad = images.shape[-1] // 8

    def step(i: int) -> None:
        idx = torch.randint(0, len(images), (batch,), device=device)
        x = images[idx].float().div_(255)
        x = F.pad(x, (pad,) * 4)
        dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
        x = x[:, :, dy:dy + images.shape[-2], dx:dx + images.shape[-1]]
        x = torch.where(torch.rand(batch, 1, 1, 1, device=device) < 0.5, x.flip(-1), x)
        x = (x - mean) / std
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x).float(), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(2):  # warm-up
        step(i)
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def project_loop(model: nn.Module, data: ImageSet, batch: int, steps: int, device: torch.device,
                 capture: bool = False) -> float:
    """The project's ``core.train.train`` for one epoch of ``steps`` batches (after a warm-up epoch of 2 batches, 4
    with ``capture``: compiling and recording the graphs): img/s."""
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.1, capture=capture)
    train(model, data.subset(torch.arange((4 if capture else 2) * batch)), cfg, device)
    part = data.subset(torch.arange(steps * batch))
    history = train(model, part, cfg, device)
    return steps * batch / history[0]["seconds"]


def training_throughput(arch: str, width: float, batch: int, steps: int, device: torch.device,
                        classes: int = 100, size: int = 32, capture: bool = False) -> dict[str, Any]:
    data = synthetic_set(max(steps, 2) * batch, classes, (3, size, size))
    macs, _ = macs_params(build_model(arch, classes, 3, width).eval(), (3, size, size))
    torch.manual_seed(0)
    plain = plain_loop(build_model(arch, classes, 3, width), data, batch, steps, device)
    torch.manual_seed(0)
    project = project_loop(build_model(arch, classes, 3, width), data, batch, steps, device)
    out = {"arch": arch, "width": width, "batch": batch, "steps": steps, "macs": macs,
           "plain_img_s": plain, "project_img_s": project, "ratio": project / plain,
           "project_tflops": 6 * macs * project / 1e12, "plain_tflops": 6 * macs * plain / 1e12}
    if capture:  # step capture (TrainConfig.capture) against the plain eager loop
        torch.manual_seed(0)
        captured = project_loop(build_model(arch, classes, 3, width), data, batch, steps, device, capture=True)
        out.update(capture_img_s=captured, capture_over_plain=captured / plain)
    return out


def data_path(batch: int, steps: int, device: torch.device, arch: str = "resnet18", width: float = 0.25,
              classes: int = 100, size: int = 32) -> dict[str, Any]:
    """The on-device loader with augmentation alone vs a whole training step: the loader's share."""
    data = synthetic_set(steps * batch, classes, (3, size, size))
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    n = 0
    for images, labels in iterate_batches(data, batch, device, True, drop_last=True):
        images = augment(images, True, gen)
        n += len(labels)
    sync(device)
    loader = n / (time.perf_counter() - start)
    step = project_loop(build_model(arch, classes, 3, width), data, batch, steps, device)
    return {"batch": batch, "loader_img_s": loader, "train_img_s": step, "loader_share": step / loader}


def probe_parts(arch: str, width: float, device: torch.device, calib_per_class: int = 50, classes: int = 10,
                size: int = 32, ratio: float = 0.3) -> dict[str, Any]:
    """One probe step (copy, prune, recalibrate, ΔG) and its parts, on a resident calibration set; on a GPU
    also the peak memory PyTorch reserved for what a probe actor holds and does (model, calibration set,
    reference geometry, one probe), without the CUDA context."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    data = synthetic_set(classes * calib_per_class * 2, classes, (3, size, size))
    cfg = MethodConfig(calib_per_class=calib_per_class, bn_batches=4, bn_batch_size=128)
    meter = GeometryMeter(Calibration.from_dataset(data, cfg, device))
    base = build_model(arch, classes, 3, width).to(device)
    meter.set_reference(base)
    target = PruneTarget((3, size, size), classes)
    t = {}
    start = time.perf_counter()
    copy.deepcopy(base)
    t["copy_s"] = time.perf_counter() - start
    start = time.perf_counter()
    pruned, _ = prune_copy(base, ratio, target.input_shape, target.num_classes, target.importance, target.round_to)
    sync(device)
    t["copy_and_prune_s"] = time.perf_counter() - start
    start = time.perf_counter()
    meter.prepare(pruned)
    sync(device)
    t["recalibrate_s"] = time.perf_counter() - start
    start = time.perf_counter()
    g = class_geometry(meter.features(pruned), meter.calibration.labels, classes)
    delta_g(meter.reference, g)
    sync(device)
    t["features_and_delta_g_s"] = time.perf_counter() - start
    t["probe_s"] = t["copy_and_prune_s"] + t["recalibrate_s"] + t["features_and_delta_g_s"]
    if device.type == "cuda":
        t["gpu_memory_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return {"arch": arch, "width": width, "calibration_images": len(meter.calibration.labels), **t}


def run_core(quick: bool, device: str | None = None) -> dict[str, Any]:
    dev = pick_device(device)
    gpu = dev.type == "cuda"
    width = 1.0 if gpu else 0.25
    batch, steps = (512, 50) if gpu else (64, 4 if quick else 12)
    archs = ("resnet18", "resnet50", "mobilenet_v2")
    return {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if gpu else "cpu",
            "threads": torch.get_num_threads(),
            "training": [training_throughput(a, width, batch, steps, dev) for a in archs],
            # on a GPU, the loop at batch 256 and 512 with step capture too (CUDA graphs; compiling on a CPU would
            # take minutes of this bench)
            "training_resnet18": ([training_throughput("resnet18", width, b, steps, dev, classes=10, capture=True)
                                   for b in (256, 512)] if gpu else []),
            "data_path": data_path(batch, steps, dev),
            # on a GPU: the paper's ResNet-18 with 5,000 calibration images (the ≤ 2 GiB per actor target)
            "probe": probe_parts("resnet18", width, dev, **({"calib_per_class": 500} if gpu else {}))}
