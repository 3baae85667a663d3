"""cluster.yaml: valid for Ray's cluster launcher, and the properties the deployment relies on.

The validation is the one `ray up` runs before touching the cloud (ray.autoscaler._private.commands.
_bootstrap_config): `prepare_config` (merge with the provider's defaults.yaml, docker checks,
per-type min/max workers) then `validate_config` (ray-schema.json plus the cross-field checks).
The provider steps that follow in `ray up` (instance-type lookup, IAM/key/security-group
bootstrap) need AWS and are not run here: nothing in this file uses the network or credentials.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
AUTH = re.compile(r"\bRAY_AUTH_MODE=token\b")


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def _validate(config: dict) -> None:
    validate_config(prepare_config(copy.deepcopy(config)))


def pinned_ray_version() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    rays = [Requirement(dep) for dep in project["dependencies"] if Requirement(dep).name == "ray"]
    assert len(rays) == 1, "pyproject.toml must list ray exactly once"
    specs = list(rays[0].specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"ray must be pinned with ==, got {rays[0]}"
    return specs[0].version


def test_ray_validates_the_config(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("mutate, error", [
    (lambda c: c.update(not_a_ray_key=1), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["ray.worker.gpu"].update(gpus=1), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["ray.worker.gpu"]["resources"].update(GPU=0.5),
     jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="no.such.type"), ValueError),
], ids=["unknown-top-level-key", "unknown-node-type-key", "fractional-resource", "unknown-head-type"])
def test_the_validator_rejects_broken_copies(raw, mutate, error):
    broken = copy.deepcopy(raw)
    mutate(broken)
    with pytest.raises(error):
        _validate(broken)


def test_head_runs_no_trials(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0


def test_an_autoscaled_gpu_worker_type(prepared):
    workers = {name: t for name, t in prepared["available_node_types"].items()
               if name != prepared["head_node_type"] and t["resources"].get("GPU", 0) > 0}
    assert workers, "no worker type declares GPUs"
    for name, t in workers.items():
        assert t["min_workers"] == 0, name
        assert t["max_workers"] > 0, name
        assert t["resources"].get("CPU", 0) > 0, name
    assert prepared["max_workers"] > 0


def test_docker_image_pins_the_ray_version(prepared):
    pinned = pinned_ray_version()
    assert pinned == ray.__version__, f"pyproject pins ray=={pinned}, installed {ray.__version__}"
    docker = prepared["docker"]
    repo, _, tag = docker["image"].partition(":")
    assert repo == "rayproject/ray"
    assert tag.split("-")[0] == pinned, f"image tag {tag!r} is not Ray {pinned}"
    assert "gpu" in tag.split("-") or any(p.startswith("cu") for p in tag.split("-")), tag
    for key in ("head_image", "worker_image"):
        assert key not in docker, f"{key} would override the pinned image"
    assert docker["container_name"]
    assert docker["pull_before_run"] is True


def test_setup_installs_this_project(prepared):
    mounts = prepared["file_mounts"]
    remote = next(r for r, local in mounts.items() if local == ".")
    for cmds in (prepared["head_setup_commands"], prepared["worker_setup_commands"]):
        assert any(re.search(rf"pip install (-e )?{re.escape(remote)}\b", c) for c in cmds), cmds


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_token_authentication_is_on(prepared, key):
    starts = [c for c in prepared[key] if "ray start" in c]
    assert len(starts) == 1, starts
    auth = AUTH.search(starts[0])
    assert auth and auth.start() < starts[0].index("ray start"), starts[0]
    assert not any("RAY_AUTH_MODE=disabled" in c for c in prepared[key])
    # every node needs the token file that `ray start` reads (~/.ray/auth_token)
    assert prepared["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_dashboard_is_not_published(prepared):
    (head_start,) = [c for c in prepared["head_start_ray_commands"] if "ray start" in c]
    host = re.search(r"--dashboard-host[= ](\S+)", head_start)
    assert host is None or host.group(1) in ("127.0.0.1", "localhost"), head_start
    assert "security_group" not in prepared["provider"], "the default group opens only SSH"
