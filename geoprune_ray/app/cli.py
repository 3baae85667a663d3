"""The ``geoprune`` command line: one ``cmd_*`` function per subcommand, the parser (``build_parser``, one ``_add_*``
per subcommand and per shared option block), and ``main``, which maps failures to exit codes. Bad input: one line on
stderr, exit code 2 (``--debug``: traceback)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import GeopruneError, Interrupted
from ..distributed.guard import EXIT_INTERRUPTED, SIGNALS

EXIT_USAGE = 2
EXIT_INTERNAL = 1
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of argparse's usage block
        raise GeopruneError(message, f"see '{self.prog} --help'")


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise GeopruneError(f"--set {text!r} is not KEY=VALUE", "write e.g. --set probes=8")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _method_config(overrides: Sequence[str]):
    from ..core.config import MethodConfig

    return MethodConfig.from_dict(dict(_parse_override(o) for o in overrides))


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..core.models import build_model, default_input_size
    from ..core.pruning import dependency_groups, macs_params

    model = build_model(args.model, args.num_classes, args.in_channels, args.width).eval()
    size = args.input_size or default_input_size(args.model) or 32
    shape = (args.in_channels, size, size)
    macs, params = macs_params(model, shape)
    groups = dependency_groups(model, shape, args.num_classes)
    report = {"model": args.model, "num_classes": args.num_classes, "width": args.width,
              "input_shape": list(shape), "params": params, "macs": macs,
              "groups": [{"name": g.name, "channels": g.channels, "modules": g.modules} for g in groups]}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.model}: {params / 1e6:.3f} M params, {macs / 1e6:.2f} M MACs at {size}×{size}, "
          f"{len(groups)} prunable groups")
    width = max(len(g.name) for g in groups) if groups else 5
    print(f"  {'group':<{width}}  channels  layers")
    for g in groups:
        print(f"  {g.name:<{width}}  {g.channels:>8}  {g.modules:>6}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from ..core.config import TrainConfig, finetune_defaults
    from ..core.reference import adaptive_prune

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise GeopruneError(f"output folder {out} is not empty", "pass another --out, or --overwrite")
    method = _method_config(args.set)
    epochs = args.epochs if args.epochs is not None else (0 if args.weights else 5)
    baseline = (TrainConfig(epochs=epochs, batch_size=args.batch_size, seed=method.seed, capture=args.step_capture)
                if epochs else None)
    ft = finetune_defaults(epochs=args.finetune_epochs, batch_size=args.batch_size, seed=method.seed,
                           capture=args.step_capture)
    result = adaptive_prune(args.model, args.dataset, args.dataset, method=method, baseline=baseline,
                            finetune_cfg=ft, width=args.width, weights=args.weights, input_size=args.input_size,
                            data_dir=args.data_dir, download=args.download, device=args.device,
                            deploy=args.deploy)
    result.save(out)
    s = result.summary
    print(f"r* = {s['controller']['r_star']:.3f} (τ = {s['tau']:.4f}, G_noise = {s['g_noise']:.4f}): "
          f"top-1 {s['baseline']['top1']:.2f}% → {s['pruned']['top1']:.2f}%, "
          f"MACs {s['baseline']['macs'] / 1e6:.2f}M → {s['pruned']['macs'] / 1e6:.2f}M, "
          f"params {s['baseline']['params'] / 1e6:.3f}M → {s['pruned']['params'] / 1e6:.3f}M; wrote {out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ..distributed.pipeline import run_job
    from .report import arms_table, render_report
    from ..core.spec import load_spec

    spec = load_spec(args.job)
    storage = args.storage or f"runs/{spec.name}"
    _resume_with(f"geoprune resume {storage}")
    summary = run_job(spec, storage, address=args.address, report=render_report)
    print(arms_table(summary["arms"]))
    print(f"wrote {storage} (report: {storage.rstrip('/')}/report.md)")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from ..core.spec import JobSpec
    from ..distributed.pipeline import STATE, run_job
    from ..core.rundir import RunDir
    from .report import arms_table, render_report

    run = RunDir(args.run_dir)
    if not run.exists(STATE):
        raise GeopruneError(f"{args.run_dir} is not a geoprune run directory (no {STATE})",
                            "pass the --storage folder of an earlier 'geoprune run'")
    if run.exists("summary.json"):
        summary = run.read_json("summary.json")
        render_report(run)
        print(f"{args.run_dir} already finished; report re-rendered")
    else:
        _resume_with(f"geoprune resume {args.run_dir}")
        summary = run_job(JobSpec.from_dict(run.read_json(STATE)["spec"]), args.run_dir, address=args.address,
                          report=render_report)
    print(arms_table(summary["arms"]))
    return 0


def _resume_with(command: str) -> None:
    SIGNALS.resume_hint = f"; resume with: {command}"


def cmd_report(args: argparse.Namespace) -> int:
    from ..core.rundir import RunDir
    from .report import render_batch, render_report

    run = RunDir(args.run_dir)
    if run.exists("batch.json"):
        jobs = run.read_json("batch.json")["jobs"]
        runs = {n: RunDir(j["run_dir"]).read_json("summary.json") for n, j in jobs.items() if j["exit_code"] == 0}
        print(f"wrote {render_batch(run, runs)}")
    else:
        print(f"wrote {render_report(run)}")
    return 0


def cmd_evidence(args: argparse.Namespace) -> int:
    from .evidence import write_evidence

    path, records = write_evidence(args.source, args.output)
    print(path.read_text(), end="")
    print(f"wrote {path} ({len(records)} seed{'s' if len(records) != 1 else ''})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_model

    rec = export_model(args.run_dir, args.format, args.out)
    print(f"wrote {rec['path']} ({args.format}; outputs match PyTorch's to {rec['max_abs_diff']:.2e} on a batch of "
          f"{rec['batch']})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..core.config import TrainConfig
    from ..core.reference import resolve
    from ..core.train import evaluate, train

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise GeopruneError(f"{out} exists", "pass another --out, or --overwrite")
    if out.parent.exists() and not out.parent.is_dir():
        raise GeopruneError(f"--out {out}: {out.parent} is a file", "pass a path inside a folder")
    import torch

    torch.manual_seed(args.seed)
    model, train_set, test_set, card = resolve(args.model, args.dataset, args.dataset, width=args.width,
                                               input_size=args.input_size, data_dir=args.data_dir,
                                               download=args.download)
    train(model, train_set, TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                        capture=args.step_capture), args.device)
    top1 = evaluate(model, test_set, args.device)["top1"]
    from ..core.rundir import RunDir

    RunDir(str(out.parent)).write_file(out.name, lambda tmp: torch.save(
        {k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp))
    print(f"{card.arch} on {train_set.name}: top-1 {top1:.2f}% after {args.epochs} epochs; wrote {out} "
          f"(use it as model.weights in a job spec)")
    return 0


def _batch_job_command(spec_file: Path, storage: str, address: str) -> list[str]:
    """How a batch runs one of its jobs: this command's ``run``, in a process of its own, on the batch's cluster."""
    return [sys.executable, "-m", "geoprune_ray.app.cli", "run", str(spec_file), "--storage", storage,
            "--address", address]


def cmd_batch(args: argparse.Namespace) -> int:
    from ..core.spec import load_batch
    from ..distributed.batch import run_batch
    from .report import render_batch

    batch = load_batch(args.batch)
    storage = args.storage or f"runs/{batch.name}"
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        names = [job.name for job in batch.jobs]
        unknown = [n for n in wanted if n not in names]
        if unknown or not wanted:
            raise GeopruneError(f"--only {args.only}: no job {', '.join(map(repr, unknown)) or 'named'} in the batch",
                                f"name some of its jobs, comma-separated: {', '.join(names)}")
        batch = batch.model_copy(update={"jobs": tuple(job for job in batch.jobs if job.name in wanted)})
    _resume_with(f"geoprune batch {args.batch} --storage {storage}" + (f" --only {args.only}" if args.only else ""))
    if args.address and args.address.startswith(("http://", "https://")):
        from .submit import submit_batch

        return submit_batch(batch, storage, args.address, follow=True)
    run_batch(batch, storage, address=args.address, report=render_batch, job_command=_batch_job_command)
    print((Path(storage) / "batch.md").read_text() if "://" not in storage else f"wrote {storage}/batch.md")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench import run_bench

    if args.pairs < 1:
        raise GeopruneError(f"--pairs {args.pairs} must be at least 1", "e.g. --pairs 2")
    result = run_bench(args.output, args.quick, args.device, args.job, args.pairs)
    print((Path(args.output) / "bench.md").read_text())
    return 0 if result else 1


def cmd_submit(args: argparse.Namespace) -> int:
    from .submit import submit

    return submit(args.job, args.address, args.storage, pip=args.pip, follow=args.follow)


def cmd_status(args: argparse.Namespace) -> int:
    from .submit import status

    return status(args.address, args.job_id)


def cmd_stop(args: argparse.Namespace) -> int:
    from .submit import stop

    return stop(args.address, args.job_id)


# The parser: one function per subcommand, in the order ``geoprune --help`` lists them, and one per option block that
# several subcommands share.

_ADDRESS_HELP = ("a Ray cluster's GCS address such as 10.0.0.1:6379, or 'auto' (default: $RAY_ADDRESS, else an "
                 "embedded local Ray). Not the dashboard URL: that is for 'geoprune submit'")
_DATASET_HELP = "digits, fashion-mnist, cifar10, cifar100 or imagefolder:PATH"


def _add_address(p: argparse.ArgumentParser, extra: str = "") -> None:
    """--address of the commands that drive a pipeline from here: a GCS address."""
    p.add_argument("--address", default=None, help=_ADDRESS_HELP + extra)


def _add_dashboard_address(p: argparse.ArgumentParser) -> None:
    """--address of the Jobs API commands: a dashboard URL."""
    p.add_argument("--address", default=None, help="the Ray dashboard URL (default: $RAY_ADDRESS)")


def _add_model_data(p: argparse.ArgumentParser, out_help: str) -> None:
    """The in-process commands' model, dataset and output (``prune``, ``train``)."""
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True, help=_DATASET_HELP)
    p.add_argument("--out", required=True, help=out_help)


