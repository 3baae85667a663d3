"""geoprune bench's parts on tiny sizes. Real runs check what only a run shows (both loops train, the pool's ΔG is one
process's, a job's comparison arms are off); every figure derived from timings or MACs is checked with those inputs
injected as known numbers, so that its value is known by construction. (Speed targets are measured by the bench
itself, never asserted here.)"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from conftest import PIPELINE_METHOD
from geoprune_ray.app.cli import main
from geoprune_ray.bench import core as bench_core, markdown, pipeline as bench_pipeline, pool as bench_pool
from geoprune_ray.bench.core import data_path, probe_parts, training_throughput
from geoprune_ray.bench.pool import cpu_share, pool_speedup, process_ceiling
from geoprune_ray.core.method import probe_ratios

CPU = torch.device("cpu")
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


class _Clock:
    """Stands in for a bench module's ``time``: ``perf_counter`` returns the given readings in turn."""

    def __init__(self, *readings: float):
        self._readings = iter(readings)

    def perf_counter(self) -> float:
        return next(self._readings)


def test_training_throughput_runs_both_loops():
    t = training_throughput("resnet18", 0.125, 16, 2, CPU, classes=10, size=16)
    assert t["plain_img_s"] > 0 and t["project_img_s"] > 0 and t["macs"] > 0
    assert "capture_img_s" not in t  # step capture only when asked for


def test_training_figures_from_known_timings_and_macs(monkeypatch):
    # 768 inputs × 10 outputs, no bias: 7,680 MACs a forward pass
    monkeypatch.setattr(bench_core, "build_model", lambda *args: nn.Sequential(nn.Flatten(), nn.Linear(768, 10, False)))
    monkeypatch.setattr(bench_core, "plain_loop", lambda *args: 100.0)
    monkeypatch.setattr(bench_core, "project_loop", lambda *args, capture=False: 150.0 if capture else 50.0)
    t = training_throughput("any", 1.0, 16, 2, CPU, classes=10, size=16, capture=True)
    assert t["macs"] == 7680
    assert t["ratio"] == pytest.approx(0.5) and t["capture_over_plain"] == pytest.approx(1.5)
    # 6 FLOPs a MAC for a trained image (2 forward, 4 backward): 7,680 × 6 × 50 img/s = 2.304 MFLOP/s
    assert t["project_tflops"] == pytest.approx(2.304e-6) and t["plain_tflops"] == pytest.approx(4.608e-6)


def test_data_path_share_from_known_timings(monkeypatch):
    monkeypatch.setattr(bench_core, "time", _Clock(0.0, 2.0))  # the loader's 32 images (2 batches of 16) take 2 s
    monkeypatch.setattr(bench_core, "project_loop", lambda *args: 4.0)  # a whole step: 4 img/s
    d = data_path(16, 2, CPU, width=0.125, classes=10, size=16)
    assert d["loader_img_s"] == pytest.approx(16.0)
    assert d["loader_share"] == pytest.approx(0.25)  # a step takes 4× as long as loading its images


def test_probe_parts_from_a_clock_that_ticks_once_a_reading(monkeypatch):
    monkeypatch.setattr(bench_core, "time", _Clock(*range(8)))  # every timed part: 1 s
    p = probe_parts("resnet18", 0.125, CPU, calib_per_class=4, size=16)
    assert p["calibration_images"] == 40  # 4 a class, 10 classes
    assert p["copy_s"] == p["copy_and_prune_s"] == p["recalibrate_s"] == p["features_and_delta_g_s"] == 1
    assert p["probe_s"] == 3  # three stages; the copy alone is inside copy + prune, not counted again
    assert "gpu_memory_gib" not in p


def test_pool_agrees_with_sequential_probes(ray_cluster, monkeypatch):
    monkeypatch.setattr(bench_pool, "time", _Clock(0.0, 4.0, 10.0, 12.0))  # sequential probes 4 s, the pool's 2 s
    monkeypatch.setattr(bench_pool, "process_ceiling", lambda *args: 1.0)  # the plain processes' 1 s
    r = pool_speedup(width=0.125, probes=4, calib_per_class=4, size=16, repeats=1)
    assert r["max_abs_delta_g_diff"] < 1e-5  # the same ΔG from the actors as in one process
    assert len(r["pids"]) == 2
    assert 0 < r["cpus_per_actor"] <= 1.0 and cpu_share(8) <= 0.25  # a whole CPU each where it fits, else a share
    assert r["speedup"] == pytest.approx(2.0)
    assert r["process_ceiling"] == pytest.approx(4.0) and r["pool_efficiency"] == pytest.approx(0.5)
    assert "machine's ceiling" in markdown({"quick": True, "ray_startup_s": 1.0, "pool": r, "core": {
        "device_name": "cpu", "threads": 2, "training": [], "data_path": data_path(16, 2, CPU, width=0.125, classes=10,
                                                                                   size=16),
        "probe": probe_parts("resnet18", 0.125, CPU, calib_per_class=4, size=16)}})


