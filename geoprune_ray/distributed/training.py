"""The Ray Train workers' side: a loop around ``core.train`` (DDP when several workers); ``launch`` starts the runs.

Used for the baseline (launched from the driver) and for every fine-tune (from a Tune trial). Workers
build the model from its card and weights; a fine-tune worker prunes it with its arm's ratios and
runs ``core.protocol.finetune_arm`` (recalibrate, ΔG and top-1 before, fine-tune on its shard, top-1
and ΔG after), so nothing waits on the probe actors. Every epoch is reported with a
``ray.train.Checkpoint`` (rank 0 writes it, uploaded in the background).
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import ray
import torch

from ..core.config import TrainConfig
from ..core.geometry import GeometryMeter
from ..core.protocol import finetune_arm
from ..core.pruning import ModelCard
from ..core.train import evaluate, keep_heap, train, warm_up
from .probes import device_for
from .progress import board_name, post
from .launch import CHECKPOINT_FILE, started_key
from .scaling import ArmJob


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
    keep_heap()  # a new process: its heap keeps what each step frees
    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = device_for(ray.get_gpu_ids()) if ray.get_gpu_ids() else torch.device("cpu")
    if device.type == "cuda":
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)  # what TorchConfig's context did; one worker runs without it (``_trainer``)
    if rank == 0 and config.get("handover"):  # the driver starts what it held back so as not to slow this start
        ray.get_actor(board_name(config["progress"][0])).deliver.remote(started_key(config["handover"]), time.time())
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
    meter.use_reference(model, ray.get(job.reference_ref) if job.reference_ref is not None else None)
    ratios, plan = job.ratios, {}
    if ratios is None:  # launched while the controller ran: everything is loaded, now the arm's ratios
        warm_up(cfg)  # the training path's one-time imports, before the plan rather than after it
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
