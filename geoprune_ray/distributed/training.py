"""The Ray Train workers' side: a loop around ``core.train`` (DDP when several workers); ``launch`` starts the runs.

Used for the baseline (launched from the driver) and for every fine-tune (from a Tune trial). Workers
build the model from its card and weights; a fine-tune worker prunes it with its arm's ratios and
runs ``core.protocol.finetune_arm`` (recalibrate, ΔG and top-1 before, fine-tune on its shard, top-1
and ΔG after), so nothing waits on the probe actors. Every epoch is reported with a
``ray.train.Checkpoint`` (rank 0 writes it, uploaded in the background).

A launch under the name and storage of an earlier one that was interrupted (its driver or its worker killed) goes on
from that run's latest checkpoint, which Ray Train hands it (``ray.train.get_checkpoint``): a fine-tune rebuilds its
pruned model from the pruning history, prunes and measures nothing again, and trains the epochs left with the
optimizer's and scheduler's state, as the uninterrupted run would have (``core.train.train`` seeds every epoch). The
final metrics say where it resumed (``resumed_from_epoch``, 0 for a run from the start).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import ray
import torch

from ..core.artifact import ModelCard
from ..core.config import TrainConfig
from ..core.geometry import GeometryMeter
from ..core.protocol import ArmResume, finetune_arm
from ..core.pruning import replay_pruning
from ..core.train import evaluate, keep_heap, train, warm_up
from .probes import device_for
from .progress import board_name, post
from .launch import CHECKPOINT_FILE, load_checkpoint, started_key
from .scaling import ArmJob

log = logging.getLogger("geoprune_ray")


def _weights(model: torch.nn.Module, history: list) -> dict[str, Any]:
    """What a checkpoint and a hand-over hold: the weights on the CPU and the pruning history."""
    return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "history": history}


def _checkpoint(model: torch.nn.Module, history: list, resume: dict, final: bool) -> tuple[Any, dict]:
    """A ``ray.train.Checkpoint`` of the weights and pruning history, and of what a worker needs to resume from it
    (``resume``: the run's fingerprint, the epochs done and their seconds, the measures taken before fine-tuning, and
    the optimizer's and scheduler's state, left out of the final one, which no training goes on from). Per-epoch ones
    upload in the background (ASYNC, deleted locally once uploaded), so they never block an epoch; the last one is
    uploaded before ``fit`` returns, since the result is read from it."""
    import ray.train

    if final:
        resume = {**resume, "optimizer": None, "scheduler": None}
    folder = tempfile.mkdtemp(prefix="geoprune-ckpt-")
    torch.save({**_weights(model, history), "resume": resume}, Path(folder) / CHECKPOINT_FILE)
    mode = ray.train.CheckpointUploadMode.SYNC if final else ray.train.CheckpointUploadMode.ASYNC
    return ray.train.Checkpoint.from_directory(folder), {"checkpoint_upload_mode": mode,
                                                         "delete_local_checkpoint_after_upload": True}


def fingerprint(config: dict, world: int, ratios: Any = None) -> str:
    """What makes two launches the same run: the model, the recipe, the number of workers (their shards) and, for a
    fine-tune, its pruning. Ray Train hands a launch the latest checkpoint stored under its name (``RunConfig(name,
    storage_path)``), even one of a run that finished, whatever its config; a checkpoint of another fingerprint is not
    resumed from."""
    job: Optional[ArmJob] = config.get("arm")
    what = {"card": config["card"], "train": config["train"], "world": world, "ratios": ratios,
            "target": dataclasses.asdict(job.target) if job else None, "bn": job.bn_recalibration if job else None}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stored(run: str, epochs: int) -> Optional[dict]:
    """The latest checkpoint Ray Train gives this launch (``ray.train.get_checkpoint``: a worker group restarted
    within the run, or a new launch under the same name and storage) if it is of this run (``fingerprint``), else
    None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    payload = load_checkpoint(checkpoint)
    resume = payload.get("resume")
    if not resume or resume.get("fingerprint") != run or not 0 < resume.get("epoch", 0) <= epochs:
        log.warning("the checkpoint at %s is of another run: training from the start", checkpoint.path)
        return None
    return payload