def _add_size(p: argparse.ArgumentParser, input_size_help: Optional[str] = None) -> None:
    """The model's width multiplier and square input size."""
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--input-size", type=int, default=None, help=input_size_help)


def _add_data_device(p: argparse.ArgumentParser) -> None:
    """Where the in-process commands find their data and what they train on."""
    p.add_argument("--data-dir", default=None)
    p.add_argument("--download", action="store_true", help="let torchvision download a missing dataset")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")


def _add_step_capture(p: argparse.ArgumentParser) -> None:
    p.add_argument("--step-capture", action="store_true",
                   help="compile the training step (CUDA graphs on a GPU; off by default, see BENCHMARKS.md)")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="params, MACs and prunable groups of a model")
    p.add_argument("model", help="zoo name (resnet18, resnet50, mobilenet_v2, convnet), torchvision:NAME or pkg.mod:factory")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-channels", type=int, default=3)
    _add_size(p, "square input size (default: the model's, else 32)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="run the adaptive method in-process and write summary.json and model/")
    _add_model_data(p, "output folder (summary.json, model/)")
    p.add_argument("--weights", help="a trained state_dict to start from (skips baseline training)")
    _add_size(p)
    p.add_argument("--epochs", type=int, default=None, help="baseline epochs (default 5, or 0 with --weights)")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    _add_data_device(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method default (recorded in summary.json), e.g. --set controller=bisect")
    _add_deploy(p)
    _add_step_capture(p)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_prune)


def _add_deploy(p: argparse.ArgumentParser) -> None:
    from ..core.deploy import DEFAULT, TARGETS

    p.add_argument("--deploy", choices=list(TARGETS), default=DEFAULT,
                   help=f"where the pruned model will run: kept channels are rounded for it (cpu: multiples of "
                        f"{TARGETS['cpu'].round_to}, cuda and cuda-bf16: {TARGETS['cuda'].round_to}) unless --set "
                        f"round_to=N (1: none); default {DEFAULT}")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a baseline in-process and write its state_dict (a job's model.weights)",
                       description="Train a model in-process (no Ray) and save its weights for a job spec.",
                       epilog="example: geoprune train --model convnet --width 0.25 --dataset fashion-mnist "
                              "--epochs 4 --out weights/convnet.pt")
    _add_model_data(p, "the state_dict file to write")
    _add_size(p)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    _add_data_device(p)
    _add_step_capture(p)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_train)


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run a job spec on Ray (embedded local Ray unless --address/RAY_ADDRESS)",
                       description="Run a job spec: baseline, probes, τ, sensitivity, controller, fine-tunes, "
                                   "report. Running again with the same --storage resumes.",
                       epilog="example: geoprune run jobs/quickstart.yaml --storage runs/quickstart")
    p.add_argument("job", help="a job spec (YAML), e.g. jobs/quickstart.yaml")
    p.add_argument("--storage", default=None,
                   help="the run directory: a local path or a pyarrow URI such as s3://bucket/runs/x "
                        "(default runs/NAME); running again with the same folder resumes")
    _add_address(p)
    p.set_defaults(func=cmd_run)


