"""The in-process reference pipeline: ``adaptive_prune`` (METHOD.md §7's protocol, adaptive arm).

train (or load) baseline → probes → τ → sensitivity → controller → prune at r* → fine-tune →
evaluate, in one process. The Ray service distributes the same steps; this is the Python API
users embed and the yardstick the distributed path is tested against. ``resolve`` turns a model's and datasets'
names into objects fitted to each other (the ``ModelCard``); ``PruneResult`` is what ``adaptive_prune`` returns.

``provenance`` (now ``core.provenance``) and ``write_json`` (now ``core.rundir``) are still importable from here for
one release (issue 14).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import GeopruneError
from .arms import ADAPTIVE
from .config import MethodConfig, TrainConfig, finetune_defaults
from .data import Dataset, load_dataset
from .deploy import DEFAULT as DEFAULT_DEPLOY, with_rounding
from .geometry import Calibration, GeometryMeter
from . import protocol
from .method import PruneTarget, allocate, measure, probe_ratios, weighted_ratio
from .models import build_model, default_input_size, load_weights
from .artifact import ModelCard, save_pruned
from .pruning import dependency_groups, macs_params
from .provenance import provenance  # also importable from here, kept for one release (issue 14)
from .rundir import write_json  # also importable from here, kept for one release (issue 14)
from .speed import deploy_speed
from .train import evaluate, pick_device, train

log = logging.getLogger("geoprune_ray")


@dataclass
class PruneResult:
    """Everything ``adaptive_prune`` decided and measured, with the pruned, fine-tuned model."""

    model: nn.Module
    pruning_history: list
    card: ModelCard
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def r_star(self) -> float:
        return self.summary["controller"]["r_star"]

    def save(self, out_dir: str | Path) -> Path:
        """Write ``summary.json`` and ``model/`` under ``out_dir`` (each written atomically)."""
        out = Path(out_dir)
        if not self.card.arch:
            raise GeopruneError("the model was passed as an nn.Module without an architecture name",
                                "pass arch='name' to adaptive_prune, or save model.state_dict() and "
                                "pruning_history yourself and reload with load_pruned(path, base_model=...)")
        save_pruned(out / "model", self.model, self.pruning_history, self.card,
                    extra={"top1": self.summary["pruned"]["top1"], "r_star": self.r_star})
        write_json(out / "summary.json", self.summary)
        return out


def _in_channels(model: nn.Module) -> int:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise GeopruneError("the model has no nn.Conv2d", "geoprune prunes the channels of convolutional networks")
    return first.in_channels


def resolve(model: nn.Module | str, train_set: Dataset | str, test_set: Dataset | str, *, width: float = 1.0,
            weights: Optional[str] = None, input_size: Optional[int] = None, data_dir: Optional[str] = None,
            download: bool = False, arch: str = "") -> tuple[nn.Module, Dataset, Dataset, ModelCard]:
    """Turn names into objects and fit the data to the model (channels and input size)."""
    if isinstance(train_set, str):
        train_set = load_dataset(train_set, "train", data_dir, download)
    if isinstance(test_set, str):
        test_set = load_dataset(test_set, "test", data_dir, download)
    if train_set.num_classes != test_set.num_classes:
        raise GeopruneError(f"train has {train_set.num_classes} classes but test has {test_set.num_classes}",
                            "use the two splits of one dataset")
    if isinstance(model, str):
        arch = model
        model = build_model(arch, train_set.num_classes, width=width)
        input_size = input_size or default_input_size(arch)
    if weights:
        load_weights(model, weights)
    channels = _in_channels(model)
    train_set, test_set = train_set.fit(channels, input_size), test_set.fit(channels, input_size)
    card = ModelCard(arch, train_set.num_classes, channels, width, tuple(train_set.shape), tuple(train_set.mean),
                     tuple(train_set.std), tuple(train_set.classes))
    return model, train_set, test_set, card


def adaptive_prune(model: nn.Module | str, train_set: Dataset | str, test_set: Dataset | str, *,
                   method: Optional[MethodConfig] = None, baseline: Optional[TrainConfig] = None,
                   finetune_cfg: Optional[TrainConfig] = None, width: float = 1.0, weights: Optional[str] = None,
                   input_size: Optional[int] = None, data_dir: Optional[str] = None, download: bool = False,
                   arch: str = "", device: str | torch.device | None = None,
                   deploy: str = DEFAULT_DEPLOY, speed: bool = True) -> PruneResult:
    """Prune ``model`` as far as the geometry of its classes allows, fine-tune it, and report.

    ``model`` is an ``nn.Module`` or a zoo name; the datasets are objects or registry names.
    ``baseline`` trains the model first (leave it None for an already trained model);
    ``finetune_cfg`` is the fine-tune recipe (default: 5 epochs, see ``finetune_defaults``).
    ``deploy`` names where the pruned model will run (``core.deploy``: ``cpu``, ``cuda``, ``cuda-bf16``): kept
    channel counts are rounded for it unless ``method.round_to`` is set (1: no rounding); with ``speed`` the pruned
    model is then timed against the base as that target runs it (``summary["speed"]``).
    """
    cfg = with_rounding(method or MethodConfig(), deploy)
    ft_cfg = finetune_cfg or finetune_defaults()
    device = pick_device(device)
    # a zoo model is initialised as the Ray pipeline initialises it: with the baseline's seed when it is trained here
    torch.manual_seed(baseline.seed if baseline is not None else cfg.seed)
    model, train_set, test_set, card = resolve(model, train_set, test_set, width=width, weights=weights,
                                               input_size=input_size, data_dir=data_dir, download=download,
                                               arch=arch)
    run = _LocalRun(cfg, card, train_set, test_set, device)
    run.baseline(model, baseline)
    run.reference(model)
    run.probes()
    run.sensitivity()
    run.controller()
    pruned, history, result = run.finetune(ft_cfg)
    timed = run.speed(pruned, result, deploy) if speed else None
    summary = run.summary(baseline, ft_cfg, result, deploy)
    summary["speed"] = timed
    return PruneResult(pruned, history, card, summary)


class _LocalRun:
    """The protocol's steps (``core.protocol``) in one process, to be called in order: each keeps what the later ones
    use, and its wall time in ``timings`` under its name (the clock starts here)."""

    def __init__(self, cfg: MethodConfig, card: ModelCard, train_set: Dataset, test_set: Dataset,
                 device: torch.device):
        self.cfg, self.card, self.train_set, self.test_set, self.device = cfg, card, train_set, test_set, device
        self.target = PruneTarget(card.input_shape, card.num_classes, cfg.importance, cfg.round_to)
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    def _lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = now - self._clock
        self._clock = now

    def baseline(self, model: nn.Module, baseline: Optional[TrainConfig]) -> None:
        """Train the model if ``baseline`` says how; its top-1, MACs and params."""
        model.to(self.device)
        if baseline is not None:
            log.info("training the baseline for %d epochs", baseline.epochs)
            train(model, self.train_set, baseline, self.device)
        top1 = evaluate(model, self.test_set, self.device)["top1"]
        macs, params = macs_params(model, self.card.input_shape)
        self.base_figures = {"top1": top1, "macs": macs, "params": params}
        self._lap("baseline")

    def reference(self, model: nn.Module) -> None:
        """The calibration set, a copy of the model as the reference every pruned copy is measured against, G_noise."""
        cfg = self.cfg
        self.meter = GeometryMeter(Calibration.from_dataset(self.train_set, cfg, self.device), cfg.bn_recalibration)
        self.base = copy.deepcopy(model)
        self.meter.set_reference(self.base)
        self.noise = self.meter.noise(cfg.noise_splits, cfg.seed)
        log.info("G_noise = %.4f on %d calibration images", self.noise, len(self.meter.calibration.labels))
        self._lap("reference")

    def measure_many(self, ratios_list, size_only: bool = False) -> list[dict[str, Any]]:
        """Prune a copy of the base with each of ``ratios_list`` and measure it (``size_only`` or not: all of it)."""
        out = []
        for ratios in ratios_list:
            res = measure(self.base, self.meter, ratios, self.target)
            out.append({"delta_g": res.delta_g, "macs": res.macs, "params": res.params, "seconds": res.seconds})
        return out

    def probes(self) -> None:
        """The probes at random ratios, and τ from them."""
        cfg = self.cfg
        ratios = probe_ratios(cfg.probes, cfg.r_probe_max, cfg.seed)
        self.probe_rows = protocol.probe_rows(ratios, self.measure_many(ratios), cfg.seed)
        for p in self.probe_rows:
            log.info("probe %d/%d: r=%.3f ΔG=%.4f", p["probe"] + 1, cfg.probes, p["ratio"], p["delta_g"])
        self.budget = protocol.budget_from_probes(self.noise, self.probe_rows, cfg, self.base_figures["macs"])
        log.info("τ = %.4f", self.budget)
        self._lap("probes")

    def sensitivity(self) -> None:
        """Each dependency group's ΔG pruned alone, and its budget τ_L."""
        cfg, card = self.cfg, self.card
        self.groups = dependency_groups(self.base, card.input_shape, card.num_classes)
        self.channels = {g.name: g.channels for g in self.groups}
        self.sens = {g.name: measure(self.base, self.meter, {g.name: cfg.sensitivity_ratio}, self.target).delta_g
                     for g in self.groups}
        self.budgets = protocol.group_budgets(self.budget, self.sens, self.noise, cfg)
        self._lap("sensitivity")

    def controller(self) -> None:
        """The controller's search for r*, the final ratios at r*, and the adaptive arm's plan."""
        cfg, channels = self.cfg, self.channels
        ctl = self.ctl = protocol.new_controller(cfg, self.probe_rows, self.budget)
        while (r := ctl.propose()) is not None:
            step_ratios = allocate(r, self.budgets, channels, cfg.r_max)
            (rec,) = self.measure_many([step_ratios])
            ctl.observe(rec["delta_g"], macs=rec["macs"], params=rec["params"],
                        mean_ratio=weighted_ratio(step_ratios, channels))
        self.r_star = protocol.r_star_of(ctl)
        self.final_ratios = protocol.final_ratios(self.r_star, self.budgets, channels, cfg)
        self.plan = protocol.settle_arms(["adaptive"], self.r_star, self.final_ratios, self.budget, channels, cfg,
                                         self.measure_many, self.base_figures["macs"], self.base_figures["params"],
                                         protocol.step_at(ctl, self.r_star))["adaptive"]
        self._lap("controller")

    def finetune(self, ft_cfg: TrainConfig) -> tuple[nn.Module, list, protocol.ArmResult]:
        """Prune at the final ratios, fine-tune, and measure before and after."""
        out = protocol.finetune_arm(self.base, self.final_ratios, self.meter, self.target, self.train_set,
                                    self.test_set, ft_cfg, self.device)
        self._lap("finetune")
        return out

    def speed(self, pruned: nn.Module, result: protocol.ArmResult, deploy: str) -> dict[str, Any]:
        """The fine-tuned model against the base, timed as ``deploy`` runs it (``core.speed.deploy_speed``)."""
        log.info("timing the base and the pruned model as %s runs them", deploy)
        record = deploy_speed(self.base, {ADAPTIVE: pruned}, self.card.input_shape, deploy,
                              macs={"base": self.base_figures["macs"], ADAPTIVE: result.macs})
        self._lap("speed")
        return record

    def summary(self, baseline: Optional[TrainConfig], ft_cfg: TrainConfig, result: protocol.ArmResult,
                deploy: str = DEFAULT_DEPLOY) -> dict[str, Any]:
        """The protocol's summary, with the probes, each group's sensitivity and the controller's state."""
        base = self.base_figures
        summary = protocol.summary(self.card, self.train_set, self.test_set, len(self.meter.calibration.labels),
                                   self.cfg, baseline, ft_cfg, self.noise, self.budget, self.probe_rows, self.ctl,
                                   self.channels, self.plan, result.to_dict(), dict(base), self.timings,
                                   provenance(self.device), deploy)
        summary["probes"] = self.probe_rows
        summary["sensitivity"] = [{"group": g.name, "channels": g.channels, "modules": g.modules,
                                   "delta_g": self.sens[g.name], "tau_l": self.budgets[g.name],
                                   "ratio": self.final_ratios.get(g.name, 0.0)} for g in self.groups]
        summary["controller"]["state"] = self.ctl.to_dict()
        log.info("r* = %.4f: top-1 %.2f%% → %.2f%%, MACs %.2fM → %.2fM, ΔG %.4f ≤ τ %.4f", self.r_star, base["top1"],
                 result.top1, base["macs"] / 1e6, result.macs / 1e6, result.delta_g, self.budget)
        return summary