def train_worker(config: dict) -> None:
    """Ray Train worker loop (see the module docstring)."""
    import ray.train  # what the steps below use, imported before ``entered``
    import ray.train.torch

    entered = time.time()  # the end of a launch's start-up (bench: train_launch_cost)
    keep_heap()  # a new process: its heap keeps what each step frees
    torch.set_num_threads(config["threads"])
    rank, world, device = _place()
    if rank == 0 and config.get("handover"):  # the driver starts what it held back so as not to slow this start
        ray.get_actor(board_name(config["progress"][0])).deliver.remote(started_key(config["handover"]), time.time())
    card, model, train_set, test_set = _load(config, device)
    worker = _Worker(config, rank, world, device, entered, model)
    if config.get("arm") is None:
        worker.train_baseline(model, train_set, test_set)
    else:
        worker.finetune(card, model, train_set, test_set)


def _place() -> tuple[int, int, torch.device]:
    """This worker's rank, the number of workers, and its device: the GPU Ray gave it, else the CPU."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = device_for(ray.get_gpu_ids()) if ray.get_gpu_ids() else torch.device("cpu")
    if device.type == "cuda":
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)  # what TorchConfig's context did; one worker runs without it (``_trainer``)
    return rank, world, device


def _load(config: dict, device: torch.device) -> tuple[ModelCard, torch.nn.Module, Any, Any]:
    """The card, the base model built from it with the base weights (moved to ``device``), and the two data sets."""
    card = ModelCard.from_dict(config["card"])
    model = card.build()
    model.load_state_dict(ray.get(config["state_ref"]))
    train_set, test_set = ray.get(config["data_ref"])
    model.to(device)
    return card, model, train_set, test_set


class _Worker:
    """One worker's run: where it runs, its progress events, and what its checkpoints hold, which the training's
    callbacks (``on_epoch``, ``on_pruned``) keep up to date."""

    def __init__(self, config: dict, rank: int, world: int, device: torch.device, entered: float,
                 model: torch.nn.Module):
        self.config, self.rank, self.world, self.device, self.entered = config, rank, world, device, entered
        self.cfg = TrainConfig.from_dict(config["train"])
        self.run_id, self.label = config.get("progress") or (None, None)
        # ``started``: a waiting fine-tune's plan arrival; ``eta``: the ETA's start, which a resumed run moves back
        # by the seconds its checkpointed epochs took, so the pace and ETA count the epochs trained, not the time it
        # was down
        self.clock = {"started": time.time(), "eta": time.time()}
        # what each epoch's checkpoint holds; ``resume``: see ``_checkpoint``
        self.current: dict[str, Any] = {"model": model, "history": [],
                                        "resume": {"epoch": 0, "seconds": 0.0, "before": None}}

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """What is trained: the model in DDP where there are several workers."""
        import ray.train.torch

        return ray.train.torch.prepare_model(model) if self.world > 1 else model

    def report(self, metrics: dict, final: bool = False) -> None:
        """``ray.train.report`` with the device; from rank 0 with a checkpoint of ``current`` and the times it entered
        and reported."""
        import ray.train

        if self.rank == 0:
            current = self.current
            checkpoint, options = _checkpoint(current["model"], current["history"], current["resume"], final)
            ray.train.report({**metrics, "device": str(self.device), "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
                              "worker_entered": self.entered,
                              "worker_reported": time.time()}, checkpoint=checkpoint, **options)
        else:
            ray.train.report({**metrics, "device": str(self.device)})

    def on_epoch(self, epoch: int, metrics: dict, state: dict) -> None:
        """After each epoch: the training state into the next checkpoint, the progress event, the report."""
        done = self.current["resume"]
        self.current["resume"] = {**done, **state, "seconds": done["seconds"] + metrics["seconds"]}
        if self.rank == 0:
            post(self.run_id, kind="epoch", label=self.label, epoch=epoch, epochs=self.cfg.epochs,
                 loss=metrics["loss"], started=self.clock["eta"])
        self.report({**metrics, "top1": float("nan")})

    def on_pruned(self, pruned: torch.nn.Module, history: list, before: dict) -> None:
        """The pruned model, its history and what was measured before fine-tuning, into the next checkpoints."""
        self.current.update(model=pruned, history=history)
        self.current["resume"]["before"] = before

    def resume_from(self, stored: Optional[dict], run: str) -> Optional[dict]:
        """The training state to go on from (None: from the start); what the next checkpoints carry on."""
        self.current["resume"]["fingerprint"] = run
        if stored is None:
            return None
        state = stored["resume"]
        self.current["resume"] = dict(state)
        self.clock["eta"] = time.time() - state["seconds"]
        if self.rank == 0:  # the driver's progress line: "LABEL: resuming at epoch k+1/n from its checkpoint"
            post(self.run_id, kind="resume", label=self.label, epoch=state["epoch"], epochs=self.cfg.epochs)
        return state

    def train_baseline(self, model: torch.nn.Module, train_set: Any, test_set: Any) -> None:
        """Train the base model (from this run's checkpoint, if any), evaluate and report it, and hand it over to the
        driver where it asked for it."""
        cfg = self.cfg
        run = fingerprint(self.config, self.world)
        stored = _stored(run, cfg.epochs)
        if stored is not None:
            model.load_state_dict(stored["state_dict"])
        state = self.resume_from(stored, run)
        train(self.wrap(model), train_set, cfg, self.device, on_epoch=self.on_epoch, rank=self.rank,
              world_size=self.world, resume=state)
        metrics = {"epoch": cfg.epochs, "top1": evaluate(model, test_set, self.device)["top1"],
                   "resumed_from_epoch": state["epoch"] if state else 0}
        self.report(metrics, final=True)
        if self.rank == 0 and self.config.get("handover"):
            _hand_over(self.run_id, self.config["handover"], model, self.current["history"],
                       {**metrics, "device": str(self.device)})

    def finetune(self, card: ModelCard, model: torch.nn.Module, train_set: Any, test_set: Any) -> None:
        """Prune the base with the arm's ratios (or rebuild the pruned model from this run's checkpoint), fine-tune
        it (``finetune_arm``) and report."""
        job: ArmJob = self.config["arm"]
        meter = _meter(job, model, self.device)
        ratios, plan = _arm_ratios(job, self.cfg)
        self.clock["started"] = self.clock["eta"] = time.time()
        run = fingerprint(self.config, self.world, ratios)
        stored = _stored(run, self.cfg.epochs)
        state = self.resume_from(stored, run)
        resume = _arm_resume(card, job, stored, state) if stored is not None else None
        _, _, result = finetune_arm(model, ratios, meter, job.target, train_set, test_set, self.cfg, self.device,
                                    wrap=self.wrap, on_epoch=self.on_epoch, rank=self.rank, world_size=self.world,
                                    on_pruned=self.on_pruned, resume=resume)
        self.report({"epoch": self.cfg.epochs, **result.to_dict(), **({"r": plan["r"]} if plan else {}),
                     "plan_received": self.clock["started"],
                     "resumed_from_epoch": resume.train_state["epoch"] if resume else 0}, final=True)


def _meter(job: ArmJob, model: torch.nn.Module, device: torch.device) -> GeometryMeter:
    """The arm's meter on ``device``: its calibration set, and the base's reference (the driver's, where it fits)."""
    meter = GeometryMeter(ray.get(job.calibration_ref).to(device), job.bn_recalibration)
    meter.use_reference(model, ray.get(job.reference_ref) if job.reference_ref is not None else None)
    return meter


def _arm_ratios(job: ArmJob, cfg: TrainConfig) -> tuple[Any, dict]:
    """The arm's ratios, and its plan where they come from the progress board (else ``{}``)."""
    ratios, plan = job.ratios, {}
    if ratios is None:  # launched while the controller ran: everything is loaded, now the arm's ratios
        warm_up(cfg)  # the training path's one-time imports, before the plan rather than after it
        plan = ray.get(ray.get_actor(job.board).plan.remote(job.arm))
        ratios = plan["ratios"]
    return ratios, plan


def _arm_resume(card: ModelCard, job: ArmJob, stored: dict, state: dict) -> ArmResume:
    """The pruned model rebuilt from the checkpoint's history and weights: not pruned, nor measured, again."""
    pruned = replay_pruning(card.build(), stored["history"], job.target.input_shape)
    pruned.load_state_dict(stored["state_dict"])
    return ArmResume(pruned, stored["history"], state["before"], state)


def _hand_over(run_id: str, key: str, model: torch.nn.Module, history: list, metrics: dict) -> None:
    """Send the final weights to the driver through the run's progress board, once the final checkpoint is stored:
    the driver goes on while Ray Train tears the run down (2-3 s). Serialised here (``torch.save``), so the board
    never imports torch and the driver reads them ``weights_only``."""
    buffer = io.BytesIO()
    torch.save(_weights(model, history), buffer)
    ray.get(ray.get_actor(board_name(run_id)).deliver.remote(key, {"payload": buffer.getvalue(), "metrics": metrics}))