def _add_resume(sub) -> None:
    p = sub.add_parser("resume", help="finish an interrupted run from its run directory",
                       epilog="example: geoprune resume runs/quickstart")
    p.add_argument("run_dir", help="the --storage folder of an earlier run")
    _add_address(p)
    p.set_defaults(func=cmd_resume)


def _add_batch(sub) -> None:
    p = sub.add_parser("batch", help="run several job specs as concurrent pipelines on one cluster",
                       description="Run a batch spec (defaults + jobs) concurrently on one Ray cluster and write "
                                   "one combined table (batch.md, batch.parquet, plots/batch.png).",
                       epilog="example: geoprune batch jobs/paper_cifar100.yaml --storage runs/paper")
    p.add_argument("batch", help="a batch spec (YAML): name, defaults, jobs")
    p.add_argument("--storage", default=None, help="the batch folder; each job runs in STORAGE/JOB_NAME")
    p.add_argument("--only", default=None, metavar="JOB[,JOB]",
                   help="run only these jobs of the batch (e.g. one seed per sitting); the others' folders are left "
                        "as they are, and 'geoprune evidence STORAGE' reads every finished one")
    _add_address(p, "; a dashboard URL (http://HOST:8265) submits each job through the Jobs API")
    p.set_defaults(func=cmd_batch)


