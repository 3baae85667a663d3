"""Training through Ray Train: a ``TorchTrainer`` around ``core.train`` (DDP when several workers).

Used for the baseline (from the driver) and for every fine-tune (inside a Tune trial). Workers
build the model from its card and weights; a fine-tune worker prunes it with its arm's ratios and
runs ``core.protocol.finetune_arm`` (recalibrate, ΔG and top-1 before, fine-tune on its shard, top-1
and ΔG after), so nothing waits on the probe actors. Every epoch is reported with a
``ray.train.Checkpoint`` (rank 0 writes it, uploaded in the background).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import ray
import torch

from ..core.config import TrainConfig
from ..core.geometry import GeometryMeter
from ..core.method import PruneTarget
from ..core.protocol import finetune_arm
from ..core.pruning import ModelCard
from ..core.train import evaluate, train
from .probes import device_for
from .progress import board_name, post
from .scaling import Scaling

CHECKPOINT_FILE = "model.pt"
HANDOVER_POLL_S = 1.0  # how long one wait on the board lasts before the driver checks that the run still lives

log = logging.getLogger("geoprune_ray")


@dataclass(frozen=True)
class ArmJob:
    """What a fine-tune worker needs besides the base weights and the data: the arm's pruning and the
    calibration set, to measure ΔG before and after fine-tuning where the model already is. Without ``ratios`` the
    worker waits for its arm's plan on the run's plan board (``board``, ``arm``) once it has loaded everything."""

    ratios: Any  # per-group dict, or one float; None: from the board
    calibration_ref: Any  # ObjectRef of the Calibration
    target: PruneTarget
    bn_recalibration: bool = True
    board: Optional[str] = None  # the PlanBoard's actor name
    arm: Optional[str] = None


def _weights(model: torch.nn.Module, history: list) -> dict[str, Any]:
    """What a checkpoint and a hand-over hold: the weights on the CPU and the pruning history."""
    return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "history": history}


def _checkpoint(model: torch.nn.Module, history: list, final: bool) -> tuple[Any, dict]:
    """A ``ray.train.Checkpoint`` of the weights and pruning history. Per-epoch ones upload in the background
    (ASYNC, deleted locally once uploaded), so they never block an epoch; the last one is uploaded before
    ``fit`` returns, since the result is read from it."""
    import ray.train

    folder = tempfile.mkdtemp(prefix="geoprune-ckpt-")
    torch.save(_weights(model, history), Path(folder) / CHECKPOINT_FILE)
    mode = ray.train.CheckpointUploadMode.SYNC if final else ray.train.CheckpointUploadMode.ASYNC
    return ray.train.Checkpoint.from_directory(folder), {"checkpoint_upload_mode": mode,
                                                         "delete_local_checkpoint_after_upload": True}


def train_worker(config: dict) -> None:
    """Ray Train worker loop (see the module docstring)."""
    import ray.train
    import ray.train.torch

    entered = time.time()  # the end of a launch's start-up (bench: train_launch_cost)
    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = device_for(ray.get_gpu_ids()) if ray.get_gpu_ids() else torch.device("cpu")
    if device.type == "cuda":
        device = ray.train.torch.get_device()
    card = ModelCard.from_dict(config["card"])
    model = card.build()
    model.load_state_dict(ray.get(config["state_ref"]))
    train_set, test_set = ray.get(config["data_ref"])
    model.to(device)
    cfg = TrainConfig.from_dict(config["train"])
    run_id, label = config.get("progress") or (None, None)
    clock = {"started": time.time()}  # the ETA's start: a waiting fine-tune's plan arrival
    current: dict[str, Any] = {"model": model, "history": []}  # what each epoch's checkpoint holds

    def report(metrics: dict, final: bool = False) -> None:
        if rank == 0:
            checkpoint, options = _checkpoint(current["model"], current["history"], final)
            ray.train.report({**metrics, "device": str(device), "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
                              "worker_entered": entered,
                              "worker_reported": time.time()}, checkpoint=checkpoint, **options)
        else:
            ray.train.report({**metrics, "device": str(device)})

    def on_epoch(epoch: int, metrics: dict) -> None:
        if rank == 0:
            post(run_id, kind="epoch", label=label, epoch=epoch, epochs=cfg.epochs, loss=metrics["loss"],
                 started=clock["started"])
        report({**metrics, "top1": float("nan")})

    wrap = (lambda m: ray.train.torch.prepare_model(m)) if world > 1 else (lambda m: m)
    job: Optional[ArmJob] = config.get("arm")
    if job is None:  # the baseline
        train(wrap(model), train_set, cfg, device, on_epoch=on_epoch, rank=rank, world_size=world)
        metrics = {"epoch": cfg.epochs, "top1": evaluate(model, test_set, device)["top1"]}
        report(metrics, final=True)
        if rank == 0 and config.get("handover"):
            _hand_over(run_id, config["handover"], model, current["history"], {**metrics, "device": str(device)})
        return
    meter = GeometryMeter(ray.get(job.calibration_ref).to(device), job.bn_recalibration)
    meter.set_reference(model)
    ratios, plan = job.ratios, {}
    if ratios is None:  # launched while the controller ran: everything is loaded, now the arm's ratios
        plan = ray.get(ray.get_actor(job.board).plan.remote(job.arm))
        ratios = plan["ratios"]
    clock["started"] = time.time()
    _, _, result = finetune_arm(model, ratios, meter, job.target, train_set, test_set, cfg, device, wrap=wrap,
                                on_epoch=on_epoch, rank=rank, world_size=world,
                                on_pruned=lambda pruned, history: current.update(model=pruned, history=history))
    report({"epoch": cfg.epochs, **result.to_dict(), **({"r": plan["r"]} if plan else {}),
            "plan_received": clock["started"]}, final=True)


def _hand_over(run_id: str, key: str, model: torch.nn.Module, history: list, metrics: dict) -> None:
    """Send the final weights to the driver through the run's progress board, once the final checkpoint is stored:
    the driver goes on while Ray Train tears the run down (2-3 s). Serialised here (``torch.save``), so the board
    never imports torch and the driver reads them ``weights_only``."""
    buffer = io.BytesIO()
    torch.save(_weights(model, history), buffer)
    ray.get(ray.get_actor(board_name(run_id)).deliver.remote(key, {"payload": buffer.getvalue(), "metrics": metrics}))


def _worker_resources(scaling: Scaling) -> dict[str, float]:
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker or 1.0
    return resources


def fit(card: ModelCard, state_ref: Any, data_ref: Any, cfg: TrainConfig, scaling: Scaling, storage: str, name: str,
        arm: Optional[ArmJob] = None, progress: Optional[tuple[str, str]] = None,
        teardowns: Optional[list["_Run"]] = None) -> tuple[dict[str, torch.Tensor], list, dict[str, Any]]:
    """Train the model ``state_ref`` holds through Ray Train: the baseline as it is, or, given ``arm``, a pruned copy
    (pruned, measured and fine-tuned on the worker). Returns the final weights, the pruning history and the last
    metrics.

    Given ``teardowns`` (and ``progress``, whose run's board carries the weights), a baseline returns as soon as its
    worker has stored the final checkpoint and handed the weights over; Ray Train's teardown goes on in a thread,
    appended to ``teardowns`` for the caller to join (``join_teardowns``). The metrics then lack
    ``checkpoint_path``."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Train's controller learns that the workers have finished by polling them (every 2 s by default): an empty
    # launch then ends 4.4 s after its worker did, 0.3 s when polled every 0.1 s (bench: train_launch_cost). Each
    # poll is a call into the training process, so polling often slows its epochs on a small CPU: once a second.
    # Ray Train hands the variable on to its controller; a user's own setting wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1")
    handover = f"{name}-{uuid.uuid4().hex[:8]}" if teardowns is not None and progress and arm is None else None
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"card": card.to_dict(), "state_ref": state_ref, "data_ref": data_ref, "arm": arm,
                           "train": cfg.to_dict(), "threads": scaling.torch_threads, "progress": progress,
                           "handover": handover},
        # NCCL only where several GPU workers talk; one worker needs no collectives, and gloo also starts where the
        # cluster's GPUs are not real CUDA devices (the worker then trains on the CPU).
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu and scaling.workers > 1 else "gloo"),
        scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=_worker_resources(scaling)),
        run_config=RunConfig(name=name, storage_path=storage),
    )
    if handover:
        run, delivered = _fit_in_background(trainer, progress[0], handover, name)
        if delivered is not None:
            teardowns.append(run)
            payload = torch.load(io.BytesIO(delivered["payload"]), map_location="cpu", weights_only=True)
            return payload["state_dict"], payload["history"], delivered["metrics"]
        result = run.result  # ended without handing over: read its checkpoint
    else:
        result = trainer.fit()
    payload = load_checkpoint(result.checkpoint)
    return payload["state_dict"], payload["history"], {**result.metrics, "checkpoint_path": result.checkpoint.path}


