"""The r controller (METHOD.md §6) as a Ray Tune ``Searcher``, and the arms' fine-tunes in the same experiment.

``suggest`` hands out one controller step at a time (``None`` while a step's ΔG is pending);
``on_trial_result`` consumes a trial's first reported ΔG, so the next step starts without
waiting for anything else that trial does. Beside the steps it hands out the arms' fine-tune
trials: ``prelaunch`` of them while the controller runs (their Ray Train workers start, load the
model, the data and the calibration set, then wait for their arm's ratios on the run's
progress board), the rest once it has stopped, ``concurrent`` at a time. The experiment can start before
τ is known: a searcher made without a controller hands out its early fine-tunes and waits for the
controller the driver provides (``provide``, under the run's id) once the search stage ends; with ``pending_step`` it
also hands out the first step's trial at once, without a ratio: the trial starts beside the search and waits on the
run's progress board for the step the searcher delivers there once τ is known (and, where fine-tunes do not launch
beside the search, their trials start there too and launch their Ray Train runs once the search has ended). When
the controller stops,
the driver's hook (registered with ``on_converged`` under the run's id) settles every arm on the
probe actors and publishes the plans; the searcher returns ``Searcher.FINISHED`` once every arm's
fine-tune has been handed out. (With the job option ``finetune_all`` each accepted step trial
fine-tunes itself after reporting its ΔG, while the controller moves on.) Its state is plain data,
so ``save``/``restore`` let ``Tuner.restore`` continue where it stopped.
"""

from __future__ import annotations

import logging
import math
import pickle
from typing import Any, Callable, Mapping, Optional, Sequence

import ray
from ray.tune.search import Searcher

from ..core.method import Controller, allocate
from .progress import board_name

log = logging.getLogger("geoprune_ray")

# run id → the driver's hook, called (in the driver, from Tune's loop) once the controller has stopped. A module-level
# registry, not an attribute: the searcher is pickled with the experiment, and a restored one finds the new driver's.
_CONVERGED: dict[str, Callable[[Controller], None]] = {}
# run id → what the driver's search stage found: the controller, the groups' budgets and channels, or its error
_PROVIDED: dict[str, dict[str, Any]] = {}


def on_converged(run_id: str, hook: Optional[Callable[[Controller], None]]) -> None:
    """Register (or, with None, drop) the hook of ``run_id``."""
    if hook is None:
        _CONVERGED.pop(run_id, None)
    else:
        _CONVERGED[run_id] = hook


def provide(run_id: str, controller: Optional[Controller] = None, budgets: Optional[Mapping[str, float]] = None,
            channels: Optional[Mapping[str, int]] = None, error: Optional[str] = None,
            pool_threads: Sequence[int] = ()) -> None:
    """Hand the searcher of ``run_id`` (made without a controller) its controller, once the search stage has found τ,
    and the torch threads a step may take on each probe actor (``ProbePool.step_threads``); or the search's ``error``,
    which ends the experiment. ``provide(run_id)`` alone drops the entry."""
    if controller is None and error is None:
        _PROVIDED.pop(run_id, None)
    else:
        _PROVIDED[run_id] = {"controller": controller.to_dict() if controller else None,
                             "budgets": dict(budgets or {}), "channels": dict(channels or {}), "error": error,
                             "pool_threads": list(pool_threads)}


SEARCHED = "search-ended"  # on the progress board once the controller is provided


def step_key(trial_id: str) -> str:
    """Where a step trial handed out without a ratio finds its step on the run's progress board."""
    return f"step-of-{trial_id}"


