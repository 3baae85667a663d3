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
    assert len(drawn) == len(summary["arms"]) == 4


def test_speed_plot_and_the_measured_speed(artifacts):
    _, summary, *_, figs = artifacts
    speed = summary["speed"]
    assert [r["batch"] for r in speed["rows"]] == [1, 256]
    heights = [bar.get_height() for ax in figs["speed"].axes for bar in ax.patches]
    assert heights == pytest.approx([v for r in speed["rows"] for v in (r["base_throughput"], r["pruned_throughput"])])
    for r in speed["rows"]:
        assert r["repeats"] >= 5 and r["base_latency_ms"] > 0 and r["pruned_latency_ms"] > 0
        assert r["speedup"] == pytest.approx(r["base_latency_ms"] / r["pruned_latency_ms"])


def test_report_md_links_plots_that_exist(full_run):
    storage, summary = full_run
    report = (storage / "report.md").read_text()  # written at the run's end
    assert render_report(str(storage)).endswith("report.md")  # and re-rendered from the artifacts alone
    for name in ("probes", "probe_accuracy", "trajectory", "groups", "accuracy_macs", "speed", "timeline"):
        assert f"(plots/{name}.png)" in report
        image = mpimg.imread(storage / "plots" / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 200 and np.ptp(image) > 0
    assert "| Adaptive GC |" in report and f"{summary['pruned']['top1']:.2f}" in report
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
