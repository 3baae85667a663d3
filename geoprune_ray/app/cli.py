"""The ``geoprune`` command line. Bad input: one line on stderr, exit code 2 (``--debug``: traceback)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import GeopruneError, Interrupted

EXIT_USAGE = 2


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
    baseline = TrainConfig(epochs=epochs, batch_size=args.batch_size, seed=method.seed) if epochs else None
    ft = finetune_defaults(epochs=args.finetune_epochs, batch_size=args.batch_size, seed=method.seed)
    result = adaptive_prune(args.model, args.dataset, args.dataset, method=method, baseline=baseline,
                            finetune_cfg=ft, width=args.width, weights=args.weights, input_size=args.input_size,
                            data_dir=args.data_dir, download=args.download, device=args.device)
    result.save(out)
    s = result.summary
    print(f"r* = {s['controller']['r_star']:.3f} (τ = {s['tau']:.4f}, G_noise = {s['g_noise']:.4f}): "
          f"top-1 {s['baseline']['top1']:.2f}% → {s['pruned']['top1']:.2f}%, "
          f"MACs {s['baseline']['macs'] / 1e6:.2f}M → {s['pruned']['macs'] / 1e6:.2f}M, "
          f"params {s['baseline']['params'] / 1e6:.3f}M → {s['pruned']['params'] / 1e6:.3f}M; wrote {out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ..distributed.pipeline import run_job
    from .spec import load_spec

    spec = load_spec(args.job)
    summary = run_job(spec, args.storage or f"runs/{spec.name}", address=args.address)
    print(format_table(summary))
    print(f"wrote {args.storage or f'runs/{spec.name}'}")
    return 0


def format_table(summary: dict) -> str:
    """The paper-style table: Method | Top-1 | Params (M) | MACs (M) | ΔG."""
    lines = ["| Method | Top-1 (%) | Params (M) | MACs (M) | ΔG |", "|---|---|---|---|---|"]
    for row in summary["arms"]:
        lines.append(f"| {row['method']} | {row['top1']:.2f} | {row['params_m']:.3f} | {row['macs_m']:.2f} | "
                     f"{row['delta_g']:.4f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="geoprune", description="Structured pruning controlled by the geometry of classes.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the result line")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("inspect", help="params, MACs and prunable groups of a model")
    p.add_argument("model", help="zoo name (resnet18, resnet50, mobilenet_v2, convnet), torchvision:NAME or pkg.mod:factory")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--input-size", type=int, default=None, help="square input size (default: the model's, else 32)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("prune", help="run the adaptive method in-process and write summary.json and model/")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True, help="digits, fashion-mnist, cifar10, cifar100 or imagefolder:PATH")
    p.add_argument("--out", required=True, help="output folder (summary.json, model/)")
    p.add_argument("--weights", help="a trained state_dict to start from (skips baseline training)")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="baseline epochs (default 5, or 0 with --weights)")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--download", action="store_true", help="let torchvision download a missing dataset")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method default (recorded in summary.json), e.g. --set controller=bisect")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("run", help="run a job spec on Ray (embedded local Ray unless --address/RAY_ADDRESS)")
    p.add_argument("job", help="a job spec (YAML), e.g. jobs/quickstart.yaml")
    p.add_argument("--storage", default=None,
                   help="the run directory: a local path or a pyarrow URI (default runs/NAME); "
                        "running again with the same folder resumes")
    p.add_argument("--address", default=None,
                   help="a Ray cluster (GCS) address such as 10.0.0.1:6379, or 'auto' (default: $RAY_ADDRESS, "
                        "else an embedded local Ray)")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                            format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
        return args.func(args)
    except Interrupted as exc:
        print(f"geoprune: interrupted: {exc}", file=sys.stderr)
        return 130
    except GeopruneError as exc:
        if debug:
            raise
        print(f"geoprune: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("geoprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
