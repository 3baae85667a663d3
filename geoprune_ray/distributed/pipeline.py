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
  top-1 before and after → ``trials.parquet``, ``model/``, ``summary.json`` (and ``report.md``, rendered by the
  caller's ``report``).

Each finished stage is recorded in ``state.json`` with its outputs, so a driver that was killed
resumes from the run directory: finished stages are read back, and the Tune experiment is restored
with ``Tuner.restore``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import os
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional

import ray
import torch
from ray import tune

from ..core import protocol
from ..core.geometry import Calibration
from ..core.method import Controller, PruneTarget, probe_ratios
from ..core.protocol import SCHEMA_VERSION
from ..core.pruning import dependency_groups, macs_params, replay_pruning, save_pruned
from ..core.reference import provenance, resolve
from ..core.train import evaluate
from .guard import SIGNALS, RunLock, failpoint, mark_embedded_cluster
from ..errors import GeopruneError, Interrupted, first_line
from ..core.spec import JobSpec
from .probes import START_TIMEOUT_S, PoolSpec, PoolStarter, ProbePool
from .progress import Progress
from ..core.rundir import RunDir
from .searcher import SEARCHED, RatioSearcher, on_converged, provide
from .sensitivity import by_group, submit_sensitivity
from .launch import NO_AUTOSCALER_ENV, fit, join_teardowns, load_checkpoint
from .scaling import Scaling
from .trial import TrialContext, search_trial

log = logging.getLogger("geoprune_ray")
STATE = "state.json"
EXPERIMENT = "controller"
TRIAL_COLUMNS = ["trial_id", "kind", "arm", "step", "r", "delta_g", "accepted", "macs", "params", "ray_train",
                 "top1", "top1_before_finetune", "delta_g_after", "pid", "actor", "threads", "train_device",
                 "train_gpu_ids", "resumed_from_epoch", "launched", "started", "finished"]


_SOLE_DRIVER = [False]  # this driver runs on a Ray of its own (no address): no other run competes for its CPUs
_EMBEDDED = [False]  # this process started the Ray it uses (``connect``): ``disconnect`` stops it


def connect(address: Optional[str] = None) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``), else start an embedded local Ray."""
    address = address or os.environ.get("RAY_ADDRESS")
    _SOLE_DRIVER[0] = not address
    if address:
        check_gcs_address(address)
    if ray.is_initialized():
        return
    try:
        quiet = {"log_to_driver": False, "logging_level": logging.ERROR}  # progress is ours, one line per event
        if address:
            os.environ.pop(NO_AUTOSCALER_ENV, None)  # a cluster may autoscale (this process may have embedded one)
            ray.init(address=address, **quiet)
        else:
            # One machine, no dashboard: Ray Train's preemption watcher (an actor per launch, waiting for nodes to be
            # drained) and its metrics (exported for a dashboard) have nothing to do, and there is no autoscaler to
            # ask for resources. The workers of an embedded Ray inherit this environment; a user's own setting wins.
            for name in ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_METRICS_ENABLED"):
                os.environ.setdefault(name, "0")
            os.environ[NO_AUTOSCALER_ENV] = "1"
            mark_embedded_cluster()  # its processes carry this driver's token: none outlives it (``guard``)
            ray.init(address="local", include_dashboard=False, **quiet)
            _EMBEDDED[0] = True
        SIGNALS.reassert()  # ray.init sets a SIGTERM handler of its own
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise GeopruneError(f"cannot connect to the Ray cluster at {address or 'local'}: {str(exc).splitlines()[0]}",
                            "check the GCS address (host:6379) and that the cluster is up") from None


def embedded_size() -> tuple[float, float]:
    """The CPUs and GPUs an embedded local Ray gets on this machine (Ray's own count, cgroup limits included)."""
    try:
        from ray._private.utils import get_num_cpus  # Ray is pinned; a move of this helper falls back below
        cpus = float(get_num_cpus())
    except (ImportError, AttributeError):
        cpus = float(os.cpu_count() or 1)
    return cpus, float(torch.cuda.device_count())


def disconnect() -> None:
    """Shut down the Ray that ``connect`` embedded (nothing for a joined cluster, which outlives this driver)."""
    if _EMBEDDED[0] and ray.is_initialized():
        _EMBEDDED[0] = False
        ray.shutdown()


def check_gcs_address(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with one line, on an address that is a URL or that nothing listens on."""
    if address.startswith(("http://", "https://")):
        raise GeopruneError(f"--address {address} is a dashboard URL, not a cluster (GCS) address",
                            "give 'run' host:6379, or use 'geoprune submit --address URL' to submit through the "
                            "Jobs API")
    if address in ("auto", "local") or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise GeopruneError(f"--address {address} is not HOST:PORT", "write e.g. 10.0.0.1:6379, or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise GeopruneError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}",
                            "check that the head is up ('ray start --head') and the port is reachable") from None


class Pipeline:
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

    def preflight(self):
        """Build the model, load its weights and the data: bad input fails here, before Ray starts."""
        if self._resolved is None:
            spec = self.spec
            torch.manual_seed(spec.seed)
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
        progress = Progress(self.state["run_id"])
        res = Resources(cluster, use_gpu, shares.actor, shares.worker, scaling,
                        spec.resources.gpus_per_worker is not None, shares.task)
        try:
            return self._run(res, model, train_set, test_set, card, progress)
        finally:
            progress.close()

    def _run(self, res: "Resources", model, train_set, test_set, card, progress: Progress) -> dict[str, Any]:
        spec, cfg = self.spec, self.cfg
        if not self.run.exists(STATE):  # every check passed: from here on 'geoprune resume' finds the run
            self.run.write_json(STATE, self.state)
        run_id = self.state["run_id"]
        target = PruneTarget(card.input_shape, card.num_classes, cfg.importance, cfg.round_to)
        data_ref = ray.put((train_set, test_set))
        calibration = Calibration.from_dataset(train_set, cfg)
        pool_spec = PoolSpec(spec.resources.probe_actors, spec.resources.cpus_per_actor, res.gpus_per_actor)

        # 1. the probe actors start (processes, imports, CUDA contexts) while the baseline trains: once its worker
        # has started (``PoolStarter``)
        baseline_scaling_now = whole_nodes(res.scaling, reserved=pool_spec.actors * pool_spec.cpus_per_actor)
        starter = None if self.stage("arms") else PoolStarter(lambda: ProbePool.start(
            target, cfg.bn_recalibration, pool_spec, run_id, max(START_TIMEOUT_S, spec.resources.wait_for_gpu_s)))
        teardowns: list = []  # Ray Train runs that handed their result over and are still ending
        try:
            return self._stages(res, starter, baseline_scaling_now, model, train_set, test_set, card, target, data_ref,
                                calibration, progress, teardowns)
        finally:
            join_teardowns(teardowns)
            if starter is not None:
                starter.shutdown()
            if self._searching is not None:  # interrupted mid-search: the actors' shutdown ends it; let it end
                self._searching.join(timeout=15)

    def _stages(self, res, starter: Optional[PoolStarter], base_scaling, model, train_set, test_set, card, target,
                data_ref, calibration, progress, teardowns: list) -> dict[str, Any]:
        spec, cfg = self.spec, self.cfg
        run_id = self.state["run_id"]

        # 2. baseline (Ray Train)
        started = time.time()
        if self.run.exists("baseline.pt"):
            model.load_state_dict(torch.load(io.BytesIO(self.run.read_bytes("baseline.pt")), weights_only=True))
        elif spec.model.weights is None and spec.protocol.baseline_epochs > 0:
            log.info("stage baseline: training %s for %d epochs through Ray Train", card.arch,
                     spec.protocol.baseline_epochs)
            failpoint("baseline:start")
            def worker_started(at: float) -> None:  # the launch's start-up is paid: now the actors start
                self._span("baseline_launch", started, at)
                if starter is not None:
                    starter.start()

            # the worker hands the weights over once the final checkpoint is stored: the actors take them while Ray
            # Train tears the run down
            state, _, metrics = fit(card, ray.put(model.state_dict()), data_ref, spec.baseline_config(), base_scaling,
                                    self.run.uri("train"), name="baseline", progress=(run_id, "baseline"),
                                    teardowns=teardowns, on_started=worker_started)
            model.load_state_dict(state)
            buffer = io.BytesIO()
            torch.save(state, buffer)
            self.run.write_bytes("baseline.pt", buffer.getvalue())
            self._done("baseline", started, top1=metrics["top1"])
            SIGNALS.reassert()
            failpoint("baseline:end")
        pool = starter.start() if starter is not None else None
        base_macs, base_params = macs_params(model, card.input_shape)
        groups = dependency_groups(model, card.input_shape, card.num_classes)
        channels = {g.name: g.channels for g in groups}

        # 3-6. One Tune experiment starts now, beside the search stage (G_noise, probes and sensitivity at the same
        # time → τ, τ_L), which runs in a thread of this driver: Tune's start and the early fine-tunes' Ray Train
        # start-up overlap the search instead of the controller's steps. The searcher hands out those fine-tunes
        # (they load everything, then wait for their arm's ratios on the progress board) and waits for its
        # controller, which the search provides; the steps are answered by the actors. When the controller stops,
        # the hook settles every arm on the actors, publishes the plans and gives the actors back, and the other
        # fine-tunes follow on what they held.
        handed = time.time()
        if pool is not None:
            # G₀ once, on probe actor 0, for every process on the CPU (probe actors, sensitivity tasks, fine-tune
            # workers), where each used to recalibrate the base and measure it again; with one torch thread, as the
            # actors and tasks measure, so an unpruned copy still gives ΔG = 0 exactly. It is measured while this
            # thread starts the experiment. Processes on a GPU measure their own.
            pool.hand(model, calibration, measure_g0=not res.use_gpu)  # the actors load while the experiment starts
        calibration_ref = pool.shared["calibration"] if pool else ray.put(calibration)  # the actors' copy, reused
        arms_wanted = list(spec.protocol.arms)
        concurrent = side_by_side(res, len(arms_wanted))
        arm_scaling = finetune_scaling(res, concurrent)
        # Early fine-tunes only where this driver is the cluster's only one (an embedded Ray): on a shared cluster
        # another run's could take the CPUs this run's steps need while they wait for them. They count on what the
        # actors leave of the cluster: the search's tasks and the baseline's teardown give theirs back (an early
        # fine-tune waits for them, beside the search).
        free = ray.cluster_resources().get("CPU", 0.0) - (pool.spec.actors * pool.spec.cpus_per_actor if pool else 0)
        early = prelaunch(res, pool.spec, arm_scaling, concurrent, free) if pool is not None and _SOLE_DRIVER[0] else 0
        ctx = TrialContext(run_id, spec.resources.probe_actors, card.to_dict(),
                           spec.finetune_config().to_dict(), data_ref, ray.put(model.state_dict()), calibration_ref,
                           target, cfg.bn_recalibration, self.run.uri("train"), res.scaling, spec.protocol.finetune_all,
                           arm_scaling, early, pool.shared.get("reference") if pool else None)
        board = progress.board  # the arms' plans go on the run's progress board
        if self.stage("arms"):  # a resumed run: its fine-tunes find the plans at once
            ray.get(board.publish.remote(self.stage("arms")["plans"]))
        found: dict[str, Any] = {}  # what the search stage found, for the hook and the artifacts
        settled: dict[str, Any] = {}
        hook = self._converged_hook(pool, board, found, channels, base_macs, base_params, arms_wanted, settled)

        def search() -> None:
            try:
                if pool is not None:
                    pool.wait_loaded()
                    if pool.g0_measured is not None:
                        self._span("reference", handed, pool.g0_measured)
                    self._span("actors", pool.created)
                if not self.stage("probes") or not self.stage("sensitivity"):
                    self._search(pool, model, test_set, target, channels, base_macs, progress, res.gpus_per_task)
                probes = self.run.read_table("probes.parquet")
                noise, budget = self.stage("probes")["g_noise"], self.stage("probes")["tau"]
                sens = self.stage("sensitivity")["delta_g"]
                budgets = protocol.group_budgets(budget, sens, noise, cfg)
                log.info("G_noise = %.4f, τ = %.4f", noise, budget)
                if self.stage("controller"):  # recorded when it stopped: the experiment only hands out fine-tunes
                    controller = replay_controller(protocol.new_controller(cfg, probes, budget),
                                                   self.stage("controller")["trials"])
                else:
                    controller = protocol.new_controller(cfg, probes, budget)
                    log.info("stage controller: controller steps as Tune trials (τ = %.4f)", budget)
                found.update(probes=probes, noise=noise, budget=budget, sens=sens, budgets=budgets,
                             started=time.time())
                # A step has the pool's threads to itself only while nothing starts or trains beside it
                # (``trial.step_threads``): never with ``finetune_all``, whose steps fine-tune beside the next ones.
                alone = pool is not None and not spec.protocol.finetune_all
                provide(run_id, controller, budgets, channels, pool_threads=pool.step_threads() if alone else ())
                board.deliver.remote(SEARCHED, True)  # fine-tunes held until the search's end go on
                if self.stage("controller"):
                    # A resumed run whose controller had stopped: its restored searcher may have handed out every trial
                    # already, and Tune then never asks it again, so the hook would never run; it runs from here (once).
                    hook(controller)
            except BaseException as exc:  # noqa: BLE001 - raised by the driver once Tune has stopped
                found["error"] = exc
                first = first_line(exc)
                provide(run_id, error=first)
                board.publish.remote({}, f"the search stage failed: {first}")

        on_converged(run_id, hook)
        searching = self._searching = threading.Thread(target=search, name="geoprune-search", daemon=True)
        try:
            # On CPUs the early fine-tune launches once the steps start, not beside the search: its start-up shares the
            # same cores either way, and beside the search's three busy processes it cost the search more than it
            # saved the controller (bench runs 22-23 on 2 cores: search +7 s, controller -5 s).
            searcher = RatioSearcher(arms=arms_wanted, r_max=cfg.r_max, concurrent=concurrent, prelaunch=early,
                                     run_id=run_id, launch_in_search=res.use_gpu, pending_step=pool is not None)
            searching.start()
            rows = self._tune(EXPERIMENT, tune.with_parameters(search_trial, ctx=ctx),
                              tune.TuneConfig(search_alg=searcher, num_samples=-1,
                                              max_concurrent_trials=max(8, concurrent + 2), reuse_actors=True),
                              f"the Tune experiment starts beside the search: its controller steps follow once τ is "
                              f"known; {early} of {len(arms_wanted)} fine-tune(s) launched early (beside the "
                              f"{'search' if res.use_gpu else 'steps'}), waiting for their arm's ratios")
            if searching.is_alive():  # Tune stopped (Ctrl-C) before the search ended: the actors' shutdown ends it
                raise Interrupted("the run stopped during the search stage",
                                  f"run the same command again to resume from {self.run.location}")
        finally:
            on_converged(run_id, None)
            provide(run_id)
        if "error" in found:
            raise found["error"]
        probes, noise, budget, sens, budgets = (found[k] for k in ("probes", "noise", "budget", "sens", "budgets"))
        started = found["started"]
        if "error" in settled:
            raise settled["error"]
        if not self.stage("controller"):
            raise Interrupted("the Tune experiment stopped before the controller converged",
                              f"run the same command again to resume from {self.run.location}")
        # a step trial that started beside the search and ended without a step (no ratio) measured nothing
        step_rows = [t for t in rows if t["kind"] == "step" and t["r"] is not None]
        ctl = replay_controller(protocol.new_controller(cfg, probes, budget), step_rows, complete=False)
        if ctl.done:  # Tune's rows hold every step, with the trials' times and actors: they replace the hook's
            self.state["stages"]["controller"]["trials"] = step_rows
        else:  # a new experiment after a restore that failed: the steps are the recorded ones
            ctl = replay_controller(protocol.new_controller(cfg, probes, budget), self.stage("controller")["trials"])
        step_trials = self.stage("controller")["trials"]
        plans = {arm: protocol.ArmPlan.from_dict(p) for arm, p in self.stage("arms")["plans"].items()}
        arms = {t["arm"]: t for t in rows if t["kind"] == "finetune" and t.get("ray_train")}
        missing = [arm for arm in plans if arm not in arms]
        if missing:
            raise Interrupted(f"the Tune experiment stopped before the {', '.join(missing)} fine-tune(s) finished",
                              f"run the same command again to resume from {self.run.location}")
        self._done("finetune", settled.get("published", started))
        trials = [*step_trials, *arms.values()]
        if any(t.get("ray_train") for t in rows if t["kind"] == "step"):
            self.timings["step_finetunes"] = _wall([t for t in rows if t["kind"] == "step" and t.get("ray_train")])
        self.timings["step_trials"] = _wall([t for t in step_trials if t["kind"] == "step"])
        self.timings["finetune_trials"] = _wall(list(arms.values()))
        return self._artifacts(res, model, train_set, test_set, card, calibration, probes, groups, channels, sens,
                               budgets, noise, budget, ctl, plans, arms, trials, base_macs, base_params)

    def _converged_hook(self, pool, board, found: dict, channels, base_macs, base_params, arms_wanted, settled: dict):
        """What the searcher calls (in this driver, from Tune's loop) once the controller has stopped: record it,
        settle every arm's ratios on the actors and time the speed there, publish the plans to the waiting
        fine-tunes, and give the actors back. An error is kept in ``settled`` (the fine-tunes fail on the board) and
        raised once the experiment has ended."""
        cfg = self.cfg

        once = threading.Lock()

        def hook(ctl: Controller) -> None:
            with once:
                if "ran" not in settled:
                    settled["ran"] = True
                    settle(ctl)

        def settle(ctl: Controller) -> None:
            try:
                budget, budgets = found["budget"], found["budgets"]
                if not self.stage("controller"):
                    self._done("controller", found["started"], trials=[
                        {"trial_id": s.get("trial_id"), "kind": "step", "arm": "step", "step": s["step"], "r": s["r"],
                         "delta_g": s["delta_g"], "accepted": s["accepted"], "macs": s.get("macs"),
                         "params": s.get("params"), "pid": s.get("pid")} for s in ctl.steps if s.get("measured")])
                    failpoint("controller:end")
                if not self.stage("arms"):
                    r_star = protocol.r_star_of(ctl)
                    final_ratios = protocol.final_ratios(r_star, budgets, channels, cfg)
                    log.info("r* = %.4f after %d controller steps (%s)", r_star, len(ctl.steps), ctl.stop_reason)
                    arms_started = time.time()

                    def measure_many(ratios_list, size_only: bool = False) -> list[dict[str, Any]]:
                        return pool.map("size" if size_only else "measure", [(r,) for r in ratios_list])

                    plans = protocol.settle_arms(arms_wanted, r_star, final_ratios, budget, channels, cfg,
                                                 measure_many, base_macs, base_params, protocol.step_at(ctl, r_star))
                    log.info("stage speed: timing the base and the Adaptive GC architecture on a probe actor's device")
                    speed = ray.get(pool.actors[0].speed.remote(final_ratios or 0.0))
                    self._done("arms", arms_started, plans={arm: plan.to_dict() for arm, plan in plans.items()},
                               speed=speed)
                    failpoint("arms:end")
                ray.get(board.publish.remote(self.stage("arms")["plans"]))
                settled["published"] = time.time()
                log.info("stage finetune: %d fine-tune(s) side by side: %s", len(arms_wanted), ", ".join(arms_wanted))
                if pool is not None:
                    pool.shutdown()
                    self._span("search_resources_returned", time.time(), time.time())
            except Exception as exc:  # noqa: BLE001 - raised by the driver once Tune has stopped
                settled["error"] = exc
                board.publish.remote({}, f"settling the arms failed: {first_line(exc)}")

        return hook

    def _search(self, pool, model, test_set, target, channels, base_macs, progress, task_gpus: float) -> None:
        """G_noise, the probes and the sensitivity tasks, submitted together: they need only the base model and the
        calibration set, so none waits for another."""
        spec, cfg = self.spec, self.cfg
        started = time.time()
        ratios = probe_ratios(cfg.probes, cfg.r_probe_max, cfg.seed)
        chunks = spec.resources.sensitivity_tasks or sensitivity_tasks(len(channels), len(pool.actors), task_gpus > 0)
        log.info("stage search: G_noise, %d probes on %d actors and %d groups' sensitivity in %d Ray tasks, at once",
                 len(ratios), len(pool.actors), len(channels), chunks)
        accuracy = {}
        if spec.protocol.probe_accuracy:  # each probe's top-1 on the test split, for Spearman(ΔG, drop)
            accuracy["base_top1"] = evaluate(model, test_set)["top1"]
            test_ref = ray.put(test_set)  # one object-store copy, read by every actor
            args = [(r, test_ref) for r in ratios]
        else:
            args = [(r,) for r in ratios]
        noise_ref = pool.actors[-1].noise.remote(cfg.noise_splits, cfg.seed)
        probe_refs = pool.submit("measure", args)
        sens_refs = submit_sensitivity(pool.shared, target, cfg.bn_recalibration, list(channels),
                                       cfg.sensitivity_ratio, chunks, gpus=task_gpus)
        failpoint("search:start")
        records = progress.gather(probe_refs, "probes", "probes")
        probes_done = time.time()
        failpoint("probes:end")  # the sensitivity tasks may still run
        sens = by_group(progress.gather(sens_refs, f"sensitivity ({len(channels)} groups)", "tasks"))
        sens_done = time.time()
        noise = ray.get(noise_ref)
        rows = protocol.probe_rows(ratios, records, cfg.seed)
        if accuracy:
            for row in rows:
                row["top1_drop"] = accuracy["base_top1"] - row["top1"]
            accuracy["spearman_delta_g_top1_drop"] = spearman([row["delta_g"] for row in rows],
                                                              [row["top1_drop"] for row in rows])
        self.run.write_table("probes.parquet", rows)
        budget = protocol.budget_from_probes(noise, rows, cfg, base_macs)
        self._done("probes", started, probes_done, g_noise=noise, tau=budget,
                   restarts=actor_restarts(rows), probes_after_restart=sum(bool(row["restarted"]) for row in rows), **accuracy)
        self._done("sensitivity", started, sens_done, delta_g={n: sens[n]["delta_g"] for n in channels})
        failpoint("search:end")

    def _artifacts(self, res, model, train_set, test_set, card, calibration, probes, groups, channels, sens, budgets,
                   noise, budget, ctl, plans, arms, trials, base_macs, base_params) -> dict[str, Any]:
        spec, cfg = self.spec, self.cfg
        failpoint("artifacts:start")
        started = time.time()
        self.run.write_table("trials.parquet", [{col: t.get(col) for col in TRIAL_COLUMNS + ["error", "checkpoint_path"]}
                                                for t in trials])
        adaptive = arms["adaptive"]
        final = load_checkpoint(adaptive["checkpoint_path"])
        pruned = replay_pruning(card.build(), final["history"], card.input_shape)
        pruned.load_state_dict(final["state_dict"])
        with tempfile.TemporaryDirectory(prefix="geoprune-") as staging:
            folder = Path(staging)
            save_pruned(folder / "model", pruned, final["history"], card,
                        extra={"top1": adaptive["top1"], "r_star": ctl.r_star})
            self.run.put_folder(folder / "model", "model")
        speed = self.stage("arms")["speed"]
        final_ratios = plans["adaptive"].ratios if isinstance(plans["adaptive"].ratios, dict) else {}
        self.run.write_table("sensitivity.parquet", [
            {"group": g.name, "channels": g.channels, "modules": g.modules, "delta_g": sens[g.name],
             "tau_l": budgets[g.name], "ratio": final_ratios.get(g.name, 0.0)} for g in groups])
        trained = self.stage("baseline")  # the baseline's own final evaluation, when this run trained it
        baseline_top1 = (arms["baseline"]["top1_before_finetune"] if "baseline" in arms
                         else trained["top1"] if trained else evaluate(model, test_set)["top1"])
        self._done("artifacts", started)
        summary = protocol.summary(card, train_set, test_set, len(calibration.labels), cfg, spec.baseline_config(),
                                   spec.finetune_config(), noise, budget, probes, ctl, channels, plans["adaptive"],
                                   adaptive, {"top1": baseline_top1, "macs": base_macs, "params": base_params},
                                   self.timings, provenance(torch.device(adaptive.get("train_device") or "cpu")))
        summary["config"]["overrides"] = dict(spec.method)
        summary.update({
            "run_id": self.state["run_id"],
            "job": _jsonable(spec.to_dict()),
            "resources": {"cluster": {k: v for k, v in res.cluster.items() if k in ("CPU", "GPU", "memory")},
                          "use_gpu": res.use_gpu, "gpus_per_actor": res.gpus_per_actor,
                          "gpus_per_worker": res.gpus_per_worker, "probe_actors": spec.resources.probe_actors,
                          "workers": res.scaling.workers, "actor_pids": sorted({row["pid"] for row in probes}),
                          "actor_gpu_ids": sorted({",".join(row["gpu_ids"]) for row in probes
                                                   if row.get("gpu_ids") is not None})},
            "probe_accuracy": ({k: self.stage("probes")[k] for k in ("base_top1", "spearman_delta_g_top1_drop")}
                               if "base_top1" in self.stage("probes") else None),
            "arms": [protocol.arm_row(plans[name], arms[name]) for name in spec.protocol.arms if name in arms],
            "speed": speed,
            "timeline": self.timeline(trials),
        })
        self.run.write_json("summary.json", summary)
        if self.report is not None:  # report.md and the plots: the app's (``report.render_report``)
            log.info("report: %s", self.report(self.run))
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


@dataclasses.dataclass(frozen=True)
class Resources:
    """What the run holds of the cluster: GPU use and shares, and the Ray Train scaling the spec asks for."""

    cluster: dict
    use_gpu: bool
    gpus_per_actor: float
    gpus_per_worker: float
    scaling: Scaling
    fixed_gpus_per_worker: bool = False  # set in the job spec: the fine-tunes keep it
    gpus_per_task: float = 0.0  # each sensitivity task's, beside the actors


def largest_node_cpus() -> float:
    return max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)


def side_by_side(res: Resources, arms: int) -> int:
    """How many fine-tunes run at once: every arm on GPUs; on CPUs at most one per core of the largest node (more
    would only share the same cores, each arm's Tune trial, Train controller and worker costing memory: four at once
    on 2 cores held 11.3 GiB against 7 or so for two)."""
    if res.scaling.use_gpu:
        return max(1, arms)
    node_cpus = largest_node_cpus()
    return max(1, min(arms, int(node_cpus // res.scaling.workers)))


def finetune_scaling(res: Resources, arms: int) -> Scaling:
    """The arms' fine-tunes run side by side once the search has given its share back: each takes an equal share of
    the GPUs (a fraction of one, or whole ones across several) and of a node's CPUs (at most what the spec asks), with,
    on CPUs, as many torch threads as the node's cores allow (one fine-tune alone uses the whole CPU, as the
    in-process path does)."""
    s = res.scaling
    concurrent = max(1, arms) * s.workers
    node_cpus = largest_node_cpus()
    trial_actors = 0.01 * max(1, arms)  # each fine-tune's Tune trial actor holds a sliver
    cpus = min(s.cpus_per_worker, max(0.01, (node_cpus - trial_actors) / concurrent))
    if s.use_gpu:
        gpus = res.cluster.get("GPU", 0.0)
        per_worker = res.gpus_per_worker if res.fixed_gpus_per_worker else min(1.0, gpus / concurrent)
        return dataclasses.replace(s, cpus_per_worker=cpus, gpus_per_worker=per_worker,
                                   threads=max(1, int(s.cpus_per_worker)))
    return dataclasses.replace(s, cpus_per_worker=cpus, threads=max(1, int(node_cpus // concurrent)))


def sensitivity_tasks(groups: int, actors: int, gpu: bool, node_cpus: Optional[float] = None) -> int:
    """How many Ray tasks share the sensitivity trials: one per two groups on GPUs; on CPUs no more than the cores the
    probe actors (a thread each) leave on the largest node, and at least one. Each task is a new process that imports
    torch and measures G₀ before its first trial: on 2 cores three of them cost more than the work they split."""
    tasks = max(1, math.ceil(groups / 2))
    if gpu:
        return tasks
    spare = int((largest_node_cpus() if node_cpus is None else node_cpus) - actors)
    return max(1, min(tasks, spare))


def prelaunch(res: "Resources", pool: PoolSpec, arm: Scaling, concurrent: int, free_cpus: float) -> int:
    """How many fine-tunes launch while the controller runs, beside the probe actors (they then wait for their arm's
    ratios): as many as fit in the CPUs free now, keeping a quarter CPU for the controller's step trials (a sliver
    each), so a waiting fine-tune can never starve the steps it waits for. On CPUs one at most: each fine-tune brings
    its trial, Ray Train controller and worker processes, and two launched beside the actors took the quickstart's
    peak memory from 7.2 to 8.4 GiB on 2 cores (bench run 7). On GPUs only where a fine-tune's share fits for sure:
    whole GPUs no actor is on, or the rest of the only GPU."""
    fits = int(max(0.0, free_cpus - 0.25) // (arm.cpus_per_worker * arm.workers + 0.01))
    if not arm.use_gpu:
        fits = min(fits, 1)
    else:
        gpus = res.cluster.get("GPU", 0.0)
        if gpus < 2:
            rest = gpus - pool.actors * pool.gpus_per_actor
            share = arm.gpus_per_worker * arm.workers
            fits = min(fits, math.floor(rest / share + 1e-6) if share else 0)  # 0.5 / 0.25 is 2, not 1.999…
        else:
            per_gpu = max(1, math.floor(1 / pool.gpus_per_actor)) if pool.gpus_per_actor else 1
            free_gpus = math.floor(gpus) - math.ceil(pool.actors / per_gpu)
            fits = min(fits, (free_gpus // arm.workers) if arm.gpus_per_worker >= 1 else 0)
    return max(0, min(concurrent, fits))


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


def wait_for_gpus(timeout_s: float) -> dict[str, float]:
    """Ask the autoscaler for a GPU node (workers that scale from 0) and wait until one has joined."""
    from ray.autoscaler.sdk import request_resources

    log.info("waiting up to %.0f s for the autoscaler to start a GPU node", timeout_s)
    request_resources(bundles=[{"GPU": 1}])
    deadline = time.monotonic() + timeout_s
    while not (cluster := ray.cluster_resources()).get("GPU") and time.monotonic() < deadline:
        time.sleep(5)
    request_resources(bundles=[])  # the running trials hold the node from here on
    return cluster


def whole_nodes(scaling: Scaling, reserved: float = 0.0) -> Scaling:
    """The baseline's workers: a GPU each (``scaling.gpus_per_worker``: a whole one, or what the probe actors starting
    beside it leave of theirs) and the CPUs that go with it, less the CPUs ``reserved`` for those actors."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    return baseline_scaling(scaling, max(0.0, ray.available_resources().get("CPU", 0) - reserved), largest_node_cpus(),
                            max((n.get("CPU", 0) / n["GPU"] for n in nodes if n.get("GPU")), default=0.0))


