"""What users prune for: inference latency and throughput, measured as the model is deployed (issue 15).

``deploy_speed`` times the base and every fine-tuned model on the deploy target's device (``core.deploy``):
- CPU: fp32 at batches 1, 64 and 256, on 1 thread and on every core the timing holds, in eager PyTorch and in ONNX
  Runtime on the model exported as ``geoprune export`` writes it;
- GPU: eager with ``cudnn.benchmark``, bf16 and fp16 with channels_last and fp32 as the target lists them, at
  batches 1, 256 and the largest of 4096/1024 that fits, each pass timed with CUDA events.
Every figure is the median of at least ``MIN_REPEATS`` timed passes after warm-up, the models' passes taking turns
so that a load coming and going on the machine slows them alike; each speed-up is over the base in the same
setting, and (given the MACs) also a fraction of the model's MACs reduction.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from .deploy import ALIGN, MIN_REPEATS, deploy_target, not_measured
from .geometry import torch_threads
from .pruning import aligned_macs

CPU_BATCHES = (1, 64, 256)
GPU_BATCHES = (1, 256)
GPU_LARGE = (4096, 1024)  # the largest of these that fits is timed too
ENGINES_CPU = ("eager", "onnxruntime")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_threads(available: int) -> tuple[int, ...]:
    """The thread counts timed on a CPU: one, and every core the timing holds (when more than one)."""
    return tuple(sorted({1, max(1, available)}))


def _median_times(runners: Sequence[Callable[[], None]], device: torch.device, min_repeats: int,
                  budget_s: float) -> list[list[float]]:
    """Each runner timed in turns (one pass of each per round, after 2 warm-up passes each): at least ``min_repeats``
    rounds, more while under ``budget_s``. On CUDA each pass is timed with CUDA events."""
    for run in runners:
        for _ in range(2):
            run()
    sync(device)
    times: list[list[float]] = [[] for _ in runners]
    started = time.perf_counter()
    while len(times[0]) < min_repeats or (len(times[0]) < 10 * min_repeats and time.perf_counter() - started < budget_s):
        for run, taken in zip(runners, times):
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                run()
                end.record()
                end.synchronize()
                taken.append(begin.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                run()
                taken.append(time.perf_counter() - t0)
    return times


def _eager(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model(x)
    return run


def _export_onnx(model: nn.Module, input_shape: Sequence[int], path: str) -> str:
    """``model`` exported to ONNX with a dynamic batch, as ``geoprune export`` writes it."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (torch.randn(2, *input_shape),), dynamo=True, input_names=["input"],
                                    output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    verbose=False)
    program.save(path)
    return path


def _ort_session(path: str, threads: int):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads, run sequentially. Its threads do not spin once a
    pass ends: the models take turns, and one session's threads spinning would take the cores of the next."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _row(name: str, engine: str, precision: str, threads: Optional[int], batch: int, taken: list[float],
         base: list[float]) -> dict[str, Any]:
    median, base_median = statistics.median(taken), statistics.median(base)
    return {"model": name, "engine": engine, "precision": precision, "threads": threads, "batch": batch,
            "latency_ms": median * 1e3, "throughput": batch / median, "speedup": base_median / median,
            "repeats": len(taken), "spread_ms": (max(taken) - min(taken)) * 1e3}


def time_cpu(base: nn.Module, models: Mapping[str, nn.Module], input_shape: Sequence[int],
             threads: Sequence[int], batches: Sequence[int] = CPU_BATCHES, engines: Sequence[str] = ENGINES_CPU,
             min_repeats: int = MIN_REPEATS, budget_s: float = 1.0,
             skipped: Optional[dict[str, str]] = None) -> list[dict[str, Any]]:
    """Every model against the base on this CPU, fp32: per thread count, engine (eager PyTorch, ONNX Runtime on the
    exported model) and batch, the models' passes taking turns. Given ``skipped``, an engine that cannot take the
    models (an ONNX export that fails) is left out and said there, instead of raising."""
    import tempfile

    device = torch.device("cpu")
    named = {"base": base.cpu().eval(), **{n: m.cpu().eval() for n, m in models.items()}}
    rows = []
    with tempfile.TemporaryDirectory(prefix="geoprune-speed-") as folder:
        exported = {}
        if "onnxruntime" in engines:
            try:
                exported = {n: _export_onnx(m, input_shape, f"{folder}/{i}.onnx") for i, (n, m) in enumerate(named.items())}
            except Exception as exc:  # noqa: BLE001 - a model ONNX cannot take is timed in eager PyTorch only
                if skipped is None:
                    raise
                skipped["onnxruntime"] = f"export failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                engines = [e for e in engines if e != "onnxruntime"]
        for t in threads:
            with torch_threads(t):
                for engine in engines:
                    sessions = {n: _ort_session(path, t) for n, path in exported.items()} if engine != "eager" else {}
                    for batch in batches:
                        x = torch.randn(batch, *input_shape)
                        if engine == "eager":
                            runners = [_eager(m, x) for m in named.values()]
                        else:
                            feed = {"input": x.numpy()}
                            runners = [(lambda s=s: s.run(None, feed)) for s in sessions.values()]
                        times = _median_times(runners, device, min_repeats, budget_s)
                        rows += [_row(n, engine, "fp32", t, batch, taken, times[0])
                                 for n, taken in zip(named, times)]
    return rows


