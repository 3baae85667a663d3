"""Every default of METHOD.md in one place, as typed, validated settings recorded with each result.

``MethodConfig`` and ``TrainConfig``, and the job and batch specs (``core/spec.py``),
are pydantic models built on ``Spec``: frozen, strict types (an int is accepted for a float, nothing else is
converted: ``"big"`` for an int or ``true`` for a float is refused), NaN and ±inf refused, unknown keys refused, each
field's range beside it. A pydantic ``ValidationError`` never reaches the user: ``spec_error`` turns its first error
into one ``GeopruneError`` line that names the key's full dotted path (``method.beta``, ``protocol.arms[1]``) and
says how to fix it: for a misspelt key the closest valid one ("did you mean"), for a value out of range the range.
"""

from __future__ import annotations

import difflib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ModelWrapValidatorHandler, ValidationError, model_validator

from ..errors import GeopruneError

# core/pruning.py's IMPORTANCES, named here without importing torch-pruning (tests/test_method.py keeps them equal)
IMPORTANCE_NAMES = ("l2", "l1", "lamp", "fpgm", "bn_scale", "random")
RATIO_HINT = "pruning ratios are fractions of a group's channels, in (0, 1)"
Seed = Annotated[int, Field(ge=0, lt=2**32)]  # torch's generators take 64 bits; derived seeds add small offsets


_DEPTH: ContextVar[int] = ContextVar("geoprune_spec_depth", default=0)  # specs being validated, nested


