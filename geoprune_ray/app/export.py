"""Export a run's pruned model (ONNX, TorchScript or the safe state format), checked against PyTorch.

The exported model is loaded back the way a user would load it (ONNX Runtime, ``torch.jit.load``,
``load_pruned`` with ``weights_only=True``) and its outputs on a batch are compared with the
PyTorch model's; a mismatch is an error, not a warning.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from ..core.artifact import MODEL_FILE, load_pruned, read_history, save_pruned
from ..core.rundir import RunDir
from ..errors import GeopruneError

FORMATS = ("onnx", "torchscript", "state")
SUFFIX = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "state": "model"}
ATOL, RTOL = 1e-4, 1e-3


def _outputs_match(reference: torch.Tensor, other: torch.Tensor) -> float:
    diff = (reference - other).abs().max().item()
    if not torch.allclose(reference, other, atol=ATOL, rtol=RTOL):
        raise RuntimeError(f"exported model's outputs differ from PyTorch's by up to {diff:.3g}")
    return diff


def export_model(run_dir: str | Path, fmt: str, out: Optional[str | Path] = None, batch: int = 8) -> dict[str, Any]:
    """Export ``run_dir/model`` as ``fmt`` to ``out`` (default ``run_dir/export/``); returns the check record."""
    if fmt not in FORMATS:
        raise GeopruneError(f"unknown export format {fmt!r}", f"use one of {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    if not (run_dir / "model" / MODEL_FILE).is_file():
        raise GeopruneError(f"{run_dir} holds no pruned model (no model/{MODEL_FILE})",
                            "pass the --storage folder of a finished run")
    model, card = load_pruned(run_dir / "model")
    model.eval()
    out_dir = Path(out) if out is not None else run_dir / "export"
    if out_dir.exists() and not out_dir.is_dir():
        raise GeopruneError(f"--out {out_dir} is a file", "pass a folder for --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    x = torch.randn(batch, *card.input_shape)
    with torch.inference_mode():
        reference = model(x)
    target = out_dir / SUFFIX[fmt]
    if fmt == "state":  # save_pruned writes its folder atomically
        save_pruned(target, model, read_history(run_dir / "model"), card)
        loaded, _ = load_pruned(target)
        with torch.inference_mode():
            diff = _outputs_match(reference, loaded(x))
    else:
        def write(tmp: str) -> float:
            if fmt == "onnx":
                return _export_onnx(model, x, reference, tmp)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.jit.save(torch.jit.trace(model, x[:1]), tmp)
                return _outputs_match(reference, torch.jit.load(tmp)(x).detach())

        diff = RunDir(str(out_dir)).write_file(target.name, write)
    record = {"format": fmt, "path": str(target), "max_abs_diff": diff, "batch": batch, "atol": ATOL, "rtol": RTOL,
              "input_shape": list(card.input_shape), "mean": list(card.mean), "std": list(card.std),
              "classes": list(card.classes), "note": "inputs are images scaled to [0, 1], then normalised by mean/std"}
    RunDir(str(out_dir)).write_json(f"{fmt}.check.json", record)
    return record


def _export_onnx(model: torch.nn.Module, x: torch.Tensor, reference: torch.Tensor, path: str) -> float:
    try:
        import onnxruntime as ort
    except ImportError:
        raise GeopruneError("ONNX export needs onnx, onnxscript and onnxruntime",
                            "reinstall geoprune-ray (they are among its dependencies), or pip install onnx onnxscript "
                            "onnxruntime") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, input_names=["input"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    program.save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    return _outputs_match(reference, got)
