"""Reports: every plot is checked against the artifacts it draws, and report.md links what exists."""

import json

import matplotlib.image as mpimg
import numpy as np
import pyarrow.parquet as pq
import pytest

from geoprune_ray.core.rundir import RunDir
from geoprune_ray.errors import GeopruneError
from geoprune_ray.app.report import figures, read_run, render_report


@pytest.fixture(scope="module")
def artifacts(full_run):
    storage, _ = full_run
    summary, probes, groups, trials = read_run(RunDir(str(storage)))
    return storage, summary, probes, groups, trials, figures(summary, probes, groups, trials)


def _offsets(collection):
    return np.asarray(collection.get_offsets(), dtype=float).reshape(-1, 2)


def _same_points(drawn, *columns):
    """The (x, y) points drawn equal the columns, in order (as flat arrays, so any pytest version compares)."""
    np.testing.assert_allclose(drawn, np.column_stack([np.asarray(c, dtype=float) for c in columns]).reshape(-1, 2),
                               rtol=1e-9, atol=1e-12)


def test_probe_plot_draws_the_probe_sample_with_g_noise_and_tau(artifacts):
    storage, summary, _, _, _, figs = artifacts
    probes = pq.read_table(storage / "probes.parquet").to_pandas()
    ax = figs["probes"].axes[0]
    _same_points(_offsets(ax.collections[0]), probes["ratio"], probes["delta_g"])
    levels = sorted(line.get_ydata()[0] for line in ax.lines)
    assert levels == pytest.approx(sorted([summary["g_noise"], summary["tau"]]))


def test_probe_accuracy_plot_draws_each_probes_delta_g_and_top1_drop(artifacts):
    _, summary, probes, _, _, figs = artifacts
    ax = figs["probe_accuracy"].axes[0]
    _same_points(_offsets(ax.collections[0]), [p["delta_g"] for p in probes], [p["top1_drop"] for p in probes])
    assert f"{summary['probe_accuracy']['spearman_delta_g_top1_drop']:.3f}" in ax.get_title()


def test_trajectory_plot_draws_the_controller_steps(artifacts):
    storage, summary, *_, figs = artifacts
    steps = pq.read_table(storage / "trials.parquet").to_pandas().query("kind == 'step'").sort_values("step")
    ax_r, ax_g = figs["trajectory"].axes
    assert list(ax_r.lines[0].get_xdata()) == list(steps["step"])
    assert list(ax_r.lines[0].get_ydata()) == pytest.approx(list(steps["r"]))
    accepted, rejected = ax_g.collections
    acc = steps[steps["accepted"].astype(bool)]
    rej = steps[~steps["accepted"].astype(bool)]
    _same_points(_offsets(accepted), acc["step"], acc["delta_g"])
    _same_points(_offsets(rejected), rej["step"], rej["delta_g"])
    assert len(rej) >= 1
    assert [line.get_ydata()[0] for line in ax_g.lines if len(set(line.get_ydata())) == 1] == [summary["tau"]]


def test_group_plot_draws_the_per_group_ratios_and_channels(artifacts):
    storage, *_, figs = artifacts
    sens = pq.read_table(storage / "sensitivity.parquet").to_pandas()
    ax = figs["groups"].axes[0]
    assert [bar.get_height() for bar in ax.patches] == pytest.approx(list(sens["ratio"]))
    assert [t.get_text() for t in ax.get_xticklabels()] == list(sens["group"])
    kept = sens["channels"] - (sens["channels"] * sens["ratio"]).round().astype(int)
    assert [t.get_text() for t in ax.texts] == [f"{k}/{c}" for k, c in zip(kept, sens["channels"])]
    assert (sens["ratio"] > 0).any()


def test_accuracy_plot_draws_every_finetuned_trial(artifacts):
    storage, summary, *_, figs = artifacts
    trials = pq.read_table(storage / "trials.parquet").to_pandas()
    tuned = trials[trials["top1"].notna()]
    drawn = np.concatenate([_offsets(c) for c in figs["accuracy_macs"].axes[0].collections])
    expected = np.column_stack([tuned["macs"] / 1e6, tuned["top1"]])
    _same_points(drawn[np.lexsort(drawn.T[::-1])], *expected[np.lexsort(expected.T[::-1])].T)
    assert len(drawn) == len(summary["arms"]) == 8


