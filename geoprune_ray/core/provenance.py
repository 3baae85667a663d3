"""Provenance: what a run's ``summary.json`` records of the software and machine that produced it.

``provenance(device)`` gives the summary's schema version, the versions of geoprune-ray, torch, torch-pruning and Ray,
the git commit of the package's checkout (None outside one), the Python version and the hardware (device, platform,
CPU count, GPU name).
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import torch

from .protocol import SCHEMA_VERSION


def package_version(pkg: str) -> Optional[str]:
    """An installed distribution's version (None if it is not installed)."""
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> Optional[str]:
    """The commit checked out where the package's code lies (None outside a git checkout, or without git)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(device: torch.device) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "package": package_version("geoprune-ray"), "torch": torch.__version__,
        "torch_pruning": package_version("torch-pruning"), "ray": package_version("ray"), "git_commit": git_commit(),
        "python": platform.python_version(),
        "hardware": {"device": str(device), "platform": platform.platform(), "cpus": os.cpu_count(),
                     "gpu": torch.cuda.get_device_name(device)
                     if device.type == "cuda" and torch.cuda.is_available() else None},
    }
