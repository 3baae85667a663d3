"""Job and batch specs: YAML → typed specs, validated once at this boundary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..distributed.job import JobSpec
from ..errors import GeopruneError


def read_yaml(path: str | Path, kind: str = "job spec", example: str = "jobs/quickstart.yaml") -> Any:
    """A YAML file's content, or one clear error naming the file (and the line of a syntax error)."""
    path = Path(path)
    if not path.is_file():
        raise GeopruneError(f"{kind} {path} does not exist", f"pass a YAML file such as {example}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise GeopruneError(f"{kind} {path} is not valid YAML{where}", "check indentation and colons") from None


def load_spec(path: str | Path) -> JobSpec:
    return JobSpec.from_dict(read_yaml(path) or {})
