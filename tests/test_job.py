"""Job specs: YAML → JobSpec, validated once (before Ray starts), with the bad key's full path named."""

import json
import math

import pytest

from geoprune_ray.core.spec import load_spec
from geoprune_ray.core.config import MethodConfig, TrainConfig
from geoprune_ray.core.spec import JobSpec
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
    ({"method": {"betta": 2}}, "unknown job-spec key 'method.betta' (did you mean 'method.beta'?)"),
    ({"method": {"r_max": 1.5}}, "outside (0, 1)"),
    ({"data": "digits"}, "data must be a mapping"),
    ({"method": ["beta"]}, "method must be a mapping, not list"),
    # types: nothing is converted but an int to a float
    ({"protocol": {"batch_size": "big"}}, "protocol.batch_size = 'big' should be of type int"),
    ({"protocol": {"lr": True}}, "protocol.lr = True should be of type float"),
    ({"protocol": {"arms": ["adaptive", 3]}}, "protocol.arms[1] = 3 should be of type str"),
    ({"resources": {"use_gpu": "yes"}}, "resources.use_gpu = 'yes' should be of type bool"),
    ({"method": {"probes": 8.0}}, "method.probes = 8.0 should be of type int"),
    # ranges, NaN and ±inf, checked before Ray starts, with the key's path
    ({"protocol": {"lr": math.nan}}, "protocol.lr = nan is not a finite number"),
    ({"protocol": {"lr": math.inf}}, "protocol.lr = inf is not a finite number"),
    ({"protocol": {"lr": 0}}, "protocol.lr = 0 must be positive"),
    ({"protocol": {"batch_size": 0}}, "protocol.batch_size = 0 must be at least 1"),
    ({"model": {"width": 0.0}}, "model.width = 0.0 must be positive"),
    ({"model": {"input_size": 0}}, "model.input_size = 0 must be at least 1"),
    ({"resources": {"workers": 0}}, "resources.workers = 0 must be at least 1"),
    ({"resources": {"cpus_per_actor": 0}}, "resources.cpus_per_actor = 0 must be positive"),
    ({"resources": {"cpus_per_worker": -1}}, "resources.cpus_per_worker = -1 must be positive"),
    ({"resources": {"gpus_per_actor": -0.25}}, "resources.gpus_per_actor = -0.25 is negative"),
    ({"resources": {"gpus_per_worker": math.inf}}, "resources.gpus_per_worker = inf is not a finite number"),
    ({"resources": {"sensitivity_tasks": 0}}, "resources.sensitivity_tasks = 0 must be at least 1"),
    ({"resources": {"wait_for_gpu_s": -5}}, "resources.wait_for_gpu_s = -5 is negative"),
    ({"seed": -1}, "seed = -1 is outside [0, 4294967296)"),
    ({"method": {"beta": -1}}, "method.beta = -1 must be positive"),
    ({"method": {"probes": 1}}, "method.probes = 1 must be at least 2"),
    ({"method": {"r0_default": 0}}, "method.r0_default = 0 is outside (0, 1)"),
    ({"method": {"epsilon": -math.inf}}, "method.epsilon = -inf is not a finite number"),
    ({"method": {"importance": "l3"}}, "method.importance: unknown value 'l3' (use one of l2, l1"),
    ({"method": {"controller": "pid"}}, "method.controller: unknown value 'pid' (use 'paper' or 'bisect')"),
])
def test_bad_specs_name_the_key(data, needle):
    with pytest.raises(GeopruneError) as err:
        JobSpec.from_dict(data)
    assert needle in str(err.value)


@pytest.mark.parametrize("kwargs,needle", [
    ({"epochs": -1}, "epochs = -1 is negative"),
    ({"batch_size": 0}, "batch_size = 0 must be at least 1"),
    ({"lr": math.nan}, "lr = nan is not a finite number"),
    ({"momentum": 1.0}, "momentum = 1.0 is outside [0, 1)"),
    ({"weight_decay": -1e-4}, "weight_decay = -0.0001 is negative"),
    ({"label_smoothing": 1}, "label_smoothing = 1 is outside [0, 1)"),
    ({"schedule": "step"}, "schedule: unknown value 'step'"),
    ({"augment": 1}, "augment = 1 should be of type bool"),
])
def test_train_config_ranges(kwargs, needle):
    """Built directly, as cli.py does, a bad recipe is one GeopruneError too (not pydantic's ValidationError)."""
    with pytest.raises(GeopruneError) as err:
        TrainConfig(**kwargs)
    assert needle in str(err.value)


