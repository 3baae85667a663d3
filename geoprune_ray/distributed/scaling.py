"""How a Ray Train run is scaled. Kept apart from ``training`` (which imports torch), so that a process that only
passes a ``Scaling`` on, such as a controller step's Tune trial, never imports torch."""

from __future__ import annotations

from dataclasses import dataclass


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