def time_gpu(base: nn.Module, models: Mapping[str, nn.Module], input_shape: Sequence[int], device: torch.device,
             precisions: Sequence[str], min_repeats: int = MIN_REPEATS, budget_s: float = 1.0) -> list[dict[str, Any]]:
    """Every model against the base on a GPU, eager with ``cudnn.benchmark``, per precision (bf16 and fp16 with
    channels_last, fp32 as it is) and batch: 1, 256 and the largest of 4096/1024 that fits."""
    torch.backends.cudnn.benchmark = True
    rows = []
    named = {"base": base, **models}
    for precision in precisions:
        dtype = DTYPES[precision]
        fmt = torch.preserve_format if precision == "fp32" else torch.channels_last
        cast = {n: copy.deepcopy(m).eval().to(device=device, dtype=dtype, memory_format=fmt) for n, m in named.items()}
        for batch in (*GPU_BATCHES, *GPU_LARGE):
            if batch in GPU_LARGE and any(r["batch"] in GPU_LARGE and r["precision"] == precision for r in rows):
                continue  # the larger one fitted
            try:
                x = torch.randn(batch, *input_shape, device=device, dtype=dtype).to(memory_format=fmt)
                times = _median_times([_eager(m, x) for m in cast.values()], device, min_repeats, budget_s)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                continue
            rows += [_row(n, "eager", precision, None, batch, taken, times[0]) for n, taken in zip(cast, times)]
        del cast
        torch.cuda.empty_cache()
    return rows


def deploy_speed(base: nn.Module, models: Mapping[str, nn.Module], input_shape: Sequence[int], deploy: str,
                 device: Optional[str | torch.device] = None, cpus: Optional[int] = None,
                 macs: Optional[Mapping[str, int]] = None, budget_s: float = 1.0) -> dict[str, Any]:
    """The speed table of a run: every model (arms, fine-tuned steps) against the base, timed as ``deploy`` runs it
    (``core.deploy``). ``device``: where to time (None: the target's device if this process has one); a GPU target
    without a GPU here is recorded as not measured. ``macs``: each model's MACs and the base's, for the speed-up as a
    fraction of the MACs reduction; every row also carries the reduction in MACs counted with channels padded to
    ``ALIGN`` (``aligned_macs_reduction``: what the hardware can realise). ``budget_s``: how long each setting may go on timing past ``MIN_REPEATS`` passes."""
    target = deploy_target(deploy)
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if target.device == "cuda" and torch.cuda.is_available() else "cpu")
    if device.type != target.device:
        return not_measured(deploy)
    record: dict[str, Any] = {"version": 2, "deploy": deploy, "device": str(device), "precision": target.precisions[0],
                              "measured": True}
    record["quiet_wait_s"] = wait_for_quiet()
    if device.type == "cuda":
        record["device_name"] = torch.cuda.get_device_name(device)
        rows = time_gpu(base, models, input_shape, device, target.precisions, budget_s=budget_s)
    else:
        record["device_name"] = cpu_name()
        record["threads"] = list(cpu_threads(cpus or torch.get_num_threads()))
        record["skipped"] = {}
        rows = time_cpu(base, models, input_shape, record["threads"], budget_s=budget_s, skipped=record["skipped"])
    record["align"] = ALIGN
    aligned = {n: aligned_macs(m, input_shape, ALIGN) for n, m in {"base": base, **models}.items()}
    for row in rows:
        row["aligned_macs_reduction"] = aligned["base"] / aligned[row["model"]]
        if macs:
            reduction = macs["base"] / macs[row["model"]] if macs.get(row["model"]) else None
            row["macs_reduction"] = reduction
            row["speedup_per_macs"] = row["speedup"] / reduction if reduction else None
    record["rows"] = rows
    return record


def wait_for_quiet(busy_below: float = 0.25, longest_s: float = 30.0) -> float:
    """Wait until the machine's other processes use less than ``busy_below`` of one core (the workers of the last
    fine-tunes, say, still exiting), for at most ``longest_s``; returns the seconds waited. A timing beside a busy
    process measures the process, not the model."""
    import psutil

    started = time.perf_counter()
    me = psutil.Process()
    me.cpu_percent()
    quiet = 0
    while time.perf_counter() - started < longest_s and quiet < 2:
        total = psutil.cpu_percent(interval=0.5) * psutil.cpu_count() / 100  # cores busy, this process included
        mine = me.cpu_percent() / 100
        quiet = quiet + 1 if total - mine < busy_below else 0
    return time.perf_counter() - started


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else the platform's processor string)."""
    import platform

    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"