def baseline_scaling(scaling: Scaling, free_cpus: float, node_cpus: float, cpus_per_gpu: float) -> Scaling:
    """On CPUs: what is free now (all of an idle node's; what other pipelines leave of a shared one), so one
    baseline uses the node and a batch's baselines take turns. On GPUs: one GPU's share of its node's CPUs, so
    the baselines of a batch train side by side, one per GPU, instead of the first taking every CPU while the
    other GPUs wait."""
    cpus = min(node_cpus, free_cpus / scaling.workers)
    if scaling.use_gpu:
        cpus = min(cpus, cpus_per_gpu)
    cpus = max(scaling.cpus_per_worker, cpus)
    # The actors beside it hold a fraction of a CPU each and sit idle while it trains: it runs on every core it
    # holds any part of, as the in-process path does.
    gpus = min(1.0, scaling.gpus_per_worker or 1.0) if scaling.use_gpu else 0.0
    return Scaling(scaling.workers, scaling.use_gpu, cpus, gpus, threads=max(1, math.ceil(cpus - 1e-9)))


SPREAD_MARGIN = 1 / 16  # an actor's share exceeds 1/(k+1) of a GPU by this fraction of it, so k fit on a GPU, not k+1


class GpuShares(NamedTuple):
    actor: float  # each probe actor's
    worker: float  # each Ray Train worker's while the actors hold theirs (the baseline; ``finetune_all``'s fine-tunes)
    task: float  # each sensitivity task's, beside the actors


