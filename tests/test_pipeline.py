"""The pipeline on a real local Ray cluster: artifacts, the controller in Tune, arms (resume: test_resilience)."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from geoprune_ray.core.artifact import load_pruned
from geoprune_ray.core.spec import JobSpec
from geoprune_ray.distributed.pipeline import run_job

from conftest import PIPELINE_METHOD as METHOD, pipeline_job as _job


def test_artifacts_of_a_full_run(full_run):
    storage, summary = full_run
    probes = pq.read_table(storage / "probes.parquet").to_pandas()
    assert len(probes) == METHOD["probes"]
    assert {"ratio", "seed", "delta_g", "macs", "params", "seconds", "pid", "node", "device"} <= set(probes.columns)
    assert probes["pid"].nunique() >= 2
    assert summary["tau"] == pytest.approx(summary["g_noise"] + np.std(probes["delta_g"], ddof=0), rel=1e-9)

    sens = pq.read_table(storage / "sensitivity.parquet").to_pandas()
    assert sorted(sens["group"]) == sorted(["0", "3", "7", "10", "14"])
    assert (sens["tau_l"] == summary["tau"] / (sens["delta_g"] + summary["g_noise"])).all()

    trials = pq.read_table(storage / "trials.parquet").to_pandas()
    steps = trials[trials["kind"] == "step"].sort_values("step")
    assert len(steps) >= 3 and not steps["ray_train"].any()  # controller steps never launch Ray Train
    # a fine-tune was launched beside the steps: a step keeps its actor's one thread while that fine-tune starts up
    # on the same two cores, and has both actors' once it waits for its plan (test_searcher: step_threads)
    assert set(steps["threads"]) <= {1, 2}
    finetunes = trials[trials["kind"] == "finetune"]
    assert (finetunes["launched"] < steps["finished"].max()).any()
    assert (~steps["accepted"].astype(bool)).any()
    for (_, a), (_, b) in zip(steps.iterrows(), steps.iloc[1:].iterrows()):  # the δ/γ rule
        assert b["r"] == pytest.approx(a["r"] + (0.05 if a["accepted"] else -0.025))
    assert all(steps["accepted"] == (steps["delta_g"] <= summary["tau"]))
    launches = [p.name for p in (storage / "train").iterdir() if p.name.startswith("finetune-")]
    assert len(launches) == len(summary["arms"]) == 8  # one Ray Train run per arm, none for a controller step
    # the four allocations at 2× fewer MACs (issue 16): each at the target within ±1%, or its gap recorded
    base_macs = summary["baseline"]["macs"]
    at_2x = [a for a in summary["arms"] if a.get("compression") == 2]
    assert sorted(a["allocation"] for a in at_2x) == ["lamp", "magnitude", "tau", "uniform"]
    for a in at_2x:
        assert a["macs_gap"] == pytest.approx((a["macs_m"] * 1e6 - base_macs / 2) / (base_macs / 2), abs=1e-6)

    pruned = summary["pruned"]
    assert pruned["delta_g_before_finetune"] <= summary["tau"]
    assert pruned["macs"] < summary["baseline"]["macs"] and pruned["top1"] >= 90
    assert [row["arm"] for row in summary["arms"]] == ["adaptive", "baseline", "gc", "uniform", "tau@2x", "uniform@2x",
                                                      "magnitude@2x", "lamp@2x"]
    uniform = next(row for row in summary["arms"] if row["arm"] == "uniform")
    assert uniform["macs_m"] == pytest.approx(pruned["macs"] / 1e6, rel=0.01)  # METHOD.md §7's ±1%
    assert uniform["macs_gap"] == pytest.approx(uniform["macs_m"] * 1e6 / pruned["macs"] - 1, abs=1e-9)
    gc = next(row for row in summary["arms"] if row["arm"] == "gc")
    assert gc["delta_g"] <= 0.07

    model, card = load_pruned(storage / "model")  # weights_only inside
    assert card.arch == "convnet"
    from geoprune_ray.core.pruning import macs_params
    assert macs_params(model, card.input_shape)[0] == pruned["macs"]
    assert summary["provenance"]["ray"] == ray.__version__ and summary["schema_version"] == 1
    assert summary["config"]["method"]["probes"] == 8 and summary["config"]["overrides"] == METHOD


def test_the_same_job_spec_is_required_to_resume(full_run, digits_weights):
    storage, _ = full_run
    from geoprune_ray.errors import GeopruneError

    other = JobSpec.from_dict(_job(digits_weights, ["adaptive"], "another"))
    with pytest.raises(GeopruneError, match="different job spec"):
        run_job(other, str(storage))
