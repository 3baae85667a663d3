"""A run's shared objects (the base model, the calibration set), handed to probe actors by name.

Probe actors restart after a crash, and Ray cannot promise a restarted actor the object-store
arguments it was created with (ray issue 53727; it logs an error for every such actor). So the
actors take only small values and fetch the driver's object refs from this holder, found by the
run's name: on a restart they fetch them again. The holder itself never restarts, imports no torch
and holds refs, not copies; the driver owns the objects and keeps them alive. Actors that are loading
for the first time are handed the refs in the call (``fetch(run_id, refs)``), so they never wait for
the holder's process to start.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Optional

import ray

if TYPE_CHECKING:
    from torch import nn

    from ..core.geometry import Calibration, Reference


def share(base: "nn.Module", calibration: "Calibration",
          reference: Optional["Reference"] = None) -> dict[str, ray.ObjectRef]:
    """One CPU copy of the base model and of the calibration set in the object store, owned by the caller:
    the probe actors (through the holder) and the sensitivity tasks all read these two; with ``reference``
    (the base's G₀, measured once) also that, which those on its kind of device adopt."""
    shared = {"base": ray.put(copy.deepcopy(base).cpu()), "calibration": ray.put(calibration.to("cpu"))}
    if reference is not None:
        shared["reference"] = ray.put(reference)
    return shared


def actor_name(run_id: str, index: int) -> str:
    """The name of the run's probe actor ``index``."""
    return f"geoprune-{run_id}-probe-{index}"


def holder_name(run_id: str) -> str:
    return f"geoprune-{run_id}-shared"


@ray.remote(num_cpus=0)
class SharedObjects:
    def __init__(self, refs: dict[str, ray.ObjectRef]) -> None:  # nested refs: borrowed, never resolved here
        self.refs = refs

    def get(self) -> dict[str, ray.ObjectRef]:
        return self.refs


def fetch(run_id: str, refs: Optional[dict[str, ray.ObjectRef]] = None) -> dict[str, Any]:
    """The shared objects themselves, in the calling worker: from ``refs`` where the caller was handed them, else
    from the run's holder (a restarted actor)."""
    if refs is None:
        refs = ray.get(ray.get_actor(holder_name(run_id)).get.remote())
    return dict(zip(refs, ray.get(list(refs.values()))))
