"""Job specs: YAML → the typed ``JobSpec``, validated once at this boundary."""

from __future__ import annotations

from pathlib import Path

import yaml

from ..distributed.job import JobSpec
from ..errors import GeopruneError


def load_spec(path: str | Path) -> JobSpec:
    path = Path(path)
    if not path.is_file():
        raise GeopruneError(f"job spec {path} does not exist", "pass a YAML file such as jobs/quickstart.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise GeopruneError(f"job spec {path} is not valid YAML{where}", "check indentation and colons") from None
    return JobSpec.from_dict(data or {})
