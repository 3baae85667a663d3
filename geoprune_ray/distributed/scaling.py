"""What a Ray Train run is given: how it is scaled and, for a fine-tune, its arm. Kept apart from ``training``
(which imports torch), so that a process that only passes them on never imports torch: a controller step's Tune
trial, and Ray Train's controller, which unpickles the training loop's config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..core.config import PruneTarget


@dataclass(frozen=True)
class Scaling:
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads: int = 0  # torch threads per worker; 0: the whole CPUs it holds (at least one)

    @property
    def torch_threads(self) -> int:
        return self.threads or max(1, int(self.cpus_per_worker))


@dataclass(frozen=True)
class ArmJob:
    """What a fine-tune worker needs besides the base weights and the data: the arm's pruning and the
    calibration set, to measure ΔG before and after fine-tuning where the model already is. Without ``ratios`` the
    worker waits for its arm's plan on the run's progress board (``board``, ``arm``) once it has loaded everything."""

    ratios: Any  # per-group dict, or one float; None: from the board
    calibration_ref: Any  # ObjectRef of the Calibration
    target: PruneTarget
    bn_recalibration: bool = True
    board: Optional[str] = None  # the name of the run's progress board, which carries the plans
    arm: Optional[str] = None
    reference_ref: Any = None  # ObjectRef of the base's Reference (G₀ measured once), adopted on its kind of device
