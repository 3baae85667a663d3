"""``geoprune bench``: speed figures measured side by side in one run (BENCHMARKS.md has the results).

Training throughput of the three paper models against a plain PyTorch loop, the data path, one
probe step and its parts with, on a GPU, the probe actor's GPU memory (``core``); the probe-actor
pool against sequential probes with the same total threads, beside the machine's plain-process
ceiling (``pool``); the cost of one Ray Train launch and a reduced pipeline's wall time by stage
with its search overhead, inference speed and peak memory (``pipeline``). ``--job`` runs one job
spec instead: through Ray with the comparison arms off, against the same spec in one process (the
distribution overhead), then with every arm it names.

Run on their own (``python -m geoprune_ray.bench.NAME``), the scripts behind other figures of BENCHMARKS.md §4:
``cpu_accounting`` (the CPU time of every process while a command runs), ``idle_actors`` (what idle Ray actors cost
a training process), ``worker_niceness`` (what Ray's worker niceness costs it); and ``fashion_subset``, which writes
the Fashion-MNIST subset that ``bench/device_check.sh`` carries to the GPU machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from ..core.deploy import slow_reason


def run_bench(output: str, quick: bool, device: Optional[str] = None, job: Optional[str] = None,
              pairs: int = 1) -> dict[str, Any]:
    """The whole bench; with ``job`` (a job-spec path) only that job's pipeline, comparison arms off, against the same
    spec in one process (``pairs`` times each side, see ``job_bench``)."""
    from ..distributed.cluster import connect

    if job is not None:
        from ..core.spec import load_spec
        from .pipeline import job_bench

        spec = load_spec(job).to_dict()
        started = time.perf_counter()
        connect(None)
        ray_startup = time.perf_counter() - started
        result: dict[str, Any] = {"quick": quick, "job": job, "ray_startup_s": ray_startup,
                                  **job_bench(spec, ray_startup, pairs)}
    else:
        from .core import run_core
        from .pipeline import run_pipeline
        from .pool import run_pool

        result = {"quick": quick, "core": run_core(quick, device)}
        started = time.perf_counter()
        connect(None)
        result["ray_startup_s"] = time.perf_counter() - started  # one-time; the pipeline below joins this Ray
        result["pool"] = run_pool(quick)
        result.update(run_pipeline(quick))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (out / "bench.md").write_text(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    """``bench.md``: the whole bench's tables, or a job bench's figures (``--job``); then, where the result has them,
    the Ray Train launch and the pipeline's figures, as rows of the last table."""
    lines = _core_tables(result) if "core" in result else _job_figures(result)
    if "train_launch" in result:
        lines.append(_launch_row(result["train_launch"]))
    if "pipeline" in result:
        lines += _pipeline_rows(result)
    lines.append("")
    return "\n".join(lines)


def _core_tables(result: dict[str, Any]) -> list[str]:
    """The whole bench's title, its training tables and its figures' table up to the probe pool."""
    core, pool = result["core"], result["pool"]
    lines = [f"# geoprune bench ({'quick' if result['quick'] else 'full'}) on {core['device_name']}, "
             f"{_threads(core['threads'])}", ""]
    lines += _training_table(core)
    lines += _core_figures(core)
    lines += [_startup_row(result)] + _pool_rows(pool)
    return lines


def _training_table(core: dict[str, Any]) -> list[str]:
    """Training throughput, the project's loop against a plain one; then resnet18's with step capture, if measured."""
    lines = ["| model | batch | plain loop img/s | project img/s | project / plain | project TFLOP/s |",
             "|---|---|---|---|---|---|"]
    for t in core["training"]:
        lines.append(f"| {t['arch']}@{t['width']} | {t['batch']} | {t['plain_img_s']:.1f} | {t['project_img_s']:.1f} | "
                     f"{t['ratio']:.3f} | {t['project_tflops']:.4f} |")
    if core.get("training_resnet18"):
        lines += ["", "| resnet18 (10 classes) | batch | plain loop img/s | project img/s | project / plain | "
                      "step capture img/s | capture / plain |", "|---|---|---|---|---|---|---|"]
        for t in core["training_resnet18"]:
            lines.append(f"| {t['arch']}@{t['width']} | {t['batch']} | {t['plain_img_s']:.1f} | "
                         f"{t['project_img_s']:.1f} | {t['ratio']:.3f} | {t['capture_img_s']:.1f} | "
                         f"{t['capture_over_plain']:.3f} |")
    return lines


