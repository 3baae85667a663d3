import json
import subprocess
import sys

import pytest
import torch

from geoprune_ray.app.cli import main
from geoprune_ray.core.artifact import load_pruned

# METHOD.md §8: params and MACs at 32×32, 100 classes.
PAPER = {"resnet18": (11.22e6, 557e6), "resnet50": (23.71e6, 1.308e9), "mobilenet_v2": (2.35e6, 26.17e6)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_inspect_matches_the_paper_table(name, capsys):
    assert main(["inspect", name, "--num-classes", "100", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    params, macs = PAPER[name]
    assert abs(report["params"] / params - 1) < 0.005
    assert abs(report["macs"] / macs - 1) < 0.005
    assert report["input_shape"] == [3, 32, 32]
    assert report["groups"] and all(g["name"] and g["channels"] > 0 for g in report["groups"])


def _run(*args):
    return subprocess.run([sys.executable, "-m", "geoprune_ray.app.cli", *args], capture_output=True, text=True,
                          timeout=300)


# In real processes (exit status and stderr as a shell sees them); tests/test_bad_input.py walks the full table.
@pytest.mark.parametrize("args,needle", [
    (["inspect", "resnet7"], "unknown model"),
    (["prune", "--model", "convnet", "--dataset", "mnist9", "--out", "OUT"], "unknown dataset"),
    (["prune", "--model", "convnet", "--dataset", "digits", "--out", "OUT", "--set", "r_max=1.2"], "outside (0, 1)"),
    (["run", "BADKEY"], "did you mean 'protocol'"),
    (["run", "GPUJOB", "--storage", "OUT"], "has no GPU"),
    (["bench", "--job", "jobs/quickstart.yaml", "--pairs", "0", "--output", "OUT"], "--pairs 0 must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, needle, tmp_path):
    (tmp_path / "bad.yaml").write_text("name: x\nprotocl: {}\n")
    (tmp_path / "gpu.yaml").write_text("name: x\ndata: {name: digits}\nresources: {use_gpu: true}\n")
    names = {"OUT": tmp_path / "out", "BADKEY": tmp_path / "bad.yaml", "GPUJOB": tmp_path / "gpu.yaml"}
    args = [str(names.get(a, a)) for a in args]
    done = _run(*args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()  # no half-written artifact


def test_prune_command_writes_summary_and_model(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["-q", "prune", "--model", "convnet", "--width", "0.5", "--dataset", "digits", "--out", str(out),
                 "--epochs", "6", "--finetune-epochs", "2", "--batch-size", "64", "--device", "cpu",
                 "--set", "probes=6", "--set", "calib_per_class=40", "--set", "bn_batches=3"])
    assert code == 0
    assert "r* =" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["method"]["probes"] == 6 and len(summary["probes"]) == 6
    assert summary["provenance"]["torch"] == torch.__version__
    model, card = load_pruned(out / "model")
    assert card.arch == "convnet" and card.input_shape == (3, 8, 8)
    assert model(torch.zeros(1, *card.input_shape)).shape == (1, 10)
    assert main(["prune", "--model", "convnet", "--dataset", "digits", "--out", str(out)]) == 2  # not empty
