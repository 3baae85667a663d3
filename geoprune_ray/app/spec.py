"""The CLI's spec loaders; the specs and their YAML reading live in ``core.spec`` (kept here for one release)."""

from ..core.spec import load_batch, load_spec, read_yaml

__all__ = ["load_batch", "load_spec", "read_yaml"]
