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
from .config import MethodConfig, TrainConfig, finetune_defaults
from .data import Dataset, load_dataset
from .geometry import Calibration, GeometryMeter
from . import protocol
from .method import PruneTarget, allocate, measure, probe_ratios, weighted_ratio
from .models import build_model, default_input_size, load_weights
from .artifact import ModelCard, save_pruned
from .pruning import dependency_groups, macs_params
from .provenance import provenance  # also importable from here, kept for one release (issue 14)
from .rundir import write_json  # also importable from here, kept for one release (issue 14)
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
                   arch: str = "", device: str | torch.device | None = None) -> PruneResult:
    """Prune ``model`` as far as the geometry of its classes allows, fine-tune it, and report.

    ``model`` is an ``nn.Module`` or a zoo name; the datasets are objects or registry names.
    ``baseline`` trains the model first (leave it None for an already trained model);
    ``finetune_cfg`` is the fine-tune recipe (default: 5 epochs, see ``finetune_defaults``).
    """
    cfg = method or MethodConfig()
    ft_cfg = finetune_cfg or finetune_defaults()
    device = pick_device(device)
    torch.manual_seed(cfg.seed)  # a zoo model is initialised as the Ray pipeline initialises it
    model, train_set, test_set, card = resolve(model, train_set, test_set, width=width, weights=weights,
                                               input_size=input_size, data_dir=data_dir, download=download,
                                               arch=arch)
    target = PruneTarget(card.input_shape, card.num_classes, cfg.importance, cfg.round_to)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    model.to(device)
    if baseline is not None:
        log.info("training the baseline for %d epochs", baseline.epochs)
        train(model, train_set, baseline, device)
    base_eval = evaluate(model, test_set, device)
    base_macs, base_params = macs_params(model, card.input_shape)
    lap("baseline")

    meter = GeometryMeter(Calibration.from_dataset(train_set, cfg, device), cfg.bn_recalibration)
    base = copy.deepcopy(model)
    meter.set_reference(base)
    noise = meter.noise(cfg.noise_splits, cfg.seed)
    log.info("G_noise = %.4f on %d calibration images", noise, len(meter.calibration.labels))
    lap("reference")

    def measure_many(ratios_list, size_only: bool = False) -> list[dict[str, Any]]:
        out = []
        for ratios in ratios_list:
            res = measure(base, meter, ratios, target)
            out.append({"delta_g": res.delta_g, "macs": res.macs, "params": res.params, "seconds": res.seconds})
        return out

    ratios = probe_ratios(cfg.probes, cfg.r_probe_max, cfg.seed)
    probes = protocol.probe_rows(ratios, measure_many(ratios), cfg.seed)
    for p in probes:
        log.info("probe %d/%d: r=%.3f ΔG=%.4f", p["probe"] + 1, cfg.probes, p["ratio"], p["delta_g"])
    budget = protocol.budget_from_probes(noise, probes, cfg, base_macs)
    log.info("τ = %.4f", budget)
    lap("probes")

    groups = dependency_groups(base, card.input_shape, card.num_classes)
    channels = {g.name: g.channels for g in groups}
    sens = {g.name: measure(base, meter, {g.name: cfg.sensitivity_ratio}, target).delta_g for g in groups}
    budgets = protocol.group_budgets(budget, sens, noise, cfg)
    lap("sensitivity")

    ctl = protocol.new_controller(cfg, probes, budget)
    while (r := ctl.propose()) is not None:
        step_ratios = allocate(r, budgets, channels, cfg.r_max)
        (rec,) = measure_many([step_ratios])
        ctl.observe(rec["delta_g"], macs=rec["macs"], params=rec["params"],
                    mean_ratio=weighted_ratio(step_ratios, channels))
    r_star = protocol.r_star_of(ctl)
    final_ratios = protocol.final_ratios(r_star, budgets, channels, cfg)
    plan = protocol.settle_arms(["adaptive"], r_star, final_ratios, budget, channels, cfg, measure_many, base_macs,
                                base_params, protocol.step_at(ctl, r_star))["adaptive"]
    lap("controller")

    pruned, history, result = protocol.finetune_arm(base, final_ratios, meter, target, train_set, test_set, ft_cfg,
                                                    device)
    lap("finetune")

    summary = protocol.summary(card, train_set, test_set, len(meter.calibration.labels), cfg, baseline, ft_cfg, noise,
                               budget, probes, ctl, channels, plan, result.to_dict(),
                               {"top1": base_eval["top1"], "macs": base_macs, "params": base_params}, timings,
                               provenance(device))
    summary["probes"] = probes
    summary["sensitivity"] = [{"group": g.name, "channels": g.channels, "modules": g.modules, "delta_g": sens[g.name],
                               "tau_l": budgets[g.name], "ratio": final_ratios.get(g.name, 0.0)} for g in groups]
    summary["controller"]["state"] = ctl.to_dict()
    log.info("r* = %.4f: top-1 %.2f%% → %.2f%%, MACs %.2fM → %.2fM, ΔG %.4f ≤ τ %.4f", r_star, base_eval["top1"],
             result.top1, base_macs / 1e6, result.macs / 1e6, result.delta_g, budget)
    return PruneResult(pruned, history, card, summary)