def test_process_ceiling_times_the_probes_in_plain_processes():
    assert process_ceiling(("resnet18", 0.125, 4, 10, 16), probe_ratios(4, 0.5, 0), 2) > 0


def _summary(timings: dict) -> dict:
    return {"timings_s": timings, "controller": {"r_star": 0.3}, "tau": 0.01, "baseline": {"top1": 90.0},
            "pruned": {"top1": 89.0, "macs_ratio": 0.5}, "resources": {"actor_gpu_ids": []},
            "provenance": {"hardware": {"device": "cpu"}}}


def test_pipeline_split_search_overhead_from_known_stage_times(monkeypatch):
    monkeypatch.setattr(bench_pipeline, "run_job", lambda *args, **kwargs: _summary(
        {"probes": 2.0, "sensitivity": 1.0, "step_trials": 3.0, "finetune_trials": 12.0}))
    pl = bench_pipeline.pipeline_split(bench_pipeline.reduced_job(True), memory=False)
    assert pl["search_s"] == pytest.approx(6.0) and pl["final_finetune_s"] == pytest.approx(12.0)
    assert pl["search_overhead"] == pytest.approx(0.5)  # a search of 6 s against a fine-tune of 12 s
    assert pl["peak_pss_gib"] is None and pl["train_device"] == "cpu"


def test_job_bench_alternates_the_sides_and_compares_known_walls(monkeypatch):
    job = {"name": "j", "protocol": {"arms": ["adaptive", "uniform"]}}
    ray_walls, local_walls, order = iter([9.0, 11.0, 18.0]), iter([5.0, 6.0]), []

    def ray_run(spec, memory=True):
        order.append(("ray", tuple(spec["protocol"]["arms"]), memory))
        return {"wall_s": next(ray_walls), "peak_pss_gib": 1.5 if memory else None}

    def local_run(spec):
        order.append(("local", tuple(spec["protocol"]["arms"])))
        return {"wall_s": next(local_walls)}

    monkeypatch.setattr(bench_pipeline, "pipeline_split", ray_run)
    monkeypatch.setattr(bench_pipeline, "in_process", local_run)
    monkeypatch.setattr(bench_pipeline, "ray_pieces", lambda: {})
    result = bench_pipeline.job_bench(job, ray_startup_s=1.0, pairs=2)
    adaptive = ("adaptive",)
    assert order == [("ray", adaptive, False), ("local", adaptive), ("local", adaptive), ("ray", adaptive, False),
                     ("ray", ("adaptive", "uniform"), True)]  # each pair reversed; memory sampled on all arms only
    # Ray: 1 s start-up + 9 s, then + 11 s; one process: 5 s, 6 s
    assert [(p["ray_wall_s"], p["in_process_wall_s"]) for p in result["pairs"]] == [(10.0, 5.0), (12.0, 6.0)]
    assert [p["ratio"] for p in result["pairs"]] == pytest.approx([2.0, 2.0])
    assert result["ray_wall_s"] == pytest.approx(11.0) and result["in_process_wall_s"] == pytest.approx(5.5)
    assert result["distribution_overhead"] == pytest.approx(2.0)
    assert result["all_arms_over_adaptive"] == pytest.approx(2.0)  # 18 s against the first adaptive run's 9 s
    assert result["pipeline"]["peak_pss_gib"] == 1.5


