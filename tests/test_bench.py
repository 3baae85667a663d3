"""geoprune bench's parts on tiny sizes: each figure is computed from real runs and agrees with itself.
(Speed targets are measured by the bench itself, never asserted here.)"""

import json

import pytest
import torch
import yaml

from conftest import PIPELINE_METHOD
from geoprune_ray.app.cli import main
from geoprune_ray.bench import markdown
from geoprune_ray.bench.core import data_path, probe_parts, training_throughput
from geoprune_ray.bench.pool import cpu_share, pool_speedup

CPU = torch.device("cpu")


def test_training_throughput_and_data_path():
    t = training_throughput("resnet18", 0.125, 16, 2, CPU, classes=10, size=16)
    assert t["plain_img_s"] > 0 and t["project_img_s"] > 0
    assert t["ratio"] == pytest.approx(t["project_img_s"] / t["plain_img_s"])
    assert t["project_tflops"] == pytest.approx(6 * t["macs"] * t["project_img_s"] / 1e12)
    d = data_path(16, 2, CPU, width=0.125, classes=10, size=16)
    assert 0 < d["loader_share"] < 1  # the loader alone is faster than a training step that includes it


def test_probe_parts_add_up():
    p = probe_parts("resnet18", 0.125, CPU, calib_per_class=4, size=16)
    assert p["calibration_images"] == 40
    assert p["probe_s"] == pytest.approx(p["copy_and_prune_s"] + p["recalibrate_s"] + p["features_and_delta_g_s"])
    assert "gpu_memory_gib" not in p


def test_pool_agrees_with_sequential_probes(ray_cluster):
    r = pool_speedup(width=0.125, probes=4, calib_per_class=4, size=16, repeats=1)
    assert r["max_abs_delta_g_diff"] < 1e-5  # the same ΔG from the actors as in one process
    assert len(r["pids"]) == 2
    assert 0 < r["cpus_per_actor"] <= 1.0 and cpu_share(8) <= 0.25  # a whole CPU each where it fits, else a share
    assert r["speedup"] == pytest.approx(r["sequential_s"] / r["pool_s"])
    assert r["process_ceiling"] == pytest.approx(r["sequential_s"] / r["processes_s"])
    assert "machine's ceiling" in markdown({"quick": True, "ray_startup_s": 1.0, "pool": r, "core": {
        "device_name": "cpu", "threads": 2, "training": [], "data_path": data_path(16, 2, CPU, width=0.125, classes=10,
                                                                                   size=16),
        "probe": probe_parts("resnet18", 0.125, CPU, calib_per_class=4, size=16)}})


def test_bench_job_runs_a_job_with_the_arms_off(ray_cluster, digits_weights, tmp_path, capsys):
    job = {"name": "bench-job", "model": {"name": "convnet", "width": 0.5, "weights": str(digits_weights)},
           "data": {"name": "digits"},
           "protocol": {"finetune_epochs": 1, "batch_size": 64, "lr": 0.1, "arms": ["adaptive", "uniform"]},
           "resources": {"probe_actors": 2, "cpus_per_worker": 1.0}, "method": PIPELINE_METHOD}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["bench", "--job", str(path), "--output", str(tmp_path / "out")]) == 0  # two pairs, by default
    result = json.loads((tmp_path / "out" / "bench.json").read_text())
    pl = result["pipeline"]
    assert pl["job"]["protocol"]["arms"] == ["adaptive"]  # the comparison arms are off for this measure
    t = pl["timings_s"]
    assert pl["search_s"] == pytest.approx(t["probes"] + t["sensitivity"] + t["step_trials"])
    assert pl["search_overhead"] == pytest.approx(pl["search_s"] / t["finetune_trials"])
    assert 0.2 < pl["peak_pss_gib"] < 24  # driver + the session's Ray processes, sampled from /proc
    out = capsys.readouterr().out
    assert "search overhead" in out and "peak memory" in out
    # The same spec in one process decides the same (one protocol), and the overhead is the ratio of the two walls.
    local = result["in_process"]
    assert (local["tau"], local["r_star"]) == pytest.approx((pl["tau"], pl["r_star"]), abs=1e-5)
    # Each side twice (Ray, one process, one process, Ray): the overhead is the ratio of the mean walls.
    pairs = result["pairs"]
    assert len(pairs) == 2 and local["wall_s"] == pairs[0]["in_process_wall_s"]
    assert result["ray_wall_s"] == pytest.approx((pairs[0]["ray_wall_s"] + pairs[1]["ray_wall_s"]) / 2)
    assert result["distribution_overhead"] == pytest.approx(result["ray_wall_s"] / result["in_process_wall_s"])
    assert f"**{result['distribution_overhead']:.2f}×**" in out
    assert f"| … pair 2 (one process first): Ray / one process (s) | {pairs[1]['ray_wall_s']:.1f} / " in out
    assert result["all_arms"]["job"]["protocol"]["arms"] == ["adaptive", "uniform"]  # then every arm, memory sampled
    pieces = result["ray_pieces"]  # the gap's Ray pieces, each alone
    assert 0 < pieces["tune_experiment"]["to_trial_s"] <= pieces["tune_experiment"]["tune_s"]
    assert pieces["train_launch"]["launch_s"] > 0 and pieces["cold_actor_s"] > 0
    assert "| alone: one Tune experiment of one empty trial (s)" in out
    assert 0 < pl["macs_ratio"] < 1 and f"| pruned model's MACs kept (its MACs reduction) | {pl['macs_ratio']:.3f}" in out
    rows = pl["speed"]["rows"]
    assert [r["batch"] for r in rows] == [1, 256]
    for r in rows:  # the speed-up beside the MACs reduction it is compared with
        assert f"| … batch {r['batch']} speed-up as a fraction of the MACs reduction | " \
               f"{r['speedup'] * pl['macs_ratio']:.2f} |" in out
