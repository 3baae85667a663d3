"""The in-process pipeline end to end on digits (the acceptance run of the core)."""

import json

import pytest
import torch

from conftest import small_method
from geoprune_ray.core.artifact import load_pruned
from geoprune_ray.core.config import MethodConfig, TrainConfig, finetune_defaults
from geoprune_ray.core.models import build_model
from geoprune_ray.core.reference import adaptive_prune
from geoprune_ray.errors import GeopruneError


@pytest.fixture(scope="module")
def result():
    """Trains a small CNN on digits and prunes it with every method default but the data sizes."""
    torch.manual_seed(0)
    return adaptive_prune("convnet", "digits", "digits", width=0.5, device="cpu",
                          baseline=TrainConfig(epochs=8, batch_size=64, lr=0.1),
                          finetune_cfg=finetune_defaults(epochs=4, batch_size=64))


def test_adaptive_prune_on_digits(result):
    s = result.summary
    steps = s["controller"]["steps"]
    assert len(s["probes"]) == MethodConfig().probes
    assert s["pruned"]["macs"] < s["baseline"]["macs"]
    assert s["pruned"]["delta_g_before_finetune"] <= s["tau"]
    # timed as deployed (cpu: rounded to 8), the model against the base, after its fine-tune (issue 15)
    assert s["config"]["deploy"] == "cpu" and s["config"]["method"]["round_to"] == 8
    assert s["speed"]["measured"] and {r["model"] for r in s["speed"]["rows"]} == {"base", "adaptive"}
    assert any(not st["accepted"] for st in steps), steps
    assert s["pruned"]["top1"] >= 90.0
    assert s["controller"]["r_star"] == max(st["r"] for st in steps if st["accepted"])
    # τ is the formula on the recorded sample
    dgs = torch.tensor([p["delta_g"] for p in s["probes"]], dtype=torch.float64)
    assert s["tau"] == pytest.approx(s["g_noise"] + dgs.std(unbiased=False).item(), rel=1e-9)
    # the controller obeys the δ/γ rule step by step
    for prev, nxt in zip(steps, steps[1:]):
        assert nxt["r"] == pytest.approx(prev["r"] + (0.05 if prev["accepted"] else -0.025))
    assert {row["group"] for row in s["sensitivity"]} == {"0", "3", "7", "10", "14"}
    json.dumps(s)  # every number is plain JSON


def test_result_saves_and_reloads(result, tmp_path, digits):
    result.save(tmp_path)
    model, card = load_pruned(tmp_path / "model")
    x = torch.randint(0, 255, (3, *card.input_shape), dtype=torch.uint8)
    from geoprune_ray.core.geometry import normalize

    with torch.no_grad():
        assert torch.allclose(model(normalize(x, card.mean, card.std)),
                              result.model.cpu().eval()(normalize(x, card.mean, card.std)), atol=1e-5)
    assert json.loads((tmp_path / "summary.json").read_text())["pruned"]["macs"] == result.summary["pruned"]["macs"]


def test_python_api_takes_modules_and_datasets(digits, digits_model, tmp_path):
    train_set, test_set = digits
    res = adaptive_prune(digits_model, train_set, test_set, method=small_method(), device="cpu",
                         finetune_cfg=finetune_defaults(epochs=1, batch_size=64), speed=False)
    assert res.summary["baseline"]["top1"] > 95 and res.card.arch == "" and res.summary["speed"] is None
    with pytest.raises(GeopruneError, match="without an architecture name"):
        res.save(tmp_path)
    assert not (tmp_path / "summary.json").exists()


def test_missing_class_in_training_split_is_an_error(digits):
    train_set, test_set = digits
    without_nines = train_set.subset((train_set.labels != 9).nonzero().flatten())
    with pytest.raises(GeopruneError, match=r"classes \[9\] have no examples"):
        adaptive_prune(build_model("convnet", 10, width=0.25), without_nines, test_set, method=small_method(),
                       device="cpu")


def test_provenance_and_write_json_are_still_importable_from_reference():
    """Their homes are core.provenance and core.rundir; core.reference keeps them for one release (issue 14)."""
    from geoprune_ray.core import provenance as home, reference, rundir

    assert reference.provenance is home.provenance and reference.write_json is rundir.write_json
