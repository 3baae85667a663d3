"""The RatioSearcher's contract, driven by hand (Tune drives it for real in test_pipeline.py)."""

import math

from ray.tune.search import Searcher

from geoprune_ray.core.method import Controller
from geoprune_ray.distributed.searcher import RatioSearcher, on_converged

CHANNELS = {"a": 16, "b": 32}
BUDGETS = {"a": 2.0, "b": 1.0}


def _searcher(**kw):
    return RatioSearcher(Controller(budget=0.1, r=0.2), BUDGETS, CHANNELS, **kw)


def test_one_step_at_a_time_then_finished():
    s = _searcher()
    first = s.suggest("t0")
    assert first["kind"] == "step" and first["r"] == 0.2 and set(first["ratios"]) == {"a", "b"}
    assert s.suggest("t1") is None  # waits for t0's ΔG
    s.on_trial_result("t0", {"delta_g": 0.05, "macs": 10})
    assert s.suggest("t1")["r"] == 0.25
    s.on_trial_result("t1", {"delta_g": 0.2})
    s.on_trial_complete("t0", {"delta_g": 0.05})  # completion after the first result changes nothing
    assert s.suggest("t2")["r"] == 0.225
    s.on_trial_result("t2", {"delta_g": 0.09})  # second switch: converged, r* = 0.225
    assert s.suggest("t3") == Searcher.FINISHED  # no arm to fine-tune
    assert s.result.r_star == 0.225


def test_failed_step_is_retried_then_counted_as_rejected():
    s = _searcher(max_failures=2)
    assert s.suggest("t0")["r"] == 0.2
    s.on_trial_complete("t0", None, error=True)
    assert s.suggest("t1")["r"] == 0.2  # the same step again
    s.on_trial_complete("t1", None, error=True)
    step = s.result.steps[-1]
    assert step["r"] == 0.2 and step["delta_g"] == math.inf and not step["accepted"] and step["failed"]


def test_save_restore_continues_the_sequence(tmp_path):
    s = _searcher()
    s.suggest("t0")
    s.on_trial_result("t0", {"delta_g": 0.05})
    s.save(str(tmp_path / "searcher.pkl"))
    restored = RatioSearcher(metric="delta_g", mode="min")
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("t1")["r"] == s.suggest("t1")["r"] == 0.25
    assert restored.result.to_dict() == s.result.to_dict()


def test_fine_tunes_launch_beside_the_steps_and_the_rest_after_the_hook():
    """One fine-tune launches while the controller runs (``prelaunch``); the hook runs once when it stops; then the
    other arms follow, two at a time (``concurrent``), and FINISHED comes once every arm is handed out."""
    calls = []
    on_converged("run1", lambda ctl: calls.append(ctl.r_star))
    try:
        s = _searcher(arms=["adaptive", "baseline", "gc"], concurrent=2, prelaunch=1, run_id="run1")
        assert s.suggest("t0")["kind"] == "step"
        assert s.suggest("f0") == {"kind": "finetune", "arm": "adaptive"}  # beside the pending step
        assert s.suggest("f1") is None  # one early fine-tune only
        s.on_trial_result("t0", {"delta_g": 0.05})
        assert s.suggest("t1")["kind"] == "step"  # steps keep their turn
        s.on_trial_result("t1", {"delta_g": 0.2})
        assert s.suggest("t2")["r"] == 0.225 and not calls
        s.on_trial_result("t2", {"delta_g": 0.09})  # converged
        assert s.suggest("f1") == {"kind": "finetune", "arm": "baseline"} and calls == [0.225]
        assert s.suggest("f2") is None  # two running: adaptive and baseline
        s.on_trial_complete("f0", {"top1": 90.0})
        assert s.suggest("f2") == {"kind": "finetune", "arm": "gc"}
        assert s.suggest("f3") == Searcher.FINISHED and calls == [0.225]  # the hook ran once
    finally:
        on_converged("run1", None)


