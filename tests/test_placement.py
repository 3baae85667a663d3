"""Several GPUs, shown on this CPU: a Ray started in a subprocess with num_gpus=4 hands out GPU ids that do not exist.
The run must fall back to the CPU instead of crashing on CUDA, and each arm's fine-tune must get a GPU of its own."""

import json
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest
import torch

from conftest import pipeline_job

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the fake GPUs would be real ones here")


def test_four_declared_gpus_without_cuda(digits_weights, tmp_path):
    job = pipeline_job(digits_weights, ["adaptive", "baseline", "gc", "uniform"], "digits-4gpus")
    job["protocol"]["finetune_epochs"] = 1
    job["resources"]["probe_actors"] = 4
    storage = tmp_path / "run"
    script = textwrap.dedent(f"""
        import json, ray
        from geoprune_ray.distributed.job import JobSpec
        from geoprune_ray.distributed.pipeline import run_job
        ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
        run_job(JobSpec.from_dict(json.loads({json.dumps(json.dumps(job))})), {str(storage)!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((storage / "summary.json").read_text())
    assert summary["resources"]["use_gpu"] and summary["resources"]["cluster"]["GPU"] == 4

    probes = pq.read_table(storage / "probes.parquet").to_pylist()
    assert {p["device"] for p in probes} == {"cpu"}  # Ray gave the actors GPU ids; they ran on the CPU
    assert all(p["gpu_ids"] for p in probes) and len({p["pid"] for p in probes}) == 4

    finetunes = [t for t in pq.read_table(storage / "trials.parquet").to_pylist() if t["kind"] == "finetune"]
    assert sorted(t["arm"] for t in finetunes) == ["adaptive", "baseline", "gc", "uniform"]
    assert {t["train_device"] for t in finetunes} == {"cpu"}
    gpus = [t["train_gpu_ids"] for t in finetunes]
    assert all(g and "," not in g for g in gpus) and len(set(gpus)) == 4  # one whole GPU each, all different
    starts, ends = [t["started"] for t in finetunes], [t["finished"] for t in finetunes]
    assert max(starts) < min(ends)  # the four fine-tunes ran at the same time
