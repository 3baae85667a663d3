"""Inference speed as deployed (core.speed, core.deploy): every model against the base, its passes taking turns."""

import pytest
import torch

from geoprune_ray.core.deploy import MIN_REPEATS, headline, not_measured, slow_reason
from geoprune_ray.core.models import build_model
from geoprune_ray.core.pruning import aligned_macs, macs_params, prune_copy
from geoprune_ray.core.speed import _median_times, cpu_threads, deploy_speed

SHAPE = (3, 8, 8)


def test_passes_take_turns_after_warm_up():
    calls: list[str] = []
    runners = [lambda: calls.append("base"), lambda: calls.append("pruned")]
    times = _median_times(runners, torch.device("cpu"), min_repeats=20, budget_s=0.0)
    assert [len(t) for t in times] == [20, 20]
    assert calls == ["base"] * 2 + ["pruned"] * 2 + ["base", "pruned"] * 20  # 2 warm-up passes each, then turns


def test_a_cpu_target_times_every_model_on_each_engine_thread_count_and_batch():
    torch.manual_seed(0)
    base = build_model("convnet", 10, width=0.5).eval()
    pruned, _ = prune_copy(base, 0.5, SHAPE, 10, round_to=8)
    macs = {"base": macs_params(base, SHAPE)[0], "adaptive": macs_params(pruned, SHAPE)[0]}
    record = deploy_speed(base, {"adaptive": pruned}, SHAPE, "cpu", cpus=2, macs=macs, budget_s=0.0)
    assert record["measured"] and record["deploy"] == "cpu" and record["precision"] == "fp32"
    assert record["threads"] == [1, 2] == list(cpu_threads(2)) and cpu_threads(1) == (1,)
    keys = {(r["model"], r["engine"], r["threads"], r["batch"]) for r in record["rows"]}
    assert keys == {(m, e, t, b) for m in ("base", "adaptive") for e in ("eager", "onnxruntime") for t in (1, 2)
                    for b in (1, 64, 256)}
    for r in record["rows"]:
        assert r["repeats"] >= MIN_REPEATS and r["latency_ms"] > 0
        assert r["throughput"] == pytest.approx(r["batch"] / (r["latency_ms"] / 1e3))
        if r["model"] == "base":
            assert r["speedup"] == 1.0 and r["macs_reduction"] == 1.0 == r["aligned_macs_reduction"]
        else:
            assert r["macs_reduction"] == pytest.approx(macs["base"] / macs["adaptive"]) and r["macs_reduction"] > 1
            assert r["speedup_per_macs"] == pytest.approx(r["speedup"] / r["macs_reduction"])
            assert r["aligned_macs_reduction"] == aligned_macs(base, SHAPE, 8) / aligned_macs(pruned, SHAPE, 8)
    top = headline(record, "adaptive")  # the arms table's figures: eager (the first engine), 2 threads
    assert top["speed_batch"] == 256 and top["latency_ms"] == next(
        r["latency_ms"] for r in record["rows"]
        if (r["model"], r["engine"], r["threads"], r["batch"]) == ("adaptive", "eager", 2, 1))


def test_a_gpu_target_without_a_gpu_is_not_measured_here():
    record = deploy_speed(torch.nn.Linear(4, 2), {}, (4,), "cuda-bf16", device="cpu")
    assert record == not_measured("cuda-bf16")
    assert not record["measured"] and record["rows"] == [] and "not measured here" in record["reason"]
    assert record["precision"] == "bf16" and headline(record, "adaptive") == {}


def test_aligned_macs_pad_every_channel_count_but_the_inputs_to_a_multiple():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.Conv2d(5, 12, 1),
                                torch.nn.Conv2d(12, 12, 3, padding=1, groups=12), torch.nn.Flatten(),
                                torch.nn.Linear(12 * 16, 10))
    shape = (3, 4, 4)  # 16 positions
    assert aligned_macs(model, shape, 1) == 16 * (5 * 3 * 9 + 12 * 5 + 12 * 9) + 10 * 192
    # padded to 8s: 5 -> 8 out, 3 in kept (the image's); 12 -> 16; the depthwise conv pads its channels only
    assert aligned_macs(model, shape, 8) == 16 * (8 * 3 * 9 + 16 * 8 + 16 * 9) + 16 * 192
    assert model.training  # left as it was


def test_a_speed_up_far_below_the_macs_reduction_says_why():
    row = {"model": "adaptive", "batch": 256, "latency_ms": 5.0, "speedup": 1.1, "speedup_per_macs": 0.55}
    assert "memory traffic" in slow_reason(row)
    assert "latency-bound at batch 1" in slow_reason({**row, "batch": 1})
    assert "overhead-bound" in slow_reason({**row, "latency_ms": 0.1})
    assert slow_reason({**row, "macs_reduction": 2.0, "aligned_macs_reduction": 1.9}).startswith("the time saved")
    padded = slow_reason({**row, "macs_reduction": 2.0, "aligned_macs_reduction": 1.1})
    assert padded == ("channel counts off multiples of 8 (in groups too small to round): padded to 8s, as the "
                      "hardware computes them, the MACs fall 1.10×, not 2.00×")
    slower = {**row, "speedup": 0.9, "speedup_per_macs": 0.85, "macs_reduction": 1.06, "aligned_macs_reduction": 1.0}
    assert "the MACs fall 1.00×, not 1.06×" in slow_reason(slower)  # a pruned model slower than the base says why
    assert slow_reason({**slower, "macs_reduction": 1.0, "speedup_per_macs": 0.9}) is None  # unpruned: noise
    assert slow_reason({**row, "speedup_per_macs": 0.9}) is None and slow_reason({**row, "model": "base"}) is None


def test_a_model_onnx_cannot_export_is_timed_in_eager_only_and_says_why(monkeypatch):
    from geoprune_ray.core import speed

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::made_up")

    monkeypatch.setattr(speed, "_export_onnx", refuse)
    torch.manual_seed(0)
    base = build_model("convnet", 10, width=0.25).eval()
    record = deploy_speed(base, {}, SHAPE, "cpu", cpus=1, budget_s=0.0)
    assert {r["engine"] for r in record["rows"]} == {"eager"}
    assert record["skipped"] == {"onnxruntime": "export failed: unsupported operator aten::made_up"}
    from geoprune_ray.app.report import speed_section

    assert "- onnxruntime not timed: export failed: unsupported operator aten::made_up." in speed_section(record, 1.0)
