"""The arms registry (``core.arms``): one decorated function adds an arm that every consumer then knows."""

import copy

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


def test_every_allocation_reaches_each_compression_on_a_real_model(digits_model, digits):
    """Issue 16's allocation arms on the digits convnet (groups of 16, 32 and 64 channels, rounded to 4s): the
    method's τ_L weights, uniform L2, global magnitude and LAMP each prune to 2× and 3× fewer MACs within ±1%, or
    record the gap they reached; each plan's MACs are what its ratios prune to, with the run's rounding."""
    import logging

    from conftest import small_method
    from geoprune_ray.core.geometry import Calibration, GeometryMeter
    from geoprune_ray.core.method import PruneTarget, allocate, layer_budgets, measure
    from geoprune_ray.core.pruning import dependency_groups, global_allocation, macs_params, prune_copy

    train_set, _ = digits
    shape, classes, cfg = (3, 8, 8), 10, small_method(round_to=4)
    target = PruneTarget(shape, classes, "l2", cfg.round_to)
    meter = GeometryMeter(Calibration.from_dataset(train_set, cfg))
    base = copy.deepcopy(digits_model)
    meter.set_reference(base)
    channels = {g.name: g.channels for g in dependency_groups(base, shape, classes)}
    base_macs, base_params = macs_params(base, shape)

    def measure_many(ratios_list, size_only=False):
        out = []
        for ratios in ratios_list:
            if size_only:
                macs, params = macs_params(prune_copy(base, ratios, shape, classes, round_to=4)[0], shape)
                out.append({"macs": macs, "params": params})
            else:
                m = measure(base, meter, ratios, target)
                out.append({"delta_g": m.delta_g, "macs": m.macs, "params": m.params})
        return out

    sens = {g: measure_many([{g: 0.5}])[0]["delta_g"] for g in channels}  # the method's sensitivity trials
    budgets = layer_budgets(0.1, sens, 0.01)
    wanted = ["adaptive", *(arms.compression_arm(a, c) for c in (2, 3) for a in arms.ALLOCATIONS)]
    plans = protocol.settle_arms(
        wanted, 0.2, allocate(0.2, budgets, channels, cfg.r_max), 0.1, channels, cfg, measure_many, base_macs,
        base_params, budgets=budgets,
        global_ratios=lambda imp, x: global_allocation(base, x, shape, classes, imp, cfg.r_max))
    assert list(plans) == wanted
    for c in (2, 3):
        reached = {}
        for a in arms.ALLOCATIONS:
            plan = plans[arms.compression_arm(a, c)]
            goal = base_macs / c
            assert plan.match["macs_target"] == pytest.approx(goal)
            assert plan.match["gap"] == pytest.approx((plan.macs - goal) / goal)
            assert abs(plan.match["gap"]) <= 0.01 or not plan.match["within"]  # within ±1%, or said it is not
            assert plan.macs == measure_many([plan.ratios], size_only=True)[0]["macs"]
            assert plan.delta_g > 0
            reached[a] = plan.ratios
            row = protocol.arm_row(plan, {"top1": 1.0, "top1_before_finetune": 1.0, "macs": plan.macs,
                                          "params": plan.params, "delta_g": plan.delta_g, "delta_g_after": 0.0})
            assert (row["allocation"], row["compression"]) == (a, c) and row["method"].endswith(f"at {c}×")
        assert all(abs(plans[arms.compression_arm(a, c)].match["gap"]) <= 0.01 for a in arms.ALLOCATIONS), {
            a: plans[arms.compression_arm(a, c)].match["gap"] for a in arms.ALLOCATIONS}
        kept = {a: tuple(round((1 - r[g]) * n) for g, n in channels.items()) for a, r in reached.items()}
        assert len(set(kept.values())) >= 3, kept  # different allocations at the same MACs
    logging.getLogger("geoprune_ray").info("allocations: %s", plans)


def test_allocation_arm_names_parse_and_label():
    assert arms.parse_compression_arm("lamp@2x") == ("lamp", 2.0)
    assert arms.parse_compression_arm("tau@2.5x") == ("tau", 2.5) and arms.compression_arm("tau", 2.5) == "tau@2.5x"
    for bad in ("lamp@1x", "lamp@2", "nope@2x", "lamp@x", "adaptive@2x", "lamp@infx"):
        assert arms.parse_compression_arm(bad) is None and not arms.is_arm(bad), bad
    assert arms.label("magnitude@3x") == "Global magnitude at 3×" and arms.color("lamp@4x", "k") == "tab:brown"
    spec = JobSpec.from_dict({"name": "j", "protocol": {"arms": ["adaptive"], "compressions": [2, 4]}})
    assert spec.protocol.arms_to_run == ("adaptive", "tau@2x", "uniform@2x", "magnitude@2x", "lamp@2x",
                                         "tau@4x", "uniform@4x", "magnitude@4x", "lamp@4x")
    with pytest.raises(GeopruneError, match="compression 0.5 is not a MACs reduction"):
        JobSpec.from_dict({"name": "j", "protocol": {"compressions": [0.5]}})
