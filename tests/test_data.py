import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from geoprune_ray.core import data
from geoprune_ray.core.data import (ImageSet, balanced_indices, list_datasets, load_dataset, read_idx, register_dataset,
                                    stratified_halves)
from geoprune_ray.errors import GeopruneError


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 20)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_fashion_mnist_from_data_dir_and_env(idx_dir, monkeypatch):
    ds = load_dataset("fashion-mnist", "train", data_dir=idx_dir)
    assert ds.images.shape == (40, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.num_classes == 10 and ds.classes[0] == "T-shirt/top" and ds.flip
    monkeypatch.setenv("GEOPRUNE_DATA", str(idx_dir))
    test = load_dataset("fashion-mnist", "test")
    assert len(test) == 20  # GEOPRUNE_DATA is searched before the system folder
    assert read_idx(idx_dir / "t10k-labels-idx1-ubyte.gz")[:5].tolist() == [0, 1, 2, 3, 4]


def test_missing_fashion_mnist_names_the_paths_searched(tmp_path, monkeypatch):
    import geoprune_ray.core.data as data

    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.delenv("GEOPRUNE_DATA", raising=False)
    with pytest.raises(GeopruneError) as err:
        load_dataset("fashion-mnist", "train", data_dir=tmp_path)
    assert str(tmp_path) in err.value.message and "apt-get install dataset-fashion-mnist" in err.value.hint


def test_real_fashion_mnist(fashion):
    train, test = fashion
    assert len(train) == 60_000 and len(test) == 10_000
    assert train.shape == (3, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10


def test_digits_split_is_fixed_and_stratified():
    a, b = load_dataset("digits", "train"), load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    assert torch.equal(a.images, b.images) and len(a) + len(test) == 1797
    assert a.images.shape[1:] == (1, 8, 8) and int(a.images.max()) == 255 and not a.flip
    assert (torch.bincount(test.labels) >= 35).all()


def test_fit_pads_small_images_resizes_others_and_repeats_gray(idx_dir):
    ds = load_dataset("fashion-mnist", "train", data_dir=idx_dir)
    padded = ds.fit(3, 32)
    assert padded.shape == (3, 32, 32) and len(padded.mean) == 3
    assert torch.equal(padded.images[:, 0, 2:30, 2:30], ds.images[:, 0])  # 28 → 32 by zero padding
    assert int(padded.images[:, :, :2].max()) == 0
    digits = load_dataset("digits", "train").fit(3, 32)  # 8 → 32 is a resize, not a pad
    assert digits.shape == (3, 32, 32) and float(digits.images[:, :, :4].float().mean()) > 0


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog", "eel"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    ds = load_dataset(f"imagefolder:{tmp_path}", "train").fit(3, 16)
    assert ds.classes == ("cat", "dog", "eel") and len(ds) == 9 and not ds.in_memory
    assert ds.images_at(torch.tensor([0, 4])).shape == (2, 3, 16, 16)
    with pytest.raises(GeopruneError, match="no train subfolder"):
        load_dataset(f"imagefolder:{tmp_path / 'train'}", "train")
    (tmp_path / "test").rename(tmp_path / "val")  # val/ is the evaluation split too, held to train/'s class names
    (tmp_path / "val" / "eel").rename(tmp_path / "val" / "emu")
    with pytest.raises(GeopruneError, match=r"val/ has classes \['emu'\] that train/ lacks and lacks \['eel'\]"):
        load_dataset(f"imagefolder:{tmp_path}", "test")


def test_bad_names_and_dirs(tmp_path):
    with pytest.raises(GeopruneError, match="unknown dataset"):
        load_dataset("mnist-ish", "train")
    with pytest.raises(GeopruneError, match="does not exist"):
        load_dataset("digits", "train", data_dir="/no/such/dir")
    with pytest.raises(GeopruneError, match="unknown split"):
        load_dataset("digits", "validation")
    with pytest.raises(GeopruneError, match="not found"):  # an empty folder and no download: refused, offline
        load_dataset("cifar10", "train", data_dir=tmp_path, download=False)


def test_the_registry_lists_the_datasets_in_order():
    assert list_datasets() == ["digits", "fashion-mnist", "cifar10", "cifar100", "imagefolder:PATH"]
    with pytest.raises(GeopruneError, match="use one of digits, fashion-mnist, cifar10, cifar100, imagefolder:PATH"):
        load_dataset("imagefolder", "train")  # a family is named with its argument


def test_a_registered_dataset_is_loaded_and_listed(monkeypatch, tmp_path):
    """Adding a dataset is one decorated loader; the registration is undone after the test."""
    monkeypatch.setattr(data, "_REGISTRY", dict(data._REGISTRY))
    calls = []

    @register_dataset("tiny", "four 2×2 gray images")
    def tiny(split, data_dir, download):
        calls.append((split, data_dir, download))
        return ImageSet("tiny", torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), ("a", "b"),
                        (0.5,), (0.25,), flip=False)

    @register_dataset("tinies", "tiny, named tinies:WHAT", argument="WHAT")
    def tinies(what, split, data_dir, download):
        calls.append((what, split))
        return tiny(split, data_dir, download)

    assert list_datasets()[-2:] == ["tiny", "tinies:WHAT"]
    ds = load_dataset("tiny", "test", data_dir=tmp_path)  # the arguments reach the loader (offline: no download)
    assert ds.name == "tiny" and ds.num_classes == 2 and calls == [("test", tmp_path, False)]
    assert load_dataset("tinies:x:y", "train").shape == (1, 2, 2) and calls[1] == ("x:y", "train")
    with pytest.raises(GeopruneError, match="unknown dataset 'tinies'"):
        load_dataset("tinies", "train")


def test_balanced_sampler():
    labels = torch.arange(4).repeat_interleave(torch.tensor([50, 30, 80, 40]))
    idx = balanced_indices(labels, 4, per_class=500, cap=10_000, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [30] * 4  # limited by the smallest class
    assert torch.bincount(labels[balanced_indices(labels, 4, 500, cap=40, seed=0)]).tolist() == [10] * 4
    assert torch.equal(idx, balanced_indices(labels, 4, 500, 10_000, seed=0))
    with pytest.raises(GeopruneError, match=r"classes \[4\] have no examples"):
        balanced_indices(labels, 5, 500, 10_000, seed=0)


def test_stratified_halves_are_disjoint_and_balanced():
    labels = torch.arange(3).repeat_interleave(11)
    a, b = stratified_halves(labels, seed=0)
    assert not set(a.tolist()) & set(b.tolist())
    assert torch.bincount(labels[a]).tolist() == torch.bincount(labels[b]).tolist() == [5, 5, 5]