class RatioSearcher(Searcher):
    """Drives the r controller through Tune trials, then the arms' fine-tunes."""

    # defaults for a searcher restored from an experiment saved before these existed
    launch_in_search = True
    pending_step = False
    pool_threads: Sequence[int] = ()

    def __init__(self, controller: Optional[Controller] = None, budgets: Optional[Mapping[str, float]] = None,
                 channels: Optional[Mapping[str, int]] = None, r_max: float = 0.9, max_failures: int = 2,
                 metric: str = "delta_g", mode: str = "min", arms: Sequence[str] = (), concurrent: int = 1,
                 prelaunch: int = 0, run_id: Optional[str] = None, launch_in_search: bool = True,
                 pending_step: bool = False):
        super().__init__(metric=metric, mode=mode)
        self.controller = controller.to_dict() if controller else None
        self.budgets = dict(budgets or {})
        self.channels = dict(channels or {})
        self.r_max = r_max
        self.max_failures = max_failures
        self.arms = list(arms)  # fine-tunes to hand out, in this order
        self.concurrent = max(1, concurrent)  # fine-tunes at once once the controller has stopped
        self.prelaunch = max(0, min(prelaunch, self.concurrent))  # … and while it runs
        self.run_id = run_id
        self.launch_in_search = launch_in_search  # early fine-tunes before the controller is provided, or after
        self.pending_step = pending_step and run_id is not None  # the first step's trial before the controller
        self.pool_threads: Sequence[int] = ()  # a step's torch threads on each probe actor, where it runs alone
        self.notified = False  # the driver's hook has run (the plans are published)
        self.trials: dict[str, dict[str, Any]] = {}  # trial id → the config it was given
        self.observed: set[str] = set()
        self.finished: set[str] = set()  # fine-tune trials that ended
        self.failures: dict[float, int] = {}

    # -- helpers
    def _ctl(self) -> Controller:
        return Controller.from_dict(self.controller)

    def _provided(self) -> Optional[bool]:
        """True once the searcher has its controller (given, restored, or provided by the driver); None when the
        driver's search failed; False while it runs."""
        if self.controller is None and self.run_id and self.run_id in _PROVIDED:
            given = _PROVIDED[self.run_id]
            if given["error"] is not None:
                return None
            self.controller, self.budgets, self.channels = given["controller"], given["budgets"], given["channels"]
            self.pool_threads = given["pool_threads"]
        return self.controller is not None

    def _waiting(self) -> bool:
        return any(cfg["kind"] == "step" and tid not in self.observed for tid, cfg in self.trials.items())

    def _step_config(self, r: float, step: int) -> dict[str, Any]:
        return {"kind": "step", "arm": "step", "r": r, "step": step, "tau": self.controller["budget"],
                "pool_threads": list(self.pool_threads),
                "ratios": allocate(r, self.budgets, self.channels, self.r_max)}

    def _deliver_steps(self) -> None:
        """Give each step trial handed out without a ratio (``pending_step``) its step, on the run's progress board
        where it waits, and tell early fine-tunes that wait for the search's end (``after_search``) that it has
        ended; again after a restore (the new driver's board is empty)."""
        sent = self.__dict__.setdefault("_sent", set())  # not in the saved state: a restored searcher sends again

        def send(key: str, value: Any) -> None:
            ray.get_actor(board_name(self.run_id)).deliver.remote(key, value)
            sent.add(key)

        if self.pending_step and SEARCHED not in sent:
            send(SEARCHED, True)
        for tid, cfg in list(self.trials.items()):
            if cfg["kind"] != "step" or not cfg.get("pending") or step_key(tid) in sent:
                continue
            if cfg["r"] is None:
                ctl = self._ctl()
                if ctl.done:  # a resumed run whose controller had converged: no step is left for this trial
                    cfg = {"kind": "step", "r": None, "no_step": True}
                else:
                    cfg = self.trials[tid] = {**self._step_config(ctl.propose(), len(ctl.steps)), "pending": True}
            send(step_key(tid), cfg)

    def _finetunes(self) -> list[str]:
        return [tid for tid, cfg in self.trials.items() if cfg["kind"] == "finetune"]

    def _next_finetune(self, trial_id: str) -> Optional[dict[str, Any]]:
        launched = self._finetunes()
        running = [tid for tid in launched if tid not in self.finished]
        slots = self.concurrent if self.notified else self.prelaunch
        if len(launched) >= len(self.arms) or len(running) >= slots:
            return None
        cfg = {"kind": "finetune", "arm": self.arms[len(launched)]}
        if self.pending_step and not self.launch_in_search and not self._provided():
            cfg["after_search"] = True  # its trial starts now, its Ray Train run once the search has ended
        self.trials[trial_id] = cfg
        return cfg

    def _notify(self, ctl: Controller) -> None:
        hook = _CONVERGED.get(self.run_id) if self.run_id else None
        if hook is not None:
            hook(ctl)
        self.notified = True

    # -- the Searcher contract
    def suggest(self, trial_id: str) -> Optional[dict[str, Any] | str]:
        provided = self._provided()
        if provided is None:
            return Searcher.FINISHED  # the search stage failed: the driver raises its error
        if not provided:
            if self.pending_step and not self._waiting():  # the first step's trial starts beside the search
                cfg = self.trials[trial_id] = {"kind": "step", "arm": "step", "r": None, "step": None, "pending": True}
                return cfg
            # a fine-tune launched early, beside the search (on CPUs only its trial: it launches once the search ends)
            return self._next_finetune(trial_id) if self.launch_in_search or self.pending_step else None
        self._deliver_steps()
        ctl = self._ctl()
        if ctl.done:
            if not self.notified:
                self._notify(ctl)
            cfg = self._next_finetune(trial_id)
            if cfg is None and len(self._finetunes()) >= len(self.arms):
                return Searcher.FINISHED
            return cfg
        if not self._waiting():
            cfg = self._step_config(ctl.propose(), len(ctl.steps))
            self.trials[trial_id] = cfg
            return cfg
        return self._next_finetune(trial_id)  # a fine-tune launched early, beside the pending step

    def _observe(self, trial_id: str, delta_g: float, **extra: Any) -> None:
        if self.controller is None:
            return
        ctl = self._ctl()
        cfg = self.trials[trial_id]
        if ctl.done or ctl.propose() != cfg["r"]:
            return  # a stale trial (e.g. re-run after a restore): its step is already recorded
        ctl.observe(delta_g, trial_id=trial_id, **extra)
        self.controller = ctl.to_dict()
        self.observed.add(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        cfg = self.trials.get(trial_id)
        measured = cfg and cfg["kind"] == "step" and cfg["r"] is not None  # not a step trial that had no step
        if measured and trial_id not in self.observed and "delta_g" in result:
            self._observe(trial_id, result["delta_g"], macs=result.get("macs"), params=result.get("params"),
                          pid=result.get("pid"))

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        cfg = self.trials.get(trial_id)
        if cfg and cfg["kind"] == "finetune":
            self.finished.add(trial_id)  # its slot is free (a failed one shows in the results)
            return
        if not cfg or cfg["kind"] != "step" or trial_id in self.observed:
            return
        r = cfg["r"]
        if r is None:  # a step trial that ended before its ratio came (failed, or no step was left): forgotten
            del self.trials[trial_id]
            if error:
                log.warning("controller trial %s failed before its step was known", trial_id)
            return
        if result and "delta_g" in result and not error:
            self.on_trial_result(trial_id, result)
            return
        # The step failed before reporting: forget it so suggest() re-proposes the same r, and
        # after max_failures count the ratio as rejected so the run cannot loop forever.
        self.failures[r] = self.failures.get(r, 0) + 1
        del self.trials[trial_id]
        log.warning("controller trial %s at r=%.4f failed (%d/%d)", trial_id, r, self.failures[r], self.max_failures)
        if self.failures[r] >= self.max_failures:
            self.trials[trial_id] = cfg
            self._observe(trial_id, math.inf, failed=True)

    # -- checkpointing for Tuner.restore
    def get_state(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def set_state(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))

    @property
    def result(self) -> Controller:
        return self._ctl()
