"""Structured pruning with torch-pruning (METHOD.md §5): groups, per-group ratios, the pruning history, MACs.

A "layer" is a torch-pruning dependency group (coupled channels removed together), named by the
qualified name of its first module. ``prune_copy`` prunes a copy with one ratio per group (local
ranking by an importance criterion from the registry); the classifier's outputs are never pruned
and every group keeps at least one channel. It returns torch-pruning's pruning history as plain data
(``plain_history``), which ``replay_pruning`` applies to an unpruned model. ``kept_channels`` and
``rounding_step`` say what a ratio keeps; ``macs_params`` counts a forward pass.

The pruned-model artifact (``ModelCard``, ``save_pruned``, ``load_pruned``, the file format) lives in
``core.artifact``; its names are still importable from here for one release (issue 14).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch_pruning as tp
from torch import nn

from ..errors import GeopruneError
from .models import classifier_head

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


def rounds(channels: int, round_to: Optional[int] = None) -> bool:
    """Whether a group's kept count is rounded (METHOD.md §5): only in groups of at least 4 × ``round_to`` channels,
    where a multiple of ``round_to`` is a fine enough step (``round_to`` None or 1: never)."""
    return bool(round_to) and round_to > 1 and channels >= 4 * round_to


def kept_channels(channels: int, ratio: float, round_to: Optional[int] = None) -> int:
    """Channels a group keeps at ``ratio``: at least one; in a group that ``rounds``, the nearest multiple of
    ``round_to`` (halves up, i.e. towards keeping more), at least ``round_to``."""
    keep = max(1, channels - int(round(channels * ratio)))
    if rounds(channels, round_to) and keep < channels:
        keep = min(channels, max(round_to, (2 * keep + round_to) // (2 * round_to) * round_to))
    return keep


def rounding_step(channels: int, round_to: Optional[int] = None) -> int:
    """The smallest change of a group's kept count that ``kept_channels`` can produce."""
    return round_to if rounds(channels, round_to) else 1


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
    return pruned, plain_history(pruner.pruning_history())


def global_allocation(model: nn.Module, ratio: float, input_shape: Sequence[int], num_classes: int,
                      importance_name: str = "l2", r_max: float = 0.9) -> dict[str, float]:
    """The per-group ratios torch-pruning's global ranking chooses at ``ratio``: ``BasePruner`` with
    ``global_pruning=True`` ranks every group's channels together by ``importance_name`` (its own normalisation:
    ``GroupMagnitudeImportance``'s per-group mean for ``l2``, LAMP's for ``lamp``), each group capped at ``r_max``;
    a copy is pruned and each group's removed fraction read off it. ``prune_copy`` then prunes at these ratios with
    METHOD.md §5's rounding, like every other allocation (within a group, LAMP ranks channels as magnitude does)."""
    groups = dependency_groups(model, input_shape, num_classes)
    if ratio <= 0:
        return {g.name: 0.0 for g in groups}
    pruned = copy.deepcopy(model).eval()
    _, head = classifier_head(pruned, num_classes)
    pruner = tp.pruner.BasePruner(
        pruned, example_input(pruned, input_shape), importance=importance(importance_name), pruning_ratio=ratio,
        global_pruning=True, max_pruning_ratio=r_max, ignored_layers=[head], root_module_types=list(ROOT_TYPES),
        in_channel_groups={}, out_channel_groups={}, num_heads={},
    )
    pruner.step()
    kept = {g.name: g.channels for g in dependency_groups(pruned, input_shape, num_classes)}
    return {g.name: (g.channels - kept[g.name]) / g.channels for g in groups}


def plain_history(history: list) -> list:
    """torch-pruning's pruning history as plain lists, ints, strs and bools (what ``weights_only`` loads)."""
    return [[str(name), bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in history]


def macs_params(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass and the parameter count."""
    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, example_input(model, input_shape))
    model.train(was_training)
    return int(macs), int(params)


def aligned_macs(model: nn.Module, input_shape: Sequence[int], multiple: int) -> int:
    """Multiply-accumulates of one forward pass of the convolutions and linear layers, with every channel count
    padded up to a multiple of ``multiple``: what vector units and blocked kernels (ONNX Runtime's NCHWc, cuDNN's
    tensor-core paths) compute. The input's own channels (an image's 1 or 3) are left as they are. Removing 3 of 8
    channels removes MACs but, padded back to 8, no work: this count shows how much of a MACs reduction the hardware
    can realise."""
    pad = lambda c: -(-c // multiple) * multiple  # noqa: E731
    x = example_input(model, input_shape)
    total = 0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            c_in = module.in_channels if inputs[0] is x else pad(module.in_channels)
            per_group = module.in_channels // module.groups if module.groups > 1 else c_in
            total += output.shape[2] * output.shape[3] * pad(module.out_channels) * per_group * \
                module.kernel_size[0] * module.kernel_size[1]
        else:
            total += output[0].numel() // output.shape[-1] * pad(module.out_features) * pad(module.in_features)

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return total


def replay_pruning(model: nn.Module, history: list, input_shape: Sequence[int]) -> nn.Module:
    """Apply a recorded pruning history to an unpruned ``model`` in place (its weights are then stale)."""
    if history:
        _dependency_graph(model, input_shape).load_pruning_history(plain_history(history))
    return model


# The artifact's names, kept for one release (issue 14): they live in core.artifact, which imports this module, so they
# are looked up on first use rather than imported here.
_MOVED_TO_ARTIFACT = frozenset({"ARTIFACT_FORMAT", "ARTIFACT_VERSION", "ModelCard", "load_pruned", "save_pruned"})


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_ARTIFACT:
        from . import artifact

        return getattr(artifact, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