def _add_submit(sub) -> None:
    p = sub.add_parser("submit", help="submit a job spec to a Ray cluster through the Ray Jobs API",
                       description="Submit 'geoprune run JOB' as a Ray job. --address is the dashboard URL "
                                   "(http://127.0.0.1:8265 after 'ray dashboard cluster.yaml'), not the GCS address.",
                       epilog="example: geoprune submit jobs/fashion_resnet18.yaml --address http://127.0.0.1:8265 "
                              "--storage s3://bucket/runs/fashion --follow")
    p.add_argument("job", help="a job spec (YAML)")
    _add_dashboard_address(p)
    p.add_argument("--storage", default=None,
                   help="the run directory as the cluster sees it: shared storage such as s3://bucket/runs/NAME "
                        "(default: ~/geoprune-runs/NAME on the node that runs the job)")
    p.add_argument("--pip", action="store_true",
                   help="install this geoprune-ray version and its pinned dependencies into the job's runtime_env")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    p.set_defaults(func=cmd_submit)


def _add_status_stop(sub) -> None:
    p = sub.add_parser("status", help="status of submitted jobs (all, or one)")
    p.add_argument("job_id", nargs="?", help="a job id printed by 'geoprune submit'")
    _add_dashboard_address(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("stop", help="stop a submitted job")
    p.add_argument("job_id")
    _add_dashboard_address(p)
    p.set_defaults(func=cmd_stop)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="render report.md and plots from a run (or batch) directory",
                       epilog="example: geoprune report runs/quickstart")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)