class _Run(threading.Thread):
    """``trainer.fit()`` in a thread: its result, or the error it raised."""

    def __init__(self, trainer: Any, name: str) -> None:
        super().__init__(name=f"ray-train-{name}", daemon=True)
        self.trainer, self.result, self.error = trainer, None, None

    def run(self) -> None:
        try:
            self.result = self.trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised by whoever waits for it
            self.error = exc


def _fit_in_background(trainer: Any, run_id: str, key: str, name: str) -> tuple[_Run, Optional[dict]]:
    """Run ``trainer.fit()`` in a thread and wait for the worker's hand-over on the board: the thread and what was
    handed over, None if the run ended without (its error, if any, is raised here)."""
    run = _Run(trainer, name)
    run.start()
    board = ray.get_actor(board_name(run_id))
    while True:
        alive = run.is_alive()  # read before the last wait: a hand-over made just before the end is still seen
        delivered = ray.get(board.take.remote(key, HANDOVER_POLL_S))
        if delivered is not None or not alive:
            break
    if delivered is None:
        run.join()
        if run.error is not None:
            raise run.error
    return run, delivered


def join_teardowns(teardowns: list["_Run"], timeout_s: float = 60.0) -> None:
    """Wait for Ray Train runs whose results were handed over early to finish their teardown; an error there (the
    result is already safe) is logged, not raised."""
    while teardowns:
        run = teardowns.pop()
        run.join(timeout_s)
        if run.is_alive():
            log.warning("Ray Train run %s is still tearing down after %.0f s; going on without it", run.name, timeout_s)
        elif run.error is not None:
            log.warning("Ray Train run %s failed after handing its result over: %s", run.name,
                        str(run.error).splitlines()[0] if str(run.error) else repr(run.error))


def load_checkpoint(checkpoint: "ray.train.Checkpoint | str") -> dict[str, Any]:
    """The weights and pruning history a worker saved (a Checkpoint, or its path), weights_only."""
    import ray.train

    if isinstance(checkpoint, str):
        checkpoint = ray.train.Checkpoint(checkpoint)
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
