"""The in-process reference pipeline: ``adaptive_prune`` (METHOD.md §7's protocol, adaptive arm).

train (or load) baseline → probes → τ → sensitivity → controller → prune at r* → fine-tune →
evaluate, in one process. The Ray service distributes the same steps; this is the Python API
users embed and the yardstick the distributed path is tested against.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import GeopruneError
from .config import MethodConfig, TrainConfig, finetune_defaults
from .data import Dataset, load_dataset
from .geometry import Calibration, GeometryMeter
from .method import (Controller, PruneTarget, allocate, initial_ratio, layer_budgets, measure, probe_ratios, tau,
                     weighted_ratio)
from .models import build_model, default_input_size, load_weights
from .pruning import ModelCard, dependency_groups, macs_params, prune_copy, save_pruned
from .train import evaluate, finetune, pick_device, train

log = logging.getLogger("geoprune_ray")
SCHEMA_VERSION = 1


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


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=float)
        f.write("\n")
    os.replace(tmp, path)


def provenance(device: torch.device) -> dict[str, Any]:
    def version(pkg: str) -> Optional[str]:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "schema_version": SCHEMA_VERSION,
        "package": version("geoprune-ray"), "torch": torch.__version__, "torch_pruning": version("torch-pruning"),
        "ray": version("ray"), "git_commit": commit, "python": platform.python_version(),
        "hardware": {"device": str(device), "platform": platform.platform(), "cpus": os.cpu_count(),
                     "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
    }


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

    probes = []
    for m, r in enumerate(probe_ratios(cfg.probes, cfg.r_probe_max, cfg.seed)):
        res = measure(base, meter, r, target)
        probes.append({"probe": m, "ratio": r, "seed": cfg.seed, "delta_g": res.delta_g, "macs": res.macs,
                       "params": res.params, "seconds": res.seconds})
        log.info("probe %d/%d: r=%.3f ΔG=%.4f", m + 1, cfg.probes, r, res.delta_g)
    budget = tau(noise, [p["delta_g"] for p in probes], cfg.beta)
    log.info("τ = %.4f", budget)
    lap("probes")

    groups = dependency_groups(base, card.input_shape, card.num_classes)
    channels = {g.name: g.channels for g in groups}
    sens = {g.name: measure(base, meter, {g.name: cfg.sensitivity_ratio}, target).delta_g for g in groups}
    epsilon = noise if cfg.epsilon is None else cfg.epsilon
    budgets = layer_budgets(budget, sens, epsilon)
    lap("sensitivity")

    r0 = min(initial_ratio(probes, budget, cfg.r0_default), cfg.r_max)
    ctl = Controller(budget, r0, cfg.r_max, cfg.delta, cfg.gamma, cfg.controller, cfg.t_max, cfg.bisect_min_delta)
    while (r := ctl.propose()) is not None:
        ratios = allocate(r, budgets, channels, cfg.r_max)
        res = measure(base, meter, ratios, target)
        ctl.observe(res.delta_g, macs=res.macs, params=res.params, mean_ratio=weighted_ratio(ratios, channels))
    r_star = ctl.r_star
    if r_star == 0.0:
        log.warning("no controller step stayed within τ = %.4f: the model is returned unpruned", budget)
    lap("controller")

    final_ratios = allocate(r_star, budgets, channels, cfg.r_max) if r_star > 0 else {}
    pruned, history = prune_copy(base, final_ratios, card.input_shape, card.num_classes, cfg.importance, cfg.round_to)
    dg_before = meter.delta(pruned)  # recalibrates BN in place: the fine-tune starts from sound statistics
    before_ft = evaluate(pruned, test_set, device)
    finetune(pruned, train_set, ft_cfg, device)
    after_ft = evaluate(pruned, test_set, device)
    dg_after = meter.delta(copy.deepcopy(pruned))
    macs, params = macs_params(pruned, card.input_shape)
    lap("finetune")

    summary = {
        "schema_version": SCHEMA_VERSION,
        "model": card.to_dict(),
        "dataset": {"name": train_set.name, "train_size": len(train_set), "test_size": len(test_set),
                    "calibration_size": len(meter.calibration.labels)},
        "config": {"method": cfg.to_dict(), "epsilon_used": epsilon, "baseline": baseline.to_dict() if baseline else None,
                   "finetune": ft_cfg.to_dict()},
        "g_noise": noise,
        "tau": budget,
        "probes": probes,
        "sensitivity": [{"group": g.name, "channels": g.channels, "modules": g.modules, "delta_g": sens[g.name],
                         "tau_l": budgets[g.name], "ratio": final_ratios.get(g.name, 0.0)} for g in groups],
        "controller": {"mode": cfg.controller, "r0": r0, "steps": ctl.steps, "stop_reason": ctl.stop_reason,
                       "r_star": r_star, "state": ctl.to_dict()},
        "baseline": {"top1": base_eval["top1"], "macs": base_macs, "params": base_params},
        "pruned": {"r_star": r_star, "mean_ratio": weighted_ratio(final_ratios, channels) if final_ratios else 0.0,
                   "top1_before_finetune": before_ft["top1"], "top1": after_ft["top1"], "macs": macs, "params": params,
                   "delta_g_before_finetune": dg_before, "delta_g_after_finetune": dg_after,
                   "macs_ratio": macs / base_macs, "params_ratio": params / base_params},
        "timings_s": timings,
        "provenance": provenance(device),
    }
    log.info("r* = %.4f: top-1 %.2f%% → %.2f%%, MACs %.2fM → %.2fM, ΔG %.4f ≤ τ %.4f", r_star, base_eval["top1"],
             after_ft["top1"], base_macs / 1e6, macs / 1e6, dg_before, budget)
    return PruneResult(pruned, history, card, summary)
