"""The evidence table: collected from a real run, rendered, and the committed results regenerated."""

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from geoprune_ray.app.cli import main
from geoprune_ray.app.evidence import collect, load_records, render

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "bench" / "results" / "evidence_fashion"


def test_probe_accuracy_and_spearman_of_a_real_run(full_run):
    storage, summary = full_run
    probes = pq.read_table(storage / "probes.parquet").to_pandas()
    acc = summary["probe_accuracy"]
    # every probe was evaluated after BN recalibration; the drop is against the unpruned model's top-1
    assert probes["top1"].between(0, 100).all()
    assert (probes["top1_drop"] - (acc["base_top1"] - probes["top1"])).abs().max() < 1e-9
    rho = probes["delta_g"].corr(probes["top1_drop"], method="spearman")
    assert acc["spearman_delta_g_top1_drop"] == pytest.approx(rho)
    # on a trained model, removing more geometry costs more accuracy
    assert rho > 0.5


def test_collect_and_render_a_real_run(full_run, tmp_path, capsys):
    storage, summary = full_run
    record = collect(storage)
    assert record["tau"] == summary["tau"] and record["seed"] == summary["job"]["seed"]
    assert [a["arm"] for a in record["arms"]] == [a["arm"] for a in summary["arms"]]
    assert len(record["probes"]) == len(pq.read_table(storage / "probes.parquet"))
    assert {g["group"] for g in record["groups"]} == set(pq.read_table(storage / "sensitivity.parquet")["group"].to_pylist())

    assert main(["evidence", str(storage), "--output", str(tmp_path / "ev")]) == 0
    assert "wrote" in capsys.readouterr().out
    written = json.loads((tmp_path / "ev" / "digits-full.json").read_text())
    assert written == json.loads(json.dumps(record))
    text = (tmp_path / "ev" / "evidence.md").read_text()
    adaptive = next(a for a in summary["arms"] if a["arm"] == "adaptive")
    assert f"| Adaptive GC | {adaptive['r']:.3f} | {adaptive['macs_m']:.3f} |" in text
    assert f"{adaptive['top1']:.2f} |" in text
    # re-rendering from the JSON alone gives the same table
    assert main(["evidence", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "evidence.md").read_text() == text


def _record(seed: int, arms: list, job: str | None = None, **fields) -> dict:
    """A hand-built evidence record: the skeleton every one shares (model, data, the fine-tune recipe), with its own
    ``arms`` and any top-level ``fields`` (tau, r_star, baseline, ...) over the defaults."""
    record = {"evidence_version": 1, "job": job or f"seed-{seed}", "seed": seed, "model": {"arch": "m", "width": 1.0},
              "dataset": {"name": "d", "train_size": 10, "test_size": 5},
              "protocol": {"baseline_epochs": 1, "finetune_epochs": 1,
                           "finetune_recipe": {"momentum": 0.9, "lr": 0.02, "schedule": "cosine", "weight_decay": 0.0,
                                               "label_smoothing": 0.1, "batch_size": 8, "augment": True}},
              "g_noise": 0.01, "tau": 0.1, "r_star": 0.3, "controller_steps": 3, "baseline": {"macs": 1e6},
              "arms": arms, "probes": [], "spearman_delta_g_top1_drop": None, "groups": []}
    return {**record, **fields}


def test_render_statistics_over_seeds():
    """Mean ± sample std, paired differences and τ's coefficient of variation, checked by hand."""
    def record(seed, tau, adaptive, uniform, rho):
        arms = [{"arm": "adaptive", "method": "Adaptive GC", "r": 0.3, "macs_m": 1.0, "params_m": 0.1,
                 "top1_before_finetune": adaptive[0], "top1": adaptive[1], "delta_g": 0.1, "delta_g_after": 0.05},
                {"arm": "uniform", "method": "Uniform L2", "r": 0.2, "macs_m": 1.0, "params_m": 0.1,
                 "top1_before_finetune": uniform[0], "top1": uniform[1], "delta_g": 0.2, "delta_g_after": 0.1}]
        return _record(seed, arms, tau=tau, baseline={"macs": 2e6}, spearman_delta_g_top1_drop=rho,
                       groups=[{"group": "g", "channels": 8, "tau_l": tau, "ratio": 0.3}])
    text = render([record(0, 0.1, (80, 90), (70, 89), 0.9), record(1, 0.2, (82, 91), (72, 92), 0.7)])
    assert "| Adaptive GC | 0.300 ± 0.000 | 1.000 ± 0.000 | 0.500 ± 0.000 |" in text
    assert "81.00 ± 1.41 | 90.50 ± 0.71 |" in text
    assert "before fine-tune 10.00 ± 0.00" in text and "after fine-tune 0.00 ± 1.41" in text
    assert "ahead after fine-tuning in 1 of 2 seeds" in text
    assert "τ over seeds: 0.1500 ± 0.0707, coefficient of variation 0.471" in text
    assert "Spearman(ΔG, top-1 drop): 0.800 ± 0.141" in text


def test_committed_evidence_regenerates_the_published_table():
    """bench/results/evidence_fashion holds the raw per-seed JSON; the table in evidence.md and in
    BENCHMARKS.md must be exactly what they render to."""
    records = load_records(COMMITTED)
    assert len({r["seed"] for r in records}) == len(records) >= 3  # one record per seed, at least three
    text = render(records)
    assert (COMMITTED / "evidence.md").read_text() == text
    assert text in (ROOT / "BENCHMARKS.md").read_text()
    # the records are real runs: every arm present, probes with their measured top-1
    for r in records:
        assert {a["arm"] for a in r["arms"]} == {"baseline", "gc", "adaptive", "uniform"}
        assert len(r["probes"]) >= 8 and all("top1_drop" in p for p in r["probes"])
        probes = pd.DataFrame(r["probes"])
        assert r["spearman_delta_g_top1_drop"] == pytest.approx(
            probes["delta_g"].corr(probes["top1_drop"], method="spearman"))


def test_render_allocations_over_seeds():
    """The allocation section on known records (two seeds, two compressions): means, paired signs against τ_L
    weights, Spearman over allocations with its permutation p-value, and the r* check, worked out by hand."""
    from geoprune_ray.app import allocations

    def arm(alloc, c, before, after, dg, gap=0.001):
        return {"arm": f"{alloc}@{c:g}x", "method": f"{alloc} at {c:g}×", "r": 0.3, "macs_m": 1.0 / c,
                "params_m": 0.1, "top1_before_finetune": before, "top1": after, "delta_g": dg, "delta_g_after": 0.0,
                "macs_gap": gap, "allocation": alloc, "compression": c}

    def record(seed, shift):
        arms = [{"arm": "baseline", "method": "Baseline", "r": 0.0, "macs_m": 1.0, "params_m": 0.2,
                 "top1_before_finetune": 90.0, "top1": 91.0, "delta_g": 0.0, "delta_g_after": 0.0},
                {"arm": "adaptive", "method": "Adaptive GC", "r": 0.25, "macs_m": 0.625, "params_m": 0.1,
                 "top1_before_finetune": 85.0, "top1": 90.8 - shift, "delta_g": 0.1, "delta_g_after": 0.0},
                {"arm": "uniform", "method": "Uniform L2", "r": 0.3, "macs_m": 0.55, "params_m": 0.1,
                 "top1_before_finetune": 84.0, "top1": 90.9 - shift, "delta_g": 0.1, "delta_g_after": 0.0}]
        # ΔG rises exactly as top-1 after fine-tune falls: Spearman 1 over all eight allocation models
        for i, (alloc, c) in enumerate((a, c) for c in (2, 4) for a in ("tau", "uniform", "magnitude", "lamp")):
            arms.append(arm(alloc, c, 80.0 - i, 90.6 - i * 0.5 - shift, 0.1 + 0.01 * i))
        return _record(seed, arms, r_star=0.25 + shift / 10, baseline={"macs": 1e6, "top1": 90.0})

    records = [record(0, 0.0), record(1, 0.2)]
    text = render(records)
    assert "## Allocations at fixed compression" in text
    # τ_L weights at 2×: top-1 after 90.6 and 90.4
    assert ("| 2× | τ_L weights | 2.00 ± 0.00× | 0.10 ± 0.00% | 0.1000 ± 0.0000 | 80.00 ± 0.00 | 90.50 ± 0.14 | "
            "0.0000 ± 0.0000 |") in text
    # LAMP at 4× is the 8th model: 1.5 points behind τ_L weights at 4× (the 5th) in both seeds
    assert "| 4× | LAMP | -3.00 ± 0.00 (-3.00, -3.00) | -1.50 ± 0.00 (-1.50, -1.50) | 2 of 2 |" in text
    rho, p = allocations.spearman_test([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], [1, 2, 3, 4, 5, 6, 7, 8])
    assert rho == pytest.approx(1.0) and p == pytest.approx(1 / (allocations.PERMUTATIONS + 1))
    assert "| 0 | 1.00 (8) | 0.0001 | 1.00 | 1.00 |" in text
    assert allocations.spearman_test([0.1, 0.1, 0.1], [1, 2, 3]) == (None, None)  # undefined: no ranking
    # the r* check: fine-tuned baseline 91.0; seed 0's τ_L curve 2× 90.6, 4× 88.6, r* (1.6×) 90.8
    check = allocations.r_star_check(records[0])
    assert check["reduction"] == pytest.approx(1.6) and check["reference_top1"] == 91.0
    assert check["within_0.5"] == pytest.approx(2.0) and check["within_1"] == pytest.approx(2.0)
    assert allocations.r_star_check(records[1])["within_0.5"] == pytest.approx(1.6)  # 2×: 90.4 < 90.5
    # any arm: seed 0's τ_L weights at 2× (90.6) is the largest within both; in seed 1 Uniform L2 (1.82×, 90.7)
    # passes where the method's allocation stops at r*'s 1.6×
    assert "| 0 | 0.250 | 1.60× | 90.80 | 91.00 | 2.00× | 2.00× | 2.00× (tau at 2×) | 2.00× (tau at 2×) |" in text
    assert "| 1 | 0.270 | 1.60× | 90.60 | 91.00 | 1.60× | 2.00× | 1.82× (Uniform L2) | 2.00× (tau at 2×) |" in text
    assert "r* over seeds: 0.260 ± 0.014" in text


def test_render_r_star_over_baselines_of_one_seed():
    """Runs of one method seed on three baselines: r*'s range against one controller step, said in words."""
    def record(job, seed, baseline_seed, r_star, tau):
        arms = [{"arm": "adaptive", "method": "Adaptive GC", "r": r_star, "macs_m": 0.5, "params_m": 0.1,
                 "top1_before_finetune": 80.0, "top1": 87.0, "delta_g": 0.1, "delta_g_after": 0.05}]
        return _record(seed, arms, job=job, baseline_seed=baseline_seed, controller_delta=0.05, tau=tau,
                       r_star=r_star, baseline={"macs": 1e6, "top1": 88.0})

    records = [record("seed-0", 0, 0, 0.10, 0.15), record("seed-0-baseline-1", 0, 1, 0.20, 0.17),
               record("seed-0-baseline-2", 0, 2, 0.15, 0.16), record("seed-1", 1, 1, 0.12, 0.15)]
    text = render(records)
    assert "## r* and baseline noise" in text
    assert "| seed-0-baseline-1 | 0 | 1 | 88.00 | 0.1700 | 0.200 | 2.00× | 87.00 |" in text
    assert ("Seed 0, 3 baselines: r* 0.150 ± 0.050, range 0.100 (more than one controller step, δ = 0.05); "
            "τ 0.1600 ± 0.0100.") in text
    assert "Over seeds (one baseline each): r* 0.110 ± 0.014, range 0.020." in text
    # seed 1 ran on baseline 1 too: one baseline, two method seeds
    assert "Baseline seed 1, 2 method seeds: r* 0.160 ± 0.057, range 0.080." in text
    assert "Baseline noise alone moves r* by up to 0.100, more than one controller step." in text
    assert "r* and baseline noise" not in render([records[0], records[3]])  # one baseline per seed: no section


def _committed(name: str, heading: str) -> list:
    """The committed JSON of bench/results/NAME: its evidence.md is what they render to, and the section from
    ``heading`` on is quoted in BENCHMARKS.md (one level down). Returns the records."""
    folder = ROOT / "bench" / "results" / name
    records = load_records(folder)
    text = render(records)
    assert (folder / "evidence.md").read_text() == text
    section = text[text.index(heading):]
    assert section.replace("## ", "### ", 1) in (ROOT / "BENCHMARKS.md").read_text()
    return records


def test_committed_r_star_runs_regenerate_their_table():
    """bench/results/rstar_baselines: the quickstart on five baselines (jobs/rstar_baselines.yaml). Its evidence.md
    and the "r* and baseline noise" section quoted in BENCHMARKS.md are what the JSON renders to."""
    records = _committed("rstar_baselines", "## r* and baseline noise")
    assert sorted((r["seed"], r["baseline_seed"]) for r in records) == [(0, 0), (0, 1), (0, 2), (1, 1), (2, 2)]
    # the runs on one baseline seed trained the same baseline (deterministic training on one machine)
    top1 = {}
    for r in records:
        top1.setdefault(r["baseline_seed"], set()).add(r["baseline"]["top1"])
    assert all(len(v) == 1 for v in top1.values()), top1


def test_committed_allocation_evidence_regenerates_its_table():
    """bench/results/evidence_allocations (jobs/evidence_allocations.yaml, one JSON per seed, three seeds): its evidence.md
    and the allocation section quoted in BENCHMARKS.md are what the JSON renders to; every allocation ran at every
    compression, each at its target MACs within ±1% or with its gap recorded."""
    records = _committed("evidence_allocations", "## Allocations at fixed compression")
    assert sorted(r["seed"] for r in records) == [0, 1, 2]  # the three seeds of the job, one run each
    for r in records:
        at = {(a["allocation"], a["compression"]): a for a in r["arms"] if a.get("compression")}
        assert set(at) == {(a, c) for a in ("tau", "uniform", "magnitude", "lamp") for c in (2, 3, 4)}
        for (_, c), a in at.items():
            target = r["baseline"]["macs"] / c
            assert a["macs_gap"] == pytest.approx((a["macs_m"] * 1e6 - target) / target, abs=1e-6)
        assert {a["arm"] for a in r["arms"]} >= {"adaptive", "baseline", "gc", "uniform"}