def gpu_shares(res, gpus: float) -> GpuShares:
    """GPU shares of the probe actors, of training while they hold theirs, and of the sensitivity tasks beside them,
    so the actors never starve the rest.

    Ray places fractional requests best-fit, packing them onto the fullest GPU that fits: four actors of 0.25 each
    would all land on the first GPU. With several GPUs the actors' shares are therefore sized so that no more than
    k = ceil(actors / GPUs) fit on one GPU (a share just over 1/(k+1)): one actor per GPU while there are as many GPUs
    as actors. Training then takes whole GPUs that hold no actor, or else what an actor leaves of its GPU; a
    sensitivity task takes half of that rest, so two run beside the actors on each GPU. One GPU (or less) is shared as
    before: the actors together take at most half of it. A share set in the job spec is kept as it is."""
    if not gpus:
        return GpuShares(0.0, 0.0, 0.0)
    actors = res.probe_actors
    if res.gpus_per_actor is not None or gpus < 2:
        per_actor = res.gpus_per_actor if res.gpus_per_actor is not None else min(0.25, gpus / 2 / actors)
        left = gpus - per_actor * actors
        default_worker, task = (1.0 if left >= 1 else left), per_actor
    else:
        per_gpu = math.ceil(actors / math.floor(gpus))  # actors that must share a GPU
        per_actor = round((1 + SPREAD_MARGIN) / (per_gpu + 1), 4)
        rest = math.floor((1 - per_gpu * per_actor) * 1e4) / 1e4  # what actors leave of a GPU they are on
        free_gpus = math.floor(gpus) - math.ceil(actors / per_gpu)  # GPUs no actor is on
        default_worker, task = (1.0 if free_gpus >= res.workers else rest), math.floor(rest / 2 * 1e4) / 1e4
    per_worker = res.gpus_per_worker if res.gpus_per_worker is not None else default_worker
    if per_worker <= 0 or per_worker > gpus:
        raise GeopruneError(f"the probe actors take {per_actor * actors:g} of {gpus:g} GPUs, "
                            f"leaving none for fine-tuning", "lower resources.gpus_per_actor or probe_actors")
    return GpuShares(per_actor, per_worker, task)


