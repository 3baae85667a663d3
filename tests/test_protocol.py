"""One protocol, two mappings: the in-process path and the Ray pipeline decide the same things on the same input."""

import pyarrow.parquet as pq
import pytest
import torch

from geoprune_ray.core.method import match_macs
from geoprune_ray.core.models import build_model
from geoprune_ray.core.pruning import dependency_groups, kept_channels, macs_params, prune_copy
from geoprune_ray.core.reference import adaptive_prune
from geoprune_ray.core.spec import JobSpec
from geoprune_ray.distributed.pipeline import run_job

from conftest import pipeline_job


@pytest.fixture(scope="module")
def both_paths(ray_cluster, digits_weights, tmp_path_factory):
    """The digits job, adaptive arm only, through Ray and in one process, from the same trained weights."""
    spec = JobSpec.from_dict(pipeline_job(digits_weights, ["adaptive"], "digits-equivalence"))
    storage = tmp_path_factory.mktemp("equivalence") / "ray"
    ray_summary = run_job(spec, str(storage))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the probe actors and sensitivity tasks run one thread each
    try:
        local = adaptive_prune(spec.model.name, spec.data.name, spec.data.name, method=spec.method_config(),
                               finetune_cfg=spec.finetune_config(), width=spec.model.width,
                               weights=str(spec.model.weights), device="cpu", speed=spec.protocol.speed)
    finally:
        torch.set_num_threads(threads)
    return storage, ray_summary, local.summary


def test_both_paths_decide_the_same(both_paths):
    storage, ray_summary, local = both_paths
    assert ray_summary["g_noise"] == pytest.approx(local["g_noise"], abs=1e-9)
    ray_probes = pq.read_table(storage / "probes.parquet").to_pandas().sort_values("probe")
    assert list(ray_probes["ratio"]) == [p["ratio"] for p in local["probes"]]
    for ray_dg, p in zip(ray_probes["delta_g"], local["probes"]):
        assert abs(ray_dg - p["delta_g"]) <= 1e-5
    assert ray_summary["tau"] == pytest.approx(local["tau"], abs=1e-5)
    ray_groups = pq.read_table(storage / "sensitivity.parquet").to_pandas().set_index("group")
    for g in local["sensitivity"]:
        assert ray_groups.loc[g["group"], "tau_l"] == pytest.approx(g["tau_l"], rel=1e-4)
    assert [s["r"] for s in ray_summary["controller"]["steps"]] == [s["r"] for s in local["controller"]["steps"]]
    assert ray_summary["controller"]["r_star"] == local["controller"]["r_star"] > 0
    assert ray_summary["pruned"]["macs"] == local["pruned"]["macs"]
    # The same summary, written by the same function: every key the in-process path writes, Ray writes too.
    assert set(local) - {"probes", "sensitivity"} <= set(ray_summary)
    assert ray_summary["pruned"]["top1"] > 90 and local["pruned"]["top1"] > 90


def test_uniform_l2_reaches_the_target_macs_within_one_percent(digits_model):
    """METHOD.md §7: one ratio, then single groups moved by one channel, largest first, to within ±1%."""
    shape, classes = (3, 8, 8), 10
    groups = {g.name: g.channels for g in dependency_groups(digits_model, shape, classes)}
    base_macs = macs_params(digits_model, shape)[0]

    def macs_of(ratios):
        return macs_params(prune_copy(digits_model, ratios, shape, classes)[0], shape)[0]

    for target in (0.71 * base_macs, 0.5 * base_macs, 0.33 * base_macs):
        m = match_macs(target, macs_of, groups)
        assert m.within and abs(m.macs - target) / target <= 0.01
        assert m.macs == macs_of(m.ratios)  # the recorded ratios give the recorded MACs
        for g, n in groups.items():  # one ratio for all, except the recorded one-channel moves
            assert n - round(m.ratios[g] * n) == kept_channels(n, m.ratio) + m.adjusted.get(g, 0)
    # A target no channel count reaches: the closest match, recorded as out of reach.
    tiny = build_model("convnet", classes, width=0.05)
    tiny_groups = {g.name: g.channels for g in dependency_groups(tiny, shape, classes)}
    tiny_macs = macs_params(tiny, shape)[0]
    m = match_macs(0.999 * tiny_macs, lambda r: macs_params(prune_copy(tiny, r, shape, classes)[0], shape)[0],
                   tiny_groups, tolerance=1e-6)
    assert not m.within and m.gap != 0.0


