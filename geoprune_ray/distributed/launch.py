"""Launching Ray Train runs: the baseline from the driver, every fine-tune from its Tune trial. The workers' side
(``train_worker``) is in ``training``.

Nothing here imports torch up front: a fine-tune's Tune trial launches its run and reads the result's metrics without
it, and Ray Train's controller, which unpickles the loop's config, imports only Ray (``_trainer``). The baseline's
weights come back to the driver, which has torch already.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import ray

from ..core.config import TrainConfig
from ..errors import first_line
from .progress import board_name
from .scaling import ArmJob, Scaling

if TYPE_CHECKING:
    import torch

    from ..core.artifact import ModelCard

CHECKPOINT_FILE = "model.pt"
# Where Ray Train keeps the list of a run's checkpoints (``ray.train.v2._internal.constants``), read by any launch under
# the run's name and storage: ``ray.train.get_checkpoint`` then gives the latest (``training``: resuming).
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
# "1" in every process of a Ray without an autoscaler: the driver of an embedded Ray sets it before starting it.
NO_AUTOSCALER_ENV = "GEOPRUNE_NO_AUTOSCALER"
HANDOVER_POLL_S = 1.0  # how long one wait on the board lasts before the driver checks that the run still lives
# How often Ray Train's controller polls a run's workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default): it
# learns from the polls that the workers have reported and finished, so an empty launch ends 1.45 s after its worker
# did at 1 s, 0.83 s at 0.5 s and 0.31 s at 0.25 s (bench: train_launch_cost; BENCHMARKS.md §4). A fine-tune's end
# is the run's end: polled every 0.25 s. A baseline hands its weights over before the teardown, and its training is
# the longest: every second (a poll costs its controller about 0.01-0.03 of a core at 0.25 s).
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
BASELINE_POLL_S, FINETUNE_POLL_S = 1.0, 0.25
_USER_POLL_S = os.environ.get(POLL_ENV)  # a user's own setting, read before this module sets its own

log = logging.getLogger("geoprune_ray")


def _train_loop(config: dict) -> None:
    """The workers' loop, by reference to this torch-free module: Ray Train's controller never imports ``training``."""
    from .training import train_worker

    train_worker(config)


def _worker_resources(scaling: Scaling) -> dict[str, float]:
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker or 1.0
    return resources


def fit(card: "ModelCard | dict", state_ref: Any, data_ref: Any, cfg: TrainConfig, scaling: Scaling, storage: str,
        name: str, arm: Optional[ArmJob] = None, progress: Optional[tuple[str, str]] = None,
        teardowns: Optional[list["_Run"]] = None, weights: bool = True,
        on_started: Optional[Callable[[float], Any]] = None, poll_s: Optional[float] = None,
        ) -> tuple[Optional[dict[str, "torch.Tensor"]], Optional[list], dict[str, Any]]:
    """Train the model ``state_ref`` holds through Ray Train: the baseline as it is, or, given ``arm``, a pruned copy
    (pruned, measured and fine-tuned on the worker). Returns the final weights, the pruning history and the last
    metrics; with ``weights=False`` only the metrics (None, None, metrics), and this process never imports torch.
    A launch under the ``name`` (in ``storage``) of a run that was interrupted goes on from that run's last checkpoint
    (``training``); the metrics' ``resumed_from_epoch`` says after which epoch (0: from the start).

    Given ``teardowns`` (and ``progress``, whose run's board carries the weights), a baseline returns as soon as its
    worker has stored the final checkpoint and handed the weights over; Ray Train's teardown goes on in a thread,
    appended to ``teardowns`` for the caller to join (``join_teardowns``). The metrics then lack
    ``checkpoint_path``. ``on_started(when)`` is called once the worker has started (its process and imports paid),
    or at once where the launch hands nothing over: what the caller starts there does not slow the launch down.
    ``poll_s``: how often Ray Train's controller polls the workers (``BASELINE_POLL_S``, ``FINETUNE_POLL_S``)."""
    # Train's controller learns that the workers have finished by polling them (every 2 s by default), and reads
    # the interval from this process's environment when the run starts; a user's own setting wins.
    os.environ[POLL_ENV] = _USER_POLL_S or str(poll_s if poll_s is not None else
                                               (BASELINE_POLL_S if arm is None else FINETUNE_POLL_S))
    handover = f"{name}-{uuid.uuid4().hex[:8]}" if teardowns is not None and progress and arm is None else None
    _set_aside_unreadable(storage, name)
    trainer = _trainer({"card": card if isinstance(card, dict) else card.to_dict(), "state_ref": state_ref,
                        "data_ref": data_ref, "arm": arm, "train": cfg.to_dict(), "threads": scaling.torch_threads,
                        "progress": progress, "handover": handover}, scaling, storage, name)
    if handover:
        run, delivered = _fit_in_background(trainer, progress[0], handover, name, on_started)
        if delivered is not None:
            teardowns.append(run)
            import torch

            payload = torch.load(io.BytesIO(delivered["payload"]), map_location="cpu", weights_only=True)
            return payload["state_dict"], payload["history"], delivered["metrics"]
        result = run.result  # ended without handing over: read its checkpoint
    else:
        if on_started is not None:
            on_started(time.time())
        result = trainer.fit()
    metrics = {**result.metrics, "checkpoint_path": result.checkpoint.path}
    if not weights:
        return None, None, metrics
    payload = load_checkpoint(result.checkpoint)
    return payload["state_dict"], payload["history"], metrics


def _set_aside_unreadable(storage: str, name: str) -> None:
    """Ray Train fails every launch under a run's name and storage, for good, whose snapshot (``SNAPSHOT_FILE``) it
    cannot restore: one cut short by a driver killed while writing it (the write is not atomic), one naming a
    checkpoint that is gone, or one of another Ray version. Such a run is moved aside (``NAME.unreadable-TIME``, kept
    to look at) and the launch starts afresh, rather than failing each time the run is resumed."""
    import json

    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(storage)
    except (ValueError, OSError):  # not a URI nor an absolute path: Ray Train says so when it starts
        return
    run = f"{root.rstrip('/')}/{name}"
    try:
        with fs.open_input_stream(f"{run}/{SNAPSHOT_FILE}") as f:
            snapshot = json.loads(f.read())
        if snapshot["ray_version"] != ray.__version__:
            raise ValueError(f"written by Ray {snapshot['ray_version']}, this is Ray {ray.__version__}")
        gone = [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]
                if fs.get_file_info(f"{run}/{c['checkpoint_dir_name']}").type == pafs.FileType.NotFound]
        if gone:
            raise ValueError(f"its checkpoint {gone[0]} is gone")
    except FileNotFoundError:  # a new run
        return
    except (OSError, ValueError, KeyError, TypeError) as exc:
        aside = f"{run}.unreadable-{time.time_ns()}"
        log.warning("Ray Train run %s cannot be resumed (its snapshot: %s); moved to %s and started afresh", run,
                    first_line(exc), aside)
        fs.move(run, aside)