def replay_controller(ctl: Controller, steps: list[dict[str, Any]], complete: bool = True) -> Controller:
    """The controller's trajectory, re-derived from the step trials (deterministic given their ΔG). A step without
    a trial counts as failed; with ``complete=False`` the replay stops there instead (an interrupted experiment)."""
    by_step: dict[int, dict] = {}
    for row in steps:
        if row.get("delta_g") is not None and not (isinstance(row["delta_g"], float) and math.isnan(row["delta_g"])):
            by_step.setdefault(int(row["step"]), row)
    while ctl.propose() is not None:
        row = by_step.get(len(ctl.steps))
        if row is None and not complete:
            break
        ctl.observe(row["delta_g"] if row else math.inf, log_step=False, macs=row and row["macs"],
                    params=row and row["params"], trial_id=row and row["trial_id"], failed=row is None)
    return ctl


def actor_restarts(rows: list[dict[str, Any]]) -> int:
    """How many times a probe actor restarted: the restarted processes (actor, pid) that answered, not their rows."""
    return len({(row["actor"], row["pid"]) for row in rows if row["restarted"]})


def arm_row(name: str, trial: dict[str, Any], budget: float) -> dict[str, Any]:
    label = {"baseline": "Baseline", "gc": "GC (τ = 0.07)", "adaptive": "Adaptive GC", "uniform": "Uniform L2"}[name]
    return {"method": label, "arm": name, "r": trial["r"], "top1": trial["top1"],
            "top1_before_finetune": trial["top1_before_finetune"], "params_m": trial["params"] / 1e6,
            "macs_m": trial["macs"] / 1e6, "delta_g": trial["delta_g"], "delta_g_after": trial["delta_g_after"],
            "budget": budget if name == "adaptive" else (0.07 if name == "gc" else None)}


def spearman(x: list[float], y: list[float]) -> Optional[float]:
    """Spearman's rank correlation (ties get average ranks); None when either side is constant."""
    import pandas as pd

    rho = pd.Series(x, dtype=float).corr(pd.Series(y, dtype=float), method="spearman")
    return None if math.isnan(rho) else float(rho)


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
    (the CLI passes ``report.render_report``: rendering is the app's, above this layer)."""
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
