"""The package's layers (issue 14): every import points down, errors → core → distributed (Ray) → app (CLI, submit,
report, evidence, export) and bench. Read from the source with ``ast``: nothing is executed. (``report``, ``evidence``
and ``export`` at the top are the old names of app's modules, kept for one release.)"""

import ast
import subprocess
import sys
from pathlib import Path

import geoprune_ray

ROOT = Path(geoprune_ray.__file__).parent
LAYERS = {"errors": 0, "core": 1, "distributed": 2, "app": 3, "report": 3, "evidence": 3, "export": 3, "bench": 3}
# Upward imports still to remove (issue 14). An entry that no longer exists fails too, so this list only shrinks.
KNOWN: set[tuple[str, str]] = set()


def _layer(module: str):
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 and parts[0] == "geoprune_ray" else None


def _imports(path: Path, module: str):
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                yield ".".join(base + ([node.module] if node.module else []))
            else:
                yield node.module or ""


def upward_imports() -> set[tuple[str, str]]:
    found = set()
    for path in sorted(ROOT.rglob("*.py")):
        module = ".".join(("geoprune_ray", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        mine = _layer(module)
        for target in _imports(path, module):
            theirs = _layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                found.add((module, ".".join(target.split(".")[:2])))
    return found


def test_every_import_points_down():
    found = upward_imports()
    assert found - KNOWN == set(), "imports that run up a layer"
    assert KNOWN - found == set(), "fixed: remove them from KNOWN"


def test_the_walker_sees_an_upward_import(tmp_path, monkeypatch):
    """The check can fail: a core module that imports the CLI is caught."""
    fake = tmp_path / "geoprune_ray"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "bad.py").write_text("from ..app import cli\nimport geoprune_ray.distributed.pipeline\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    assert upward_imports() == {("geoprune_ray.core.bad", "geoprune_ray.app"),
                                ("geoprune_ray.core.bad", "geoprune_ray.distributed")}


def test_loading_a_job_spec_imports_no_ray():
    code = ("import sys, geoprune_ray.app.spec, geoprune_ray.core.spec; "
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))[:5]")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr.splitlines()[-1:]


def test_moved_modules_keep_their_old_names():
    """report, evidence and export moved under app (issue 14): the old names are the same modules for one release."""
    import importlib

    for name in ("report", "evidence", "export"):
        assert importlib.import_module(f"geoprune_ray.{name}") is importlib.import_module(f"geoprune_ray.app.{name}")


def test_nothing_below_the_app_runs_it_by_name():
    """No import, and no command line either: a module below app that started ``geoprune_ray.app.cli`` in a child
    process (as the batch once did) depends on the app as surely as one that imports it."""
    named = [str(p.relative_to(ROOT)) for layer in ("core", "distributed") for p in sorted((ROOT / layer).rglob("*.py"))
             if "geoprune_ray.app" in p.read_text()]
    assert named == []
