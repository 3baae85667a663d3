"""Training, fine-tuning and evaluation (METHOD.md §7's protocol).

In-memory datasets live on the device as uint8 and are augmented in batches there (random crop
and flip as tensor ops, airbench's way); image folders stream through a DataLoader and get the
same batched augmentation. SGD + Nesterov, label smoothing, one-cycle or cosine schedule; bf16
autocast and channels_last on GPU. Model, data and device are passed in, so a Ray Train worker
calls these functions unchanged (``rank``/``world_size`` shard the batches for DDP).
"""

from __future__ import annotations

import ctypes
import logging
import math
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TrainConfig, finetune_defaults
from .data import Dataset
from .geometry import normalize

log = logging.getLogger("geoprune_ray")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _shard(indices: Tensor, rank: int, world_size: int) -> Tensor:
    per = len(indices) // world_size  # equal shards so DDP ranks run the same number of steps
    return indices[rank * per:(rank + 1) * per]


def iterate_batches(data: Dataset, batch_size: int, device: torch.device, shuffle: bool, seed: int = 0,
                    rank: int = 0, world_size: int = 1, drop_last: bool = False,
                    resident: Optional[tuple[Tensor, Tensor]] = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (uint8 images, labels) on ``device``; in-memory data is indexed where it lives."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=gen) if shuffle else torch.arange(len(data))
    order = _shard(order, rank, world_size)
    stop = len(order) - (len(order) % batch_size if drop_last and len(order) >= batch_size else 0)
    if data.in_memory:
        images, labels = resident if resident is not None else (data.images.to(device), data.labels.to(device))
        for idx in order[:stop].to(images.device).split(batch_size):
            yield images[idx], labels[idx]
        return
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, order[:stop].tolist()),
                                         batch_size=batch_size, num_workers=min(4, torch.get_num_threads()),
                                         pin_memory=device.type == "cuda")
    for images, labels in loader:
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def augment(images: Tensor, flip: bool, gen: torch.Generator) -> Tensor:
    """Random translation (pad-and-crop, pad = size/8) and, where label-preserving, horizontal flip.

    The random numbers are drawn by ``gen`` on the images' device, so a step on a GPU copies nothing from the host
    (``train`` makes ``gen`` on its device)."""
    n, _, h, w = images.shape
    dev = images.device
    pad = max(1, min(h, w) // 8)
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=dev)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=dev)
    rows = (torch.arange(h, device=dev)[None, :] + dy[:, None])[:, None, :, None]
    cols = (torch.arange(w, device=dev)[None, :] + dx[:, None])[:, None, None, :]
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chan = torch.arange(images.shape[1], device=dev)[None, :, None, None]
    out = padded[batch, chan, rows, cols]
    if flip:
        mirror = (torch.rand(n, generator=gen, device=dev) < 0.5)[:, None, None, None]
        out = torch.where(mirror, out.flip(-1), out)
    return out


def _optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=cfg.lr, momentum=cfg.momentum, nesterov=True, fused=fused or None)


M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters (malloc.h)


def keep_heap() -> bool:
    """Have glibc's malloc keep the memory this process has freed instead of giving it back to the kernel: blocks up
    to 32 MiB (its largest allowed threshold) come from the heap, and the heap's top is trimmed only past 1 GiB free.
    Called first thing in the Ray processes that compute (training workers, probe actors, sensitivity tasks), which
    are new processes whose heap never settles: a fine-tune worker returned and faulted back in its activations'
    pages at every step, about 1.9 million page faults and 5 s of system time per epoch of the quickstart, where the
    one-process path, whose long-lived heap had settled, took none (BENCHMARKS.md §4). True if glibc took the
    settings; elsewhere (macOS, musl) nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no C library to load by name (Windows), or no mallopt in it
        return False
    return all(mallopt(param, value) == 1 for param, value in
               ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20)))


def warm_up(cfg: TrainConfig) -> None:
    """Pay now what a process's first ``train`` pays once: its first optimizer imports ``torch._dynamo`` (about 1.2 s
    on one core, more beside other work). A fine-tune worker launched early calls it while it waits for its plan, so
    the import is not paid after the plan has arrived (BENCHMARKS.md §4)."""
    _optimizer(nn.Linear(1, 1), cfg)


def capture_step(model: nn.Module, device: torch.device) -> nn.Module:
    """``TrainConfig.capture``: the model's forward (and, through AOTAutograd, its backward) compiled for the batch's
    fixed shape; on CUDA replayed as CUDA graphs (``mode="reduce-overhead"``). Augmentation stays eager: it draws from
    the step's generator. A last, smaller batch compiles once more (``dynamic=False``)."""
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else "default", dynamic=False)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    if total_steps < 8:  # too few steps to warm up and anneal (OneCycleLR divides by zero): a constant LR
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.25)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)


