"""The typed job spec: what to prune, on what data, with which protocol and resources.

Nothing here sets τ, r or ratios: the method decides them. ``method`` may override a METHOD.md
default (recorded in ``summary.json``). ``JobSpec.from_dict`` validates once, before Ray starts,
and past it code trusts the spec. The spec is a tree of pydantic models (``core.config.Spec``):
strict types, every range beside its field, NaN and ±inf refused, and one ``GeopruneError`` line
naming the key's dotted path (``protocol.lr``) and, for an unknown key, the closest valid one.
Validation also covers what the spec only builds later: the method overrides (``method.beta``)
and the baseline and fine-tune recipes. ``check_placeable`` refuses resources that an embedded
local cluster (which cannot grow) could never place.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..core.config import MethodConfig, Seed, Spec, TrainConfig, finetune_defaults
from ..core.protocol import ARMS
from ..errors import GeopruneError

_EPS = 1e-9  # Ray keeps resource quantities to 1e-4: a request equal to the cluster fits


class _Part(Spec):
    KIND: ClassVar[str] = "job-spec"


class ModelSpec(_Part):
    HINTS: ClassVar[dict[str, str]] = {"width": "use e.g. 1.0 (full) or 0.25 (narrow)",
                                       "input_size": "use a positive image size, or leave it unset"}

    name: str = "convnet"
    width: float = Field(1.0, gt=0)
    weights: Optional[str] = None  # a trained state_dict: skips baseline training
    input_size: Optional[int] = Field(None, ge=1)


class DataSpec(_Part):
    name: str = "fashion-mnist"
    data_dir: Optional[str] = None
    download: bool = False


class ProtocolSpec(_Part):
    """The ranges include TrainConfig's: the recipes built from it (``JobSpec.baseline_config``) cannot fail."""

    HINTS: ClassVar[dict[str, str]] = {
        "baseline_epochs": "use 0 or more epochs", "finetune_epochs": "use 0 or more epochs",
        "batch_size": "use a positive batch size",
        "lr": "use a positive learning rate: the baseline's peak; fine-tuning uses a tenth",
    }

    baseline_epochs: int = Field(5, ge=0)
    finetune_epochs: int = Field(3, ge=0)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(0.2, gt=0)  # baseline peak learning rate; fine-tuning uses a tenth of it
    arms: tuple[str, ...] = ARMS
    finetune_all: bool = False  # also fine-tune every accepted controller candidate
    probe_accuracy: bool = False  # also measure each probe's top-1 on the test split (Spearman(ΔG, drop))
    step_capture: bool = False  # compile the training step (CUDA graphs on a GPU): TrainConfig.capture

    @field_validator("arms", mode="before")
    @classmethod
    def _as_tuple(cls, arms: Any) -> Any:  # YAML and state.json give a list; one arm may be written bare
        return (arms,) if isinstance(arms, str) else tuple(arms) if isinstance(arms, list) else arms

    @field_validator("arms")
    @classmethod
    def _known_arms(cls, arms: tuple[str, ...]) -> tuple[str, ...]:
        for arm in arms:
            if arm not in ARMS:
                raise PydanticCustomError("spec_rule", "{message}", {"message": f"unknown arm {arm!r}",
                                                                     "hint": f"use some of {', '.join(ARMS)}"})
        if "adaptive" not in arms:
            raise PydanticCustomError("spec_rule", "{message}", {"message": "must include 'adaptive'",
                                                                 "hint": "the adaptive arm is the method itself"})
        return arms


