"""Job and batch specs: YAML → typed specs, validated once at this boundary, before Ray starts.

A file is read with ``yaml.safe_load``, so no constructor runs: a tag (``!!python/object:...``) is refused with a
message saying that tags are not allowed, not as a syntax error. An empty file, or one of comments only, is refused
rather than run as the default job. ``distributed/job.py`` and ``distributed/batch.py`` validate the content.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ..distributed.job import JobSpec
from ..errors import GeopruneError


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
