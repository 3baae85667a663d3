"""The typed job and batch specs, and reading them from YAML: what to prune, on what data, with which protocol and
resources. (Core: loading a spec imports no Ray. ``distributed.job`` and ``distributed.batch`` re-export these names
for one release.)

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

import copy
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Optional

import yaml

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .config import MethodConfig, Seed, Spec, TrainConfig, finetune_defaults
from .deploy import DEFAULT, DEPLOY_HINT, TARGETS, with_rounding
from .arms import ADAPTIVE, ALLOCATIONS, compression_arm, default_arms, is_arm
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
    arms: tuple[str, ...] = default_arms()
    finetune_all: bool = False  # also fine-tune every accepted controller candidate
    probe_accuracy: bool = False  # also measure each probe's top-1 on the test split (Spearman(ΔG, drop))
    step_capture: bool = False  # compile the training step (CUDA graphs on a GPU): TrainConfig.capture
    speed: bool = True  # time every fine-tuned model as ``deploy`` runs it, after the last fine-tune (a stage of its own)
    # also prune to each of these MACs reductions with every allocation of ``core.arms.ALLOCATIONS`` (the method's
    # τ_L weights, uniform L2, global magnitude, LAMP), each fine-tuned like the arms: ``arms_to_run``
    compressions: tuple[float, ...] = ()
    # the baseline's own seed (its initialisation and data order; None: the job's ``seed``). With ``model.weights``
    # unset, runs that differ only here measure how far baseline noise alone moves τ and r* (issue 16)
    baseline_seed: Optional[Seed] = None

    @field_validator("arms", "compressions", mode="before")
    @classmethod
    def _as_tuple(cls, value: Any) -> Any:  # YAML and state.json give a list; one item may be written bare
        return (value,) if isinstance(value, (str, int, float)) else tuple(value) if isinstance(value, list) else value

    @field_validator("compressions")
    @classmethod
    def _reductions(cls, compressions: tuple[float, ...]) -> tuple[float, ...]:
        for c in compressions:
            if not c > 1:
                raise PydanticCustomError("spec_rule", "{message}", {
                    "message": f"compression {c:g} is not a MACs reduction",
                    "hint": "use factors above 1, e.g. compressions: [2, 3, 4] (2: half the base's MACs)"})
        return compressions

    @field_validator("arms")
    @classmethod
    def _known_arms(cls, arms: tuple[str, ...]) -> tuple[str, ...]:
        for arm in arms:
            if not is_arm(arm):
                raise PydanticCustomError("spec_rule", "{message}", {
                    "message": f"unknown arm {arm!r}",
                    "hint": f"use some of {', '.join(default_arms())}, or ALLOCATION@Cx with ALLOCATION one of "
                            f"{', '.join(ALLOCATIONS)} (e.g. lamp@2x)"})
        if ADAPTIVE not in arms:
            raise PydanticCustomError("spec_rule", "{message}", {"message": f"must include {ADAPTIVE!r}",
                                                                 "hint": "the adaptive arm is the method itself"})
        return arms

    @property
    def arms_to_run(self) -> tuple[str, ...]:
        """``arms``, then every allocation at each of ``compressions`` (``tau@2x``, ``uniform@2x``, …)."""
        extra = [compression_arm(a, c) for c in self.compressions for a in ALLOCATIONS]
        return (*self.arms, *(e for e in extra if e not in self.arms))


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
    HINTS: ClassVar[dict[str, str]] = {"deploy": DEPLOY_HINT}

    name: str = "geoprune"
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    protocol: ProtocolSpec = Field(default_factory=ProtocolSpec)
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    method: dict[str, Any] = Field(default_factory=dict)  # overrides of MethodConfig, recorded as given
    deploy: Literal[tuple(TARGETS)] = DEFAULT  # where the pruned model will run: rounding and what is timed
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
        """The method's settings: the overrides over METHOD.md's defaults, with the deploy target's channel rounding
        unless ``method.round_to`` is given."""
        cfg = MethodConfig.from_dict({"seed": self.seed, **self.method}, where="method.", kind=self.KIND)
        return with_rounding(cfg, self.deploy)

    def baseline_seed(self) -> int:
        """The seed of the baseline's initialisation and training: ``protocol.baseline_seed``, else ``seed``."""
        return self.seed if self.protocol.baseline_seed is None else self.protocol.baseline_seed

    def baseline_config(self) -> TrainConfig:
        p = self.protocol
        return TrainConfig.from_dict({"epochs": p.baseline_epochs, "batch_size": p.batch_size, "lr": p.lr,
                                      "seed": self.baseline_seed(), "capture": p.step_capture})

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


