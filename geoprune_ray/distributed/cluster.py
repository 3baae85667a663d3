"""Which Ray this driver runs on: join a cluster at its GCS address, or start an embedded local Ray (and stop it
again); the address checked in seconds before anything waits on it; the size an embedded Ray would have.

``connect`` records whether this driver is the only one on its Ray (an embedded one): ``sole_driver()``, which the
pipeline asks before it launches fine-tunes beside the search.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Optional

import ray
import torch

from ..errors import GeopruneError
from .guard import SIGNALS, mark_embedded_cluster
from .launch import NO_AUTOSCALER_ENV

log = logging.getLogger("geoprune_ray")

_SOLE_DRIVER = [False]  # this driver runs on a Ray of its own (no address): no other run competes for its CPUs
_EMBEDDED = [False]  # this process started the Ray it uses (``connect``): ``disconnect`` stops it


def sole_driver() -> bool:
    """Whether this driver started the Ray it runs on (no address): no other run competes for its CPUs."""
    return _SOLE_DRIVER[0]


def connect(address: Optional[str] = None) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``), else start an embedded local Ray."""
    address = address or os.environ.get("RAY_ADDRESS")
    _SOLE_DRIVER[0] = not address
    if address:
        check_gcs_address(address)
    if ray.is_initialized():
        return
    try:
        quiet = {"log_to_driver": False, "logging_level": logging.ERROR}  # progress is ours, one line per event
        if address:
            os.environ.pop(NO_AUTOSCALER_ENV, None)  # a cluster may autoscale (this process may have embedded one)
            ray.init(address=address, **quiet)
        else:
            # One machine, no dashboard: Ray Train's preemption watcher (an actor per launch, waiting for nodes to be
            # drained) and its metrics (exported for a dashboard) have nothing to do, and there is no autoscaler to
            # ask for resources. The workers of an embedded Ray inherit this environment; a user's own setting wins.
            for name in ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_METRICS_ENABLED"):
                os.environ.setdefault(name, "0")
            os.environ[NO_AUTOSCALER_ENV] = "1"
            mark_embedded_cluster()  # its processes carry this driver's token: none outlives it (``guard``)
            ray.init(address="local", include_dashboard=False, **quiet)
            _EMBEDDED[0] = True
        SIGNALS.reassert()  # ray.init sets a SIGTERM handler of its own
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise GeopruneError(f"cannot connect to the Ray cluster at {address or 'local'}: {str(exc).splitlines()[0]}",
                            "check the GCS address (host:6379) and that the cluster is up") from None


def embedded_size() -> tuple[float, float]:
    """The CPUs and GPUs an embedded local Ray gets on this machine (Ray's own count, cgroup limits included)."""
    try:
        from ray._private.utils import get_num_cpus  # Ray is pinned; a move of this helper falls back below
        cpus = float(get_num_cpus())
    except (ImportError, AttributeError):
        cpus = float(os.cpu_count() or 1)
    return cpus, float(torch.cuda.device_count())


def disconnect() -> None:
    """Shut down the Ray that ``connect`` embedded (nothing for a joined cluster, which outlives this driver)."""
    if _EMBEDDED[0] and ray.is_initialized():
        _EMBEDDED[0] = False
        ray.shutdown()


def check_gcs_address(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with one line, on an address that is a URL or that nothing listens on."""
    if address.startswith(("http://", "https://")):
        raise GeopruneError(f"--address {address} is a dashboard URL, not a cluster (GCS) address",
                            "give 'run' host:6379, or use 'geoprune submit --address URL' to submit through the "
                            "Jobs API")
    if address in ("auto", "local") or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise GeopruneError(f"--address {address} is not HOST:PORT", "write e.g. 10.0.0.1:6379, or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise GeopruneError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}",
                            "check that the head is up ('ray start --head') and the port is reachable") from None
