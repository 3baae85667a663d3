"""The pipeline driver: the whole protocol on a Ray cluster, every artifact in one run directory.

baseline (Ray Train) → probe actors: G_noise, probes → τ (driver) → sensitivity tasks → τ_L →
the controller as a Tune searcher (steps answered by the actors) → fine-tunes of r* and the
comparison arms through Ray Train → ``trials.parquet``, ``model/``, ``summary.json``.

Each finished stage is recorded in ``state.json`` with its outputs, so a driver that was killed
resumes from the run directory: finished stages are read back, the Tune experiment is restored
with ``Tuner.restore`` and its searcher continues the controller where it stopped.
"""

from __future__ import annotations

import io
import logging
import math
import os
import socket
import tempfile
import time
import unittest.mock
import uuid
from pathlib import Path
from typing import Any, Optional

import ray
import torch
from ray import tune

from ..core.geometry import Calibration
from ..core.method import (Controller, PruneTarget, allocate, initial_ratio, layer_budgets, probe_ratios, tau,
                           weighted_ratio)
from ..core.pruning import dependency_groups, macs_params, replay_pruning, save_pruned
from ..core.reference import SCHEMA_VERSION, provenance, resolve
from ..core.speed import compare_speed
from ..core.train import evaluate
from ..errors import GeopruneError, Interrupted
from .job import JobSpec
from .probes import START_TIMEOUT_S, PoolSpec, ProbePool
from .progress import Progress
from .rundir import RunDir
from .searcher import RatioSearcher
from .sensitivity import run_sensitivity
from .training import Scaling, fit, load_checkpoint
from .trial import TrialContext, pruning_trial

log = logging.getLogger("geoprune_ray")
STATE = "state.json"
EXPERIMENT = "controller"
TRIAL_COLUMNS = ["trial_id", "kind", "arm", "step", "r", "delta_g", "accepted", "macs", "params", "ray_train",
                 "top1", "top1_before_finetune", "delta_g_after", "pid", "actor", "train_device", "started",
                 "finished"]


