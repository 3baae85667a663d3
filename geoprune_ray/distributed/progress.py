"""Live progress: one line per event on the driver, with elapsed time and an ETA.

Work that runs far from the driver (Ray Train workers inside Tune trials) posts its events to a
small named actor, the run's progress board; the driver drains it from a background thread.
Work the driver waits on itself (probes, sensitivity tasks) is reported as its results arrive.
The board also carries results handed over before the work that made them has ended (``deliver``,
``take``): a Ray Train run's final weights, sent by its worker before the run's teardown; and the arms' plans
(``publish``, ``plan``), awaited by fine-tunes launched before they exist; and a controller step's ratio (``value``),
awaited by the step's trial, started before τ was known.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import warnings
from typing import Any, Optional, Sequence

import ray

from .guard import failpoint

log = logging.getLogger("geoprune_ray")


def restarted() -> bool:
    """Whether the calling actor is a restart of one that died (Ray's own property calls a deprecated getter)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def board_name(run_id: str) -> str:
    return f"geoprune-{run_id}-progress"


@ray.remote(num_cpus=0, max_restarts=-1)
class ProgressBoard:
    """Events in order, values handed over by key (taken once), and the arms' plans. Async, so ``take`` and ``plan``
    can wait without holding up the posts.

    A fine-tune launched while the controller runs starts its Ray Train worker, loads the model, the data and the
    calibration set and measures G₀, then waits here for its arm's plan. The driver publishes once (or an error,
    which every waiting fine-tune raises). A board that restarted has lost the plans: a fine-tune that asks it then
    fails at once (resuming the run publishes them again) instead of waiting for ever."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.values: dict[str, Any] = {}
        self.arrived = asyncio.Condition()
        self.plans: dict[str, Any] = {}
        self.plans_error: Optional[str] = None
        self.published = asyncio.Event()
        self.waiting = 0  # fine-tunes that have loaded everything and wait for their plan
        if restarted():
            self.plans_error = "the run's progress board restarted and lost the arms' plans"
            self.published.set()

    async def post(self, event: dict) -> None:
        self.events.append(event)

    async def since(self, index: int) -> list[dict]:
        return self.events[index:]

    async def deliver(self, key: str, value: Any) -> None:
        async with self.arrived:
            self.values[key] = value
            self.arrived.notify_all()

    async def take(self, key: str, timeout_s: float) -> Optional[Any]:
        """The value delivered under ``key`` (removed from the board), or None if none came within ``timeout_s``."""
        async with self.arrived:
            try:
                await asyncio.wait_for(self.arrived.wait_for(lambda: key in self.values), timeout_s)
            except asyncio.TimeoutError:
                return None
            return self.values.pop(key)

    async def value(self, key: str) -> Any:
        """The value delivered under ``key`` (kept: a retried caller gets it again), waited for as long as it takes;
        the run's error (``publish(..., error)``, or a restarted board) is raised instead."""
        async with self.arrived:
            await self.arrived.wait_for(lambda: key in self.values or self.plans_error is not None)
            if key in self.values:
                return self.values[key]
        raise RuntimeError(self.plans_error)

    async def publish(self, plans: dict[str, Any], error: Optional[str] = None) -> None:
        self.plans, self.plans_error = dict(plans), error
        self.published.set()
        async with self.arrived:  # ``value`` waiters raise the error
            self.arrived.notify_all()

    async def plan(self, arm: str) -> dict[str, Any]:
        self.waiting += 1
        try:
            await self.published.wait()
        finally:
            self.waiting -= 1
        if self.plans_error is not None:
            raise RuntimeError(self.plans_error)
        return self.plans[arm]

    async def waiting_for_plans(self) -> int:
        """How many fine-tunes wait for their plan now (their start-up done, idle until the driver publishes)."""
        return self.waiting


def post(run_id: Optional[str], **event: Any) -> None:
    """Best effort, fire and forget: progress never fails the work it describes."""
    if not run_id:
        return
    try:
        ray.get_actor(board_name(run_id)).post.remote({"time": time.time(), **event})
    except Exception:  # noqa: BLE001 - no board (e.g. a test without a driver): nothing to tell
        pass


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """The driver's side: owns the board, prints what is posted, times stages."""

    def __init__(self, run_id: str, poll_s: float = 1.0):
        self.started = time.time()
        self.board = ProgressBoard.options(name=board_name(run_id), get_if_exists=True).remote()
        self._seen = 0
        self._stop = threading.Event()
        self._first: dict[str, float] = {}
        self._thread = threading.Thread(target=self._loop, args=(poll_s,), daemon=True)
        self._thread.start()

    def elapsed(self) -> str:
        return fmt_duration(time.time() - self.started)

    def _loop(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            self.drain()

    def drain(self) -> None:
        try:
            events = ray.get(self.board.since.remote(self._seen), timeout=10)
        except Exception:  # noqa: BLE001 - the board restarts; try again next poll
            return
        self._seen += len(events)
        for e in events:
            if e.get("kind") == "epoch":
                label, epoch, epochs = e["label"], e["epoch"], e["epochs"]
                first = self._first.setdefault(label, e.get("started", e["time"]))
                per_epoch = (e["time"] - first) / max(epoch, 1)
                loss = f", loss {e['loss']:.4f}" if isinstance(e.get("loss"), float) else ""
                log.info("%s: epoch %d/%d%s, %.1f s/epoch, ETA %s [elapsed %s]", label, epoch, epochs, loss,
                         per_epoch, fmt_duration(per_epoch * (epochs - epoch)), self.elapsed())
                if label.startswith("fine-tune") and epoch < epochs:
                    failpoint("finetune:epoch")
            elif e.get("kind") == "resume":  # a Ray Train run launched again goes on from its last checkpoint
                log.info("%s: resuming at epoch %d/%d from its checkpoint [elapsed %s]", e["label"],
                         min(e["epoch"] + 1, e["epochs"]), e["epochs"], self.elapsed())

    def gather(self, refs: Sequence[ray.ObjectRef], label: str, unit: str) -> list[Any]:
        """``ray.get(refs)`` in order, logging 'label k/n unit done' as each finishes, with an ETA."""
        refs = list(refs)
        pending, done, started = list(refs), 0, time.time()
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            done += len(ready)
            per_item = (time.time() - started) / done
            log.info("%s: %d/%d %s done, ETA %s [elapsed %s]", label, done, len(refs), unit,
                     fmt_duration(per_item * len(pending)), self.elapsed())
        return ray.get(refs)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.drain()
        ray.kill(self.board)