def _core_figures(core: dict[str, Any]) -> list[str]:
    """The figures' table, opened with the data path's rows and one probe step's, part by part."""
    d, p = core["data_path"], core["probe"]
    lines = ["", "| figure | value |", "|---|---|",
             f"| loader alone (img/s) | {d['loader_img_s']:.0f} |",
             f"| training step (img/s) | {d['train_img_s']:.1f} |",
             f"| loader's share of a step | {d['loader_share']:.4f} |",
             f"| probe step, {p['arch']}@{p['width']}, {p['calibration_images']} calibration images (s) | "
             f"{p['probe_s']:.3f} |",
             f"| … copy + prune (s) | {p['copy_and_prune_s']:.3f} |",
             f"| … BN recalibration (s) | {p['recalibrate_s']:.3f} |",
             f"| … features + ΔG (s) | {p['features_and_delta_g_s']:.3f} |"]
    if p.get("gpu_memory_gib") is not None:
        lines.append(f"| probe actor's peak GPU memory (GiB) | {p['gpu_memory_gib']:.2f} |")
    return lines


def _pool_rows(pool: dict[str, Any]) -> list[str]:
    """The probe pool's speed-up and, where measured, the machine's ceiling beside it."""
    lines = [f"| probe pool: {pool['probes']} probes, {pool['actors']} actors vs 1 process with "
             f"{pool['threads_total']} threads: speed-up (medians of {pool['repeats']}) | {pool['speedup']:.2f}× |"]
    if "process_ceiling" in pool:
        lines += [f"| … the machine's ceiling: {pool['actors']} plain 1-thread processes (no Ray) vs the same "
                  f"process | {pool['process_ceiling']:.2f}× |",
                  f"| … pool speed-up as a fraction of that ceiling | {pool['pool_efficiency']:.2f} |"]
    return lines


def _job_figures(result: dict[str, Any]) -> list[str]:
    """A job bench's title and figures: Ray against one process, pair by pair, what each decided, the one process's
    stages, all arms, then Ray's start-up and, measured alone, its pieces."""
    local, pairs = result["in_process"], result["pairs"]
    mean = f" (mean of {len(pairs)} pairs)" if len(pairs) > 1 else ""
    lines = [f"# geoprune bench --job {result['job']}", "", "| figure | value |", "|---|---|",
             f"| Ray: adaptive arm only, Ray start-up included (s){mean} | {result['ray_wall_s']:.1f} |",
             f"| one process (adaptive_prune, {_threads(local['threads'])}) (s){mean} | "
             f"{result['in_process_wall_s']:.1f} |",
             f"| **distribution overhead**: Ray / one process{mean} | **{result['distribution_overhead']:.2f}×** |"]
    if len(pairs) > 1:
        lines += [f"| … pair {i + 1} ({'Ray first' if i % 2 == 0 else 'one process first'}): Ray / one process (s) | "
                  f"{p['ray_wall_s']:.1f} / {p['in_process_wall_s']:.1f} = {p['ratio']:.2f}× |"
                  for i, p in enumerate(pairs)]
    lines += [f"| … τ, r*, baseline top-1: Ray / one process | {result['pipeline']['tau']:.4f} / "
              f"{local['tau']:.4f}, {result['pipeline']['r_star']:.4f} / {local['r_star']:.4f}, "
              f"{result['pipeline']['baseline_top1']:.2f} / {local['baseline_top1']:.2f} |"]
    lines += [f"| … one process{' (its first run)' if mean else ''}: {k} (s) | {v:.1f} |"
              for k, v in local["timings_s"].items()]
    if "all_arms" in result:
        lines += [f"| Ray: all arms ({', '.join(result['all_arms']['job']['protocol']['arms'])}) (s) | "
                  f"{result['all_arms']['wall_s']:.1f} |",
                  f"| … all arms / adaptive only | {result['all_arms_over_adaptive']:.2f}× |"]
    lines += [_startup_row(result)]
    if "ray_pieces" in result:
        lines += _ray_pieces_rows(result["ray_pieces"])
    return lines


def _ray_pieces_rows(pieces: dict[str, Any]) -> list[str]:
    """The parts of Ray's gap to one process, each measured on its own on the idle machine."""
    tl, te = pieces["train_launch"], pieces["tune_experiment"]
    return [_launch_row(tl, "alone: "),
            f"| alone: one Tune experiment of one empty trial (s): to the trial's first line / in all | "
            f"{te['to_trial_s']:.1f} / {te['tune_s']:.1f} |",
            f"| alone: a new actor importing the pipeline's modules (s) | {pieces['cold_actor_s']:.1f} |"]


def _startup_row(result: dict[str, Any]) -> str:
    return f"| Ray start-up, one-time (s) | {result['ray_startup_s']:.1f} |"


