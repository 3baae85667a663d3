import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from geoprune_ray.core.config import TrainConfig, finetune_defaults
from geoprune_ray.core.data import load_dataset
from geoprune_ray.core.models import build_model
from geoprune_ray.core.pruning import prune_copy
from geoprune_ray.core.train import augment, evaluate, finetune, iterate_batches, train
from geoprune_ray.errors import GeopruneError


def test_augment_translates_and_flips_in_batches():
    gen = torch.Generator().manual_seed(0)
    images = torch.zeros(64, 1, 16, 16, dtype=torch.uint8)
    images[:, :, 6:10, 6:10] = 255  # a centred square: every crop keeps it whole
    out = augment(images, flip=True, gen=gen)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert (out.float().sum(dim=(1, 2, 3)) == 16 * 255).all()
    assert len({tuple(o.nonzero()[0].tolist()) for o in out}) > 4  # different shifts per image
    stripe = torch.zeros(256, 1, 8, 8, dtype=torch.uint8)
    stripe[:, :, :, 0] = 255  # a left stripe moves at most 1 pixel by translation; only a flip sends it right
    assert not (augment(stripe, flip=False, gen=gen)[:, :, :, 7] == 255).any()
    assert (augment(stripe, flip=True, gen=gen)[:, :, :, 7] == 255).any()


