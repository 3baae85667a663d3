"""Structured pruning with torch-pruning (METHOD.md §5): groups, per-group ratios, safe artifacts.

A "layer" is a torch-pruning dependency group (coupled channels removed together), named by the
qualified name of its first module. ``prune_copy`` prunes a copy with one ratio per group (local
ranking by an importance criterion from the registry); the classifier's outputs are never pruned
and every group keeps at least one channel. ``save_pruned``/``load_pruned`` store the state_dict
with torch-pruning's pruning history, so loading needs no pickle (``weights_only=True``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch_pruning as tp
from torch import nn

from ..errors import GeopruneError
from .rundir import RunDir
from .models import build_model, classifier_head

ARTIFACT_FORMAT = "geoprune-ray/pruned-model"
ARTIFACT_VERSION = 1
ROOT_TYPES = (nn.Conv2d, nn.Linear)

IMPORTANCES: dict[str, Callable[[], tp.importance.Importance]] = {
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "lamp": lambda: tp.importance.LAMPImportance(p=2),
    "fpgm": lambda: tp.importance.FPGMImportance(p=2),
    "bn_scale": lambda: tp.importance.BNScaleImportance(),
    "random": lambda: tp.importance.RandomImportance(),
}


def importance(name: str) -> tp.importance.Importance:
    if name not in IMPORTANCES:
        raise GeopruneError(f"unknown importance criterion {name!r}",
                            f"use one of {', '.join(sorted(IMPORTANCES))} (default l2)")
    return IMPORTANCES[name]()


@dataclass(frozen=True)
class GroupInfo:
    """One dependency group: its name (first module's qualified name) and channel count n_L."""

    name: str
    channels: int
    modules: int  # how many layers the group couples


def example_input(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.zeros(1, *input_shape, device=device)


def _dependency_graph(model: nn.Module, input_shape: Sequence[int]) -> tp.DependencyGraph:
    return tp.DependencyGraph().build_dependency(model, example_inputs=example_input(model, input_shape))


def _groups(model: nn.Module, graph: tp.DependencyGraph, num_classes: int):
    _, head = classifier_head(model, num_classes)
    return graph.get_all_groups(ignored_layers=[head], root_module_types=list(ROOT_TYPES))


def dependency_groups(model: nn.Module, input_shape: Sequence[int], num_classes: int) -> list[GroupInfo]:
    """The prunable groups of ``model``, in the order their first modules appear in the model."""
    graph = _dependency_graph(model, input_shape)
    order = {m: (i, n) for i, (n, m) in enumerate(model.named_modules())}
    roots = [(order[g[0].dep.target.module], len(g[0].idxs), len({d.target.module for d, _ in g}))
             for g in _groups(model, graph, num_classes)]
    return [GroupInfo(name, channels, modules) for (_, name), channels, modules in sorted(roots)]


def kept_channels(channels: int, ratio: float, round_to: Optional[int] = None) -> int:
    """Channels a group keeps at ``ratio``: at least one, a multiple of ``round_to`` where set."""
    keep = max(1, channels - int(round(channels * ratio)))
    if round_to and channels >= round_to and keep < channels:
        keep = max(round_to, keep - keep % round_to)
    return keep


def rounding_step(channels: int, round_to: Optional[int] = None) -> int:
    """The smallest change of a group's kept count that ``kept_channels`` can produce."""
    return round_to if round_to and channels >= round_to else 1


def check_ratio(name: str, ratio: float) -> None:
    if not 0.0 <= float(ratio) < 1.0:
        raise GeopruneError(f"pruning ratio {ratio} for {name} is outside [0, 1)",
                            "a ratio is the fraction of a group's channels to remove, 0 ≤ r < 1")


def prune_copy(model: nn.Module, ratios: Mapping[str, float] | float, input_shape: Sequence[int], num_classes: int,
               importance_name: str = "l2", round_to: Optional[int] = None) -> tuple[nn.Module, list]:
    """Prune a deep copy of ``model`` with one ratio per group (or one ratio for all groups).

    Returns the pruned copy and torch-pruning's pruning history (what ``load_pruned`` replays).
    """
    pruned = copy.deepcopy(model)
    groups = dependency_groups(pruned, input_shape, num_classes)
    if not isinstance(ratios, Mapping):
        check_ratio("every group", ratios)
        ratios = {g.name: float(ratios) for g in groups}
    channels = {g.name: g.channels for g in groups}
    unknown = sorted(set(ratios) - set(channels))
    if unknown:
        raise GeopruneError(f"unknown pruning groups: {', '.join(unknown[:5])}",
                            "name groups as 'geoprune inspect MODEL' lists them")
    modules = dict(pruned.named_modules())
    ratio_dict = {}
    for name, ratio in ratios.items():
        check_ratio(name, ratio)
        keep = kept_channels(channels[name], ratio, round_to)
        if keep < channels[name]:
            # torch-pruning keeps int(n·(1−r)) channels: aim at keep + ½ so it keeps exactly `keep`.
            ratio_dict[modules[name]] = 1.0 - (keep + 0.5) / channels[name]
    if not ratio_dict:
        return pruned, []
    _, head = classifier_head(pruned, num_classes)
    pruner = tp.pruner.BasePruner(
        pruned, example_input(pruned, input_shape), importance=importance(importance_name),
        pruning_ratio=0.0, pruning_ratio_dict=ratio_dict, ignored_layers=[head],
        root_module_types=list(ROOT_TYPES), in_channel_groups={}, out_channel_groups={}, num_heads={},
    )
    pruner.step()
    return pruned, _plain_history(pruner.pruning_history())


def _plain_history(history: list) -> list:
    return [[str(name), bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in history]


def macs_params(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass and the parameter count."""
    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, example_input(model, input_shape))
    model.train(was_training)
    return int(macs), int(params)


# ---------------------------------------------------------------- artifacts


@dataclass(frozen=True)
class ModelCard:
    """What is needed to rebuild and use a (pruned) model: architecture, input and normalisation."""

    arch: str
    num_classes: int
    in_channels: int
    width: float
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "num_classes": self.num_classes, "in_channels": self.in_channels,
                "width": self.width, "input_shape": list(self.input_shape), "mean": list(self.mean),
                "std": list(self.std), "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelCard":
        return cls(d["arch"], int(d["num_classes"]), int(d["in_channels"]), float(d["width"]),
                   tuple(d["input_shape"]), tuple(d["mean"]), tuple(d["std"]), tuple(d.get("classes", ())))

    def build(self) -> nn.Module:
        return build_model(self.arch, self.num_classes, self.in_channels, self.width)


def save_pruned(path: str | Path, model: nn.Module, history: list, card: ModelCard,
                extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``path/`` (``model.pt`` + ``model.json``) atomically: all of it or nothing."""
    path = Path(path)
    payload = {
        "format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "card": card.to_dict(),
        "pruning_history": _plain_history(history),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    macs, params = macs_params(model, card.input_shape)
    meta = {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "card": card.to_dict(),
            "macs": macs, "params": params, "pruned_groups": len(history), **dict(extra or {})}
    def write(staging: Path) -> None:
        torch.save(payload, staging / "model.pt")
        (staging / "model.json").write_text(json.dumps(meta, indent=2) + "\n")

    RunDir(str(path.parent)).write_folder(path.name, write)
    return path


def load_pruned(path: str | Path, map_location: str | torch.device = "cpu",
                base_model: Optional[nn.Module] = None) -> tuple[nn.Module, ModelCard]:
    """Rebuild the exact pruned model from ``save_pruned``'s folder (or its ``model.pt``).

    The architecture is rebuilt from the saved card, or taken from ``base_model`` (an unpruned
    instance of the same architecture) for models that were passed in as objects.
    """
    path = Path(path)
    file = path / "model.pt" if path.is_dir() else path
    if not file.is_file():
        raise GeopruneError(f"no pruned model at {path}", "pass the model/ folder a geoprune run wrote")
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise GeopruneError(f"cannot load {file} safely: {str(exc).splitlines()[0]}",
                            "pass a model.pt written by geoprune") from None
    if not isinstance(payload, dict) or payload.get("format") != ARTIFACT_FORMAT:
        raise GeopruneError(f"{file} is not a geoprune pruned model", "pass a model.pt written by geoprune")
    if payload.get("version", 0) > ARTIFACT_VERSION:
        raise GeopruneError(f"{file} has format version {payload['version']}, newer than this geoprune reads",
                            "upgrade geoprune-ray")
    card = ModelCard.from_dict(payload["card"])
    if base_model is None and not card.arch:
        raise GeopruneError(f"{file} records no architecture name", "pass base_model= (an unpruned instance)")
    model = replay_pruning((base_model if base_model is not None else card.build()).cpu().eval(),
                           payload["pruning_history"], card.input_shape)
    model.load_state_dict(payload["state_dict"])
    return model.to(map_location), card


def replay_pruning(model: nn.Module, history: list, input_shape: Sequence[int]) -> nn.Module:
    """Apply a recorded pruning history to an unpruned ``model`` in place (its weights are then stale)."""
    if history:
        _dependency_graph(model, input_shape).load_pruning_history(_plain_history(history))
    return model
