import copy
import json
import math
import statistics

import numpy as np
import pytest

from conftest import small_method
from geoprune_ray.core.config import IMPORTANCE_NAMES, MethodConfig
from geoprune_ray.core.geometry import Calibration, GeometryMeter
from geoprune_ray.core.method import (Controller, PruneTarget, allocate, initial_ratio, layer_budgets, measure,
                                      probe_ratios, tau, weighted_ratio)
from geoprune_ray.core.pruning import IMPORTANCES, dependency_groups
from geoprune_ray.errors import GeopruneError

TARGET = PruneTarget((3, 8, 8), 10)


@pytest.fixture(scope="module")
def meter_and_base(digits, digits_model):
    meter = GeometryMeter(Calibration.from_dataset(digits[0], small_method()))
    base = copy.deepcopy(digits_model)
    meter.set_reference(base)
    return meter, base


def test_probe_at_ratio_zero_gives_zero_through_the_real_path(meter_and_base):
    meter, base = meter_and_base
    assert measure(base, meter, 0.0, TARGET).delta_g == 0.0
    groups = dependency_groups(base, TARGET.input_shape, 10)
    assert measure(base, meter, {g.name: 0.0 for g in groups}, TARGET).delta_g == 0.0


def test_delta_g_grows_with_the_ratio(meter_and_base):
    meter, base = meter_and_base
    values = [measure(base, meter, r, TARGET).delta_g for r in (0.1, 0.3, 0.6)]
    assert 0 < values[0] < values[1] < values[2], values


def test_probe_ladder_is_seeded_one_ratio_per_rung():
    ratios = probe_ratios(16, 0.5, seed=0)
    assert ratios == probe_ratios(16, 0.5, seed=0) and ratios != probe_ratios(16, 0.5, seed=1)
    for m, r in enumerate(ratios, start=1):
        assert 0.5 * (m - 1) / 16 < r <= 0.5 * m / 16


def test_tau_matches_the_formula():
    sample = [0.012, 0.05, 0.09, 0.2, 0.31]
    assert tau(0.017, sample, beta=1.0) == pytest.approx(0.017 + np.std(sample, ddof=0), abs=1e-15)
    assert tau(0.017, sample, beta=2.0) == pytest.approx(0.017 + 2 * statistics.pstdev(sample))
    with pytest.raises(GeopruneError):
        tau(0.01, [0.1])


def test_initial_ratio_is_largest_probe_within_budget():
    probes = [{"ratio": 0.1, "delta_g": 0.02}, {"ratio": 0.2, "delta_g": 0.05}, {"ratio": 0.3, "delta_g": 0.09}]
    assert initial_ratio(probes, 0.06) == 0.2
    assert initial_ratio(probes, 0.01, default=0.05) == 0.05


def test_controller_reproduces_a_scripted_sequence_step_by_step():
    ctl = Controller(budget=0.1, r=0.2)
    script = [(0.2, 0.05, True), (0.25, 0.08, True), (0.3, 0.12, False), (0.275, 0.09, True)]
    for r, dg, accepted in script:
        assert ctl.propose() == pytest.approx(r)
        step = ctl.observe(dg)
        assert step["accepted"] is accepted and step["r"] == pytest.approx(r)
    assert ctl.propose() is None and ctl.switches == 2 and "second switch" in ctl.stop_reason
    assert ctl.r_star == pytest.approx(0.275)
    with pytest.raises(RuntimeError):
        ctl.observe(0.0)


def test_controller_never_measures_a_ratio_twice():
    ctl = Controller(budget=0.1, r=0.3)
    for dg in (0.2, 0.15, 0.05):  # 0.3 ✗, 0.275 ✗, 0.25 ✓ → next is 0.3 again: answered from the record
        ctl.observe(dg)
    assert ctl.done and [s["measured"] for s in ctl.steps] == [True, True, True, False]
    assert ctl.steps[-1]["r"] == pytest.approx(0.3) and not ctl.steps[-1]["accepted"]
    assert ctl.r_star == pytest.approx(0.25)


def test_controller_stops_at_range_edge_and_t_max():
    edge = Controller(budget=0.1, r=0.9, r_max=0.9)
    edge.observe(0.01)
    assert edge.done and "leave" in edge.stop_reason and edge.r_star == 0.9
    low = Controller(budget=0.1, r=0.025)
    low.observe(0.5)
    assert low.done and low.r_star == 0.0
    long = Controller(budget=1.0, r=0.05, t_max=5)
    while long.propose() is not None:
        long.observe(0.0)
    assert len(long.steps) == 5 and "T_max" in long.stop_reason and long.r_star == pytest.approx(0.25)