def _add_evidence(sub) -> None:
    p = sub.add_parser("evidence", help="the evidence table (arms over seeds) from finished runs or their JSON",
                       description="From a batch (or run) folder: write one JSON per run and evidence.md, "
                                   "mean ± std over seeds. From a folder of those JSON files: re-render evidence.md.",
                       epilog="example: geoprune evidence runs/evidence_fashion --output bench/results/evidence_fashion")
    p.add_argument("source", help="a batch folder, a run folder, or a folder of evidence JSON")
    p.add_argument("--output", default=None, help="folder for the JSON and evidence.md (default SOURCE/evidence, "
                                                  "or SOURCE itself for JSON)")
    p.set_defaults(func=cmd_evidence)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="measure training throughput, the data path, probe steps and the probe pool",
                       epilog="example: geoprune bench --quick --output runs/bench")
    p.add_argument("--output", required=True, help="folder for bench.json and bench.md")
    p.add_argument("--quick", action="store_true", help="a reduced run for a CPU (minutes)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--job", default=None, help="instead: run this job spec with the comparison arms off and report "
                                               "its stage times, search overhead and peak memory")
    p.add_argument("--pairs", type=int, default=2, help="with --job: measure Ray and one process this many times each, "
                                                        "alternating which goes first (default 2)")
    p.set_defaults(func=cmd_bench)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a run's pruned model, checked against PyTorch's outputs",
                       epilog="example: geoprune export runs/quickstart --format onnx")
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "state"])
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/export)")
    p.set_defaults(func=cmd_export)


_SUBCOMMANDS = (_add_inspect, _add_prune, _add_train, _add_run, _add_resume, _add_batch, _add_submit, _add_status_stop,
                _add_report, _add_evidence, _add_bench, _add_export)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="geoprune", description="Structured pruning controlled by the geometry of classes.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the result line")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Progress goes to stdout (the log); stderr holds only the final line of a failure or an interruption."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # Every command connects to Ray explicitly (``pipeline.connect``): a call made after the shutdown (a thread still
    # ending) must fail, not start a second Ray of its own.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    SIGNALS.install()
    SIGNALS.resume_hint = ""
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stdout,
                            format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
        logging.captureWarnings(True)  # library warnings are progress too: in the log, not on stderr
        return args.func(args)
    except Interrupted as exc:
        _stderr(f"geoprune: interrupted: {exc.message}{SIGNALS.resume_hint or f' ({exc.hint})'}")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt as exc:
        why = f" ({exc.args[0]})" if exc.args else ""
        _stderr(f"geoprune: interrupted{why}{SIGNALS.resume_hint}")
        return EXIT_INTERRUPTED
    except GeopruneError as exc:
        if debug:
            raise
        _stderr(f"geoprune: error: {exc}")
        return EXIT_USAGE
    except OSError as exc:
        if debug:
            raise
        if exc.errno in _DISK_ERRORS or "No space left on device" in str(exc):
            where = f" writing {exc.filename}" if exc.filename else ""
            _stderr(f"geoprune: error: {exc.strerror or exc}{where} (free space or pick another --storage/--out; "
                    f"nothing half-written was left)")
            return EXIT_USAGE
        return _internal(exc)
    except Exception as exc:  # an internal fault: say so, and where the traceback is
        if debug:
            raise
        return _internal(exc)
    finally:
        _shutdown_embedded_ray()


def _stderr(line: str) -> None:
    sys.stdout.flush()  # the progress above it first
    print(line, file=sys.stderr, flush=True)


def _shutdown_embedded_ray() -> None:
    """Stop the Ray this command embedded (its processes with it), now rather than in an exit hook. A signal during
    the shutdown exits at once (``guard``); the watchdog then ends what is left."""
    cluster = sys.modules.get("geoprune_ray.distributed.cluster")  # only a command that imported it embeds a Ray
    if cluster is None:
        return
    try:
        cluster.disconnect()
    except KeyboardInterrupt:
        pass


def _internal(exc: BaseException) -> int:
    first = (str(exc).strip().splitlines() or [""])[0]
    _stderr(f"geoprune: internal error: {type(exc).__name__}: {first} (run again with --debug for the traceback)")
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
