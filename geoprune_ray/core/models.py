"""The model zoo: the paper's CIFAR variants, any torchvision classifier, a user's factory.

``build_model(name, num_classes, in_channels=3, width=1.0)`` is the one entry (timm's shape):
- a registered name (``resnet18``, ``resnet50``, ``mobilenet_v2`` as in METHOD.md §8, ``convnet``),
- ``torchvision:NAME`` for any torchvision classification model (random init, no download),
- ``pkg.mod:factory`` for a user's model, called with the arguments it accepts.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import GeopruneError


@dataclass(frozen=True)
class ModelEntry:
    factory: Callable[..., nn.Module]
    input_size: Optional[int]  # the square input size it is built for; None: the data's own size
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, input_size: Optional[int], description: str):
    """Decorator: add ``factory(num_classes, in_channels, width)`` to the zoo under ``name``."""

    def wrap(factory):
        _REGISTRY[name] = ModelEntry(factory, input_size, description)
        return factory

    return wrap


def _scaled(channels: int, width: float) -> int:  # also cifar_resnet's
    return max(1, int(round(channels * width)))


@register_model("resnet18", 32, "ResNet-18, CIFAR stem (the paper's, 11.22 M params at 100 classes)")
def resnet18(num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    from .cifar_resnet import CifarResNet, tv_resnet

    return CifarResNet(tv_resnet.BasicBlock, [2, 2, 2, 2], num_classes, in_channels, width)


@register_model("resnet50", 32, "ResNet-50, CIFAR stem (the paper's, 23.71 M params at 100 classes)")
def resnet50(num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    from .cifar_resnet import CifarResNet, tv_resnet

    return CifarResNet(tv_resnet.Bottleneck, [3, 4, 6, 3], num_classes, in_channels, width)


@register_model("mobilenet_v2", 32, "MobileNetV2, first conv stride 1 (the paper's, 2.35 M params at 100 classes)")
def mobilenet_v2(num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    import torchvision

    model = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=width)
    first = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    return model


@register_model("convnet", None, "a small VGG-style CNN with BatchNorm (5 convs), for CPU runs and tests")
def convnet(num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    c1, c2, c3 = (_scaled(c, width) for c in (32, 64, 128))

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(in_channels, c1), *block(c1, c1), nn.MaxPool2d(2),
        *block(c1, c2), *block(c2, c2), nn.MaxPool2d(2),
        *block(c2, c3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(c3, num_classes),
    )


def build_model(name: str, num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """Build a freshly initialised model (no weights are downloaded)."""
    if num_classes < 2:
        raise GeopruneError(f"num_classes={num_classes}: a classifier needs at least 2 classes",
                            "pass the number of classes of your dataset")
    if not width > 0:
        raise GeopruneError(f"width={width} must be positive", "use e.g. 1.0 (full) or 0.25 (narrow)")
    if name in _REGISTRY:
        return _REGISTRY[name].factory(num_classes=num_classes, in_channels=in_channels, width=width)
    if name.startswith("torchvision:"):
        return _torchvision_model(name.split(":", 1)[1], num_classes, in_channels, width)
    if ":" in name:
        return _user_model(name, num_classes, in_channels, width)
    raise GeopruneError(
        f"unknown model {name!r}",
        f"use one of {', '.join(sorted(_REGISTRY))}, 'torchvision:NAME' (e.g. torchvision:vgg11_bn) "
        "or 'package.module:factory'")


def default_input_size(name: str) -> Optional[int]:
    """The square input size a model is built for (None: it takes the data's own size)."""
    if name in _REGISTRY:
        return _REGISTRY[name].input_size
    if name.startswith("torchvision:"):
        return 224
    factory = _resolve_user_factory(name) if ":" in name else None
    return getattr(factory, "input_size", None)


def _torchvision_model(arch: str, num_classes: int, in_channels: int, width: float) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        raise GeopruneError(f"unknown torchvision model {arch!r}",
                            "use a classification model from torchvision.models.list_models(), e.g. vgg11_bn")
    if in_channels != 3:
        raise GeopruneError(f"torchvision:{arch} takes 3 input channels, not {in_channels}",
                            "leave in_channels at 3: grayscale data is repeated to 3 channels")
    kwargs = {"weights": None, "num_classes": num_classes}
    if width != 1.0:
        builder = torchvision.models.get_model_builder(arch)
        if "width_mult" not in inspect.signature(builder).parameters and arch not in ("mobilenet_v2",):
            raise GeopruneError(f"torchvision:{arch} has no width multiplier",
                                "use width 1.0 with this model, or a zoo model (resnet18, mobilenet_v2, ...)")
        kwargs["width_mult"] = width
    return torchvision.models.get_model(arch, **kwargs)


def _resolve_user_factory(name: str) -> Callable[..., nn.Module]:
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise GeopruneError(f"cannot import {module_name!r} for model {name!r}: {exc}",
                            "make the module importable (install it or add its folder to PYTHONPATH)") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise GeopruneError(f"{module_name} has no callable {attr!r}",
                            "name a function or class that returns an nn.Module, as 'package.module:factory'")
    return factory


def _user_model(name: str, num_classes: int, in_channels: int, width: float) -> nn.Module:
    factory = _resolve_user_factory(name)
    offered = {"num_classes": num_classes, "in_channels": in_channels, "width": width}
    try:
        params = inspect.signature(factory).parameters
        takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in offered.items() if takes_all or k in params}
    except (TypeError, ValueError):
        kwargs = {"num_classes": num_classes}
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise GeopruneError(f"{name} returned {type(model).__name__}, not an nn.Module",
                            "the factory must return a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a user's trained weights from a state_dict file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise GeopruneError(f"weights file {path} does not exist", "pass the path of a saved state_dict (.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle of arbitrary objects, or not a torch file at all
        raise GeopruneError(f"cannot load {path} safely: {str(exc).splitlines()[0]}",
                            "save the weights with torch.save(model.state_dict(), path)") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise GeopruneError(f"{path} holds a {type(state).__name__}, not a state_dict",
                            "save the weights with torch.save(model.state_dict(), path)")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DDP-saved weights
    hint = "check the model name, width and number of classes the weights were trained with"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise GeopruneError(f"{path} does not match the model: {first}", hint) from None
    if missing or unexpected:
        raise GeopruneError(f"{path} does not match the model: {len(missing)} missing keys (e.g. {missing[:2]}), "
                            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})", hint)
    return model


def classifier_head(model: nn.Module, num_classes: int) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` with ``num_classes`` outputs: its input is the penultimate feature φ(x)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not found:
        raise GeopruneError(f"the model has no nn.Linear with {num_classes} outputs",
                            "geometry is read at the classifier's input: the model must end in nn.Linear(d, classes)")
    return found[-1]
