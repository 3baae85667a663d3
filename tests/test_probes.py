"""Probe actors and sensitivity tasks on a real local Ray cluster, against the in-process reference."""

import contextlib
import copy
import os
from pathlib import Path

import pytest
import ray
import torch

from conftest import small_method
from geoprune_ray.core.geometry import Calibration, GeometryMeter
from geoprune_ray.core.method import PruneTarget, measure, probe_ratios
from geoprune_ray.core.pruning import dependency_groups
from geoprune_ray.distributed.holder import share
from geoprune_ray.distributed.probes import actor_restarts
from geoprune_ray.distributed.probes import PoolSpec, ProbePool
from geoprune_ray.distributed.sensitivity import run_sensitivity
from geoprune_ray.errors import GeopruneError

TARGET = PruneTarget((3, 8, 8), 10)


@pytest.fixture(scope="module")
def setup(ray_cluster, digits, digits_model):
    cfg = small_method()
    calibration = Calibration.from_dataset(digits[0], cfg)
    meter = GeometryMeter(calibration)
    base = copy.deepcopy(digits_model)
    meter.set_reference(base)
    return calibration, meter, base


@contextlib.contextmanager
def probe_pool(model, calibration, run_id):
    pool = ProbePool(model, calibration, TARGET, True, PoolSpec(actors=2), run_id)
    try:
        yield pool
    finally:
        pool.shutdown()


def test_actor_delta_g_equals_in_process(setup, digits_model):
    calibration, meter, base = setup
    with probe_pool(digits_model, calibration, "probe-eq") as pool:
        ratios = probe_ratios(8, 0.5, seed=0)
        records = pool.map("measure", [(r,) for r in ratios])
        for r, rec in zip(ratios, records):
            assert rec["delta_g"] == pytest.approx(measure(base, meter, r, TARGET).delta_g, abs=1e-4)
        assert len({rec["pid"] for rec in records}) >= 2
        assert all(rec["device"] == "cpu" and rec["node"] and rec["threads"] == 1 for rec in records)
        # A controller step runs alone on the pool: both actors are on this node's CPU, so it gets their two threads,
        # for that call only.
        assert pool.step_threads() == (2, 2)
        step = ray.get(pool.actors[0].measure.remote(ratios[3], None, 2))
        assert step["threads"] == 2 and step["delta_g"] == pytest.approx(records[3]["delta_g"], abs=1e-4)
        assert ray.get(pool.actors[0].measure.remote(ratios[3]))["threads"] == 1
        assert ray.get(pool.actors[0].noise.remote(5, 0)) == pytest.approx(meter.noise(5, 0), abs=1e-6)
    # Restartable actors get no object-store arguments (Ray logs an error for those, ray issue 53727): this
    # driver's own log says so for every pool created in this session so far.
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    (driver_log,) = logs.glob(f"python-core-driver-*_{os.getpid()}.log")
    warned = [line for line in driver_log.read_text().splitlines() if "constructor arguments in the object store" in line]
    assert not [line for line in warned if "'ProbeActor'" in line], warned


def test_a_pool_that_cannot_be_placed_fails_with_one_line(setup, digits_model):
    calibration, _, _ = setup
    # 3 CPUs per actor on a 2-CPU cluster: Ray would keep the actor pending for ever. (What is free depends on what
    # earlier tests' actors still hold while they end, e.g. a Tune trial's 0.01 CPU.)
    with pytest.raises(GeopruneError, match=r"1 of 1 probe actors could not start within 2 s: each asks for 3 CPU; "
                                            r"the cluster has [\d.]+ CPU free of 2 \(lower resources.cpus_per_actor"):
        ProbePool(digits_model, calibration, TARGET, True, PoolSpec(1, 3.0), "probe-unplaced", start_timeout_s=2)
    for name in ("geoprune-probe-unplaced-probe-0", "geoprune-probe-unplaced-shared"):  # nothing left behind
        with pytest.raises(ValueError):
            ray.get_actor(name)


