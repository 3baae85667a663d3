"""Inference speed: base and pruned passes take turns, so a passing load on the machine slows both alike."""

import torch
from torch import nn

from geoprune_ray.core.speed import compare_speed


class Recorder(nn.Module):
    def __init__(self, name: str, calls: list):
        super().__init__()
        self.name, self.calls, self.layer = name, calls, nn.Linear(8, 4)

    def forward(self, x):
        self.calls.append(self.name)
        return self.layer(x)


def test_base_and_pruned_passes_take_turns():
    calls: list[str] = []
    result = compare_speed(Recorder("base", calls), Recorder("pruned", calls), (8,), "cpu", batches=(1, 16),
                           budget_s=0.05)
    assert [row["batch"] for row in result["rows"]] == [1, 16]
    for row in result["rows"]:
        assert row["repeats"] >= 5 and row["speedup"] == row["base_latency_ms"] / row["pruned_latency_ms"]
    first_batch = calls[4:4 + 2 * result["rows"][0]["repeats"]]  # after 2 warm-up passes of each
    assert first_batch == ["base", "pruned"] * result["rows"][0]["repeats"]
    assert torch.get_num_threads() == result["threads"]
