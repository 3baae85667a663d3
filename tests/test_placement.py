"""GPU placement, shown on this CPU: a Ray started in a subprocess with num_gpus=N hands out GPU ids that do not exist.
The run must fall back to the CPU instead of crashing on CUDA; with four GPUs the probe actors are spread one per GPU
and each arm's fine-tune gets a GPU of its own; with one GPU the baseline trains beside the probe actors starting on
the same GPU."""

import json
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest
import torch

from conftest import pipeline_job

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the fake GPUs would be real ones here")


def _run_with_gpus(job: dict, storage, gpus: int) -> dict:
    script = textwrap.dedent(f"""
        import json, ray
        from geoprune_ray.core.spec import JobSpec
        from geoprune_ray.distributed.pipeline import run_job
        ray.init(address="local", num_cpus=2, num_gpus={gpus}, include_dashboard=False, log_to_driver=False)
        run_job(JobSpec.from_dict(json.loads({json.dumps(json.dumps(job))})), {str(storage)!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((storage / "summary.json").read_text())
    assert summary["resources"]["use_gpu"] and summary["resources"]["cluster"]["GPU"] == gpus
    return summary


def test_four_declared_gpus_without_cuda(digits_weights, tmp_path):
    job = pipeline_job(digits_weights, ["adaptive", "baseline", "gc", "uniform"], "digits-4gpus")
    job["protocol"]["finetune_epochs"] = 1
    job["resources"]["probe_actors"] = 4
    storage = tmp_path / "run"
    _run_with_gpus(job, storage, 4)

    probes = pq.read_table(storage / "probes.parquet").to_pylist()
    assert {p["device"] for p in probes} == {"cpu"}  # Ray gave the actors GPU ids; they ran on the CPU
    assert all(p["gpu_ids"] for p in probes) and len({p["pid"] for p in probes}) == 4
    by_actor = {p["pid"]: p["gpu_ids"] for p in probes}
    assert sorted(g for ids in by_actor.values() for g in ids) == ["0", "1", "2", "3"]  # one actor per GPU, not packed

    finetunes = [t for t in pq.read_table(storage / "trials.parquet").to_pylist() if t["kind"] == "finetune"]
    assert sorted(t["arm"] for t in finetunes) == ["adaptive", "baseline", "gc", "uniform"]
    assert {t["train_device"] for t in finetunes} == {"cpu"}
    gpus = [t["train_gpu_ids"] for t in finetunes]
    assert all(g and "," not in g for g in gpus) and len(set(gpus)) == 4  # one whole GPU each, all different
    # the four trials ran at the same time (each began before any ended; on 2 cores their workers' start-ups
    # queue, and a 1-epoch digits fine-tune takes seconds, so the training itself need not overlap)
    launched, ends = [t["launched"] for t in finetunes], [t["finished"] for t in finetunes]
    assert max(launched) < min(ends)


def test_one_declared_gpu_baseline_beside_the_actors(tmp_path):
    """The probe actors start on the only GPU while the baseline trains: the baseline asks for what they leave of it
    (a whole GPU would never come free while they live, and the run would wait for ever)."""
    job = pipeline_job(None, ["adaptive"], "digits-1gpu")
    del job["model"]["weights"]
    job["protocol"].update(baseline_epochs=1, finetune_epochs=1)
    storage = tmp_path / "run"
    summary = _run_with_gpus(job, storage, 1)
    assert summary["resources"]["gpus_per_actor"] == 0.25 and summary["resources"]["gpus_per_worker"] == 0.5
    state = json.loads((storage / "state.json").read_text())
    assert "baseline" in state["stages"] and state["stages"]["baseline"]["started"] < state["spans"]["actors"]["finished"]
    # the actors started once the baseline's worker had (its launch is not slowed by their start-up), before it ended
    spans = state["spans"]
    assert spans["baseline_launch"]["finished"] <= spans["actors"]["started"] < state["stages"]["baseline"]["finished"]
    probes = pq.read_table(storage / "probes.parquet").to_pylist()
    assert {",".join(p["gpu_ids"]) for p in probes} == {"0"}
    finetune = [t for t in pq.read_table(storage / "trials.parquet").to_pylist() if t["kind"] == "finetune"]
    assert [t["train_gpu_ids"] for t in finetune] == ["0"]
