"""`geoprune batch`: two architectures as concurrent pipelines on one Ray cluster, one combined table."""

import json

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import PIPELINE_METHOD
from geoprune_ray.app.cli import main
from geoprune_ray.core.config import TrainConfig
from geoprune_ray.core.models import build_model
from geoprune_ray.core.train import train


@pytest.fixture(scope="module")
def resnet_weights(digits, tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=0.125)
    train(model, digits[0], TrainConfig(epochs=4, batch_size=64, lr=0.1), "cpu")
    path = tmp_path_factory.mktemp("weights") / "resnet18_digits.pt"
    torch.save(model.state_dict(), path)
    return path


def test_batch_runs_two_architectures_concurrently(ray_cluster, digits_weights, resnet_weights, tmp_path, capsys):
    batch = {"name": "two-archs",
             "defaults": {"data": {"name": "digits"}, "method": PIPELINE_METHOD,
                          "protocol": {"finetune_epochs": 1, "batch_size": 64, "lr": 0.1, "arms": ["adaptive"]},
                          "resources": {"probe_actors": 1, "cpus_per_actor": 0.25, "cpus_per_worker": 0.5}},
             "jobs": [{"name": "convnet", "model": {"name": "convnet", "width": 0.5, "weights": str(digits_weights)}},
                      {"name": "resnet18", "model": {"name": "resnet18", "width": 0.125, "input_size": 8,
                                                     "weights": str(resnet_weights)}}]}  # trained at 8×8
    (tmp_path / "batch.yaml").write_text(yaml.safe_dump(batch))
    storage = tmp_path / "runs"
    assert main(["batch", str(tmp_path / "batch.yaml"), "--storage", str(storage)]) == 0
    out = capsys.readouterr().out
    assert "[convnet]" in out and "[resnet18]" in out  # each pipeline's progress, prefixed

    record = json.loads((storage / "batch.json").read_text())
    assert {n: j["exit_code"] for n, j in record["jobs"].items()} == {"convnet": 0, "resnet18": 0}
    spans = {}
    for name, job in record["jobs"].items():
        stages = job["stages"]
        assert {"probes", "sensitivity", "controller", "arms", "finetune", "artifacts"} <= set(stages)
        spans[name] = [(s["started"], s["finished"]) for s in stages.values()]
    overlapping = [(a, b) for a in spans["convnet"] for b in spans["resnet18"] if max(a[0], b[0]) < min(a[1], b[1])]
    assert overlapping, spans  # the two pipelines ran at the same time, not one after the other

    rows = pq.read_table(storage / "batch.parquet").to_pylist()
    assert sorted((r["run"], r["arch"]) for r in rows) == [("convnet", "convnet"), ("resnet18", "resnet18")]
    for r in rows:
        summary = json.loads((storage / r["run"] / "summary.json").read_text())
        assert r["top1"] == summary["pruned"]["top1"] and r["macs_ratio"] < 1
        # both are real, trained models: the baseline well trained, the pruned one far above chance (10 %) after
        # its single fine-tune epoch (how far it recovers depends on the CPU's kernels: 91 % and 77 % seen)
        assert summary["baseline"]["top1"] > 80 and r["top1"] > 50
    table = (storage / "batch.md").read_text()
    assert "| convnet | convnet | digits | Adaptive GC |" in table and "| resnet18 | resnet18 |" in table
    assert (storage / "plots" / "batch.png").stat().st_size > 0
    assert (storage / "convnet" / "report.md").exists() and (storage / "resnet18" / "report.md").exists()

    # --only runs some of the batch's jobs (one seed per sitting): the finished convnet run is resumed, nothing else
    resnet_summary = (storage / "resnet18" / "summary.json").read_bytes()
    assert main(["batch", str(tmp_path / "batch.yaml"), "--storage", str(storage), "--only", "convnet"]) == 0
    assert set(json.loads((storage / "batch.json").read_text())["jobs"]) == {"convnet"}
    assert (storage / "resnet18" / "summary.json").read_bytes() == resnet_summary  # left as it was


def test_batch_only_names_jobs_of_the_batch(tmp_path, capsys):
    (tmp_path / "batch.yaml").write_text(yaml.safe_dump({"name": "b", "jobs": [{"name": "seed-0"}, {"name": "seed-1"}]}))
    code = main(["batch", str(tmp_path / "batch.yaml"), "--storage", str(tmp_path / "runs"), "--only", "seed-2"])
    err = capsys.readouterr().err
    assert code == 2 and "--only seed-2: no job 'seed-2' in the batch" in err and "seed-0, seed-1" in err
    assert not (tmp_path / "runs").exists()