def test_bisect_mode_halves_steps_at_each_switch():
    ctl = Controller(budget=0.1, r=0.3, mode="bisect", min_delta=0.01)
    rs = []
    while (r := ctl.propose()) is not None:
        rs.append(r)
        ctl.observe(0.0 if r <= 0.33 else 0.2)  # the boundary sits at 0.33
    assert "δ fell below" in ctl.stop_reason
    assert rs[:3] == pytest.approx([0.3, 0.35, 0.3375])  # +0.05, −0.025/2 after the first switch
    assert 0.32 < ctl.r_star <= 0.33


def test_controller_state_round_trips_through_json():
    a = Controller(budget=0.1, r=0.2)
    a.observe(0.05)
    b = Controller.from_dict(json.loads(json.dumps(a.to_dict())))
    for dg in (0.12, 0.09):
        a.observe(dg)
        b.observe(dg)
    assert a.to_dict() == b.to_dict() and b.done


def test_allocation_favours_insensitive_groups_and_keeps_the_mean():
    sens = {"a": 0.01, "b": 0.05, "c": 0.2}
    channels = {"a": 64, "b": 32, "c": 128}
    budgets = layer_budgets(0.1, sens, epsilon=0.02)
    assert budgets["a"] == pytest.approx(0.1 / 0.03)
    ratios = allocate(0.2, budgets, channels, r_max=0.9)
    assert ratios["a"] > ratios["b"] > ratios["c"]
    assert weighted_ratio(ratios, channels) == pytest.approx(0.2)  # the cap does not bind
    capped = allocate(0.6, budgets, channels, r_max=0.9)
    assert max(capped.values()) == 0.9 and weighted_ratio(capped, channels) < 0.6
    with pytest.raises(GeopruneError):
        layer_budgets(0.1, sens, epsilon=0.0)


# METHOD.md's settings out of range (each with the words of its message), and the edge of each range that is allowed
BAD_METHOD = [("calib_per_class", 1, "at least 2"), ("calib_cap", 1, "at least 2"), ("bn_batches", 0, "at least 1"),
              ("bn_batch_size", 0, "at least 1"), ("noise_splits", 1, "at least 2"), ("probes", 1, "at least 2"),
              ("r_probe_max", 0, "outside (0, 1)"), ("r_probe_max", 1, "outside (0, 1)"),
              ("sensitivity_ratio", 1.0, "outside (0, 1)"), ("r_max", 0.0, "outside (0, 1)"),
              ("r0_default", 0, "outside (0, 1)"), ("beta", 0, "must be positive"), ("beta", -1, "must be positive"),
              ("importance", "l3", "unknown value"), ("epsilon", -0.01, "is negative"), ("round_to", 0, "at least 1"),
              ("controller", "pid", "unknown value"), ("delta", 0, "must be positive"),
              ("gamma", -0.1, "must be positive"), ("t_max", 0, "at least 1"),
              ("bisect_min_delta", 0, "must be positive"),
              ("probes", "8", "should be of type int"), ("probes", True, "should be of type int"),
              ("beta", True, "should be of type float"), ("bn_recalibration", 1, "should be of type bool")]
FLOATS = ["r_probe_max", "beta", "sensitivity_ratio", "epsilon", "r_max", "r0_default", "delta", "gamma",
          "bisect_min_delta"]
EDGES = dict(calib_per_class=2, calib_cap=2, bn_batches=1, bn_batch_size=1, noise_splits=2, probes=2, r_probe_max=0.999,
             beta=1e-6, sensitivity_ratio=1e-3, epsilon=0, r_max=0.999, round_to=1, r0_default=0.001, delta=1e-4,
             gamma=1e-4, t_max=1, bisect_min_delta=1e-5, controller="bisect", importance="fpgm")


@pytest.mark.parametrize("key,value,words", BAD_METHOD + [(k, v, "not a finite number") for k in FLOATS
                                                         for v in (math.nan, math.inf, -math.inf)])
def test_method_settings_out_of_range_are_refused_by_name(key, value, words):
    with pytest.raises(GeopruneError) as err:
        MethodConfig.from_dict({key: value}, where="method.", kind="job-spec")
    assert str(err.value).startswith(f"method.{key} = {value!r} " if words != "unknown value"
                                     else f"method.{key}: unknown value {value!r}") and words in str(err.value)
    with pytest.raises(GeopruneError):
        MethodConfig(**{key: value})  # built directly: the same error, not pydantic's


def test_the_edges_of_the_ranges_are_allowed():
    cfg = MethodConfig(**EDGES)
    assert cfg.to_dict() == {**MethodConfig().to_dict(), **EDGES} and cfg.beta == 1e-6


def test_importance_names_are_the_pruning_registry():
    """config.py names the criteria without importing torch-pruning; the two lists must agree."""
    assert set(IMPORTANCE_NAMES) == set(IMPORTANCES)