def test_a_step_takes_the_pools_threads_only_while_the_early_fine_tunes_wait(ray_cluster):
    """A controller step gets the pool's threads (``ProbePool.step_threads``) where nothing else runs on those cores:
    no fine-tune was launched beside the steps, or each one has started up and waits for its plan on the board."""
    import dataclasses

    import ray

    from geoprune_ray.core.config import PruneTarget
    from geoprune_ray.distributed.progress import Progress
    from geoprune_ray.distributed.trial import TrialContext, step_threads

    progress = Progress("threads-test")
    try:
        ctx = TrialContext("threads-test", 2, {}, {}, None, None, None, PruneTarget((1, 8, 8), 10), True, "",
                           early=1)
        assert step_threads(ctx, (2, 2), 0) == 0  # the early fine-tune is still starting up: the actor's own threads
        plan = progress.board.plan.remote("adaptive")  # it has loaded everything and waits for its plan
        # An async actor need not start one caller's calls in order, so the count is read until the plan call has
        # begun: each read is a round trip through the board's event loop, where the plan call, delivered before it,
        # starts within a few; the bound only stops a hung board (no clock, no speed claim)
        for _ in range(1000):
            if ray.get(progress.board.waiting_for_plans.remote()) >= 1:
                break
        assert step_threads(ctx, (2, 2), 1) == 2
        ray.get(progress.board.publish.remote({"adaptive": {"r": 0.2}}))
        assert ray.get(plan) == {"r": 0.2} and ray.get(progress.board.waiting_for_plans.remote()) == 0
        assert step_threads(dataclasses.replace(ctx, early=0), (2, 2), 0) == 2  # nothing launched beside the steps
        assert step_threads(ctx, (), 0) == 0  # finetune_all, or no pool
    finally:
        progress.close()


def test_the_experiment_starts_before_tau_and_waits_for_the_provided_controller():
    """A searcher made without a controller (the experiment starts beside the search stage) hands out its early
    fine-tune, then nothing until the driver provides the controller; steps then carry τ and the pool's threads. A
    failed search ends the experiment."""
    from geoprune_ray.distributed.searcher import provide

    s = RatioSearcher(arms=["adaptive"], prelaunch=1, run_id="run2")
    try:
        assert s.suggest("f0") == {"kind": "finetune", "arm": "adaptive"}  # beside the search
        assert s.suggest("t0") is None  # no controller yet
        provide("run2", Controller(budget=0.1, r=0.2), BUDGETS, CHANNELS, pool_threads=(2, 2))
        step = s.suggest("t0")
        assert (step["kind"], step["r"], step["tau"], step["pool_threads"]) == ("step", 0.2, 0.1, [2, 2])
        assert set(step["ratios"]) == {"a", "b"}
    finally:
        provide("run2")
    on_cpus = RatioSearcher(arms=["adaptive"], prelaunch=1, run_id="run4", launch_in_search=False)
    try:
        assert on_cpus.suggest("f0") is None  # on CPUs the early fine-tune waits for the steps
        provide("run4", Controller(budget=0.1, r=0.2), BUDGETS, CHANNELS)
        assert on_cpus.suggest("t0")["kind"] == "step"
        assert on_cpus.suggest("f0") == {"kind": "finetune", "arm": "adaptive"}  # beside the first step
    finally:
        provide("run4")
    failed = RatioSearcher(arms=["adaptive"], run_id="run3")
    try:
        provide("run3", error="the search stage failed: boom")
        assert failed.suggest("t0") == Searcher.FINISHED
    finally:
        provide("run3")