def test_the_recipes_of_a_valid_spec_are_valid():
    spec = JobSpec.from_dict({"protocol": {"lr": 1e-300, "batch_size": 1, "baseline_epochs": 0, "finetune_epochs": 0}})
    assert spec.baseline_config().lr == 1e-300 and spec.finetune_config().lr == pytest.approx(1e-301)
    with pytest.raises(GeopruneError, match="protocol: the fine-tune recipe's lr = 0.0 must be positive"):
        JobSpec.from_dict({"protocol": {"lr": 5e-324}})  # its tenth rounds to 0


def test_set_overrides_name_the_closest_method_key():
    """``geoprune prune --set`` goes through MethodConfig.from_dict: the same formatter, without the 'method.'."""
    with pytest.raises(GeopruneError) as err:
        MethodConfig.from_dict({"betta": 2})
    assert str(err.value) == "unknown method key 'betta' (did you mean 'beta'?)"
    assert MethodConfig.from_dict({"beta": 2, "controller": "bisect"}).beta == 2.0


def test_to_dict_keeps_the_shape_that_state_json_holds():
    """A resumed run compares ``spec.to_dict()`` (through JSON) with the stored one: the shape may not change."""
    spec = JobSpec.from_dict({"method": {"beta": 2}})
    assert spec.to_dict() == {
        "name": "geoprune",
        "model": {"name": "convnet", "width": 1.0, "weights": None, "input_size": None},
        "data": {"name": "fashion-mnist", "data_dir": None, "download": False},
        "protocol": {"baseline_epochs": 5, "finetune_epochs": 3, "batch_size": 256, "lr": 0.2,
                     "arms": ("adaptive", "baseline", "gc", "uniform"), "finetune_all": False,
                     "probe_accuracy": False, "step_capture": False, "speed": True, "compressions": (),
                     "baseline_seed": None},
        "resources": {"probe_actors": 2, "cpus_per_actor": 0.25, "gpus_per_actor": None, "workers": 1,
                      "cpus_per_worker": 1.0, "gpus_per_worker": None, "use_gpu": None, "sensitivity_tasks": None,
                      "wait_for_gpu_s": 0.0},
        "method": {"beta": 2},
        "deploy": "cpu",
        "seed": 0,
    }
    stored = json.loads(json.dumps(spec.to_dict()))
    assert JobSpec.from_dict(stored) == spec and json.loads(json.dumps(JobSpec.from_dict(stored).to_dict())) == stored
    assert spec.method_config().beta == 2.0 and spec.method == {"beta": 2}  # recorded as given
    with pytest.raises(ValueError, match="frozen"):
        spec.protocol.lr = 0.1


@pytest.mark.parametrize("resources,cpus,gpus,needle", [
    ({"probe_actors": 64, "cpus_per_actor": 1}, 2, 0,
     "resources.probe_actors * resources.cpus_per_actor = 64 * 1 = 64 CPUs, but this machine's embedded Ray has 2 CPUs "
     "(use probe_actors * cpus_per_actor <= 2, or --address a larger cluster)"),
    ({"workers": 2, "cpus_per_worker": 1.5}, 2, 0, "resources.workers * resources.cpus_per_worker = 2 * 1.5 = 3 CPUs"),
    ({"use_gpu": True}, 2, 0, "resources.use_gpu is true but this machine's embedded Ray has no GPU"),
    ({"use_gpu": True, "wait_for_gpu_s": 60}, 2, 0, "has no GPU"),  # an embedded cluster gets none by waiting
    ({"probe_actors": 4, "gpus_per_actor": 0.5}, 8, 1, "= 2 GPUs, but this machine's embedded Ray has 1 GPU"),
    ({"workers": 2, "gpus_per_worker": 1}, 8, 1, "resources.workers * resources.gpus_per_worker = 2 * 1 = 2 GPUs"),
])
def test_check_placeable_refuses_what_a_local_cluster_never_places(resources, cpus, gpus, needle):
    spec = JobSpec.from_dict({"resources": resources})
    with pytest.raises(GeopruneError) as err:
        spec.check_placeable(cpus, gpus)
    assert needle in str(err.value)