def _launch_row(tl: dict[str, Any], prefix: str = "") -> str:
    """One Ray Train launch of 0 epochs, in all and by part."""
    return (f"| {prefix}one Ray Train launch (0 epochs) (s): start-up / worker / checkpoint + teardown | "
            f"{tl['launch_s']:.1f}: {tl['startup_s']:.1f} / {tl['worker_s']:.1f} / {tl['end_s']:.1f} |")


def _pipeline_rows(result: dict[str, Any]) -> list[str]:
    """The pipeline's wall time by stage, its search overhead, peak memory, GPU use, where it ran, and the pruned
    model's MACs and inference speed."""
    pl, t = result["pipeline"], result["pipeline"]["timings_s"]
    lines = [f"| {'reduced ' if 'core' in result else ''}pipeline wall time (s) | {pl['wall_s']:.1f} |"]
    lines += [f"| … {k} (s) | {v:.1f} |" for k, v in t.items()]
    overhead = pl["search_overhead"]
    sampled = " (sampled on the all-arms run)" if "all_arms" in result else ""
    lines += [f"| search overhead: (probes + sensitivity + controller) / final fine-tune | "
              f"{overhead:.2f} |" if overhead is not None else "| search overhead | n/a |",
              f"| peak memory, all processes (PSS, GiB){sampled} | {pl['peak_pss_gib']:.2f} |"]
    if pl.get("gpu_busy") is not None:
        lines.append(f"| GPU busy over the run (NVML, 3 s samples) | {pl['gpu_busy']:.0%} |")
    if pl.get("train_device"):
        gpu_ids = "; ".join(pl["resources"]["actor_gpu_ids"]) or "none"
        lines.append(f"| where it ran: the probe actors' GPU ids / the adaptive fine-tune's device | "
                     f"{gpu_ids} / {pl['train_device']} |")
    speed, kept = pl.get("speed") or {}, pl.get("macs_ratio")
    if kept:
        lines.append(f"| pruned model's MACs kept (its MACs reduction) | {kept:.3f} ({1 / kept:.2f}×) |")
    return lines + _speed_rows(speed, kept) + _frontier_rows(pl.get("frontier") or [])


def _speed_rows(speed: dict[str, Any], kept: Optional[float]) -> list[str]:
    """Inference latency and throughput, base against pruned, by batch; each speed-up beside the MACs reduction."""
    if speed.get("version", 1) >= 2:
        return _deployed_speed_rows(speed)
    lines = []
    for row in speed.get("rows", []):
        lines.append(f"| inference batch {row['batch']} ({speed['device_name']}, {_threads(speed['threads'])}): "
                     f"base / pruned latency (ms), img/s, speed-up | {row['base_latency_ms']:.2f} / "
                     f"{row['pruned_latency_ms']:.2f}, {row['base_throughput']:.0f} / {row['pruned_throughput']:.0f}, "
                     f"{row['speedup']:.2f}× |")
        if kept:
            lines.append(f"| … batch {row['batch']} speed-up as a fraction of the MACs reduction | "
                         f"{row['speedup'] * kept:.2f} |")
    return lines


def _frontier_rows(frontier: list[dict[str, Any]]) -> list[str]:
    """Accuracy against measured latency, every arm (the report's accuracy_latency.png, as rows)."""
    return [f"| accuracy vs latency: {a['method']}: top-1 (%), MACs (M), latency b1 (ms), speed-up b{a['speed_batch']} | "
            f"{a['top1']:.2f}, {a['macs_m']:.3f}, {a['latency_ms']:.3f}, {a['speedup']:.2f}× |"
            for a in frontier if a.get("latency_ms") is not None]


def _deployed_speed_rows(speed: dict[str, Any]) -> list[str]:
    """The speed stage's figures (``core.speed.deploy_speed``): every timed model against the base, per engine,
    precision, threads and batch, with its speed-up as a fraction of its MACs reduction and, where that is far below
    1, why."""
    if not speed["measured"]:
        return [f"| inference as deployed ({speed['deploy']}) | {speed['reason']} |"]
    lines = []
    for r in speed["rows"]:
        if r["model"] == "base":
            continue
        where = f"{speed['device_name']}, {r['precision']}, {r['engine']}" + (
            f", {_threads(r['threads'])}" if r["threads"] else "")
        lines.append(f"| inference {r['model']} batch {r['batch']} ({where}): latency (ms), img/s, speed-up, as a "
                     f"fraction of the MACs reduction | {r['latency_ms']:.2f}, {r['throughput']:.0f}, "
                     f"{r['speedup']:.2f}×, {_fraction(r.get('speedup_per_macs'))} |")
        reason = slow_reason(r)
        if reason:
            lines.append(f"| … why | {reason} |")
    return lines


def _fraction(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _threads(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"