def _trainer(config: dict, scaling: Scaling, storage: str, name: str) -> Any:
    """A Ray Train trainer running ``training.train_worker`` with ``config``, without the parts of a launch that the
    pipeline does not use (bench: ``train_launch_cost``; BENCHMARKS.md §4):

    - one worker gets no process group: it has no collectives, so a plain ``BackendConfig`` replaces
      ``TorchConfig``, whose import (torch) and gloo set-up Train's controller and worker would otherwise pay;
    - no ``DatasetsCallback``: it starts a ``DatasetManager`` actor per launch even without Ray datasets (data comes
      through the object store here);
    - no ``PlacementGroupCleanerCallback``: its detached actor (started on the launch's critical path, then polling
      the controller's state every second) frees the workers' placement group if the controller dies while the
      driver lives on. Here a failed launch fails the run, and the placement group goes with its driver's job;
    - on an embedded Ray, no resource requests to an autoscaler it does not have: they go through an actor that
      stays for the whole run (``lean_train.LocalScalingPolicy``).

    Several workers get ``TorchConfig`` (gloo, NCCL on GPUs) for DDP."""
    from ray.train import BackendConfig, RunConfig, ScalingConfig

    from .lean_train import LeanTrainer

    if scaling.workers > 1:
        from ray.train.torch import TorchConfig

        # NCCL where several GPU workers talk; gloo also starts where the cluster's GPUs are not real CUDA devices
        # (the workers then train on the CPU).
        backend = TorchConfig(backend="nccl" if scaling.use_gpu else "gloo")
    else:
        backend = BackendConfig()
    return LeanTrainer(_train_loop, train_loop_config=config, backend_config=backend,
                       scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.use_gpu,
                                                    resources_per_worker=_worker_resources(scaling)),
                       run_config=RunConfig(name=name, storage_path=storage))


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


def started_key(handover: str) -> str:
    """The board key under which a worker that will hand its result over says that it has started."""
    return f"{handover}:started"


def _fit_in_background(trainer: Any, run_id: str, key: str, name: str,
                       on_started: Optional[Callable[[float], Any]] = None) -> tuple[_Run, Optional[dict]]:
    """Run ``trainer.fit()`` in a thread and wait for the worker's hand-over on the board: the thread and what was
    handed over, None if the run ended without (its error, if any, is raised here). ``on_started`` is called with
    the time the worker said that it started (not if the run ends before)."""
    run = _Run(trainer, name)
    run.start()
    board = ray.get_actor(board_name(run_id))
    if on_started is not None:
        when = _take_while_alive(run, board, started_key(key))
        if when is not None:
            on_started(when)
    delivered = _take_while_alive(run, board, key)
    if delivered is None:
        run.join()
        if run.error is not None:
            raise run.error
    return run, delivered


def _take_while_alive(run: _Run, board: Any, key: str) -> Optional[Any]:
    """What the run's worker delivers on the board under ``key``, or None once the run has ended without it."""
    while True:
        alive = run.is_alive()  # read before the last wait: a delivery made just before the end is still seen
        value = ray.get(board.take.remote(key, HANDOVER_POLL_S))
        if value is not None or not alive:
            return value


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
                        first_line(run.error))


def load_checkpoint(checkpoint: "ray.train.Checkpoint | str") -> dict[str, Any]:
    """The weights and pruning history a worker saved (a Checkpoint, or its path), weights_only."""
    import ray.train
    import torch

    if isinstance(checkpoint, str):
        checkpoint = ray.train.Checkpoint(checkpoint)
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
