"""The typed job spec: what to prune, on what data, with which protocol and resources.

Nothing here sets τ, r or ratios: the method decides them. ``method`` may override a METHOD.md
default (recorded in ``summary.json``). ``JobSpec.from_dict`` validates once, naming the bad key
and the closest valid one; past it, code trusts the spec.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, get_type_hints

from ..core.config import MethodConfig, TrainConfig, finetune_defaults
from ..errors import GeopruneError
from ..core.protocol import ARMS


@dataclass(frozen=True)
class ModelSpec:
    name: str = "convnet"
    width: float = 1.0
    weights: Optional[str] = None  # a trained state_dict: skips baseline training
    input_size: Optional[int] = None


@dataclass(frozen=True)
class DataSpec:
    name: str = "fashion-mnist"
    data_dir: Optional[str] = None
    download: bool = False


@dataclass(frozen=True)
class ProtocolSpec:
    baseline_epochs: int = 5
    finetune_epochs: int = 3
    batch_size: int = 256
    lr: float = 0.2  # baseline peak learning rate; fine-tuning uses a tenth of it
    arms: tuple[str, ...] = ARMS
    finetune_all: bool = False  # also fine-tune every accepted controller candidate
    probe_accuracy: bool = False  # also measure each probe's top-1 on the test split (Spearman(ΔG, drop))
    step_capture: bool = False  # compile the training step (CUDA graphs on a GPU): TrainConfig.capture


@dataclass(frozen=True)
class ResourceSpec:
    probe_actors: int = 2
    cpus_per_actor: float = 0.25
    gpus_per_actor: Optional[float] = None  # None: one GPU: ≤ 0.25 each, half of it in all; several: spread, one per GPU
    workers: int = 1  # Ray Train workers per fine-tune (DDP when > 1)
    cpus_per_worker: float = 1.0
    gpus_per_worker: Optional[float] = None  # None: 1, or what the actors leave of a GPU they are on
    use_gpu: Optional[bool] = None  # None: when the cluster has GPUs
    sensitivity_tasks: Optional[int] = None  # None: one per 2 groups (on CPUs, ≤ the cores the actors leave)
    wait_for_gpu_s: float = 0.0  # an autoscaling cluster with GPU workers from 0: ask for one, wait this long


@dataclass(frozen=True)
class JobSpec:
    name: str = "geoprune"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    protocol: ProtocolSpec = field(default_factory=ProtocolSpec)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    method: dict[str, Any] = field(default_factory=dict)  # overrides of MethodConfig, recorded
    seed: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "JobSpec":
        spec = _build(cls, data, "")
        spec.method_config()  # validate overrides now, not mid-run
        for arm in spec.protocol.arms:
            if arm not in ARMS:
                raise GeopruneError(f"protocol.arms: unknown arm {arm!r}", f"use some of {', '.join(ARMS)}")
        if "adaptive" not in spec.protocol.arms:
            raise GeopruneError("protocol.arms must include 'adaptive'", "the adaptive arm is the method itself")
        for key in ("baseline_epochs", "finetune_epochs"):
            if getattr(spec.protocol, key) < 0:
                raise GeopruneError(f"protocol.{key} is negative", "use 0 or more epochs")
        if spec.resources.probe_actors < 1 or spec.resources.workers < 1:
            raise GeopruneError("resources.probe_actors and resources.workers must be at least 1",
                                "use e.g. probe_actors: 2, workers: 1")
        return spec

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def method_config(self) -> MethodConfig:
        return MethodConfig.from_dict({"seed": self.seed, **self.method})

    def baseline_config(self) -> TrainConfig:
        p = self.protocol
        return TrainConfig(epochs=p.baseline_epochs, batch_size=p.batch_size, lr=p.lr, seed=self.seed,
                           capture=p.step_capture)

    def finetune_config(self) -> TrainConfig:
        p = self.protocol
        return finetune_defaults(epochs=p.finetune_epochs, batch_size=p.batch_size, lr=p.lr / 10, seed=self.seed,
                                 capture=p.step_capture)


def _build(cls: type, data: Any, where: str):
    if not isinstance(data, Mapping):
        raise GeopruneError(f"{where.rstrip('.') or 'the job spec'} must be a mapping, not {type(data).__name__}",
                            "write KEY: VALUE pairs (see the README's job-spec table)")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean '{where}{close[0]}'?" if close else f"valid keys: {', '.join(fields)}"
            raise GeopruneError(f"unknown job-spec key '{path}'", hint)
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path + ".")
    origin = getattr(hint, "__origin__", None)
    args = getattr(hint, "__args__", ())
    if origin is dict:
        if not isinstance(value, Mapping):
            raise GeopruneError(f"{path} must be a mapping", f"write {path}: {{KEY: VALUE}}")
        return dict(value)
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise GeopruneError(f"{path} must be a list", f"write {path}: [a, b]")
        return tuple(_coerce(args[0], v, path) for v in items)
    if type(None) in args:  # Optional[X]
        if value is None:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, path)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise GeopruneError(f"{path} = {value!r} should be of type {getattr(hint, '__name__', hint)}",
                        "fix the value's type in the job spec")