def test_markdown_of_a_job_bench_with_known_figures():
    row = {"batch": 1, "base_latency_ms": 3.0, "pruned_latency_ms": 2.0, "base_throughput": 333,
           "pruned_throughput": 500, "speedup": 1.5}
    speed = {"device_name": "H200", "threads": 1, "rows": [row]}
    decided = {"tau": 0.01, "r_star": 0.3, "baseline_top1": 90.0}
    result = {"job": "j.yaml", "ray_startup_s": 1.0, "ray_wall_s": 11.0, "in_process_wall_s": 5.5,
              "distribution_overhead": 2.0, "pairs": [{"ray_wall_s": 11.0, "in_process_wall_s": 5.5, "ratio": 2.0}],
              "in_process": {**decided, "threads": 2, "timings_s": {"baseline": 3.0}},
              "pipeline": {**decided, "wall_s": 10.0, "timings_s": {"probes": 2.0}, "search_overhead": 0.5,
                           "peak_pss_gib": 1.5, "gpu_busy": 0.8, "resources": {"actor_gpu_ids": ["0"]},
                           "train_device": "cuda:0", "macs_ratio": 0.5, "speed": speed}}
    md = markdown(result)
    assert "| **distribution overhead**: Ray / one process | **2.00×** |" in md
    assert "| GPU busy over the run (NVML, 3 s samples) | 80% |" in md
    assert "| where it ran: the probe actors' GPU ids / the adaptive fine-tune's device | 0 / cuda:0 |" in md
    assert "| pruned model's MACs kept (its MACs reduction) | 0.500 (2.00×) |" in md
    # 1.5× faster where half the MACs would allow 2×: three quarters of it
    assert "| … batch 1 speed-up as a fraction of the MACs reduction | 0.75 |" in md
    # A result recorded before the devices were: no such line
    recorded = json.loads((RESULTS / "issue12" / "after_bench_job_quickstart_amd_run40.json").read_text())
    assert "where it ran" not in markdown(recorded)


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
    assert pl["search_s"] > 0 and pl["search_overhead"] > 0  # the figures, from known stage times above
    assert 0.2 < pl["peak_pss_gib"] < 24  # driver + the session's Ray processes, sampled from /proc
    out = capsys.readouterr().out
    assert "search overhead" in out and "peak memory" in out
    # The same spec in one process decides the same (one protocol).
    local = result["in_process"]
    assert (local["tau"], local["r_star"]) == pytest.approx((pl["tau"], pl["r_star"]), abs=1e-5)
    # Each side twice, by default (the order and the overhead: test_job_bench_alternates_the_sides_and_compares_...).
    pairs = result["pairs"]
    assert len(pairs) == 2 and local["wall_s"] == pairs[0]["in_process_wall_s"]
    assert f"**{result['distribution_overhead']:.2f}×**" in out
    assert f"| … pair 2 (one process first): Ray / one process (s) | {pairs[1]['ray_wall_s']:.1f} / " in out
    assert result["all_arms"]["job"]["protocol"]["arms"] == ["adaptive", "uniform"]  # then every arm, memory sampled
    pieces = result["ray_pieces"]  # the gap's Ray pieces, each alone
    assert 0 < pieces["tune_experiment"]["to_trial_s"] <= pieces["tune_experiment"]["tune_s"]
    assert pieces["train_launch"]["launch_s"] > 0 and pieces["cold_actor_s"] > 0
    assert "| alone: one Tune experiment of one empty trial (s)" in out
    assert 0 < pl["macs_ratio"] < 1 and f"| pruned model's MACs kept (its MACs reduction) | {pl['macs_ratio']:.3f}" in out
    rows = [r for r in pl["speed"]["rows"] if r["model"] == "adaptive"]  # timed as deployed, after the fine-tune
    assert {r["batch"] for r in rows} == {1, 64, 256} and {r["engine"] for r in rows} == {"eager", "onnxruntime"}
    for r in rows:  # each timing beside its speed-up as a fraction of the MACs reduction
        assert f"{r['speedup']:.2f}×, {r['speedup_per_macs']:.2f} |" in out
    assert "| accuracy vs latency: Adaptive GC: top-1 (%), MACs (M), latency b1 (ms), speed-up b256 | " in out
    # Where it ran: both sides on the same kind of device (the line's format: test_markdown_of_a_job_bench_...)
    assert pl["train_device"].split(":")[0] == local["device"].split(":")[0]
    assert "| where it ran: the probe actors' GPU ids / the adaptive fine-tune's device | " in out


def test_rounding_checks_read_the_cpu_targets_off_a_speed_record():
    """bench.rounding's targets (issue 15): Adaptive GC ≥ 0.8 of its MACs reduction at batches 64 and 256; no pruned
    arm more than 3% slower than the base. Known rows, known verdicts."""
    from geoprune_ray.bench.rounding import checks

    def row(model, batch, speedup, reduction):
        return {"model": model, "engine": "eager", "threads": 1, "batch": batch, "speedup": speedup,
                "macs_reduction": reduction, "speedup_per_macs": speedup / reduction}

    speed = {"rows": [row("base", 64, 1.0, 1.0), row("adaptive", 1, 1.05, 1.5), row("adaptive", 64, 1.5, 1.5),
                      row("adaptive", 256, 1.25, 1.5), row("baseline", 64, 0.9, 1.0), row("gc", 64, 0.98, 1.2)]}
    c = checks(speed)
    assert c["adaptive_min_fraction"] == pytest.approx(1.25 / 1.5) and c["adaptive_fraction_met"]  # batch 1: no target
    assert c["adaptive_min_fraction_aligned"] is None  # rows from before the padded count
    for r in speed["rows"]:
        r["aligned_macs_reduction"] = 1.25
    assert checks(speed)["adaptive_min_fraction_aligned"] == pytest.approx(1.0)  # 1.25× against 1.25× padded
    assert checks(speed)["adaptive_aligned_reduction"] == 1.25
    assert c["none_slower"] and c["slowest_pruned"]["model"] == "gc"  # 0.98; the baseline arm (0.9) is unpruned
    speed["rows"].append(row("uniform", 1, 0.96, 1.5))  # any batch counts
    c = checks(speed)
    assert not c["none_slower"] and c["slowest_pruned"]["model"] == "uniform"
    speed["rows"][3] = row("adaptive", 256, 1.1, 1.5)
    assert not checks(speed)["adaptive_fraction_met"]
