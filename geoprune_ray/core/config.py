"""Every default of METHOD.md in one place, as typed dataclasses recorded with each result."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional

from ..errors import GeopruneError


def _check(cond: bool, message: str, hint: str) -> None:
    if not cond:
        raise GeopruneError(message, hint)


class _Serializable:
    """to_dict/from_dict for the config dataclasses; unknown keys are a user error."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        _check(not unknown, f"unknown {cls.__name__} keys: {', '.join(unknown)}",
               f"valid keys are: {', '.join(sorted(names))}")
        return cls(**data)


@dataclass
class MethodConfig(_Serializable):
    """The method's settings; the defaults are METHOD.md's. Users normally change none of them."""

    # §1 calibration set (training split only)
    calib_per_class: int = 500
    calib_cap: int = 10_000
    # §2 BatchNorm recalibration before every measurement
    bn_recalibration: bool = True
    bn_batches: int = 20
    bn_batch_size: int = 256
    # §3 noise floor
    noise_splits: int = 5
    # §4 probes and τ
    probes: int = 16
    r_probe_max: float = 0.5
    beta: float = 1.0
    importance: str = "l2"
    # §5 sensitivity and allocation
    sensitivity_ratio: float = 0.5
    epsilon: Optional[float] = None  # None → G_noise
    r_max: float = 0.9
    round_to: Optional[int] = None
    # §6 controller
    controller: Literal["paper", "bisect"] = "paper"
    r0_default: float = 0.05
    delta: float = 0.05
    gamma: float = 0.025
    t_max: int = 12
    bisect_min_delta: float = 0.00625
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.calib_per_class >= 2, f"calib_per_class={self.calib_per_class} is too small",
               "use at least 2 images per class (the noise floor splits each class in halves)")
        _check(self.probes >= 2, f"probes={self.probes}: τ needs a spread", "use at least 2 probes")
        for name in ("r_probe_max", "sensitivity_ratio", "r_max"):
            value = getattr(self, name)
            _check(0.0 < value < 1.0, f"{name}={value} is outside (0, 1)",
                   "pruning ratios are fractions of a group's channels, in (0, 1)")
        _check(self.controller in ("paper", "bisect"), f"unknown controller mode {self.controller!r}",
               "use 'paper' or 'bisect'")
        _check(self.delta > 0 and self.gamma > 0, "controller steps δ and γ must be positive",
               "leave delta/gamma at their defaults (0.05/0.025)")
        _check(self.round_to is None or self.round_to >= 1, f"round_to={self.round_to} is invalid",
               "use a positive channel multiple, or leave it unset")



@dataclass
class TrainConfig(_Serializable):
    """One training or fine-tuning recipe: SGD + Nesterov, label smoothing, a one-cycle or cosine schedule."""

    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    augment: bool = True
    seed: int = 0
    # Compile the fixed-shape step: forward and backward through torch.compile, on CUDA as CUDA graphs
    # (mode="reduce-overhead": one graph replay a step instead of a launch per kernel, the bound of small images at
    # batch 256) with a fused optimizer. Off until a GPU measurement shows it faster at the same accuracy
    # (BENCHMARKS.md); on a CPU it compiles with inductor, which first costs tens of seconds.
    capture: bool = False

    def __post_init__(self) -> None:
        _check(self.epochs >= 0, f"epochs={self.epochs} is negative", "use 0 or more epochs")
        _check(self.batch_size >= 1, f"batch_size={self.batch_size} is invalid", "use a positive batch size")
        _check(self.lr > 0, f"lr={self.lr} must be positive", "use a positive learning rate")
        _check(self.schedule in ("onecycle", "cosine"), f"unknown schedule {self.schedule!r}",
               "use 'onecycle' or 'cosine'")


def finetune_defaults(epochs: int = 5, **overrides: Any) -> TrainConfig:
    """The fine-tune recipe: the training recipe with a tenth of the peak learning rate and cosine decay."""
    return TrainConfig(**{"epochs": epochs, "lr": 0.02, "schedule": "cosine", **overrides})


@dataclass(frozen=True)
class PruneTarget:
    """What pruning needs to know about the base model besides its weights. (Here, with no torch import, so a Ray
    process that only passes it on, such as a controller step's trial, never imports torch.)"""

    input_shape: tuple[int, int, int]
    num_classes: int
    importance: str = "l2"
    round_to: Optional[int] = None


__all__ = ["MethodConfig", "PruneTarget", "TrainConfig", "finetune_defaults"]
