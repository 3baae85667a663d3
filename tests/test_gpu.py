"""GPU correctness (skipped without CUDA; bench/device_check.sh runs these on the lent GPU machine):
the method's numbers on a GPU agree with the CPU's, training uses the fast path, actors share a GPU."""

import copy

import pytest
import torch

from geoprune_ray.core.config import MethodConfig, TrainConfig
from geoprune_ray.core.geometry import Calibration, GeometryMeter
from geoprune_ray.core.method import PruneTarget, measure
from geoprune_ray.core.models import build_model
from geoprune_ray.core.train import _optimizer, _scheduler, evaluate, train, train_step
from geoprune_ray.bench.core import synthetic_set

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _setup(size=32, per_class=20):
    data = synthetic_set(10 * per_class * 4, 10, (3, size, size))
    cfg = MethodConfig(calib_per_class=per_class, bn_batches=4, bn_batch_size=64)
    torch.manual_seed(0)
    return build_model("resnet18", 10, 3, 0.25), data, Calibration.from_dataset(data, cfg), PruneTarget((3, size, size), 10)


def test_delta_g_on_gpu_matches_cpu():
    model, _, calibration, target = _setup()
    results = {}
    for device in ("cpu", "cuda"):
        meter = GeometryMeter(calibration.to(device))
        base = copy.deepcopy(model).to(device)
        meter.set_reference(base)
        results[device] = [measure(base, meter, r, target).delta_g for r in (0.1, 0.3, 0.5)]
    # fp32 on both (the method never autocasts its measurements); TF32 convs may differ slightly
    assert results["cuda"] == pytest.approx(results["cpu"], rel=0.05, abs=2e-3)
    assert results["cuda"][0] < results["cuda"][2]


def test_training_on_gpu_learns_and_keeps_fp32_weights():
    model, data, _, _ = _setup(per_class=40)
    before = evaluate(copy.deepcopy(model), data, "cuda")["loss"]
    trained = copy.deepcopy(model)
    train(trained, data, TrainConfig(epochs=3, batch_size=64, lr=0.1), "cuda")
    assert all(p.dtype == torch.float32 for p in trained.parameters())  # bf16 only inside autocast
    assert evaluate(trained, data, "cuda")["loss"] < before


def test_a_training_step_never_waits_on_the_host():
    """Issue 12: no host-device synchronisation inside a training step (augmentation draws on the device, normalize
    keeps its mean/std there). CUDA's sync-debug mode turns any synchronising call into an error."""
    model, data, _, _ = _setup(per_class=40)
    device = torch.device("cuda")
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.1)
    train(model, data, cfg, device)  # warm-up: cuDNN's choices, the lazy init of autocast and the optimizer
    opt, gen = _optimizer(model, cfg), torch.Generator(device=device).manual_seed(0)
    sched = _scheduler(opt, cfg, 100)
    images, labels = data.images[:64].to(device), data.labels[:64].to(device)
    model.train()
    train_step(model, opt, sched, images, labels, data, cfg, gen, device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, hits = train_step(model, opt, sched, images, labels, data, cfg, gen, device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loss.device.type == "cuda" and float(loss) > 0 and 0 <= int(hits) <= 64


def test_four_probe_actors_share_one_gpu(ray_cluster):
    from geoprune_ray.distributed.probes import PoolSpec, ProbePool

    if ray_cluster.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the session's Ray cluster has no GPU")
    model, _, calibration, target = _setup()
    pool = ProbePool(model, calibration, target, True, PoolSpec(4, 0.25, 0.25), run_id="gputest")
    try:
        records = pool.map("measure", [(r,) for r in (0.1, 0.2, 0.3, 0.4)])
    finally:
        pool.shutdown()
    assert {r["device"] for r in records} == {"cuda"} and len({r["pid"] for r in records}) == 4
    meter = GeometryMeter(calibration.to("cuda"))
    base = copy.deepcopy(model).to("cuda")
    meter.set_reference(base)
    local = [measure(base, meter, r, target).delta_g for r in (0.1, 0.2, 0.3, 0.4)]
    assert [r["delta_g"] for r in records] == pytest.approx(local, rel=1e-4, abs=1e-6)


def test_step_capture_on_gpu_trains_alike():
    """Step capture (CUDA graphs through torch.compile's reduce-overhead mode, a fused optimizer) learns as the eager
    step does on the same data; BENCHMARKS.md holds its speed (``geoprune bench``'s ``capture_img_s``)."""
    model, data, _, _ = _setup(per_class=40)
    results = {}
    for capture in (False, True):
        trained = copy.deepcopy(model)
        history = train(trained, data, TrainConfig(epochs=3, batch_size=64, lr=0.1, capture=capture), "cuda")
        results[capture] = (history[-1]["loss"], evaluate(trained, data, "cuda")["top1"])
    assert results[True][0] == pytest.approx(results[False][0], rel=0.05)  # bf16 autocast on both
    assert abs(results[True][1] - results[False][1]) < 5


def test_a_cuda_bf16_target_times_every_precision_with_cuda_events():
    """issue 15: bf16 and fp16 with channels_last and fp32 beside them, batches 1, 256 and the largest of 4096/1024
    that fits; every figure a median of at least 20 passes."""
    from geoprune_ray.core.pruning import macs_params, prune_copy
    from geoprune_ray.core.speed import deploy_speed

    torch.manual_seed(0)
    shape = (3, 32, 32)
    base = build_model("resnet18", 10, 3, 0.25).eval()
    pruned, _ = prune_copy(base, 0.3, shape, 10, round_to=16)
    macs = {"base": macs_params(base, shape)[0], "adaptive": macs_params(pruned, shape)[0]}
    record = deploy_speed(base, {"adaptive": pruned}, shape, "cuda-bf16", macs=macs, budget_s=0.0)
    assert record["measured"] and record["device"].startswith("cuda") and record["precision"] == "bf16"
    assert {r["precision"] for r in record["rows"]} == {"bf16", "fp16", "fp32"}
    for precision in ("bf16", "fp16", "fp32"):
        batches = sorted({r["batch"] for r in record["rows"] if r["precision"] == precision})
        assert batches[:2] == [1, 256] and batches[2] in (1024, 4096) and len(batches) == 3
    assert all(r["repeats"] >= 20 and r["engine"] == "eager" for r in record["rows"])