class _BatchFile(Spec):
    """A batch file's shape; its jobs are merged over the defaults and validated as job specs by BatchSpec."""

    KIND: ClassVar[str] = "batch-spec"

    name: str = "batch"
    defaults: Optional[dict[str, Any]] = None  # any job-spec keys
    jobs: list[dict[str, Any]] = Field(default_factory=list)


class BatchSpec(Spec):
    """A validated batch: its name and its job specs, each merged over the batch's defaults."""

    KIND: ClassVar[str] = "batch-spec"

    name: str
    jobs: tuple[JobSpec, ...]

    @classmethod
    def from_dict(cls, data: Any) -> "BatchSpec":
        """One error line for the whole batch; a job's is prefixed with its name ("batch job 'a': method.beta ...")."""
        shape = _BatchFile.from_dict(data)
        if not shape.jobs:
            raise GeopruneError("the batch spec has no jobs", "list at least one job under 'jobs:'")
        specs = []
        for i, job in enumerate(shape.jobs):
            if not job.get("name"):
                raise GeopruneError(f"batch job #{i + 1} has no name", "give every job a unique 'name:'")
            try:
                specs.append(JobSpec.from_dict(_merge(shape.defaults or {}, job)))
            except GeopruneError as exc:
                raise GeopruneError(f"batch job '{job['name']}': {exc.message}", exc.hint) from None
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise GeopruneError("batch job names repeat", "give every job a unique 'name:' (it names its run folder)")
        return cls(name=shape.name, jobs=tuple(specs))


def load_batch(path: str | Path) -> BatchSpec:
    return BatchSpec.from_dict(read_yaml(path, "batch spec", "jobs/paper_cifar100.yaml"))


def _merge(base: Mapping, over: Mapping) -> dict:
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) else value
    return out


def read_yaml(path: str | Path, kind: str = "job spec", example: str = "jobs/quickstart.yaml") -> Any:
    """A YAML file's content, or one clear error naming the file (and the line of a syntax error or a tag)."""
    path = Path(path)
    if not path.is_file():
        raise GeopruneError(f"{kind} {path} does not exist", f"pass a YAML file such as {example}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise GeopruneError(f"{kind} {path} is not UTF-8 text", f"pass a YAML file such as {example}") from None
    except yaml.constructor.ConstructorError as exc:
        tag = re.search(r"tag '([^']*)'", str(exc.problem))
        if tag is None:  # e.g. a mapping key that is itself a list
            raise GeopruneError(f"{kind} {path} is not valid YAML{_line(exc)}: {exc.problem}",
                                "write plain KEY: VALUE pairs") from None
        shown = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        raise GeopruneError(f"{kind} {path} uses the YAML tag {shown}{_line(exc)}: tags are not allowed",
                            "write plain values: strings, numbers, lists and mappings, without '!' tags") from None
    except yaml.YAMLError as exc:
        raise GeopruneError(f"{kind} {path} is not valid YAML{_line(exc)}", "check indentation and colons") from None
    if data is None:
        raise GeopruneError(f"{kind} {path} is empty",
                            f"write the {kind}'s keys as in {example}; an empty file is not run as the defaults")
    return data


def _line(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f" at line {mark.line + 1}" if mark else ""


def load_spec(path: str | Path) -> JobSpec:
    return JobSpec.from_dict(read_yaml(path))