def test_the_first_steps_trial_starts_beside_the_search_and_waits_for_its_step(ray_cluster):
    """With ``pending_step`` the first step's trial is handed out before τ is known, without a ratio, and the early
    fine-tune's trial beside it (its Ray Train run waits for the search's end); once the driver provides the
    controller, the searcher delivers the step on the run's progress board, where the trial waits for it (again after
    a restore), and the search's end. A failed run raises in the waiting trial instead."""
    import pytest
    import ray

    from geoprune_ray.distributed.progress import Progress
    from geoprune_ray.distributed.searcher import SEARCHED, provide, step_key

    progress = Progress("pending-test")
    board = progress.board
    try:
        s = RatioSearcher(arms=["adaptive"], prelaunch=1, run_id="pending-test", launch_in_search=False,
                          pending_step=True)
        assert s.suggest("t0") == {"kind": "step", "arm": "step", "r": None, "step": None, "pending": True}
        assert s.suggest("f0") == {"kind": "finetune", "arm": "adaptive", "after_search": True}
        assert s.suggest("t1") is None  # one step and one early fine-tune
        waiting = board.value.remote(step_key("t0"))
        assert not ray.wait([waiting], timeout=0.5)[0]  # no step before τ is known
        provide("pending-test", Controller(budget=0.1, r=0.2), BUDGETS, CHANNELS, pool_threads=(2, 2))
        assert s.suggest("t1") is None  # step 0 is pending, the fine-tune launched
        step = ray.get(waiting, timeout=60)
        assert (step["kind"], step["r"], step["step"], step["tau"], step["pool_threads"]) == ("step", 0.2, 0, 0.1,
                                                                                            [2, 2])
        assert ray.get(board.value.remote(SEARCHED), timeout=60) is True
        s.on_trial_result("t0", {"delta_g": 0.05})
        assert s.result.steps[0]["r"] == 0.2 and s.suggest("t1")["r"] == 0.25  # t1: a step with its ratio
        assert "pending" not in s.trials["t1"]
    finally:
        provide("pending-test")
        progress.close()

    progress = Progress("pending-test2")
    try:
        s = RatioSearcher(run_id="pending-test2", pending_step=True)
        s.suggest("t0")
        provide("pending-test2", Controller(budget=0.1, r=0.2), BUDGETS, CHANNELS)
        s.suggest("t1")
        assert ray.get(progress.board.take.remote(step_key("t0"), 60))["r"] == 0.2  # gone from the board, as after
        restored = RatioSearcher(metric="delta_g", mode="min")  # a driver restart: the restored searcher sends again
        restored.set_state(s.get_state())
        restored.suggest("t1")
        assert ray.get(progress.board.value.remote(step_key("t0")), timeout=60)["r"] == 0.2
        ray.get(progress.board.publish.remote({}, "the search stage failed: boom"))
        with pytest.raises(ray.exceptions.RayTaskError, match="boom"):
            ray.get(progress.board.value.remote(step_key("t9")), timeout=60)
    finally:
        provide("pending-test2")
        progress.close()

    progress = Progress("pending-test4")  # resumed after the controller converged: the early step has nothing to do
    try:
        s = RatioSearcher(arms=["adaptive"], run_id="pending-test4", pending_step=True)
        assert s.suggest("t0")["r"] is None
        done = Controller(budget=0.1, r=0.2)
        for dg in (0.05, 0.2, 0.09):
            done.observe(dg)
        assert done.done
        provide("pending-test4", done, BUDGETS, CHANNELS)
        assert s.suggest("f0") == {"kind": "finetune", "arm": "adaptive"}
        assert ray.get(progress.board.value.remote(step_key("t0")), timeout=60)["no_step"] is True
        s.on_trial_result("t0", {"delta_g": float("nan")})  # what the trial reports then (Tune wants the metric)
        assert s.result.to_dict() == done.to_dict()
        s.on_trial_complete("t0", {"delta_g": float("nan")})
        assert "t0" not in s.trials and s.suggest("f1") == Searcher.FINISHED
    finally:
        provide("pending-test4")
        progress.close()

    failed = RatioSearcher(run_id="pending-test3", pending_step=True)
    failed.suggest("t0")
    failed.on_trial_complete("t0", None, error=True)  # failed before its step came: forgotten, not counted
    assert failed.trials == {} and failed.failures == {} and failed.suggest("t1")["r"] is None