class Spec(BaseModel):
    """A frozen, strictly typed spec whose every validation error is one ``GeopruneError`` naming the key.

    Built directly (``TrainConfig(lr=0)``) or with ``from_dict``, the outermost spec turns pydantic's
    ``ValidationError`` into the one line; a nested spec passes it up whole, so that its location keeps the path
    from the outermost one (``protocol.lr``, not ``lr``)."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid", allow_inf_nan=False)
    KIND: ClassVar[str] = "spec"  # names the spec in messages: "unknown job-spec key 'modle'"
    HINTS: ClassVar[dict[str, str]] = {}  # how to fix a field's bad value (else a hint derived from its range)

    @model_validator(mode="wrap")
    @classmethod
    def _one_error(cls, data: Any, handler: ModelWrapValidatorHandler) -> Any:
        token = _DEPTH.set(_DEPTH.get() + 1)
        try:
            return handler(data)
        except ValidationError as exc:
            if _DEPTH.get() > 1:
                raise
            raise spec_error(exc, cls) from None
        finally:
            _DEPTH.reset(token)

    @classmethod
    def from_dict(cls, data: Any, where: str = "", kind: Optional[str] = None):
        """``data`` validated; ``where`` prefixes the key paths in messages (``"method."``), ``kind`` names the spec
        they belong to (the job spec, for its method overrides)."""
        token = _DEPTH.set(1)  # the ValidationError comes here whole, to be told with ``where``
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise spec_error(exc, cls, where, kind) from None
        finally:
            _DEPTH.reset(token)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


_TYPES = {"int": ("int", "a whole number such as 3"), "float": ("float", "a number such as 0.5"),
          "string": ("str", "a string such as convnet"), "bool": ("bool", "true or false")}  # pydantic's error types


def spec_error(exc: ValidationError, root: type[Spec], where: str = "", kind: Optional[str] = None) -> GeopruneError:
    """The first error of ``exc`` (validating ``root``) as one line: what is wrong with which key, and how to fix it."""
    err = exc.errors(include_url=False)[0]
    kind = kind or root.KIND
    loc, value, etype, ctx = err["loc"], err.get("input"), err["type"], err.get("ctx") or {}
    path = where + _dotted(loc)
    parent = _model_at(root, loc[:-1])
    name = loc[-1] if loc else None
    field = parent.model_fields.get(name) if parent is not None and isinstance(name, str) else None
    hint = parent.HINTS.get(name) if parent is not None and isinstance(name, str) else None
    if etype == "extra_forbidden":
        names = list(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(str(name), names, n=1)
        stem = where + "".join(f"{p}." if isinstance(p, str) else "" for p in loc[:-1])
        return GeopruneError(f"unknown {kind} key '{path}'",
                             f"did you mean '{stem}{close[0]}'?" if close else f"valid keys: {', '.join(names)}")
    if etype in ("model_type", "model_attributes_type", "dict_type"):
        what = path or f"the {kind.replace('-', ' ')}"
        return GeopruneError(f"{what} must be a mapping, not {type(value).__name__}",
                             "write KEY: VALUE pairs; see the README's job-spec table")
    if etype in ("tuple_type", "list_type"):
        return GeopruneError(f"{path} must be a list, not {type(value).__name__}", f"write {path}: [a, b]")
    if etype == "literal_error":
        return GeopruneError(f"{path}: unknown value {value!r}", hint or f"use {ctx['expected']}")
    if etype == "spec_rule":  # a check of its own (a field validator's PydanticCustomError)
        return GeopruneError(f"{path}: {ctx['message']}", ctx.get("hint", ""))
    bounds = {k: getattr(m, k) for m in (field.metadata if field else ()) for k in ("gt", "ge", "lt", "le")
              if hasattr(m, k)}  # the field's annotated-types constraints
    broken, use = _range(bounds)
    if etype == "finite_number":
        return GeopruneError(f"{path} = {value!r} is not a finite number", hint or use)
    if etype in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return GeopruneError(f"{path} = {value!r} {broken}", hint or use)
    expected = _TYPES.get(etype.split("_")[0])
    if expected:
        return GeopruneError(f"{path} = {value!r} should be of type {expected[0]}", f"write {expected[1]}")
    return GeopruneError(f"{path or 'the ' + kind.replace('-', ' ')}: {err['msg']}", "see the README's job-spec table")


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(root: type[Spec], loc: tuple) -> Optional[type[Spec]]:
    """The model class that validates the mapping at ``loc`` (list indices skipped), or None."""
    cls = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, Spec)):
            return None
        cls = field.annotation
    return cls


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range(b: dict[str, Any]) -> tuple[str, str]:
    """What a value outside the bounds ``b`` (gt/ge/lt/le) is, and what to use instead."""
    lo, hi = b.get("gt", b.get("ge")), b.get("lt", b.get("le"))
    if lo is not None and hi is not None:
        interval = f"{'(' if 'gt' in b else '['}{_num(lo)}, {_num(hi)}{')' if 'lt' in b else ']'}"
        return f"is outside {interval}", f"use a value in {interval}"
    if "gt" in b:
        if lo == 0:
            return "must be positive", "use a positive number"
        return f"must be greater than {_num(lo)}", f"use a number greater than {_num(lo)}"
    if "ge" in b:
        if lo == 0:
            return "is negative", "use 0 or more"
        return f"must be at least {_num(lo)}", f"use {_num(lo)} or more"
    return "is out of range", "see the README's job-spec table"


class MethodConfig(Spec):
    """The method's settings; the defaults are METHOD.md's. Users normally change none of them."""

    KIND: ClassVar[str] = "method"
    HINTS: ClassVar[dict[str, str]] = {
        "calib_per_class": "use at least 2 images per class: the noise floor splits each class in halves",
        "calib_cap": "use at least 2 calibration images in all; METHOD.md uses 10000",
        "noise_splits": "use at least 2 seeded splits for the noise floor; METHOD.md uses 5",
        "probes": "τ needs a spread: use at least 2 probes; METHOD.md uses 16",
        "r_probe_max": RATIO_HINT, "sensitivity_ratio": RATIO_HINT, "r_max": RATIO_HINT, "r0_default": RATIO_HINT,
        "beta": "β scales the probes' spread in τ = G_noise + β·σ: use a positive number; METHOD.md uses 1",
        "importance": f"use one of {', '.join(IMPORTANCE_NAMES)}; the default is l2",
        "epsilon": "use 0 or more, or leave it unset for G_noise",
        "round_to": "use a positive channel multiple, or leave it unset",
        "controller": "use 'paper' or 'bisect'",
        "delta": "leave delta and gamma at their defaults, 0.05 and 0.025",
        "gamma": "leave delta and gamma at their defaults, 0.05 and 0.025",
        "t_max": "use at least 1 controller step; METHOD.md uses 12",
    }

    # §1 calibration set (training split only)
    calib_per_class: int = Field(500, ge=2)
    calib_cap: int = Field(10_000, ge=2)
    # §2 BatchNorm recalibration before every measurement
    bn_recalibration: bool = True
    bn_batches: int = Field(20, ge=1)
    bn_batch_size: int = Field(256, ge=1)
    # §3 noise floor
    noise_splits: int = Field(5, ge=2)
    # §4 probes and τ
    probes: int = Field(16, ge=2)
    r_probe_max: float = Field(0.5, gt=0, lt=1)
    beta: float = Field(1.0, gt=0)
    importance: Literal[IMPORTANCE_NAMES] = "l2"
    # §5 sensitivity and allocation
    sensitivity_ratio: float = Field(0.5, gt=0, lt=1)
    epsilon: Optional[float] = Field(None, ge=0)  # None → G_noise
    r_max: float = Field(0.9, gt=0, lt=1)
    round_to: Optional[int] = Field(None, ge=1)
    # §6 controller
    controller: Literal["paper", "bisect"] = "paper"
    r0_default: float = Field(0.05, gt=0, lt=1)
    delta: float = Field(0.05, gt=0)
    gamma: float = Field(0.025, gt=0)
    t_max: int = Field(12, ge=1)
    bisect_min_delta: float = Field(0.00625, gt=0)
    seed: Seed = 0


class TrainConfig(Spec):
    """One training or fine-tuning recipe: SGD + Nesterov, label smoothing, a one-cycle or cosine schedule."""

    KIND: ClassVar[str] = "TrainConfig"
    HINTS: ClassVar[dict[str, str]] = {
        "epochs": "use 0 or more epochs", "batch_size": "use a positive batch size",
        "lr": "use a positive learning rate", "momentum": "use a momentum in [0, 1), e.g. 0.9",
        "label_smoothing": "use a value in [0, 1), e.g. 0.1", "schedule": "use 'onecycle' or 'cosine'",
    }

    epochs: int = Field(10, ge=0)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(0.2, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    augment: bool = True
    seed: Seed = 0
    # Compile the fixed-shape step: forward and backward through torch.compile, on CUDA as CUDA graphs
    # (mode="reduce-overhead": one graph replay a step instead of a launch per kernel, the bound of small images at
    # batch 256) with a fused optimizer. Off until a GPU measurement shows it faster at the same accuracy
    # (BENCHMARKS.md); on a CPU it compiles with inductor, which first costs tens of seconds.
    capture: bool = False


def finetune_defaults(epochs: int = 5, **overrides: Any) -> TrainConfig:
    """The fine-tune recipe: the training recipe with a tenth of the peak learning rate and cosine decay."""
    return TrainConfig.from_dict({"epochs": epochs, "lr": 0.02, "schedule": "cosine", **overrides})


@dataclass(frozen=True)
class PruneTarget:
    """What pruning needs to know about the base model besides its weights. (Here, with no torch import, so a Ray
    process that only passes it on, such as a controller step's trial, never imports torch.)"""

    input_shape: tuple[int, int, int]
    num_classes: int
    importance: str = "l2"
    round_to: Optional[int] = None


__all__ = ["MethodConfig", "PruneTarget", "Spec", "TrainConfig", "finetune_defaults", "spec_error"]