class ResourceSpec(_Part):
    HINTS: ClassVar[dict[str, str]] = {"probe_actors": "use e.g. probe_actors: 2, workers: 1",
                                       "workers": "use e.g. probe_actors: 2, workers: 1",
                                       "gpus_per_actor": "use 0 or more, or leave it unset (auto)",
                                       "gpus_per_worker": "use 0 or more, or leave it unset (auto)",
                                       "sensitivity_tasks": "use 1 or more, or leave it unset (auto)",
                                       "wait_for_gpu_s": "use 0 or more seconds"}

    probe_actors: int = Field(2, ge=1)
    cpus_per_actor: float = Field(0.25, gt=0)
    # None: on one GPU ≤ 0.25 each, half of it in all; on several, spread one per GPU
    gpus_per_actor: Optional[float] = Field(None, ge=0)
    workers: int = Field(1, ge=1)  # Ray Train workers per fine-tune (DDP when > 1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: Optional[float] = Field(None, ge=0)  # None: 1, or what the actors leave of a GPU they are on
    use_gpu: Optional[bool] = None  # None: when the cluster has GPUs
    # None: one per 2 groups (on CPUs, ≤ the cores the actors leave)
    sensitivity_tasks: Optional[int] = Field(None, ge=1)
    # an autoscaling cluster with GPU workers from 0: ask for one, wait this long
    wait_for_gpu_s: float = Field(0.0, ge=0)


class JobSpec(Spec):
    KIND: ClassVar[str] = "job-spec"

    name: str = "geoprune"
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    protocol: ProtocolSpec = Field(default_factory=ProtocolSpec)
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    method: dict[str, Any] = Field(default_factory=dict)  # overrides of MethodConfig, recorded as given
    seed: Seed = 0

    @classmethod
    def from_dict(cls, data: Any) -> "JobSpec":
        """The spec, or one ``GeopruneError`` naming the first bad key."""
        return super().from_dict(data)

    @model_validator(mode="after")
    def _builds(self) -> "JobSpec":
        """What the spec builds later, built once now: a bad override fails here, not mid-run after Ray started."""
        self.method_config()
        for recipe, build in (("baseline", self.baseline_config), ("fine-tune", self.finetune_config)):
            try:  # the protocol's ranges include TrainConfig's: only an lr whose tenth is 0.0 gets here
                build()
            except GeopruneError as exc:
                raise GeopruneError(f"protocol: the {recipe} recipe's {exc.message}", exc.hint) from None
        return self

    def method_config(self) -> MethodConfig:
        return MethodConfig.from_dict({"seed": self.seed, **self.method}, where="method.", kind=self.KIND)

    def baseline_config(self) -> TrainConfig:
        p = self.protocol
        return TrainConfig.from_dict({"epochs": p.baseline_epochs, "batch_size": p.batch_size, "lr": p.lr,
                                      "seed": self.seed, "capture": p.step_capture})

    def finetune_config(self) -> TrainConfig:
        p = self.protocol
        return finetune_defaults(epochs=p.finetune_epochs, batch_size=p.batch_size, lr=p.lr / 10, seed=self.seed,
                                 capture=p.step_capture)

    def check_placeable(self, cpus: float, gpus: float) -> None:
        """Refuse what an embedded local cluster of ``cpus`` CPUs and ``gpus`` GPUs can never place (it cannot grow,
        so the run would wait for it in vain): the probe actors live all at once, and a Ray Train worker group starts
        all its workers at once. Resources placed one after another (actors beside the baseline) are not summed."""
        r = self.resources
        if r.use_gpu and not gpus:
            raise GeopruneError("resources.use_gpu is true but this machine's embedded Ray has no GPU",
                                "set use_gpu: false, or --address a cluster with GPUs")
        asks = [("probe_actors", "cpus_per_actor", "CPU", cpus), ("workers", "cpus_per_worker", "CPU", cpus)]
        if r.use_gpu if r.use_gpu is not None else gpus > 0:  # an unset GPU share is sized to the GPUs (gpu_shares)
            asks += [("probe_actors", "gpus_per_actor", "GPU", gpus), ("workers", "gpus_per_worker", "GPU", gpus)]
        for count, each, unit, have in asks:
            n, per = getattr(r, count), getattr(r, each)
            if per is not None and n * per > have + _EPS:
                raise GeopruneError(f"resources.{count} * resources.{each} = {n} * {per:g} = {n * per:g} {unit}s, "
                                    f"but this machine's embedded Ray has {have:g} {unit}{'s' if have != 1 else ''}",
                                    f"use {count} * {each} <= {have:g}, or --address a larger cluster")