def test_shards_are_disjoint_and_equal(digits):
    train_set, _ = digits
    device = torch.device("cpu")
    shards = [torch.cat([y for _, y in iterate_batches(train_set, 100, device, True, 0, rank, 2)]) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(train_set) // 2


def test_training_learns_digits(digits, digits_model):
    _, test_set = digits
    assert evaluate(digits_model, test_set, "cpu")["top1"] > 95


def test_finetune_a_pruned_model_recovers(digits, digits_model):
    train_set, test_set = digits
    pruned, _ = prune_copy(digits_model, 0.6, train_set.shape, 10)
    before = evaluate(pruned, test_set, "cpu")["top1"]
    history = finetune(pruned, train_set, finetune_defaults(epochs=3, batch_size=64), "cpu")
    assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"]
    assert evaluate(pruned, test_set, "cpu")["top1"] > max(before, 90)


def test_image_folder_trains_through_a_dataloader(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls, colour in (("red", 0), ("blue", 2)):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(12):
                pixels = rng.integers(0, 60, (10, 10, 3), dtype=np.uint8)
                pixels[..., colour] = 220
                Image.fromarray(pixels).save(folder / f"{i}.png")
    train_set = load_dataset(f"imagefolder:{tmp_path}", "train").fit(3, 8)
    test_set = load_dataset(f"imagefolder:{tmp_path}", "test").fit(3, 8)
    model = build_model("convnet", 2, width=0.25)
    train(model, train_set, TrainConfig(epochs=4, batch_size=8, lr=0.05), "cpu")
    assert evaluate(model, test_set, "cpu")["top1"] == 100.0


def test_bad_train_config():
    with pytest.raises(GeopruneError, match="schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(GeopruneError, match="unknown TrainConfig key .lrr."):
        TrainConfig.from_dict({"lrr": 0.1})


@pytest.mark.parametrize("n", [64, 128, 256])
def test_a_handful_of_steps_trains_with_a_constant_lr(digits, n):
    """1 to 4 steps in all (a tiny fine-tune set); OneCycleLR divided by zero at exactly 4."""
    data = digits[0].subset(torch.arange(n))
    history = train(build_model("convnet", 10, width=0.25), data, TrainConfig(epochs=1, batch_size=64, lr=0.1), "cpu")
    assert len(history) == 1 and history[0]["loss"] > 0


def test_step_capture_compiles_the_step_and_trains_alike(digits):
    """``TrainConfig.capture`` (off by default): the step runs through torch.compile (on a CPU with inductor; CUDA
    graphs on a GPU, tests/test_gpu.py) and trains as the eager step does. Compiled kernels reorder float sums, so the
    losses agree closely, not bit for bit."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    data = digits[0].subset(torch.arange(256))
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.1)
    histories = []
    for capture in (False, True):
        torch.manual_seed(0)
        model = build_model("convnet", 10, width=0.25)
        histories.append(train(model, data, TrainConfig.from_dict({**cfg.to_dict(), "capture": capture}), "cpu"))
    assert counters["stats"]["unique_graphs"] >= 1  # the captured run went through dynamo
    eager, captured = ([h["loss"] for h in hist] for hist in histories)
    assert captured == pytest.approx(eager, rel=1e-3)
    assert TrainConfig().capture is False


def test_warm_up_pays_the_first_optimizers_imports():
    """A fine-tune worker launched early warms the training path up while it waits for its plan: after ``warm_up``,
    building the optimizer a ``train`` builds imports nothing more (without it, the first one imports
    ``torch._dynamo``)."""
    code = ("import sys, torch; from geoprune_ray.core.config import TrainConfig; "
            "from geoprune_ray.core.train import _optimizer, warm_up; cfg = TrainConfig(); "
            "model = torch.nn.Conv2d(3, 4, 3); {}; before = set(sys.modules); _optimizer(model, cfg); "
            "print(sorted(set(sys.modules) - before)[:3])")
    cold, warm = (subprocess.run([sys.executable, "-c", code.format(step)], capture_output=True, text=True)
                  for step in ("pass", "warm_up(cfg)"))
    assert cold.returncode == 0 and warm.returncode == 0, (cold.stderr or warm.stderr).splitlines()[-1]
    assert cold.stdout.strip() != "[]"  # the first optimizer imports (torch._dynamo): what warming up is for
    assert warm.stdout.strip() == "[]"


def test_keep_heap_stops_a_new_process_faulting_its_blocks_back_in():
    """A new process that frees a step's blocks together has glibc give them back and fault them in again at the next
    step (a fine-tune worker did so at every training step); after ``keep_heap`` it reuses them."""
    code = ("import resource, torch; from geoprune_ray.core.train import keep_heap; kept = {}\n"
            "def step(): blocks = [torch.ones(2 << 20) for _ in range(6)]\n"  # six 8-MiB blocks, freed together
            "step(); before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(20): step()\n"
            "print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    # glibc moves its thresholds as a process frees big blocks, so how many pages come back without keep_heap varies
    # from run to run (16k to 243k here); fixed at its initial mmap threshold, every freed block goes back to the
    # system, as in a fresh process's first steps, and the count without keep_heap is the same each time
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}
    runs = [subprocess.run([sys.executable, "-c", code.format(step)], capture_output=True, text=True, env=env)
            for step in ("None", "keep_heap()")]
    assert all(r.returncode == 0 for r in runs), [r.stderr.splitlines()[-1:] for r in runs]
    (_, given_back), (kept, kept_faults) = (r.stdout.split() for r in runs)
    if kept != "True":
        pytest.skip("not glibc: keep_heap changes nothing here")
    import resource

    pages = 20 * 6 * (8 << 20) // resource.getpagesize()
    assert int(given_back) > pages // 2  # most of every step's pages faulted in again
    assert int(kept_faults) < pages // 20


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_training_resumed_from_an_epochs_state_ends_as_the_uninterrupted_run(digits, schedule):
    """``train`` hands ``on_epoch`` what a checkpoint needs (optimizer and scheduler state; shuffles and augmentation
    are seeded per epoch): a second model given epoch 1's weights and state (through ``torch.save`` and a
    ``weights_only`` load, as a Ray Train checkpoint) trains epochs 2-3 only and ends with the uninterrupted run's
    weights. Same process and threads, so the same float operations: equal, not merely close."""
    import io

    data = digits[0].subset(torch.arange(512))
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.1, schedule=schedule)
    saved = {}

    def on_epoch(epoch, metrics, state):
        if epoch == 1:
            buffer = io.BytesIO()
            torch.save({"weights": model.state_dict(), "state": state}, buffer)
            saved.update(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))

    torch.manual_seed(0)
    model = build_model("convnet", 10, width=0.25)
    full = train(model, data, cfg, "cpu", on_epoch=on_epoch)
    assert saved["state"]["epoch"] == 1 and saved["state"]["optimizer"]["state"]  # momentum buffers in it

    resumed = build_model("convnet", 10, width=0.25)
    resumed.load_state_dict(saved["weights"])
    rest = train(resumed, data, cfg, "cpu", resume=saved["state"])
    assert [h["epoch"] for h in rest] == [2, 3]
    assert [h["loss"] for h in rest] == [h["loss"] for h in full[1:]]
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in model.state_dict().items())
    # a state at the last epoch trains nothing more
    assert train(resumed, data, cfg, "cpu", resume={**saved["state"], "epoch": 3}) == []