def test_adaptive_gc_is_not_measured_again_at_r_star():
    """The controller's accepted step at r* pruned the base with the final allocation: settling the arms reuses its
    ΔG, MACs and params instead of measuring that allocation a second time."""
    from geoprune_ray.core import protocol
    from geoprune_ray.core.config import MethodConfig
    from geoprune_ray.core.method import Controller

    cfg = MethodConfig()
    budgets, channels = {"a": 0.1, "b": 0.2}, {"a": 8, "b": 16}
    calls = []

    def measure_many(ratios_list, size_only=False):
        calls.append(ratios_list)
        return [{"delta_g": 0.5, "macs": 1, "params": 1} for _ in ratios_list]

    ctl = Controller(budget=0.1, r=0.2)
    ctl.observe(0.05, macs=900, params=90)  # 0.2 accepted
    ctl.observe(0.2, macs=800, params=80)  # 0.25 rejected
    ctl.observe(0.3, macs=850, params=85)  # 0.225 rejected: second switch
    assert ctl.done and ctl.r_star == 0.2
    known = protocol.step_at(ctl, ctl.r_star)
    assert known == {"delta_g": 0.05, "macs": 900, "params": 90}
    final = protocol.final_ratios(ctl.r_star, budgets, channels, cfg)
    plans = protocol.settle_arms(["adaptive", "baseline"], ctl.r_star, final, 0.1, channels, cfg, measure_many,
                                 1000, 100, known)
    assert calls == []
    assert (plans["adaptive"].delta_g, plans["adaptive"].macs, plans["adaptive"].params) == (0.05, 900, 90)
    # without the step (a controller that recorded no sizes), the allocation is measured
    plans = protocol.settle_arms(["adaptive"], ctl.r_star, final, 0.1, channels, cfg, measure_many, 1000, 100, None)
    assert calls == [[final]] and plans["adaptive"].delta_g == 0.5
    assert protocol.step_at(Controller(budget=0.1, r=0.2), 0.2) is None


def test_uniform_l2_with_rounding_matches_within_one_percent_or_records_the_gap(digits_model, caplog):
    """issue 15: with round_to on, Uniform L2 moves rounded groups by whole multiples; where that cannot reach ±1% it
    records the gap it reached and warns, never silently off."""
    from geoprune_ray.core import arms
    from geoprune_ray.core.config import MethodConfig

    shape, classes, round_to = (3, 8, 8), 10, 8
    cfg = MethodConfig(round_to=round_to)
    groups = {g.name: g.channels for g in dependency_groups(digits_model, shape, classes)}
    base_macs, base_params = macs_params(digits_model, shape)

    def measure_many(ratios_list, size_only=False):
        out = []
        for ratios in ratios_list:
            pruned = prune_copy(digits_model, ratios, shape, classes, round_to=round_to)[0]
            macs, params = macs_params(pruned, shape)
            out.append({"delta_g": 0.0, "macs": macs, "params": params, "pruned": pruned})
        return out

    outcomes = []
    for fraction in (0.71, 0.5, 0.33):
        target = int(fraction * base_macs)
        adaptive = arms.ArmPlan("adaptive", 0.3, {}, 0.0, target, 0)
        s = arms.Settling(0.3, {}, 0.1, groups, cfg, measure_many, base_macs, base_params, adaptive=adaptive)
        caplog.clear()
        plan = arms.ARMS["uniform"].choose(s)
        (rec,) = measure_many([plan.ratios])
        assert plan.macs == rec["macs"] and plan.match["gap"] == pytest.approx((plan.macs - target) / target)
        kept = {n: m.out_channels for n, m in rec["pruned"].named_modules() if isinstance(m, torch.nn.Conv2d)}
        assert all(k % round_to == 0 for n, k in kept.items() if groups.get(n, 0) >= 4 * round_to)
        warned = "not ±1%" in caplog.text
        assert plan.match["within"] == (abs(plan.match["gap"]) <= 0.01) == (not warned), (fraction, plan.match)
        outcomes.append(plan.match["within"])
    assert any(outcomes)  # rounding leaves single-channel moves in the small groups: ±1% stays reachable here