def test_every_arm_is_timed_as_deployed_after_the_last_fine_tune(artifacts):
    storage, summary, *_, figs = artifacts
    speed = summary["speed"]
    assert speed["version"] == 2 and speed["measured"] and speed["deploy"] == summary["job"]["deploy"] == "cpu"
    models = {r["model"] for r in speed["rows"]}
    assert models == {"base", "adaptive", "baseline", "gc", "uniform", "tau@2x", "uniform@2x", "magnitude@2x",
                      "lamp@2x"}
    assert {(r["engine"], r["batch"]) for r in speed["rows"]} == {(e, b) for e in ("eager", "onnxruntime")
                                                                   for b in (1, 64, 256)}
    assert all(r["repeats"] >= 20 for r in speed["rows"])
    # the stage ran after every fine-tune had finished (never beside one)
    stages = {t["stage"]: t for t in summary["timeline"]}
    assert stages["speed"]["start"] >= max(t["end"] for name, t in stages.items() if name.startswith("fine-tune "))
    # speed.png: one panel per batch, a bar for the base and each arm, heights the deployed throughputs
    deployed = [r for r in speed["rows"] if r["engine"] == "eager" and r["threads"] == max(speed["threads"])]
    heights = [bar.get_height() for ax in figs["speed"].axes for bar in ax.patches]
    assert heights == pytest.approx([r["throughput"] for r in sorted(deployed, key=lambda r: r["batch"])])
    # each arm's row and trial carry its latency and throughput beside its MACs
    trials = pq.read_table(storage / "trials.parquet").to_pandas().query("kind == 'finetune'")
    for row in summary["arms"]:
        b1 = next(r for r in deployed if r["model"] == row["arm"] and r["batch"] == 1)
        big = next(r for r in deployed if r["model"] == row["arm"] and r["batch"] == 256)
        assert (row["latency_ms"], row["throughput"], row["speed_batch"]) == (b1["latency_ms"], big["throughput"], 256)
        trial = trials[trials["arm"] == row["arm"]].iloc[0]
        assert trial["latency_ms"] == pytest.approx(row["latency_ms"]) and trial["macs"] == row["macs_m"] * 1e6
    # accuracy against measured latency: every fine-tuned trial
    drawn = np.concatenate([_offsets(c) for c in figs["accuracy_latency"].axes[0].collections])
    expected = np.column_stack([trials["latency_ms"], trials["top1"]])
    _same_points(drawn[np.lexsort(drawn.T[::-1])], *expected[np.lexsort(expected.T[::-1])].T)


def test_report_md_links_plots_that_exist(full_run):
    storage, summary = full_run
    report = (storage / "report.md").read_text()  # written at the run's end
    assert render_report(str(storage)).endswith("report.md")  # and re-rendered from the artifacts alone
    for name in ("probes", "probe_accuracy", "trajectory", "groups", "accuracy_macs", "speed", "accuracy_latency",
                 "timeline"):
        assert f"(plots/{name}.png)" in report
        image = mpimg.imread(storage / "plots" / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 200 and np.ptp(image) > 0
    assert "| Adaptive GC |" in report and f"{summary['pruned']['top1']:.2f}" in report
    assert "## Inference speed" in report and "Deploy target **cpu** (fp32)" in report
    assert "| Latency b1 (ms) | img/s b256 | Speed-up b256 |" in report
    assert f"{summary['tau']:.4f}" in report
    # METHOD.md §4: the summary and the report say how many probes removed no channel (kept in τ's sample)
    probes = pq.read_table(storage / "probes.parquet").to_pylist()
    empty = sum(p["macs"] >= summary["baseline"]["macs"] for p in probes)
    assert summary["probes_removing_nothing"] == empty
    assert (f"{empty} of which removed no channel" in report) == (empty > 0)
    assert f"Spearman(ΔG, top-1 drop) = {summary['probe_accuracy']['spearman_delta_g_top1_drop']:.3f}" in report


def test_report_of_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({}))
    with pytest.raises(GeopruneError, match="not a finished geoprune run"):
        render_report(str(tmp_path))


def test_a_speed_record_from_before_issue_15_still_renders():
    """Run directories keep working: a version-1 record (base against the Adaptive GC architecture) renders as it did."""
    from geoprune_ray.app.report import plot_speed, speed_section

    speed = {"device": "cpu", "device_name": "cpu", "threads": 2,
             "rows": [{"batch": b, "base_latency_ms": 1.0 * b, "pruned_latency_ms": 0.8 * b, "base_throughput": 1000.0,
                       "pruned_throughput": 1250.0, "speedup": 1.25, "repeats": 5} for b in (1, 256)]}
    text = "\n".join(speed_section(speed, 0.6))
    assert "| 256 | 256.000 | 204.800 | 1000 | 1250 | 1.25× |" in text and "MACs ratio ×0.600" in text
    heights = [bar.get_height() for ax in plot_speed(speed).axes for bar in ax.patches]
    assert heights == [1000.0, 1250.0, 1000.0, 1250.0]