@pytest.mark.parametrize("resources,cpus,gpus", [
    ({}, 2, 0),  # the defaults fit a 2-CPU machine
    ({"probe_actors": 8, "cpus_per_actor": 0.25, "cpus_per_worker": 2}, 2, 0),  # exactly full
    ({"probe_actors": 4, "gpus_per_actor": 0.5}, 8, 0),  # GPU shares are not used without GPUs
    ({"probe_actors": 4, "gpus_per_actor": 0.5, "use_gpu": False}, 8, 1),
    ({"probe_actors": 16}, 4, 1),  # unset GPU shares are sized to the GPUs by gpu_shares
    ({"probe_actors": 2, "gpus_per_actor": 1.0, "workers": 1, "gpus_per_worker": 2}, 8, 2),  # whole GPUs
])
def test_check_placeable_accepts_what_fits(resources, cpus, gpus):
    JobSpec.from_dict({"resources": resources}).check_placeable(cpus, gpus)


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
    for text in ("", "# only a comment\n\n", "~\n"):  # not the default job
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        with pytest.raises(GeopruneError, match="job spec .*empty.yaml is empty"):
            load_spec(empty)
    tagged = tmp_path / "tagged.yaml"
    marker = tmp_path / "ran"
    tagged.write_text(f"name: x\nmodel: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(GeopruneError) as err:
        load_spec(tagged)
    assert "uses the YAML tag !!python/object/apply:os.system at line 2: tags are not allowed" in str(err.value)
    assert "indentation" not in str(err.value) and not marker.exists()


def test_every_shipped_job_file_loads():
    from pathlib import Path

    from geoprune_ray.core.spec import load_batch

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
            if f.name in ("evidence_allocations.yaml", "evidence_fashion_gpu.yaml"):  # issue 16's sweep
                assert all(j.protocol.compressions == (2, 3, 4) for j in batch.jobs)
        elif f.name == "rstar_baselines.yaml":  # one method seed on three baselines, two more seeds
            batch = load_batch(f)
            assert [(j.seed, j.baseline_seed()) for j in batch.jobs] == [(0, 0), (0, 1), (0, 2), (1, 1), (2, 2)]
            assert all(j.protocol.arms == ("adaptive",) and j.method == {} for j in batch.jobs)
        elif "\njobs:" in text:
            batch = load_batch(f)
            assert [j.model.name for j in batch.jobs] == ["resnet50", "resnet18", "mobilenet_v2"]
            assert all(j.protocol.baseline_epochs == 40 and j.protocol.finetune_epochs == 20 for j in batch.jobs)
        else:
            spec = load_spec(f)
            assert spec.method == {}  # the method decides τ, r and the ratios


def test_deploy_sets_the_channel_rounding_unless_the_method_sets_it():
    """issue 15: kept channels are rounded for where the model will run (METHOD.md §5); ``round_to: 1`` turns it off."""
    assert JobSpec.from_dict({"name": "j"}).deploy == "cpu"
    assert JobSpec.from_dict({"name": "j"}).method_config().round_to == 8
    for deploy in ("cuda", "cuda-bf16"):
        assert JobSpec.from_dict({"name": "j", "deploy": deploy}).method_config().round_to == 16
    assert JobSpec.from_dict({"name": "j", "deploy": "cuda", "method": {"round_to": 4}}).method_config().round_to == 4
    assert JobSpec.from_dict({"name": "j", "method": {"round_to": 1}}).method_config().round_to == 1
    with pytest.raises(GeopruneError) as err:
        JobSpec.from_dict({"name": "j", "deploy": "tpu"})
    assert "deploy" in str(err.value) and "cpu, cuda, cuda-bf16" in str(err.value)


def test_the_baseline_seed_defaults_to_the_jobs_and_moves_only_the_baseline():
    spec = JobSpec.from_dict({"seed": 3})
    assert spec.baseline_seed() == 3 == spec.baseline_config().seed == spec.method_config().seed
    other = JobSpec.from_dict({"seed": 3, "protocol": {"baseline_seed": 7}})
    assert other.baseline_seed() == 7 == other.baseline_config().seed
    assert other.method_config() == spec.method_config() and other.finetune_config() == spec.finetune_config()
    with pytest.raises(GeopruneError, match="protocol.baseline_seed"):
        JobSpec.from_dict({"protocol": {"baseline_seed": -1}})
