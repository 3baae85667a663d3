"""A table of bad inputs walked through the CLI: each gives exit code 2, one line naming the problem
(no traceback), and leaves no partial artifact in the storage folder."""

import errno
import pickle

import pytest
import torch
import yaml

from conftest import assert_refused
from geoprune_ray.app.cli import main
from geoprune_ray.core.models import build_model
from geoprune_ray.core.rundir import RunDir

GOOD = {"name": "bad-input", "model": {"name": "convnet", "width": 0.5}, "data": {"name": "digits"},
        "protocol": {"baseline_epochs": 0, "finetune_epochs": 1}}


def _with(**changes):
    job = yaml.safe_load(yaml.safe_dump(GOOD))
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = job
        for p in parents:
            node = node.setdefault(p, {})
        node[key] = value
    return job


# (name, argv with placeholders, job spec or file content, expected words)
CASES = [
    ("unknown command", ["frobnicate"], None, ["invalid choice"]),
    ("job spec missing", ["run", "{tmp}/absent.yaml", "--storage", "{out}"], None, ["does not exist"]),
    ("job spec not YAML", ["run", "{job}", "--storage", "{out}"], "name: [x\nmodel: {", ["not valid YAML", "line"]),
    ("job spec not a mapping", ["run", "{job}", "--storage", "{out}"], "- a\n- b\n", ["must be a mapping"]),
    ("unknown top-level key", ["run", "{job}", "--storage", "{out}"], {**GOOD, "modle": {}},
     ["unknown job-spec key 'modle'", "did you mean 'model'"]),
    ("unknown nested key", ["run", "{job}", "--storage", "{out}"], _with(protocol__finetune_epoch=2),
     ["protocol.finetune_epoch", "did you mean 'protocol.finetune_epochs'"]),
    ("wrong type", ["run", "{job}", "--storage", "{out}"], _with(protocol__batch_size="big"),
     ["protocol.batch_size", "should be of type int"]),
    ("negative epochs", ["run", "{job}", "--storage", "{out}"], _with(protocol__finetune_epochs=-1),
     ["protocol.finetune_epochs", "negative"]),
    ("unknown arm", ["run", "{job}", "--storage", "{out}"], _with(protocol__arms=["adaptive", "magic"]),
     ["unknown arm 'magic'"]),
    ("arms without adaptive", ["run", "{job}", "--storage", "{out}"], _with(protocol__arms=["baseline"]),
     ["must include 'adaptive'"]),
    ("no probe actors", ["run", "{job}", "--storage", "{out}"], _with(resources__probe_actors=0), ["at least 1"]),
    ("unknown method override", ["run", "{job}", "--storage", "{out}"], _with(method={"tau": 0.1}), ["unknown", "tau"]),
    ("override out of range", ["run", "{job}", "--storage", "{out}"], _with(method={"r_max": 1.5}), ["r_max", "outside"]),
    ("unknown model", ["run", "{job}", "--storage", "{out}"], _with(model__name="resnet7"), ["unknown model 'resnet7'"]),
    ("non-positive width", ["run", "{job}", "--storage", "{out}"], _with(model__width=0.0), ["width", "positive"]),
    ("unknown dataset", ["run", "{job}", "--storage", "{out}"], _with(data__name="mnist9"), ["unknown dataset 'mnist9'"]),
    ("missing data folder", ["run", "{job}", "--storage", "{out}"],
     _with(data__name="fashion-mnist", data__data_dir="/no/such/dir"), ["/no/such/dir", "does not exist"]),
    ("weights file missing", ["run", "{job}", "--storage", "{out}"], _with(model__weights="/no/weights.pt"),
     ["/no/weights.pt", "does not exist"]),
    ("checkpoint does not fit", ["run", "{job}", "--storage", "{out}"], _with(model__weights="{wrong_weights}"),
     ["does not match the model", "missing keys"]),
    ("checkpoint is a pickle", ["run", "{job}", "--storage", "{out}"], _with(model__weights="{pickle}"),
     ["safely"]),
    ("use_gpu with no GPU", ["run", "{job}", "--storage", "{out}"], _with(resources__use_gpu=True), ["no GPU"]),
    ("storage parent is a file", ["run", "{job}", "--storage", "{tmp}/a_file/run"], GOOD, ["is a file"]),
    ("dashboard URL given to run", ["run", "{job}", "--storage", "{out}", "--address", "http://127.0.0.1:8265"], GOOD,
     ["dashboard URL", "submit"]),
    ("unreachable cluster", ["run", "{job}", "--storage", "{out}", "--address", "127.0.0.1:1"], GOOD,
     ["cannot reach the Ray cluster at 127.0.0.1:1"]),
    ("malformed cluster address", ["run", "{job}", "--storage", "{out}", "--address", "head-node"], GOOD,
     ["not HOST:PORT"]),
    ("unreachable dashboard", ["submit", "{job}", "--address", "http://127.0.0.1:1", "--storage", "{out}"], GOOD,
     ["cannot reach the Ray dashboard at http://127.0.0.1:1"]),
    ("GCS address given to submit", ["submit", "{job}", "--address", "127.0.0.1:6379", "--storage", "{out}"], GOOD,
     ["dashboard URL"]),
    ("resume a folder that is not a run", ["resume", "{tmp}"], None, ["not a geoprune run directory"]),
    ("report a folder that is not a run", ["report", "{tmp}"], None, ["not a finished geoprune run"]),
    ("export a folder that is not a run", ["export", "{tmp}", "--format", "onnx"], None, ["holds no pruned model"]),
    ("evidence of a folder without runs", ["evidence", "{tmp}"], None, ["holds no evidence JSON"]),
    ("evidence of a missing folder", ["evidence", "{tmp}/absent"], None, ["does not exist"]),
    ("unknown export format", ["export", "{tmp}", "--format", "tflite"], None, ["invalid choice", "tflite"]),
    ("batch with repeated names", ["batch", "{job}", "--storage", "{out}"],
     {"name": "b", "defaults": GOOD, "jobs": [{"name": "a"}, {"name": "a"}]}, ["names repeat"]),
    ("batch job with a bad key", ["batch", "{job}", "--storage", "{out}"],
     {"name": "b", "defaults": GOOD, "jobs": [{"name": "a", "protocol": {"epochs": 1}}]}, ["batch job 'a'", "protocol.epochs"]),
    ("malformed --set", ["prune", "--model", "convnet", "--dataset", "digits", "--out", "{out}", "--set", "probes"], None,
     ["not KEY=VALUE"]),
    # refused by validation before Ray starts, naming the key's full path
    ("empty job file", ["run", "{job}", "--storage", "{out}"], "", ["job spec", "is empty"]),
    ("job file of comments only", ["run", "{job}", "--storage", "{out}"], "# name: x\n\n# model: {}\n",
     ["is empty"]),
    ("YAML tag", ["run", "{job}", "--storage", "{out}"], '!!python/object/apply:os.system ["echo hi"]\n',
     ["!!python/object/apply:os.system", "tags are not allowed"]),
    ("method beta negative", ["run", "{job}", "--storage", "{out}"], _with(method={"beta": -1}),
     ["method.beta", "must be positive"]),
    ("method with one probe", ["run", "{job}", "--storage", "{out}"], _with(method={"probes": 1}),
     ["method.probes", "at least 2"]),
    ("method r0_default 0", ["run", "{job}", "--storage", "{out}"], _with(method={"r0_default": 0}),
     ["method.r0_default", "outside (0, 1)"]),
    ("protocol.lr NaN", ["run", "{job}", "--storage", "{out}"], _with(protocol__lr=float("nan")),
     ["protocol.lr", "not a finite number"]),
    ("protocol.batch_size 0", ["run", "{job}", "--storage", "{out}"], _with(protocol__batch_size=0),
     ["protocol.batch_size", "at least 1"]),
    ("cpus_per_actor 0", ["run", "{job}", "--storage", "{out}"], _with(resources__cpus_per_actor=0),
     ["resources.cpus_per_actor", "must be positive"]),
    ("batch job with a bad method value", ["batch", "{job}", "--storage", "{out}"],
     {"name": "b", "defaults": GOOD, "jobs": [{"name": "a", "method": {"beta": -1}}]},
     ["batch job 'a': method.beta = -1 must be positive"]),
    ("empty batch file", ["batch", "{job}", "--storage", "{out}"], "", ["batch spec", "is empty"]),
    ("--set out of range", ["prune", "--model", "convnet", "--dataset", "digits", "--out", "{out}", "--set", "beta=-1"],
     None, ["beta = -1", "must be positive"]),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    torch.save(build_model("resnet18", 10, 3, 0.25).state_dict(), d / "wrong.pt")
    (d / "pickle.pt").write_bytes(pickle.dumps({"payload": RunDir}))  # an arbitrary object, not tensors
    return d


@pytest.mark.parametrize("name,argv,content,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, argv, content, words, files, tmp_path, capsys, ray_cluster):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    subs = {"tmp": tmp_path, "out": out, "job": job, "wrong_weights": files / "wrong.pt", "pickle": files / "pickle.pt"}
    if isinstance(content, str):
        job.write_text(content)
    elif content is not None:
        job.write_text(yaml.safe_dump(content).replace("'{wrong_weights}'", str(subs["wrong_weights"]))
                       .replace("'{pickle}'", str(subs["pickle"])))
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main([a.format(**subs) for a in argv])
    assert_refused(code, capsys.readouterr().err, words)
    assert not out.exists()  # no partial artifact
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_full_disk_leaves_no_half_written_file(full_run, monkeypatch, capsys):
    """ENOSPC in the middle of writing the report: exit 2, one line, no report.md and no temporary file."""
    storage, _ = full_run
    (storage / "report.md").unlink()
    before = {p for p in storage.rglob("*")}
    real = RunDir._write_stream

    def fill_up(self, path, data):
        real(self, path, data[: len(data) // 2])  # half the bytes land, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(RunDir, "_write_stream", fill_up)
    code = main(["report", str(storage)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "No space left on device" in err, err
    assert {p for p in storage.rglob("*")} == before  # no report.md, no temporary file

    monkeypatch.undo()
    assert main(["report", str(storage)]) == 0 and (storage / "report.md").exists()


def test_an_internal_fault_exits_1_and_points_to_debug(monkeypatch, capsys, tmp_path):
    import geoprune_ray.app.cli as cli

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "cmd_inspect", broken)
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _patched(parser(), broken))
    assert main(["inspect", "convnet"]) == 1
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError: a bug" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "inspect", "convnet"])


def _patched(parser, func):
    for action in parser._subparsers._group_actions:
        action.choices["inspect"].set_defaults(func=func)
    return parser