def test_sensitivity_tasks_match_in_process(setup, digits_model):
    calibration, meter, base = setup
    names = [g.name for g in dependency_groups(base, TARGET.input_shape, 10)]
    rows = run_sensitivity(share(digits_model, calibration), TARGET, True, names, 0.5, chunks=2)
    assert set(rows) == set(names)
    for name in names:
        assert rows[name]["delta_g"] == pytest.approx(measure(base, meter, {name: 0.5}, TARGET).delta_g, abs=1e-4)
    assert len({row["pid"] for row in rows.values()}) >= 1


def test_actors_and_tasks_adopt_g0_measured_once(setup, digits_model):
    """G₀ is measured once on the CPU with one thread (``geometry.measure_reference``), by the driver or, in a run,
    by probe actor 0 while the driver goes on (``hand(..., measure_g0=True)``): the actors and the sensitivity tasks
    adopt it and measure exactly what they measure with their own G₀ (one thread each, this machine), and a probe
    that removes nothing still gives ΔG = 0."""
    from geoprune_ray.core.geometry import measure_reference

    calibration, _, base = setup
    reference = measure_reference(digits_model, calibration, True)
    ratios = [0.0, *probe_ratios(4, 0.5, seed=0)]
    records = {}
    for name, ref in (("own", None), ("adopted", reference), ("actor 0's", None)):
        pool = ProbePool.start(TARGET, True, PoolSpec(actors=2), f"probe-g0-{name[:5]}")
        try:
            pool.hand(digits_model, calibration, ref, measure_g0=name == "actor 0's")
            pool.wait_loaded()
            assert {i["g0"] for i in pool.identities} == {"measured" if name == "own" else "adopted"}
            assert (pool.g0_measured is not None) == (name == "actor 0's")
            if name == "actor 0's":  # the very numbers the driver measures
                measured = ray.get(pool.shared["reference"])
                assert torch.equal(measured.geometry, reference.geometry)
                assert torch.equal(measured.features, reference.features)
            records[name] = [rec["delta_g"] for rec in pool.map("measure", [(r,) for r in ratios])]
        finally:
            pool.shutdown()
    assert records["adopted"] == records["own"] == records["actor 0's"]
    assert records["adopted"][0] == 0.0 and max(records["own"]) > 0
    names = [g.name for g in dependency_groups(base, TARGET.input_shape, 10)]
    rows = {name: run_sensitivity(share(digits_model, calibration, ref), TARGET, True, names, 0.5, chunks=1)
            for name, ref in (("own", None), ("adopted", reference))}
    assert {n: r["delta_g"] for n, r in rows["adopted"].items()} == {n: r["delta_g"] for n, r in rows["own"].items()}


def test_killing_a_probe_actor_mid_probe_keeps_the_sample(setup, digits_model):
    calibration, meter, base = setup
    with probe_pool(digits_model, calibration, "probe-kill") as pool:
        ratios = probe_ratios(12, 0.5, seed=1)
        refs = pool.submit("measure", [(r,) for r in ratios])
        ray.wait(refs, num_returns=1)
        victim = pool.actors[1]
        old_pid = pool.identities[1]["pid"]
        ray.kill(victim, no_restart=False)  # a crash: Ray restarts the actor and retries its calls
        records = ray.get(refs)
        assert len(records) == len(ratios)
        for r, rec in zip(ratios, records):
            assert rec["delta_g"] == pytest.approx(measure(base, meter, r, TARGET).delta_g, abs=1e-4)
        restarted = [rec for rec in records if rec["restarted"]]
        assert actor_restarts(records) == 1  # state.json's count: one restart, however many probes it answered
        assert restarted and all(rec["pid"] != old_pid for rec in restarted)


def test_spread_balances_calls_sorted_by_cost():
    from geoprune_ray.distributed.probes import spread

    assert spread(8, 2) == [0, 1, 1, 0, 0, 1, 1, 0]
    for calls, actors in ((16, 2), (16, 4), (7, 3), (1, 4)):
        order = spread(calls, actors)
        counts = [order.count(a) for a in range(actors)]
        assert max(counts) - min(counts) <= 1 and set(order) <= set(range(actors))
    # costs that fall with the index (probes sorted by ratio): the snake beats round-robin
    cost = [16 - i for i in range(16)]
    snake = [sum(c for c, a in zip(cost, spread(16, 2)) if a == k) for k in range(2)]
    robin = [sum(cost[k::2]) for k in range(2)]
    assert max(snake) - min(snake) < max(robin) - min(robin)
