"""The arms registry (``core.arms``): one decorated function adds an arm that every consumer then knows."""

import pytest

from geoprune_ray.core import arms, protocol
from geoprune_ray.core.config import MethodConfig
from geoprune_ray.core.spec import JobSpec
from geoprune_ray.errors import GeopruneError


def _measure_many(ratios_list, size_only=False):
    """A stand-in for pruned copies of a 1000-MAC base: MACs fall with the mean ratio, ΔG grows with it."""
    out = []
    for ratios in ratios_list:
        r = sum(ratios.values()) / len(ratios) if isinstance(ratios, dict) and ratios else float(ratios or 0.0)
        out.append({"delta_g": r / 2, "macs": round(1000 * (1 - r) ** 2), "params": round(100 * (1 - r) ** 2)})
    return out


@pytest.fixture
def half_arm():
    """A made-up arm, registered for one test: every group pruned at half of r*."""

    @arms.register_arm("half", "Half r*", "tab:red", budget=0.5)
    def _half(s: arms.Settling) -> arms.ArmPlan:
        assert s.adaptive is not None and s.adaptive.arm == "adaptive"  # settled after Adaptive GC, which it may use
        (rec,) = s.measure_many([s.r_star / 2])
        return arms.ArmPlan("half", s.r_star / 2, s.r_star / 2, rec["delta_g"], rec["macs"], rec["params"], 0.5)

    yield arms.ARMS["half"]
    del arms.ARMS["half"]


def test_the_registry_holds_the_papers_arms_in_the_tables_order():
    assert arms.arm_names() == ("baseline", "gc", "adaptive", "uniform")
    assert arms.default_arms() == ("adaptive", "baseline", "gc", "uniform")  # fine-tunes start with the method
    assert JobSpec.from_dict({"name": "j"}).protocol.arms == arms.default_arms()
    gc = arms.ARMS["gc"]
    assert gc.budget == 0.07 and gc.label == "GC (τ = 0.07)"  # one number, written once
    assert all(arm.timed for arm in arms.ARMS.values())  # every arm is timed as deployed (issue 15)


def test_a_registered_arm_is_settled_labelled_and_accepted_by_a_spec(half_arm):
    cfg, channels = MethodConfig(), {"a": 8, "b": 16}
    plans = protocol.settle_arms(["adaptive", "half", "uniform"], 0.4, {"a": 0.3, "b": 0.5}, 0.2, channels, cfg,
                                 _measure_many, 1000, 100)
    assert list(plans) == ["adaptive", "half", "uniform"]  # the spec's order
    assert plans["half"].r == pytest.approx(0.2) and plans["half"].macs == 640
    row = protocol.arm_row(plans["half"], {"top1": 50.0, "top1_before_finetune": 40.0, "macs": 640, "params": 64,
                                           "delta_g": 0.1, "delta_g_after": 0.05})
    assert row["method"] == "Half r*" and row["budget"] == 0.5
    assert arms.color("half", "tab:purple") == "tab:red" and arms.color("step", "tab:purple") == "tab:purple"
    assert JobSpec.from_dict({"name": "j", "protocol": {"arms": ["adaptive", "half"]}}).protocol.arms == (
        "adaptive", "half")


def test_an_unknown_arm_is_refused_with_the_registered_ones():
    with pytest.raises(GeopruneError) as err:
        JobSpec.from_dict({"name": "j", "protocol": {"arms": ["adaptive", "halve"]}})
    assert "unknown arm 'halve'" in str(err.value) and "adaptive, baseline, gc, uniform" in str(err.value)