def connect(address: Optional[str] = None) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``), else start an embedded local Ray."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_gcs_address(address)
    if ray.is_initialized():
        return
    try:
        quiet = {"log_to_driver": False, "logging_level": logging.ERROR}  # progress is ours, one line per event
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(address="local", include_dashboard=False, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise GeopruneError(f"cannot connect to the Ray cluster at {address or 'local'}: {str(exc).splitlines()[0]}",
                            "check the GCS address (host:6379) and that the cluster is up") from None


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
        self.timings: dict[str, float] = dict(self.state.get("timings", {}))
        self._resolved = None

    # -- bookkeeping
    def _done(self, stage: str, started: float, **outputs: Any) -> None:
        if stage in self.state["stages"]:
            return  # finished by an earlier driver: keep its record and timing
        self.timings[stage] = time.time() - started
        self.state["stages"][stage] = {"started": started, "finished": time.time(), **outputs}
        self.state["timings"] = self.timings
        self.run.write_json(STATE, self.state)

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
        spec, cfg = self.spec, self.cfg
        cluster = ray.cluster_resources()
        if spec.resources.use_gpu and not cluster.get("GPU") and spec.resources.wait_for_gpu_s > 0:
            cluster = wait_for_gpus(spec.resources.wait_for_gpu_s)
        gpus = cluster.get("GPU", 0)
        use_gpu = spec.resources.use_gpu if spec.resources.use_gpu is not None else gpus > 0
        if use_gpu and gpus == 0:
            raise GeopruneError("resources.use_gpu is true but the Ray cluster has no GPU",
                                "set use_gpu: false, or run on a cluster with GPUs")
        gpus_per_actor, gpus_per_worker = gpu_shares(spec.resources, gpus if use_gpu else 0)
        scaling = Scaling(spec.resources.workers, use_gpu, spec.resources.cpus_per_worker, gpus_per_worker)
        model, train_set, test_set, card = self.preflight()
        progress = Progress(self.state["run_id"])
        try:
            return self._run(spec, cfg, cluster, use_gpu, gpus_per_actor, gpus_per_worker, scaling, model, train_set,
                             test_set, card, progress)
        finally:
            progress.close()

    def _run(self, spec, cfg, cluster, use_gpu, gpus_per_actor, gpus_per_worker, scaling, model, train_set, test_set,
             card, progress: Progress) -> dict[str, Any]:
        target = PruneTarget(card.input_shape, card.num_classes, cfg.importance, cfg.round_to)
        data_ref = ray.put((train_set, test_set))

        # 1. baseline
        started = time.time()
        if self.run.exists("baseline.pt"):
            model.load_state_dict(torch.load(io.BytesIO(self.run.read_bytes("baseline.pt")), weights_only=True))
        elif spec.model.weights is None and spec.protocol.baseline_epochs > 0:
            log.info("stage baseline: training %s for %d epochs through Ray Train", card.arch,
                     spec.protocol.baseline_epochs)
            state, metrics = fit(card, [], model.state_dict(), data_ref, spec.baseline_config(),
                                 whole_nodes(scaling), self.run.uri("train"), name="baseline",
                                 progress=(self.state["run_id"], "baseline"))
            model.load_state_dict(state)
            buffer = io.BytesIO()
            torch.save(state, buffer)
            self.run.write_bytes("baseline.pt", buffer.getvalue())
            self._done("baseline", started, top1=metrics["top1"])
        base_macs, base_params = macs_params(model, card.input_shape)

        # 2. probe actors, G_noise, probes → τ
        started = time.time()
        calibration = Calibration.from_dataset(train_set, cfg)
        pool = ProbePool(model, calibration, target, cfg.bn_recalibration,
                         PoolSpec(spec.resources.probe_actors, spec.resources.cpus_per_actor, gpus_per_actor),
                         self.state["run_id"], max(START_TIMEOUT_S, spec.resources.wait_for_gpu_s))
        self.timings["actor_startup"] = time.time() - started  # one-time start-up, reported beside the stages
        started = time.time()
        if not self.stage("probes"):
            noise = ray.get(pool.actors[0].noise.remote(cfg.noise_splits, cfg.seed))
            ratios = probe_ratios(cfg.probes, cfg.r_probe_max, cfg.seed)
            log.info("stage probes: %d probes on %d actors", len(ratios), len(pool.actors))
            accuracy = {}
            if spec.protocol.probe_accuracy:  # each probe's top-1 on the test split, for Spearman(ΔG, drop)
                accuracy["base_top1"] = evaluate(model, test_set)["top1"]
                test_ref = ray.put(test_set)  # one object-store copy, read by every actor
                args = [(r, test_ref) for r in ratios]
            else:
                args = [(r,) for r in ratios]
            records = progress.gather(pool.submit("measure", args), "probes", "probes")
            rows = [{"probe": m, "ratio": r, "seed": cfg.seed, **rec} for m, (r, rec) in enumerate(zip(ratios, records))]
            if accuracy:
                for row in rows:
                    row["top1_drop"] = accuracy["base_top1"] - row["top1"]
                accuracy["spearman_delta_g_top1_drop"] = spearman([row["delta_g"] for row in rows],
                                                                  [row["top1_drop"] for row in rows])
            self.run.write_table("probes.parquet", rows)
            budget = tau(noise, [row["delta_g"] for row in rows], cfg.beta)
            self._done("probes", started, g_noise=noise, tau=budget,
                       restarts=sum(bool(row["restarted"]) for row in rows), **accuracy)
        probes = self.run.read_table("probes.parquet")
        noise, budget = self.stage("probes")["g_noise"], self.stage("probes")["tau"]
        log.info("G_noise = %.4f, τ = %.4f", noise, budget)

        # 3. sensitivity tasks → τ_L
        started = time.time()
        groups = dependency_groups(model, card.input_shape, card.num_classes)
        channels = {g.name: g.channels for g in groups}
        if not self.stage("sensitivity"):
            chunks = spec.resources.sensitivity_tasks or max(1, math.ceil(len(groups) / 2))
            log.info("stage sensitivity: %d groups in %d Ray tasks", len(groups), chunks)
            rows = run_sensitivity(pool.shared, target, cfg.bn_recalibration, list(channels),
                                   cfg.sensitivity_ratio, chunks, gpus=gpus_per_actor,
                                   gather=lambda refs: progress.gather(refs, f"sensitivity ({len(groups)} groups)",
                                                                       "tasks"))
            self._done("sensitivity", started, delta_g={n: rows[n]["delta_g"] for n in channels})
        sens = self.stage("sensitivity")["delta_g"]
        epsilon = noise if cfg.epsilon is None else cfg.epsilon
        budgets = layer_budgets(budget, sens, epsilon)

        # 4. controller steps and fine-tunes as Tune trials
        started = time.time()
        r0 = min(initial_ratio(probes, budget, cfg.r0_default), cfg.r_max)
        ctl = Controller(budget, r0, cfg.r_max, cfg.delta, cfg.gamma, cfg.controller, cfg.t_max, cfg.bisect_min_delta)
        ctx = TrialContext(self.state["run_id"], len(pool.actors), budget, cfg.r_max, card.to_dict(),
                           spec.finetune_config().to_dict(), data_ref, self.run.uri("train"), scaling,
                           spec.protocol.finetune_all)
        trials = self._tune(ctx, RatioSearcher(ctl, budgets, channels, cfg.r_max, spec.protocol.arms))
        arms = {t["arm"]: t for t in trials if t["kind"] == "finetune" and t.get("ray_train")}
        missing = [arm for arm in spec.protocol.arms if arm not in arms]
        if missing:
            raise Interrupted(f"the Tune experiment stopped before the {', '.join(missing)} fine-tune(s) finished",
                              f"run the same command again to resume from {self.run.location}")
        self.run.write_table("trials.parquet", trials)
        steps = [t for t in trials if t["kind"] == "step"]
        ctl = replay_controller(ctl, steps)
        r_star = ctl.r_star
        final_ratios = allocate(r_star, budgets, channels, cfg.r_max) if r_star > 0 else {}
        self._done("tune", started, r_star=r_star)
        for kind in ("step", "finetune"):  # wall time of the controller steps and of the fine-tunes
            rows = [t for t in trials if t["kind"] == kind and t.get("started") and t.get("finished")]
            if rows:
                self.timings[f"{kind}_trials"] = max(t["finished"] for t in rows) - min(t["started"] for t in rows)
        log.info("r* = %.4f after %d controller steps (%s)", r_star, len(ctl.steps), ctl.stop_reason)

        # 5. artifacts
        started = time.time()
        adaptive = arms["adaptive"]
        final = load_checkpoint(adaptive["checkpoint_path"])
        pruned = replay_pruning(card.build(), final["history"], card.input_shape)
        pruned.load_state_dict(final["state_dict"])
        with tempfile.TemporaryDirectory(prefix="geoprune-") as staging:
            folder = Path(staging)
            save_pruned(folder / "model", pruned, final["history"], card,
                        extra={"top1": adaptive["top1"], "r_star": r_star})
            self.run.put_folder(folder / "model", "model")
        log.info("stage speed: timing base and pruned models on the fine-tune device")
        speed = ray.get(_speed_task.options(num_cpus=scaling.cpus_per_worker,
                                            num_gpus=gpus_per_worker if use_gpu else 0).remote(
            model, pruned, card.input_shape, use_gpu))
        self.run.write_table("sensitivity.parquet", [
            {"group": g.name, "channels": g.channels, "modules": g.modules, "delta_g": sens[g.name],
             "tau_l": budgets[g.name], "ratio": final_ratios.get(g.name, 0.0)} for g in groups])
        baseline_top1 = (arms["baseline"]["top1_before_finetune"] if "baseline" in arms
                         else evaluate(model, test_set)["top1"])
        summary = {
            "schema_version": SCHEMA_VERSION,
            "run_id": self.state["run_id"],
            "job": _jsonable(spec.to_dict()),
            "model": card.to_dict(),
            "dataset": {"name": train_set.name, "train_size": len(train_set), "test_size": len(test_set),
                        "calibration_size": len(calibration.labels)},
            "config": {"method": cfg.to_dict(), "epsilon_used": epsilon, "baseline": spec.baseline_config().to_dict(),
                       "finetune": spec.finetune_config().to_dict(), "overrides": dict(spec.method)},
            "resources": {"cluster": {k: v for k, v in cluster.items() if k in ("CPU", "GPU", "memory")},
                          "use_gpu": use_gpu, "gpus_per_actor": gpus_per_actor,
                          "gpus_per_worker": gpus_per_worker, "probe_actors": len(pool.actors),
                          "workers": scaling.workers,
                          "actor_pids": sorted({row["pid"] for row in probes})},
            "g_noise": noise, "tau": budget,
            "probe_accuracy": ({k: self.stage("probes")[k] for k in ("base_top1", "spearman_delta_g_top1_drop")}
                               if "base_top1" in self.stage("probes") else None),
            "controller": {"mode": cfg.controller, "r0": r0, "steps": ctl.steps, "stop_reason": ctl.stop_reason,
                           "r_star": r_star},
            "baseline": {"top1": baseline_top1, "macs": base_macs, "params": base_params},
            "pruned": {"r_star": r_star, "mean_ratio": weighted_ratio(final_ratios, channels) if final_ratios else 0.0,
                       "top1_before_finetune": adaptive["top1_before_finetune"], "top1": adaptive["top1"],
                       "macs": adaptive["macs"], "params": adaptive["params"],
                       "delta_g_before_finetune": adaptive["delta_g"], "delta_g_after_finetune": adaptive["delta_g_after"],
                       "macs_ratio": adaptive["macs"] / base_macs, "params_ratio": adaptive["params"] / base_params},
            "arms": [arm_row(name, arms[name], budget) for name in spec.protocol.arms if name in arms],
            "speed": speed,
            "timings_s": self.timings,
            "provenance": provenance(torch.device("cuda" if use_gpu else "cpu")),
        }
        self.run.write_json("summary.json", summary)
        self._done("artifacts", started)
        pool.shutdown()
        from ..report import render_report

        log.info("report: %s", render_report(self.run))
        return summary

    def _tune(self, ctx: TrialContext, searcher: RatioSearcher) -> list[dict[str, Any]]:
        trainable = tune.with_resources(tune.with_parameters(pruning_trial, ctx=ctx), {"cpu": 0.01})
        path = self.run.uri(f"tune/{EXPERIMENT}")
        if tune.Tuner.can_restore(path):
            log.info("stage tune: restoring the Tune experiment at %s", path)
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
        else:
            log.info("stage tune: controller steps as Tune trials (τ = %.4f)", ctx.tau)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=8,
                                            reuse_actors=True),
                run_config=tune.RunConfig(name=EXPERIMENT, storage_path=self.run.uri("tune"), verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=2)),
            )
        with _tune_console_quiet():
            results = tuner.fit()
        rows = []
        for result in results:
            metrics = result.metrics or {}
            config = result.config or {}
            row = {col: metrics.get(col) for col in TRIAL_COLUMNS}
            row.update(trial_id=metrics.get("trial_id") or (result.path or "").rsplit("/", 1)[-1],
                       kind=config.get("kind"), arm=config.get("arm"), step=config.get("step"),
                       r=metrics.get("r", config.get("r")), error=str(result.error).splitlines()[0] if result.error else None,
                       checkpoint_path=metrics.get("checkpoint_path"))
            rows.append(row)
        return sorted(rows, key=lambda r: (r["kind"] != "step", r["step"] if r["step"] is not None else 1e9,
                                           r["started"] or 0))