def _autocast(device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def _inputs(images: Tensor, data: Dataset, device: torch.device) -> Tensor:
    x = normalize(images, data.mean, data.std)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def train_step(model: nn.Module, opt: torch.optim.Optimizer, sched, images: Tensor, labels: Tensor, data: Dataset,
               cfg: TrainConfig, gen: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
    """One optimisation step on a batch already on ``device``; returns the loss and the number of correct predictions
    as device tensors. Nothing in it waits on the host (tests/test_gpu.py checks it in CUDA's sync-debug mode)."""
    if cfg.augment:
        images = augment(images, data.flip, gen)
    if cfg.capture and device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs were consumed (loss and hits)
    with _autocast(device):
        logits = model(_inputs(images, data, device))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.detach(), (logits.argmax(1) == labels).sum()


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s augmentation and of torch's global generator (dropout), apart from its shuffle's
    (``seed + epoch``). Both are drawn afresh every epoch, so a run resumed at an epoch draws what an uninterrupted run
    draws there, and its checkpoint needs no generator state."""
    return (1 << 40) + seed * 1_000_003 + epoch


def train(model: nn.Module, data: Dataset, cfg: TrainConfig, device: str | torch.device | None = None,
          on_epoch: Optional[Callable[[int, dict, dict], None]] = None, rank: int = 0, world_size: int = 1,
          resume: Optional[Mapping[str, Any]] = None) -> list[dict]:
    """Train ``model`` in place for ``cfg.epochs`` epochs; returns one metrics dict per epoch trained here.

    ``on_epoch(epoch, metrics, state)`` is called after each epoch with what a checkpoint needs to go on from there:
    ``state`` holds ``epoch`` (done so far), ``optimizer`` and ``scheduler`` (their state dicts, the live tensors: save
    them before the next step). Given such a ``state`` as ``resume`` (loaded ``weights_only``), training goes on after
    its epoch as the uninterrupted run would have: the model's weights are the caller's to load; shuffles and
    augmentation are seeded per epoch, so there is no generator state to restore."""
    device = pick_device(device)
    _prepare_model(model, device)
    start = int(resume["epoch"]) if resume is not None else 0
    if cfg.epochs == 0 or start >= cfg.epochs:
        model.eval()
        return []
    gen = torch.Generator(device=device)  # augmentation draws where the batch is
    per_rank = len(data) // world_size
    drop_last = per_rank >= 2 * cfg.batch_size  # avoid a tiny last batch upsetting BN
    steps = (per_rank // cfg.batch_size) if drop_last else math.ceil(per_rank / cfg.batch_size)
    opt = _optimizer(model, cfg, fused=cfg.capture and device.type == "cuda")
    sched = _scheduler(opt, cfg, max(1, steps * cfg.epochs))
    step_model = capture_step(model, device) if cfg.capture else model
    resident = (data.images.to(device), data.labels.to(device)) if data.in_memory else None
    if resume is not None:  # after the scheduler, which sets the optimizer's learning rates when it is made
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
    history = []
    for epoch in range(start, cfg.epochs):
        torch.manual_seed(epoch_seed(cfg.seed, epoch))
        gen.manual_seed(epoch_seed(cfg.seed, epoch))
        model.train()
        began, seen = time.perf_counter(), 0
        loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
        for images, labels in iterate_batches(data, cfg.batch_size, device, True, cfg.seed + epoch, rank, world_size,
                                              drop_last, resident):
            loss, hits = train_step(step_model, opt, sched, images, labels, data, cfg, gen, device)
            loss_sum += loss * len(labels)
            correct += hits
            seen += len(labels)
        metrics = {"epoch": epoch + 1, "loss": float(loss_sum) / max(seen, 1),
                   "train_top1": 100.0 * float(correct) / max(seen, 1), "seconds": time.perf_counter() - began}
        history.append(metrics)
        log.info("epoch %d/%d loss %.4f train top-1 %.2f%% (%.1fs)", epoch + 1, cfg.epochs, metrics["loss"],
                 metrics["train_top1"], metrics["seconds"])
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics, {"epoch": epoch + 1, "optimizer": opt.state_dict(),
                                          "scheduler": sched.state_dict()})
    model.eval()
    return history


def finetune(model: nn.Module, data: Dataset, cfg: Optional[TrainConfig] = None,
             device: str | torch.device | None = None, **kwargs) -> list[dict]:
    """Fine-tune a pruned model (the fine-tune recipe unless ``cfg`` is given). Rebuilds the optimizer."""
    return train(model, data, cfg or finetune_defaults(), device, **kwargs)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, device: str | torch.device | None = None,
             batch_size: int = 1000) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy on ``data``, in eval mode."""
    device = pick_device(device)
    _prepare_model(model, device)
    model.eval()
    correct, loss_sum, seen = 0, 0.0, 0
    for images, labels in iterate_batches(data, batch_size, device, shuffle=False):
        with _autocast(device):
            logits = model(_inputs(images, data, device)).float()
        correct += int((logits.argmax(1) == labels).sum())
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        seen += len(labels)
    return {"top1": 100.0 * correct / max(seen, 1), "loss": loss_sum / max(seen, 1)}
