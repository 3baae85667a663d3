"""The pipeline driver: the whole protocol on a Ray cluster, every artifact in one run directory.

The steps and the summary are ``core.protocol``'s; this module maps them onto Ray, each stage
starting as soon as its inputs exist:
- the probe actors start (processes, imports, CUDA contexts) while the baseline trains (Ray Train);
- G_noise and the probes (actors) and the sensitivity (Ray tasks) run at the same time → τ, τ_L;
- one Tune experiment: the controller is its searcher, whose steps the actors answer; fine-tunes that fit
  beside the actors launch while it runs and wait for their arm's ratios (Ray Train's start-up overlaps
  the controller);
- when it stops, every arm's ratios are settled on the actors and published, and the actors are given back;
- the arms' fine-tunes run side by side as trials through Ray Train, each measuring its own ΔG and
  top-1 before and after;
- once the last has finished, every fine-tuned model is timed against the base as the job's ``deploy`` target runs it
  (one task, ``distributed.speed``) → ``trials.parquet``, ``model/``, ``summary.json`` (and ``report.md``, rendered by
  the caller's ``report``).

Each finished stage is recorded in ``state.json`` with its outputs, so a driver that was killed
resumes from the run directory: finished stages are read back, and the Tune experiment is restored
with ``Tuner.restore``.

``Pipeline`` holds the run's record; its stage methods (``_setup``, ``_baseline``, ``_experiment`` with
``_search_thread`` and the converged hook's ``_settle``, ``_collect``, ``_speed``, ``_artifacts``) share one
``RunContext``.
Which Ray the driver joins is ``cluster``'s; how much of it each part takes is ``resources``'; the protocol's
decisions and the summary are ``core.protocol``'s; the arms are ``core.arms``'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import functools
import logging
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import ray
import torch
from ray import tune
from torch import nn

from ..core import arms as arm_registry
from ..core import protocol
from ..core.data import Dataset
from ..core.deploy import headline, not_measured
from ..core.geometry import Calibration
from ..core.method import Controller, PruneTarget, probe_ratios
from ..core.protocol import SCHEMA_VERSION
from ..core.artifact import ModelCard, save_pruned
from ..core.provenance import provenance
from ..core.pruning import dependency_groups, global_allocation, macs_params, replay_pruning
from ..core.reference import resolve
from ..core.rundir import RunDir
from ..core.spec import JobSpec
from ..core.train import evaluate
from ..errors import GeopruneError, Interrupted, first_line
from .cluster import connect, embedded_size, sole_driver
from .guard import SIGNALS, RunLock, failpoint
from .launch import fit, join_teardowns, load_checkpoint
from .probes import START_TIMEOUT_S, PoolSpec, PoolStarter, ProbePool, actor_restarts
from .progress import Progress
from .resources import (Resources, finetune_scaling, gpu_shares, largest_node_cpus, prelaunch, sensitivity_tasks,
                        settled_free_cpus, side_by_side, wait_for_gpus, whole_nodes)
from .scaling import Scaling
from .searcher import SEARCHED, RatioSearcher, on_converged, provide
from .sensitivity import by_group, submit_sensitivity
from .speed import time_models
from .trial import TrialContext, search_trial

# Moved out of this module by issue 14 (to ``cluster``, ``resources``, ``probes``, ``core.protocol``); importable from
# here for one release.
from .cluster import check_gcs_address, disconnect  # noqa: E402
from .resources import GpuShares, baseline_scaling  # noqa: E402
from ..core.protocol import replay_controller, spearman  # noqa: E402

__all__ = ["EXPERIMENT", "STATE", "TRIAL_COLUMNS", "Pipeline", "RunContext", "run_job",
           # the old names
           "GpuShares", "Resources", "actor_restarts", "baseline_scaling", "check_gcs_address", "connect", "disconnect",
           "embedded_size", "finetune_scaling", "gpu_shares", "largest_node_cpus", "prelaunch", "replay_controller",
           "sensitivity_tasks", "side_by_side", "spearman", "wait_for_gpus", "whole_nodes"]

log = logging.getLogger("geoprune_ray")
STATE = "state.json"
EXPERIMENT = "controller"
TRIAL_COLUMNS = ["trial_id", "kind", "arm", "step", "r", "delta_g", "accepted", "macs", "params", "ray_train",
                 "top1", "top1_before_finetune", "delta_g_after", "pid", "actor", "threads", "train_device",
                 "train_gpu_ids", "resumed_from_epoch", "launched", "started", "finished"]
SPEED_COLUMNS = ["latency_ms", "throughput", "speedup", "speedup_per_macs", "speed_batch"]  # as deployed (``_speed``)


@dataclasses.dataclass
class RunContext:
    """What the stages of one driver's run share: set up by ``run_all`` and ``_setup``, then filled in stage by stage
    (the base's size after the baseline, what the search found, the arms after the experiment)."""

    res: Resources
    model: nn.Module
    train_set: Dataset
    test_set: Dataset
    card: ModelCard
    progress: Progress
    target: Optional[PruneTarget] = None
    data_ref: Any = None  # ObjectRef of (train set, test set)
    calibration: Optional[Calibration] = None
    starter: Optional[PoolStarter] = None  # the probe actors, started once the baseline's worker is up
    teardowns: list = dataclasses.field(default_factory=list)  # Ray Train runs still ending after handing over
    pool: Optional[ProbePool] = None
    base_macs: int = 0
    base_params: int = 0
    groups: list = dataclasses.field(default_factory=list)
    channels: dict[str, int] = dataclasses.field(default_factory=dict)
    # the search stage's: probes, noise, budget, sens, budgets, started (or error); filled in its thread
    found: dict[str, Any] = dataclasses.field(default_factory=dict)
    settled: dict[str, Any] = dataclasses.field(default_factory=dict)  # the converged hook's: published (or error)
    ctl: Optional[Controller] = None  # after the experiment: the controller, the arms' plans and fine-tunes
    plans: dict[str, protocol.ArmPlan] = dataclasses.field(default_factory=dict)
    arms: dict[str, dict] = dataclasses.field(default_factory=dict)
    trials: list[dict] = dataclasses.field(default_factory=list)


class Pipeline:
    """One run of a job spec on Ray: ``run_all`` goes through the stages (``_baseline``, ``_experiment`` with the
    search in a thread beside it, ``_artifacts``), each recorded in ``state.json`` when it finishes, over one
    ``RunContext``."""

    def __init__(self, spec: JobSpec, storage: str):
        self.spec = spec
        self.run = RunDir(storage)
        self.cfg = spec.method_config()
        if self.run.exists(STATE):
            self.state = self.run.read_json(STATE)
            if self.state["spec"] != _jsonable(spec.to_dict()):
                raise GeopruneError(f"{storage} holds a run of a different job spec",
                                    "pass a new --storage folder, or the same job spec to resume")
            log.info("resuming run %s: stages done: %s", self.state["run_id"], ", ".join(self.state["stages"]) or "none")
        else:
            self.state = {"run_id": uuid.uuid4().hex[:8], "spec": _jsonable(spec.to_dict()), "stages": {},
                          "schema_version": SCHEMA_VERSION}
        self.state.setdefault("created", time.time())  # the time line's zero (this driver's, for older runs)
        self.timings: dict[str, float] = dict(self.state.get("timings", {}))
        self._resolved = None
        self._searching: Optional[threading.Thread] = None
        self.report: Optional[Callable[[RunDir], Any]] = None  # renders the report from the run directory at the end

    @property
    def run_id(self) -> str:
        return self.state["run_id"]

    # -- bookkeeping
    def _done(self, stage: str, started: float, finished: Optional[float] = None, **outputs: Any) -> None:
        if stage in self.state["stages"]:
            return  # finished by an earlier driver: keep its record and timing
        finished = finished or time.time()
        self.timings[stage] = finished - started
        self.state["stages"][stage] = {"started": started, "finished": finished, **outputs}
        self.state["timings"] = self.timings
        self.run.write_json(STATE, self.state)

    def _span(self, name: str, started: float, finished: Optional[float] = None) -> None:
        """A span of the run's time line that is not a resumable stage (Ray start-up, actor start-up)."""
        self.state.setdefault("spans", {})[name] = {"started": started, "finished": finished or time.time()}
        self.timings[name] = self.state["spans"][name]["finished"] - started

    def stage(self, name: str) -> Optional[dict]:
        return self.state["stages"].get(name)

    def _stopped(self, what: str) -> Interrupted:
        return Interrupted(what, f"run the same command again to resume from {self.run.location}")

    def preflight(self):
        """Build the model, load its weights and the data: bad input fails here, before Ray starts."""
        if self._resolved is None:
            spec = self.spec
            torch.manual_seed(spec.baseline_seed())
            self._resolved = resolve(spec.model.name, spec.data.name, spec.data.name, width=spec.model.width,
                                     weights=spec.model.weights, input_size=spec.model.input_size,
                                     data_dir=spec.data.data_dir, download=spec.data.download)
        return self._resolved

    # -- the run
    def run_all(self) -> dict[str, Any]:
        spec = self.spec
        cluster = ray.cluster_resources()
        if spec.resources.use_gpu and not cluster.get("GPU") and spec.resources.wait_for_gpu_s > 0:
            cluster = wait_for_gpus(spec.resources.wait_for_gpu_s)
        gpus = cluster.get("GPU", 0)
        use_gpu = spec.resources.use_gpu if spec.resources.use_gpu is not None else gpus > 0
        if use_gpu and gpus == 0:
            raise GeopruneError("resources.use_gpu is true but the Ray cluster has no GPU",
                                "set use_gpu: false, or run on a cluster with GPUs")
        shares = gpu_shares(spec.resources, gpus if use_gpu else 0)
        scaling = Scaling(spec.resources.workers, use_gpu, spec.resources.cpus_per_worker, shares.worker)
        model, train_set, test_set, card = self.preflight()
        res = Resources(cluster, use_gpu, shares.actor, shares.worker, scaling,
                        spec.resources.gpus_per_worker is not None, shares.task)
        ctx = RunContext(res, model, train_set, test_set, card, Progress(self.run_id))
        try:
            self._setup(ctx)
            try:
                self._baseline(ctx)
                self._experiment(ctx)
                self._speed(ctx)
                return self._artifacts(ctx)
            finally:
                join_teardowns(ctx.teardowns)
                if ctx.starter is not None:
                    ctx.starter.shutdown()
                if self._searching is not None:  # interrupted mid-search: the actors' shutdown ends it; let it end
                    self._searching.join(timeout=15)
        finally:
            ctx.progress.close()

    def _setup(self, ctx: RunContext) -> None:
        """Every check passed: the run is recorded (from here on 'geoprune resume' finds it), the data and the
        calibration set are shared, and the probe actors are made ready to start beside the baseline."""
        spec, cfg = self.spec, self.cfg
        if not self.run.exists(STATE):
            self.run.write_json(STATE, self.state)
        ctx.target = PruneTarget(ctx.card.input_shape, ctx.card.num_classes, cfg.importance, cfg.round_to)
        ctx.data_ref = ray.put((ctx.train_set, ctx.test_set))
        ctx.calibration = Calibration.from_dataset(ctx.train_set, cfg)
        pool_spec = PoolSpec(spec.resources.probe_actors, spec.resources.cpus_per_actor, ctx.res.gpus_per_actor)
        if not self.stage("arms"):
            timeout = max(START_TIMEOUT_S, spec.resources.wait_for_gpu_s)
            ctx.starter = PoolStarter(lambda: ProbePool.start(ctx.target, cfg.bn_recalibration, pool_spec, self.run_id,
                                                              timeout))

    def _baseline(self, ctx: RunContext) -> None:
        """The baseline trains through Ray Train (unless given or already trained); the probe actors start (processes,
        imports, CUDA contexts) once its worker has started. Then the base's size and dependency groups."""
        spec = self.spec
        started = time.time()
        if self.run.exists("baseline.pt"):
            ctx.model.load_state_dict(torch.load(io.BytesIO(self.run.read_bytes("baseline.pt")), weights_only=True))
        elif spec.model.weights is None and spec.protocol.baseline_epochs > 0:
            log.info("stage baseline: training %s for %d epochs through Ray Train", ctx.card.arch,
                     spec.protocol.baseline_epochs)
            failpoint("baseline:start")
            pool_cpus = spec.resources.probe_actors * spec.resources.cpus_per_actor
            scaling = whole_nodes(ctx.res.scaling, reserved=pool_cpus)

            def worker_started(at: float) -> None:  # the launch's start-up is paid: now the actors start
                self._span("baseline_launch", started, at)
                if ctx.starter is not None:
                    ctx.starter.start()

            # the worker hands the weights over once the final checkpoint is stored: the actors take them while Ray
            # Train tears the run down
            state, _, metrics = fit(ctx.card, ray.put(ctx.model.state_dict()), ctx.data_ref, spec.baseline_config(),
                                    scaling, self.run.uri("train"), name="baseline", progress=(self.run_id, "baseline"),
                                    teardowns=ctx.teardowns, on_started=worker_started)
            ctx.model.load_state_dict(state)
            buffer = io.BytesIO()
            torch.save(state, buffer)
            self.run.write_bytes("baseline.pt", buffer.getvalue())
            self._done("baseline", started, top1=metrics["top1"])
            SIGNALS.reassert()
            failpoint("baseline:end")
        ctx.pool = ctx.starter.start() if ctx.starter is not None else None
        ctx.base_macs, ctx.base_params = macs_params(ctx.model, ctx.card.input_shape)
        ctx.groups = dependency_groups(ctx.model, ctx.card.input_shape, ctx.card.num_classes)
        ctx.channels = {g.name: g.channels for g in ctx.groups}

    def _experiment(self, ctx: RunContext) -> None:
        """One Tune experiment starts now, beside the search stage (G_noise, probes and sensitivity at the same time →
        τ, τ_L), which runs in a thread of this driver (``_search_thread``): Tune's start and the early fine-tunes'
        Ray Train start-up overlap the search instead of the controller's steps. The searcher hands out those
        fine-tunes (they load everything, then wait for their arm's ratios on the progress board) and waits for its
        controller, which the search provides; the steps are answered by the actors. When the controller stops, the
        hook settles every arm on the actors, publishes the plans and gives the actors back, and the other fine-tunes
        follow on what they held."""
        spec, pool, res = self.spec, ctx.pool, ctx.res
        handed = time.time()
        if pool is not None:
            # G₀ once, on probe actor 0, for every process on the CPU (probe actors, sensitivity tasks, fine-tune
            # workers), where each used to recalibrate the base and measure it again; with one torch thread, as the
            # actors and tasks measure, so an unpruned copy still gives ΔG = 0 exactly. It is measured while this
            # thread starts the experiment. Processes on a GPU measure their own.
            pool.hand(ctx.model, ctx.calibration, measure_g0=not res.use_gpu)  # they load while the experiment starts
        arms_wanted = list(spec.protocol.arms_to_run)
        concurrent = side_by_side(res, len(arms_wanted))
        arm_scaling = finetune_scaling(res, concurrent)
        # Early fine-tunes only where this driver is the cluster's only one (an embedded Ray): on a shared cluster
        # another run's could take the CPUs this run's steps need while they wait for them. They count on what the
        # actors leave of the cluster: the search's tasks and the baseline's teardown give theirs back (an early
        # fine-tune waits for them, beside the search).
        free = ray.cluster_resources().get("CPU", 0.0) - (pool.spec.actors * pool.spec.cpus_per_actor if pool else 0)
        early = prelaunch(res, pool.spec, arm_scaling, concurrent, free) if pool is not None and sole_driver() else 0
        trial_ctx = TrialContext(
            self.run_id, spec.resources.probe_actors, ctx.card.to_dict(), spec.finetune_config().to_dict(),
            ctx.data_ref, ray.put(ctx.model.state_dict()),
            pool.shared["calibration"] if pool else ray.put(ctx.calibration),  # the actors' copy, reused
            ctx.target, self.cfg.bn_recalibration, self.run.uri("train"), res.scaling, spec.protocol.finetune_all,
            arm_scaling, early, pool.shared.get("reference") if pool else None)
        board = ctx.progress.board  # the arms' plans go on the run's progress board
        if self.stage("arms"):  # a resumed run: its fine-tunes find the plans at once
            ray.get(board.publish.remote(self.stage("arms")["plans"]))
        hook = self._converged_hook(ctx, arms_wanted)
        on_converged(self.run_id, hook)
        searching = self._searching = threading.Thread(target=self._search_thread, args=(ctx, hook, handed),
                                                       name="geoprune-search", daemon=True)
        try:
            # On CPUs the early fine-tune launches once the steps start, not beside the search: its start-up shares the
            # same cores either way, and beside the search's three busy processes it cost the search more than it
            # saved the controller (bench runs 22-23 on 2 cores: search +7 s, controller -5 s).
            searcher = RatioSearcher(arms=arms_wanted, r_max=self.cfg.r_max, concurrent=concurrent, prelaunch=early,
                                     run_id=self.run_id, launch_in_search=res.use_gpu, pending_step=pool is not None)
            searching.start()
            rows = self._tune(EXPERIMENT, tune.with_parameters(search_trial, ctx=trial_ctx),
                              tune.TuneConfig(search_alg=searcher, num_samples=-1,
                                              max_concurrent_trials=max(8, concurrent + 2), reuse_actors=True),
                              f"the Tune experiment starts beside the search: its controller steps follow once τ is "
                              f"known; {early} of {len(arms_wanted)} fine-tune(s) launched early (beside the "
                              f"{'search' if res.use_gpu else 'steps'}), waiting for their arm's ratios")
            if searching.is_alive():  # Tune stopped (Ctrl-C) before the search ended: the actors' shutdown ends it
                raise self._stopped("the run stopped during the search stage")
        finally:
            on_converged(self.run_id, None)
            provide(self.run_id)
        self._collect(ctx, rows)

    def _search_thread(self, ctx: RunContext, hook: Callable[[Controller], None], handed: float) -> None:
        """The search stage, beside the experiment: τ and τ_L (measured, or read back), then the controller handed to
        the searcher. An error is kept in ``ctx.found`` and raised by the driver once Tune has stopped."""
        cfg, pool, board = self.cfg, ctx.pool, ctx.progress.board
        try:
            if pool is not None:
                pool.wait_loaded()
                if pool.g0_measured is not None:
                    self._span("reference", handed, pool.g0_measured)
                self._span("actors", pool.created)
            if not self.stage("probes") or not self.stage("sensitivity"):
                self._search(ctx)
            probes = self.run.read_table("probes.parquet")
            noise, budget = self.stage("probes")["g_noise"], self.stage("probes")["tau"]
            sens = self.stage("sensitivity")["delta_g"]
            budgets = protocol.group_budgets(budget, sens, noise, cfg)
            log.info("G_noise = %.4f, τ = %.4f", noise, budget)
            if self.stage("controller"):  # recorded when it stopped: the experiment only hands out fine-tunes
                controller = protocol.replay_controller(protocol.new_controller(cfg, probes, budget),
                                                        self.stage("controller")["trials"])
            else:
                controller = protocol.new_controller(cfg, probes, budget)
                log.info("stage controller: controller steps as Tune trials (τ = %.4f)", budget)
            ctx.found.update(probes=probes, noise=noise, budget=budget, sens=sens, budgets=budgets,
                             started=time.time())
            # A step has the pool's threads to itself only while nothing starts or trains beside it
            # (``trial.step_threads``): never with ``finetune_all``, whose steps fine-tune beside the next ones.
            alone = pool is not None and not self.spec.protocol.finetune_all
            provide(self.run_id, controller, budgets, ctx.channels,
                    pool_threads=pool.step_threads() if alone else ())
            board.deliver.remote(SEARCHED, True)  # fine-tunes held until the search's end go on
            if self.stage("controller"):
                # A resumed run whose controller had stopped: its restored searcher may have handed out every trial
                # already, and Tune then never asks it again, so the hook would never run; it runs from here (once).
                hook(controller)
        except BaseException as exc:  # noqa: BLE001 - raised by the driver once Tune has stopped
            ctx.found["error"] = exc
            first = first_line(exc)
            provide(self.run_id, error=first)
            board.publish.remote({}, f"the search stage failed: {first}")

    def _collect(self, ctx: RunContext, rows: list[dict[str, Any]]) -> None:
        """The experiment has ended: the controller, the arms' plans and their fine-tunes, from Tune's rows (or the
        run's record); an interrupted experiment stops the run here, to be resumed."""
        cfg, found = self.cfg, ctx.found
        if "error" in found:
            raise found["error"]
        if "error" in ctx.settled:
            raise ctx.settled["error"]
        if not self.stage("controller"):
            raise self._stopped("the Tune experiment stopped before the controller converged")
        probes, budget = found["probes"], found["budget"]
        # a step trial that started beside the search and ended without a step (no ratio) measured nothing
        step_rows = [t for t in rows if t["kind"] == "step" and t["r"] is not None]
        ctl = protocol.replay_controller(protocol.new_controller(cfg, probes, budget), step_rows, complete=False)
        if ctl.done:  # Tune's rows hold every step, with the trials' times and actors: they replace the hook's
            self.state["stages"]["controller"]["trials"] = step_rows
        else:  # a new experiment after a restore that failed: the steps are the recorded ones
            ctl = protocol.replay_controller(protocol.new_controller(cfg, probes, budget),
                                             self.stage("controller")["trials"])
        step_trials = self.stage("controller")["trials"]
        plans = {arm: protocol.ArmPlan.from_dict(p) for arm, p in self.stage("arms")["plans"].items()}
        arms = {t["arm"]: t for t in rows if t["kind"] == "finetune" and t.get("ray_train")}
        missing = [arm for arm in plans if arm not in arms]
        if missing:
            raise self._stopped(f"the Tune experiment stopped before the {', '.join(missing)} fine-tune(s) finished")
        self._done("finetune", ctx.settled.get("published", found["started"]))
        if any(t.get("ray_train") for t in rows if t["kind"] == "step"):
            self.timings["step_finetunes"] = _wall([t for t in rows if t["kind"] == "step" and t.get("ray_train")])
        self.timings["step_trials"] = _wall([t for t in step_trials if t["kind"] == "step"])
        self.timings["finetune_trials"] = _wall(list(arms.values()))
        ctx.ctl, ctx.plans, ctx.arms, ctx.trials = ctl, plans, arms, [*step_trials, *arms.values()]

    def _speed(self, ctx: RunContext) -> None:
        """Every fine-tuned model (each arm; each accepted step with ``finetune_all``) against the base, timed as the
        deploy target runs it, in one task after the last fine-tune (``distributed.speed``): a stage of its own."""
        if self.stage("speed") or not self.spec.protocol.speed:
            return
        started = time.time()
        tuned = {**{arm: t for arm, t in ctx.arms.items() if arm_registry.arm(arm).timed},
                 **{f"step {t['step']}": t for t in ctx.trials if t["kind"] == "step" and t.get("ray_train")}}
        log.info("stage speed: timing the base and %d fine-tuned model(s) as %s runs them", len(tuned),
                 self.spec.deploy)
        join_teardowns(ctx.teardowns)  # nothing of the run's own still winding down beside the timing
        failpoint("speed:start")
        try:
            record = time_models(ctx.card.to_dict(), ray.put(ctx.model.state_dict()),
                                 {name: t["checkpoint_path"] for name, t in tuned.items()}, self.spec.deploy,
                                 {"base": ctx.base_macs, **{name: t["macs"] for name, t in tuned.items()}},
                                 largest_node_cpus(), settled_free_cpus(largest_node_cpus()),
                                 ray.cluster_resources().get("GPU", 0.0))
        except ray.exceptions.RayTaskError as exc:  # the models are trained and saved: the run goes on without it
            log.warning("stage speed: the timing failed (%s); the run's models are unaffected", first_line(exc))
            record = not_measured(self.spec.deploy, f"not measured: the timing failed: {first_line(exc)}")
        self._done("speed", started, record=record)

    def _speed_record(self) -> dict[str, Any]:
        """The speed stage's record ({} when the stage did not run)."""
        return (self.stage("speed") or {}).get("record") or {}

    def _converged_hook(self, ctx: RunContext, arms_wanted: list[str]) -> Callable[[Controller], None]:
        """What the searcher calls (in this driver, from Tune's loop) once the controller has stopped: ``_settle``,
        once. An error is kept in ``ctx.settled`` (the fine-tunes fail on the board) and raised once the experiment
        has ended."""
        once = threading.Lock()

        def hook(ctl: Controller) -> None:
            with once:
                if "ran" not in ctx.settled:
                    ctx.settled["ran"] = True
                    try:
                        self._settle(ctx, ctl, arms_wanted)
                    except Exception as exc:  # noqa: BLE001 - raised by the driver once Tune has stopped
                        ctx.settled["error"] = exc
                        ctx.progress.board.publish.remote({}, f"settling the arms failed: {first_line(exc)}")

        return hook

    def _settle(self, ctx: RunContext, ctl: Controller, arms_wanted: list[str]) -> None:
        """Record the stopped controller, settle every arm's ratios on the actors and time the speed there, publish
        the plans to the waiting fine-tunes, and give the actors back."""
        cfg, pool, found = self.cfg, ctx.pool, ctx.found
        if not self.stage("controller"):
            self._done("controller", found["started"], trials=[
                {"trial_id": s.get("trial_id"), "kind": "step", "arm": "step", "step": s["step"], "r": s["r"],
                 "delta_g": s["delta_g"], "accepted": s["accepted"], "macs": s.get("macs"),
                 "params": s.get("params"), "pid": s.get("pid")} for s in ctl.steps if s.get("measured")])
            failpoint("controller:end")
        if not self.stage("arms"):
            r_star = protocol.r_star_of(ctl)
            final_ratios = protocol.final_ratios(r_star, found["budgets"], ctx.channels, cfg)
            log.info("r* = %.4f after %d controller steps (%s)", r_star, len(ctl.steps), ctl.stop_reason)
            arms_started = time.time()

            def measure_many(ratios_list, size_only: bool = False) -> list[dict[str, Any]]:
                return pool.map("size" if size_only else "measure", [(r,) for r in ratios_list])

            @functools.lru_cache(maxsize=None)
            def global_ratios(importance_name: str, ratio: float) -> dict[str, float]:
                return global_allocation(ctx.model, ratio, ctx.target.input_shape, ctx.target.num_classes,
                                         importance_name, cfg.r_max)

            plans = protocol.settle_arms(arms_wanted, r_star, final_ratios, found["budget"], ctx.channels, cfg,
                                         measure_many, ctx.base_macs, ctx.base_params, protocol.step_at(ctl, r_star),
                                         budgets=found["budgets"], global_ratios=global_ratios)
            self._done("arms", arms_started, plans={arm: plan.to_dict() for arm, plan in plans.items()})
            failpoint("arms:end")
        ray.get(ctx.progress.board.publish.remote(self.stage("arms")["plans"]))
        ctx.settled["published"] = time.time()
        log.info("stage finetune: %d fine-tune(s) side by side: %s", len(arms_wanted), ", ".join(arms_wanted))
        if pool is not None:
            pool.shutdown()
            self._span("search_resources_returned", time.time(), time.time())

    def _search(self, ctx: RunContext) -> None:
        """G_noise, the probes and the sensitivity tasks, submitted together: they need only the base model and the
        calibration set, so none waits for another."""
        spec, cfg, pool, channels = self.spec, self.cfg, ctx.pool, ctx.channels
        started = time.time()
        ratios = probe_ratios(cfg.probes, cfg.r_probe_max, cfg.seed)
        task_gpus = ctx.res.gpus_per_task
        chunks = spec.resources.sensitivity_tasks or sensitivity_tasks(len(channels), len(pool.actors), task_gpus > 0)
        log.info("stage search: G_noise, %d probes on %d actors and %d groups' sensitivity in %d Ray tasks, at once",
                 len(ratios), len(pool.actors), len(channels), chunks)
        accuracy = {}
        if spec.protocol.probe_accuracy:  # each probe's top-1 on the test split, for Spearman(ΔG, drop)
            accuracy["base_top1"] = evaluate(ctx.model, ctx.test_set)["top1"]
            test_ref = ray.put(ctx.test_set)  # one object-store copy, read by every actor
            args = [(r, test_ref) for r in ratios]
        else:
            args = [(r,) for r in ratios]
        noise_ref = pool.actors[-1].noise.remote(cfg.noise_splits, cfg.seed)
        probe_refs = pool.submit("measure", args)
        sens_refs = submit_sensitivity(pool.shared, ctx.target, cfg.bn_recalibration, list(channels),
                                       cfg.sensitivity_ratio, chunks, gpus=task_gpus)
        failpoint("search:start")
        records = ctx.progress.gather(probe_refs, "probes", "probes")
        probes_done = time.time()
        failpoint("probes:end")  # the sensitivity tasks may still run
        sens = by_group(ctx.progress.gather(sens_refs, f"sensitivity ({len(channels)} groups)", "tasks"))
        sens_done = time.time()
        noise = ray.get(noise_ref)
        rows = protocol.probe_rows(ratios, records, cfg.seed)
        if accuracy:
            for row in rows:
                row["top1_drop"] = accuracy["base_top1"] - row["top1"]
            accuracy["spearman_delta_g_top1_drop"] = protocol.spearman([row["delta_g"] for row in rows],
                                                                       [row["top1_drop"] for row in rows])
        self.run.write_table("probes.parquet", rows)
        budget = protocol.budget_from_probes(noise, rows, cfg, ctx.base_macs)
        self._done("probes", started, probes_done, g_noise=noise, tau=budget, restarts=actor_restarts(rows),
                   probes_after_restart=sum(bool(row["restarted"]) for row in rows), **accuracy)
        self._done("sensitivity", started, sens_done, delta_g={n: sens[n]["delta_g"] for n in channels})
        failpoint("search:end")

    def _artifacts(self, ctx: RunContext) -> dict[str, Any]:
        """``trials.parquet``, the Adaptive GC model (``model/``), ``sensitivity.parquet``, ``summary.json``, and the
        report through ``self.report``."""
        failpoint("artifacts:start")
        started = time.time()
        speed = self._speed_record()
        self.run.write_table("trials.parquet", [
            {**{col: t.get(col) for col in TRIAL_COLUMNS + ["error", "checkpoint_path"]},
             **{col: _timed(speed, t).get(col) for col in SPEED_COLUMNS}} for t in ctx.trials])
        adaptive = ctx.arms[arm_registry.ADAPTIVE]
        final = load_checkpoint(adaptive["checkpoint_path"])
        pruned = replay_pruning(ctx.card.build(), final["history"], ctx.card.input_shape)
        pruned.load_state_dict(final["state_dict"])
        with tempfile.TemporaryDirectory(prefix="geoprune-") as staging:
            folder = Path(staging)
            save_pruned(folder / "model", pruned, final["history"], ctx.card,
                        extra={"top1": adaptive["top1"], "r_star": ctx.ctl.r_star})
            self.run.put_folder(folder / "model", "model")
        plan = ctx.plans[arm_registry.ADAPTIVE]
        final_ratios = plan.ratios if isinstance(plan.ratios, dict) else {}
        sens, budgets = ctx.found["sens"], ctx.found["budgets"]
        self.run.write_table("sensitivity.parquet", [
            {"group": g.name, "channels": g.channels, "modules": g.modules, "delta_g": sens[g.name],
             "tau_l": budgets[g.name], "ratio": final_ratios.get(g.name, 0.0)} for g in ctx.groups])
        trained = self.stage("baseline")  # the baseline's own final evaluation, when this run trained it
        baseline_top1 = (ctx.arms["baseline"]["top1_before_finetune"] if "baseline" in ctx.arms
                         else trained["top1"] if trained else evaluate(ctx.model, ctx.test_set)["top1"])
        self._done("artifacts", started)
        summary = self._summary(ctx, baseline_top1)
        self.run.write_json("summary.json", summary)
        if self.report is not None:  # report.md and the plots: the app's (``app.report.render_report``)
            log.info("report: %s", self.report(self.run))
        return summary

    def _summary(self, ctx: RunContext, baseline_top1: float) -> dict[str, Any]:
        """``core.protocol.summary`` with what only this path has: the job, the resources, the arms, the time line."""
        spec, res, arms = self.spec, ctx.res, ctx.arms
        adaptive = arms[arm_registry.ADAPTIVE]
        speed = self._speed_record()
        probes = ctx.found["probes"]
        summary = protocol.summary(ctx.card, ctx.train_set, ctx.test_set, len(ctx.calibration.labels), self.cfg,
                                   spec.baseline_config(), spec.finetune_config(), ctx.found["noise"],
                                   ctx.found["budget"], probes, ctx.ctl, ctx.channels, ctx.plans[arm_registry.ADAPTIVE],
                                   adaptive, {"top1": baseline_top1, "macs": ctx.base_macs, "params": ctx.base_params},
                                   self.timings, provenance(torch.device(adaptive.get("train_device") or "cpu")),
                                   spec.deploy)
        summary["config"]["overrides"] = dict(spec.method)
        summary.update({
            "run_id": self.run_id,
            "job": _jsonable(spec.to_dict()),
            "resources": {"cluster": {k: v for k, v in res.cluster.items() if k in ("CPU", "GPU", "memory")},
                          "use_gpu": res.use_gpu, "gpus_per_actor": res.gpus_per_actor,
                          "gpus_per_worker": res.gpus_per_worker, "probe_actors": spec.resources.probe_actors,
                          "workers": res.scaling.workers, "actor_pids": sorted({row["pid"] for row in probes}),
                          "actor_gpu_ids": sorted({",".join(row["gpu_ids"]) for row in probes
                                                   if row.get("gpu_ids") is not None})},
            "probe_accuracy": ({k: self.stage("probes")[k] for k in ("base_top1", "spearman_delta_g_top1_drop")}
                               if "base_top1" in self.stage("probes") else None),
            "arms": [{**protocol.arm_row(ctx.plans[name], arms[name]), **headline(speed, name)}
                     for name in spec.protocol.arms_to_run if name in arms],
            "speed": self._speed_record() or None,
            "timeline": self.timeline(ctx.trials),
        })
        return summary

    def timeline(self, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every stage, span and trial with its start and end on one time axis (seconds from the run's start)."""
        t0 = self.state["created"]
        rows = [{"stage": name, "start": s["started"] - t0, "end": s["finished"] - t0}
                for name, s in {**self.state.get("spans", {}), **self.state["stages"]}.items()]
        for t in trials:
            if t.get("started") and t.get("finished"):
                label = f"step {t['step']}" if t["kind"] == "step" else f"fine-tune {t['arm']}"
                rows.append({"stage": label, "start": t["started"] - t0, "end": t["finished"] - t0})
                if t.get("launched") and t["launched"] < t["started"]:  # launched early, waited for its ratios
                    waited = "start, wait for τ" if t["kind"] == "step" else "launch, wait for ratios"
                    rows.append({"stage": f"{label}: {waited}", "start": t["launched"] - t0,
                                 "end": t["started"] - t0})
        return sorted(rows, key=lambda r: (r["start"], r["end"]))

    def _tune(self, name: str, trainable, tune_config: "tune.TuneConfig", what: str,
              param_space: Optional[dict] = None) -> list[dict[str, Any]]:
        trainable = tune.with_resources(trainable, {"cpu": 0.01})
        path = self.run.uri(f"tune/{name}")
        tuner = None
        if tune.Tuner.can_restore(path):
            # A driver killed while Tune set the experiment up leaves tuner.pkl without the experiment's state: such a
            # folder can never be restored, and retrying it would fail every resume the same way. It is started again
            # instead, from the run's recorded stages (the searcher's state is rebuilt from them: ``replay_controller``).
            saved = [n for n in self.run.list(f"tune/{name}") if n.startswith("experiment_state")]
            try:
                if not saved:
                    raise ValueError("the driver stopped before Tune saved the experiment's state")
                log.info("stage %s: restoring the Tune experiment at %s", name, path)
                tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
            except Exception as exc:  # noqa: BLE001 - any failure to restore: start the experiment again
                log.warning("stage %s: the Tune experiment at %s cannot be restored (%s); starting it again from the "
                            "run's recorded stages", name, path, first_line(exc))
                self.run.delete(f"tune/{name}")
        if tuner is None:
            log.info("stage %s: %s", name, what)
            tuner = tune.Tuner(
                trainable, param_space=param_space, tune_config=tune_config,
                run_config=tune.RunConfig(name=name, storage_path=self.run.uri("tune"), verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=2)),
            )
        failpoint("tune:start")
        with _tune_console_quiet(), SIGNALS.tune_running():
            results = tuner.fit()
        rows = []
        for result in results:
            metrics = result.metrics or {}
            config = result.config or {}
            row = {col: _plain(metrics.get(col)) for col in TRIAL_COLUMNS}
            row.update(trial_id=metrics.get("trial_id") or (result.path or "").rsplit("/", 1)[-1],
                       kind=config.get("kind"), arm=config.get("arm"), step=metrics.get("step", config.get("step")),
                       r=metrics.get("r", config.get("r")), error=first_line(result.error) if result.error else None,
                       checkpoint_path=metrics.get("checkpoint_path"))
            rows.append(row)
        return sorted(rows, key=lambda r: (r["kind"] != "step", r["step"] if r["step"] is not None else 1e9,
                                           r["started"] or 0))


def _wall(rows: list[dict[str, Any]]) -> float:
    rows = [t for t in rows if t.get("started") and t.get("finished")]
    return max(t["finished"] for t in rows) - min(t["started"] for t in rows) if rows else 0.0


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


@contextlib.contextmanager
def _tune_console_quiet() -> Iterator[None]:
    """Tune's console output prints an experiment box and result paths even at ``verbose=0`` (the box says
    "Number of trials 9223372036854775807" for ``num_samples=-1``); with its legacy reporter ``verbose=0``
    is silent. The run's own progress lines say what a user follows; the environment is put back after."""
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def _timed(speed: dict[str, Any], trial: dict[str, Any]) -> dict[str, Any]:
    """A fine-tuned trial's figures from the speed stage (``core.deploy.headline``); nothing for the others."""
    if not trial.get("ray_train"):
        return {}
    return headline(speed, trial["arm"] if trial["kind"] == "finetune" else f"step {trial['step']}")


def _jsonable(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _jsonable(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_jsonable(v) for v in data]
    return data


def run_job(spec: JobSpec, storage: str, address: Optional[str] = None,
            report: Optional[Callable[[RunDir], Any]] = None) -> dict[str, Any]:
    """Run (or resume) ``spec`` with every artifact under ``storage``; returns the summary. One driver at a time
    holds a run directory (``RunDir.lock``). ``report(run)``, given, renders the report once the artifacts are written
    (the CLI passes ``app.report.render_report``: rendering is the app's, above this layer)."""
    pipeline = Pipeline(spec, storage)  # checks the run directory before a cluster is started
    pipeline.report = report
    pipeline.preflight()  # and the model, weights and data
    if not (address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized():
        spec.check_placeable(*embedded_size())  # what an embedded Ray could never place: refused before it starts
    lock = RunLock(pipeline.run.location, None if pipeline.run.remote else pipeline.run.root).acquire()
    try:
        started = time.time()
        connect(address)
        pipeline._span("ray_startup", started)  # one-time: about 0 when joining a running cluster
        return pipeline.run_all()
    finally:
        lock.release()
