"""Bad image folders are bad input: refused in the driver's preflight (before Ray starts) with exit 2 and one line
that names the file or the classes, never an internal error from a Ray worker half-way through a run.

None of these needs Ray: the preflight fails before ``connect``, so they ask for no ``ray_cluster``.
"""

import io
import logging

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import assert_refused
from geoprune_ray.app.cli import main
from geoprune_ray.core import data
from geoprune_ray.core.data import load_dataset

CLASSES = ("bird", "cat", "dog")


def _image_folder(root, per_class=3, size=12):
    """A tiny image folder of real PNGs: train/ and test/, one subfolder per class."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in CLASSES:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return root


def _truncated_png() -> bytes:
    """A PNG whose header is intact (Image.open succeeds) but whose pixel data stops half-way."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def _corrupt_train(folder):
    return [str(_random_bytes(folder / "train" / "bird" / "0015.jpg")), "delete or replace it"]


def _corrupt_test(folder):
    return [str(_random_bytes(folder / "test" / "dog" / "0007.jpg")), "delete or replace it"]


def _truncated_train(folder):
    bad = folder / "train" / "cat" / "0009.png"
    bad.write_bytes(_truncated_png())
    return [str(bad), "cannot be decoded", "delete or replace it"]


def _renamed_test_class(folder):
    (folder / "test" / "cat").rename(folder / "test" / "cat2")
    return [f"imagefolder {folder}: test/ has classes ['cat2'] that train/ lacks and lacks ['cat']", "name the class"]


def _missing_test_class(folder):
    (folder / "test" / "dog").rename(folder / "dog-later")
    return ["test/ lacks ['dog']"]


CASES = {"random bytes in train": _corrupt_train, "random bytes in test": _corrupt_test,
         "truncated image in train": _truncated_train, "test class renamed": _renamed_test_class,
         "test class missing": _missing_test_class}


@pytest.mark.parametrize("spoil", CASES.values(), ids=CASES.keys())
def test_a_bad_image_folder_is_refused_before_anything_starts(spoil, tmp_path, capsys):
    folder = _image_folder(tmp_path / "images")
    words = spoil(folder)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "bad-data", "model": {"name": "convnet", "width": 0.5, "input_size": 16},  # convnet: the data's size
        "data": {"name": f"imagefolder:{folder}"}, "protocol": {"baseline_epochs": 1, "finetune_epochs": 1}}))
    out = tmp_path / "out"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    code = main(["run", str(job), "--storage", str(out)])

    assert_refused(code, capsys.readouterr().err, words)
    assert not out.exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_good_image_folder_passes_the_check_and_says_so_when_large(tmp_path, caplog, monkeypatch):
    folder = _image_folder(tmp_path)
    (folder / "train" / "cat" / "notes.txt").write_text("not an image, and not an image file: ImageFolder skips it")
    with caplog.at_level(logging.INFO, logger="geoprune_ray"):
        train, test = load_dataset(f"imagefolder:{folder}", "train"), load_dataset(f"imagefolder:{folder}", "test")
    assert train.classes == test.classes == CLASSES and len(train) == len(test) == 9
    assert torch.equal(train.labels, torch.arange(3).repeat_interleave(3))
    assert train.fit(3, 16).images_at(torch.arange(9)).shape == (9, 3, 16, 16)
    assert not [r for r in caplog.records if "checking" in r.getMessage()]  # a small folder: no progress line

    monkeypatch.setattr(data, "CHECK_PROGRESS_FILES", 5)  # a large one (over a few hundred files) says so first
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="geoprune_ray"):
        load_dataset(f"imagefolder:{folder}", "train")
    progress = [r.getMessage() for r in caplog.records]
    assert progress == [f"checking that the 9 images under {folder / 'train'} decode"], progress
