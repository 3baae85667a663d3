"""The pruned-model artifact: ``ModelCard`` and the on-disk format of a pruned model's folder.

A folder written by ``save_pruned`` holds ``model.pt`` (the ``state_dict``, torch-pruning's pruning history and the
card: tensors and plain data only) and ``model.json`` (the card again, with MACs and params). ``load_pruned`` reads
``model.pt`` with ``torch.load(..., weights_only=True)`` (no pickle of arbitrary objects), rebuilds the architecture
from the card, replays the history (``pruning.replay_pruning``) and loads the weights; ``read_history`` gives the
history alone. The folder is written through ``RunDir.write_folder``: all of it or nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..errors import GeopruneError
from .models import build_model
from .pruning import macs_params, plain_history, replay_pruning
from .rundir import RunDir

ARTIFACT_FORMAT = "geoprune-ray/pruned-model"
ARTIFACT_VERSION = 1
MODEL_FILE = "model.pt"  # state_dict + pruning history + card, read with weights_only=True
META_FILE = "model.json"  # the card, MACs and params, for people and tools


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
        "pruning_history": plain_history(history),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    macs, params = macs_params(model, card.input_shape)
    meta = {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "card": card.to_dict(),
            "macs": macs, "params": params, "pruned_groups": len(history), **dict(extra or {})}
    def write(staging: Path) -> None:
        torch.save(payload, staging / MODEL_FILE)
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    RunDir(str(path.parent)).write_folder(path.name, write)
    return path


def load_pruned(path: str | Path, map_location: str | torch.device = "cpu",
                base_model: Optional[nn.Module] = None) -> tuple[nn.Module, ModelCard]:
    """Rebuild the exact pruned model from ``save_pruned``'s folder (or its ``model.pt``).

    The architecture is rebuilt from the saved card, or taken from ``base_model`` (an unpruned
    instance of the same architecture) for models that were passed in as objects.
    """
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
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


def read_history(folder: str | Path) -> list:
    """The pruning history stored in ``save_pruned``'s folder."""
    payload = torch.load(Path(folder) / MODEL_FILE, map_location="cpu", weights_only=True)
    return payload["pruning_history"]
