"""Training through Ray Train: a ``TorchTrainer`` around ``core.train`` (DDP when several workers).

Used for the baseline (from the driver) and for every fine-tune (inside a Tune trial). Workers
rebuild the (pruned) model from its card, pruning history and weights, train it with
``core.train.train`` on their shard, report every epoch with a ``ray.train.Checkpoint`` (rank 0
writes it), and finish with the test top-1.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import ray
import torch

from ..core.config import TrainConfig
from ..core.pruning import ModelCard, replay_pruning
from ..core.train import evaluate, train
from .progress import post

CHECKPOINT_FILE = "model.pt"


@dataclass(frozen=True)
class Scaling:
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


def train_worker(config: dict) -> None:
    """Ray Train worker loop (see the module docstring)."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(1, int(config["cpus"])))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    card = ModelCard.from_dict(config["card"])
    model = replay_pruning(card.build(), config["history"], card.input_shape)
    model.load_state_dict(ray.get(config["state_ref"]))
    train_set, test_set = ray.get(config["data_ref"])
    model.to(device)
    top1_before = evaluate(model, test_set, device)["top1"]
    net = ray.train.torch.prepare_model(model) if world > 1 else model

    def report(metrics: dict) -> None:
        checkpoint: Optional[ray.train.Checkpoint] = None
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                torch.save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                            "history": config["history"]}, Path(folder) / CHECKPOINT_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({**metrics, "top1_before": top1_before, "device": str(device)}, checkpoint=checkpoint)

    cfg = TrainConfig.from_dict(config["train"])
    run_id, label = config.get("progress") or (None, None)
    started = time.time()

    def on_epoch(epoch: int, metrics: dict) -> None:
        if rank == 0:
            post(run_id, kind="epoch", label=label, epoch=epoch, epochs=cfg.epochs, loss=metrics["loss"],
                 started=started)
        report({**metrics, "top1": float("nan")})

    train(net, train_set, cfg, device, on_epoch=on_epoch, rank=rank, world_size=world)
    report({"epoch": cfg.epochs, "top1": evaluate(model, test_set, device)["top1"]})


def _worker_resources(scaling: Scaling) -> dict[str, float]:
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker or 1.0
    return resources


def fit(card: ModelCard, history: list, state_dict: Mapping[str, torch.Tensor], data_ref: Any, cfg: TrainConfig,
        scaling: Scaling, storage: str, name: str, progress: Optional[tuple[str, str]] = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train a (pruned) model through Ray Train; returns its final weights and last metrics."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"card": card.to_dict(), "history": history, "state_ref": ray.put(dict(state_dict)),
                           "data_ref": data_ref, "train": cfg.to_dict(),
                           "cpus": scaling.cpus_per_worker, "progress": progress},
        scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=_worker_resources(scaling)),
        run_config=RunConfig(name=name, storage_path=storage),
    )
    result = trainer.fit()
    payload = load_checkpoint(result.checkpoint)
    return payload["state_dict"], {**result.metrics, "checkpoint_path": result.checkpoint.path}


def load_checkpoint(checkpoint: "ray.train.Checkpoint | str") -> dict[str, Any]:
    """The weights and pruning history a worker saved (a Checkpoint, or its path), weights_only."""
    import ray.train

    if isinstance(checkpoint, str):
        checkpoint = ray.train.Checkpoint(checkpoint)
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
