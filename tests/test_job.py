"""Job specs: YAML → JobSpec, validated once, with the bad key named."""

import pytest

from geoprune_ray.app.spec import load_spec
from geoprune_ray.distributed.job import JobSpec
from geoprune_ray.errors import GeopruneError


def test_quickstart_spec_loads_and_decides_nothing_about_tau(tmp_path):
    spec = load_spec("jobs/quickstart.yaml")
    assert spec.model.name == "convnet" and spec.data.name == "fashion-mnist"
    assert spec.protocol.arms == ("adaptive", "baseline", "gc", "uniform")
    assert spec.method == {} and spec.method_config().probes == 16
    assert spec.finetune_config().lr == pytest.approx(spec.protocol.lr / 10)


@pytest.mark.parametrize("data,needle", [
    ({"modle": {}}, "unknown job-spec key 'modle' (did you mean 'model'?)"),
    ({"model": {"widht": 0.5}}, "did you mean 'model.width'?"),
    ({"model": {"width": "wide"}}, "model.width = 'wide' should be of type float"),
    ({"protocol": {"finetune_epochs": 2.5}}, "protocol.finetune_epochs = 2.5 should be of type int"),
    ({"protocol": {"arms": ["adaptive", "magic"]}}, "unknown arm 'magic'"),
    ({"protocol": {"arms": ["baseline"]}}, "must include 'adaptive'"),
    ({"protocol": {"baseline_epochs": -1}}, "negative"),
    ({"resources": {"probe_actors": 0}}, "at least 1"),
    ({"method": {"betta": 2}}, "unknown MethodConfig keys: betta"),
    ({"method": {"r_max": 1.5}}, "outside (0, 1)"),
    ({"data": "digits"}, "data must be a mapping"),
])
def test_bad_specs_name_the_key(data, needle):
    with pytest.raises(GeopruneError) as err:
        JobSpec.from_dict(data)
    assert needle in str(err.value)


def test_yaml_errors(tmp_path):
    with pytest.raises(GeopruneError, match="does not exist"):
        load_spec(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: [convnet\n")
    with pytest.raises(GeopruneError, match="not valid YAML at line"):
        load_spec(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(GeopruneError, match="must be a mapping"):
        load_spec(listing)


def test_every_shipped_job_file_loads():
    from pathlib import Path

    from geoprune_ray.distributed.batch import load_batch

    files = sorted(Path("jobs").glob("*.yaml"))
    assert {f.name for f in files} >= {"quickstart.yaml", "fashion_resnet18.yaml", "paper_cifar100.yaml",
                                       "cifar10_resnet18.yaml"}
    for f in files:
        text = f.read_text()
        assert text.startswith("#")  # documented in place
        if f.name.startswith("evidence_"):  # one job per seed, every arm, the probes' accuracy measured
            batch = load_batch(f)
            assert sorted(j.seed for j in batch.jobs) == [0, 1, 2]
            assert all(j.protocol.probe_accuracy and set(j.protocol.arms) == {"adaptive", "baseline", "gc", "uniform"}
                       and j.method == {} for j in batch.jobs)
        elif "\njobs:" in text:
            batch = load_batch(f)
            assert [j.model.name for j in batch.jobs] == ["resnet50", "resnet18", "mobilenet_v2"]
            assert all(j.protocol.baseline_epochs == 40 and j.protocol.finetune_epochs == 20 for j in batch.jobs)
        else:
            spec = load_spec(f)
            assert spec.method == {}  # the method decides τ, r and the ratios