def _tune_console_quiet():
    """Tune's console output prints an experiment box and result paths even at ``verbose=0`` (the box says
    "Number of trials 9223372036854775807" for ``num_samples=-1``); with its legacy reporter ``verbose=0``
    is silent. The run's own progress lines say what a user follows; the environment is put back after."""
    return unittest.mock.patch.dict(os.environ, {"RAY_AIR_NEW_OUTPUT": "0"})


@ray.remote
def _speed_task(base: torch.nn.Module, pruned: torch.nn.Module, input_shape, use_gpu: bool) -> dict[str, Any]:
    """Inference speed of base vs pruned on the device the run fine-tuned on."""
    return compare_speed(base, pruned, input_shape, "cuda" if use_gpu else "cpu")


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


def whole_nodes(scaling: Scaling) -> Scaling:
    """The baseline runs before any actor exists: each worker gets a whole GPU and the CPUs that go with it."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    return baseline_scaling(scaling, ray.available_resources().get("CPU", 0),
                            max((n.get("CPU", 0) for n in nodes), default=1),
                            max((n.get("CPU", 0) / n["GPU"] for n in nodes if n.get("GPU")), default=0.0))


def baseline_scaling(scaling: Scaling, free_cpus: float, node_cpus: float, cpus_per_gpu: float) -> Scaling:
    """On CPUs: what is free now (all of an idle node's; what other pipelines leave of a shared one), so one
    baseline uses the node and a batch's baselines take turns. On GPUs: one GPU's share of its node's CPUs, so
    the baselines of a batch train side by side, one per GPU, instead of the first taking every CPU while the
    other GPUs wait."""
    cpus = min(node_cpus, free_cpus // scaling.workers)
    if scaling.use_gpu:
        cpus = min(cpus, cpus_per_gpu)
    return Scaling(scaling.workers, scaling.use_gpu, max(scaling.cpus_per_worker, cpus), 1.0 if scaling.use_gpu else 0.0)


def gpu_shares(res, gpus: float) -> tuple[float, float]:
    """GPU per probe actor and per Ray Train worker, so the actors never starve the fine-tunes."""
    if not gpus:
        return 0.0, 0.0
    per_actor = res.gpus_per_actor if res.gpus_per_actor is not None else min(0.25, gpus / 2 / res.probe_actors)
    left = gpus - per_actor * res.probe_actors
    per_worker = res.gpus_per_worker if res.gpus_per_worker is not None else (1.0 if left >= 1 else left)
    if per_worker <= 0 or per_worker > gpus:
        raise GeopruneError(f"the probe actors take {per_actor * res.probe_actors:g} of {gpus:g} GPUs, "
                            f"leaving none for fine-tuning", "lower resources.gpus_per_actor or probe_actors")
    return per_actor, per_worker


def replay_controller(ctl: Controller, steps: list[dict[str, Any]]) -> Controller:
    """The controller's trajectory, re-derived from the step trials (deterministic given their ΔG)."""
    by_step: dict[int, dict] = {}
    for row in steps:
        if row.get("delta_g") is not None and not (isinstance(row["delta_g"], float) and math.isnan(row["delta_g"])):
            by_step.setdefault(int(row["step"]), row)
    while ctl.propose() is not None:
        row = by_step.get(len(ctl.steps))
        ctl.observe(row["delta_g"] if row else math.inf, macs=row and row["macs"], params=row and row["params"],
                    trial_id=row and row["trial_id"], failed=row is None)
    return ctl


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


def run_job(spec: JobSpec, storage: str, address: Optional[str] = None) -> dict[str, Any]:
    """Run (or resume) ``spec`` with every artifact under ``storage``; returns the summary."""
    pipeline = Pipeline(spec, storage)  # checks the run directory before a cluster is started
    pipeline.preflight()  # and the model, weights and data
    started = time.time()
    connect(address)
    pipeline.timings["ray_startup"] = time.time() - started  # one-time: 0 when joining a running cluster
    return pipeline.run_all()
