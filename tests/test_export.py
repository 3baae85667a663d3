"""`geoprune export` and `geoprune train`: exported models give the PyTorch model's outputs on real data."""

import json
import os
import stat

import numpy as np
import pytest
import torch

from geoprune_ray.app.cli import main
from geoprune_ray.core.artifact import ModelCard, load_pruned, save_pruned
from geoprune_ray.core.geometry import normalize
from geoprune_ray.core.models import build_model, load_weights
from geoprune_ray.core.rundir import write_json
from geoprune_ray.app.export import export_model


@pytest.fixture(scope="module")
def digits_batch(digits):
    _, test_set = digits
    images = test_set.images[:64].float() / 255.0
    return normalize(images, test_set.mean, test_set.std)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "state"])
def test_export_matches_pytorch_on_real_images(fmt, full_run, digits_batch, tmp_path, capsys):
    storage, _ = full_run
    out = tmp_path / fmt
    assert main(["export", str(storage), "--format", fmt, "--out", str(out)]) == 0
    assert "outputs match PyTorch's" in capsys.readouterr().out
    model, card = load_pruned(storage / "model")
    with torch.inference_mode():
        expected = model(digits_batch).numpy()
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(None, {"input": digits_batch.numpy()})[0]  # a batch size other than the export's
    elif fmt == "torchscript":
        got = torch.jit.load(str(out / "model.torchscript.pt"))(digits_batch).detach().numpy()
    else:
        loaded, loaded_card = load_pruned(out / "model")
        assert loaded_card == card
        with torch.inference_mode():
            got = loaded(digits_batch).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
    assert (got.argmax(1) == expected.argmax(1)).all()
    record = json.loads((out / f"{fmt}.check.json").read_text())
    assert record["max_abs_diff"] <= 1e-4 and record["input_shape"] == list(card.input_shape)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_train_writes_weights_a_job_can_use(tmp_path, capsys):
    out = tmp_path / "w" / "convnet.pt"
    assert main(["train", "--model", "convnet", "--width", "0.25", "--dataset", "digits", "--epochs", "2",
                 "--batch-size", "64", "--lr", "0.1", "--device", "cpu", "--out", str(out)]) == 0
    top1 = float(capsys.readouterr().out.split("top-1 ")[1].split("%")[0])
    assert top1 > 50
    model = load_weights(build_model("convnet", 10, 3, 0.25), out)  # weights_only inside
    assert sum(p.numel() for p in model.parameters()) > 0
    assert main(["train", "--model", "convnet", "--dataset", "digits", "--out", str(out)]) == 2  # exists


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)],
                         ids=["umask022", "umask027"])
def test_artifacts_honour_the_umask(umask, file_mode, dir_mode, tmp_path):
    """Written to a temporary name (mkstemp 0600, mkdtemp 0700) and renamed, artifacts still get open()'s modes."""
    card = ModelCard("convnet", 10, 3, 0.25, (3, 8, 8), (0.5,) * 3, (0.25,) * 3)
    old = os.umask(umask)
    try:
        save_pruned(tmp_path / "model", build_model("convnet", 10, 3, 0.25), [], card)  # a run's model/
        write_json(tmp_path / "summary.json", {"r_star": 0.5})  # the in-process summary
        for fmt in ("onnx", "torchscript", "state"):
            export_model(tmp_path, fmt)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    folders = ["model", "export", "export/model"]
    files = ["model/model.pt", "model/model.json", "summary.json", "export/model.onnx", "export/onnx.check.json",
             "export/model.torchscript.pt", "export/torchscript.check.json", "export/model/model.pt",
             "export/model/model.json", "export/state.check.json"]
    assert modes == {**dict.fromkeys(folders, dir_mode), **dict.fromkeys(files, file_mode)}  # and no temporary file
