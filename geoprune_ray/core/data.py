"""Datasets as uint8 image tensors, fitted to the model's input, and the seeded samplers.

``load_dataset(name, split, data_dir=None, download=False)`` looks the name up in the dataset registry, which
``list_datasets()`` lists: ``digits`` (scikit-learn's bundled 8×8 digits), ``fashion-mnist`` (IDX ``.gz`` files),
``cifar10``/``cifar100`` (torchvision) and ``imagefolder:PATH`` (``PATH/train``, ``PATH/test`` or ``PATH/val``).
A dataset is added by one decorated loader, ``@register_dataset(name, description)`` (``argument="PATH"`` for a
family named ``name:PATH``). Small datasets live in memory as one uint8 tensor; image folders are read lazily
through a DataLoader.

An image folder is checked when a split is loaded, which is the driver's preflight, before Ray starts:
every image file is decoded once by the decoder the loader uses, and an unreadable one is refused
(``GeopruneError`` naming the file: exit 2), not skipped. Skipping would train on a dataset other than
the one on disk, and a bad file found mid-run by a Ray worker would cost the run and name no file. The
test split's class folders must be named as the train split's: a label is its folder's position in the
sorted names, so other names would make every label silently wrong.
"""

from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import GeopruneError, first_line

log = logging.getLogger("geoprune_ray")

if TYPE_CHECKING:
    import torchvision
    from PIL import Image

# torchvision is imported where it is needed (image folders, CIFAR, downloads, resizing): it costs a process about
# 1.3 s of CPU, which every Ray worker of a run on in-memory data of the right size would pay for nothing.


def _tf():
    """torchvision's functional transforms, imported on first use."""
    from torchvision.transforms.v2 import functional

    return functional

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Per-channel statistics of each training split, as fractions of 255.
_STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
SPLITS = ("train", "test")


class _Labelled:
    """What every dataset answers: its size and its classes (``labels``, ``classes`` fields)."""

    labels: Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class ImageSet(_Labelled):
    """A labelled image dataset held in memory: uint8 images (N, C, H, W) and int64 labels."""

    name: str
    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool  # whether a horizontal flip keeps the label (false for digits)

    in_memory = True

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def images_at(self, indices: Tensor) -> Tensor:
        return self.images[indices]

    def subset(self, indices: Tensor) -> "ImageSet":
        return replace(self, images=self.images[indices], labels=self.labels[indices])

    def fit(self, channels: int, size: Optional[int]) -> "ImageSet":
        """Return the dataset with ``channels`` channels and ``size``×``size`` images (None: keep)."""
        images = _fit_channels(self.images, channels, self.name)
        mean, std = _fit_stats(self.mean, channels), _fit_stats(self.std, channels)
        if size is not None:
            images = _fit_size(images, size)
        return replace(self, images=images.contiguous(), mean=mean, std=std)


@dataclass(frozen=True)
class FolderImages(_Labelled):
    """An image folder read lazily (``torchvision.datasets.ImageFolder``), resized to ``size``."""

    name: str
    folder: torchvision.datasets.ImageFolder
    labels: Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool = True
    channels: int = 3
    size: int = 224

    in_memory = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.folder.samples[index]
        image = _tf().pil_to_tensor(_decode(self.folder, path))
        image = _tf().resize(image, [self.size, self.size], antialias=True)
        return _fit_channels(image[None], self.channels, self.name)[0], label

    def images_at(self, indices: Tensor) -> Tensor:
        return torch.stack([self[int(i)][0] for i in indices])

    def fit(self, channels: int, size: Optional[int]) -> "FolderImages":
        return replace(self, channels=channels, size=size or self.size,
                       mean=_fit_stats(self.mean, channels), std=_fit_stats(self.std, channels))


Dataset = ImageSet | FolderImages


@dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset, or family of datasets (``argument`` set): how to load it and a line about it."""

    loader: Callable[..., Dataset]
    description: str
    argument: Optional[str] = None  # what follows "name:" for a family of datasets (imagefolder:PATH); None: one


_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(name: str, description: str, argument: Optional[str] = None):
    """Decorator: add a loader to the registry under ``name``.

    A dataset's loader is called as ``loader(split, data_dir, download)``; a family's (``argument`` set, named
    ``name:ARG``) as ``loader(arg, split, data_dir, download)``, ``arg`` being the text after the colon.
    """

    def wrap(loader):
        _REGISTRY[name] = DatasetEntry(loader, description, argument)
        return loader

    return wrap


def list_datasets() -> list[str]:
    """The registered names, in the order they were registered (a family as ``name:ARG``)."""
    return [name if entry.argument is None else f"{name}:{entry.argument}" for name, entry in _REGISTRY.items()]


def load_dataset(name: str, split: str, data_dir: str | Path | None = None, download: bool = False) -> Dataset:
    """Load one split (``train`` or ``test``) of a dataset by name."""
    if split not in SPLITS:
        raise GeopruneError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise GeopruneError(f"data directory {data_dir} does not exist",
                            "pass an existing folder with --data-dir, or leave it out to use the default places")
    entry = _REGISTRY.get(name)
    if entry is not None and entry.argument is None:
        return entry.loader(split, data_dir, download)
    family, colon, arg = name.partition(":")
    entry = _REGISTRY.get(family)
    if colon and entry is not None and entry.argument is not None:
        return entry.loader(arg, split, data_dir, download)
    raise GeopruneError(f"unknown dataset {name!r}", f"use one of {', '.join(list_datasets())}")


def _search_dirs(data_dir: str | Path | None, *extra: Path) -> list[Path]:
    dirs = [Path(data_dir)] if data_dir else []
    if os.environ.get("GEOPRUNE_DATA"):
        dirs.append(Path(os.environ["GEOPRUNE_DATA"]))
    return dirs + list(extra)


def _cache_dir(data_dir: str | Path | None) -> Path:
    return Path(data_dir) if data_dir else Path.home() / ".cache" / "geoprune"


@register_dataset("digits", "scikit-learn's bundled 8×8 digits, a fixed stratified 80/20 split")
def _digits(split: str, data_dir, download: bool) -> ImageSet:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    train_idx, test_idx = train_test_split(np.arange(len(images)), test_size=0.2, random_state=0,
                                           stratify=bunch.target)
    idx = train_idx if split == "train" else test_idx
    train_images = torch.from_numpy(images[train_idx]).float() / 255.0
    mean, std = (train_images.mean().item(),), (train_images.std().item(),)
    return ImageSet("digits", torch.from_numpy(images[idx]), torch.from_numpy(bunch.target[idx]).long(),
                    tuple(str(c) for c in range(10)), mean, std, flip=False)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise GeopruneError(f"{path} is not an IDX file of unsigned bytes",
                            "point --data-dir at the original Fashion-MNIST .gz files")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for sub in ("", "fashion-mnist", "FashionMNIST/raw"):
        for suffix in (".gz", ""):
            candidate = folder / sub / (stem + suffix)
            if candidate.is_file():
                return candidate
    return None


@register_dataset("fashion-mnist", "Fashion-MNIST's IDX files (--data-dir, $GEOPRUNE_DATA, the system copy, "
                                   "or a download)")
def _fashion_mnist(split: str, data_dir, download: bool) -> ImageSet:
    image_stem, label_stem = _FASHION_FILES[split]
    searched = _search_dirs(data_dir, SYSTEM_FASHION_MNIST)
    if download:
        import torchvision

        cache = _cache_dir(data_dir)
        torchvision.datasets.FashionMNIST(str(cache), train=split == "train", download=True)
        searched.append(cache)
    for folder in searched:
        images, labels = _find_idx(folder, image_stem), _find_idx(folder, label_stem)
        if images and labels:
            x, y = read_idx(images), read_idx(labels)
            if len(x) != len(y):
                raise GeopruneError(f"{images} has {len(x)} images but {labels} has {len(y)} labels",
                                    "re-fetch the Fashion-MNIST files")
            mean, std = _STATS["fashion-mnist"]
            return ImageSet("fashion-mnist", torch.from_numpy(x.copy())[:, None],
                            torch.from_numpy(y.astype(np.int64)), tuple(_FASHION_CLASSES), mean, std, flip=True)
    raise GeopruneError(
        f"Fashion-MNIST {split} files ({image_stem}.gz) not found in: {', '.join(map(str, searched))}",
        "install them with 'apt-get install dataset-fashion-mnist', pass --data-dir, "
        "set GEOPRUNE_DATA, or allow a download with --download")


@register_dataset("cifar10", "CIFAR-10 (torchvision's archive)")
def _cifar10(split: str, data_dir, download: bool) -> ImageSet:
    return _cifar("cifar10", split, data_dir, download)


@register_dataset("cifar100", "CIFAR-100 (torchvision's archive)")
def _cifar100(split: str, data_dir, download: bool) -> ImageSet:
    return _cifar("cifar100", split, data_dir, download)


def _cifar(name: str, split: str, data_dir, download: bool) -> ImageSet:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    searched = _search_dirs(data_dir, _cache_dir(None))
    for root in searched:
        try:
            ds = cls(str(root), train=split == "train", download=False)
            break
        except RuntimeError:
            continue
    else:
        if not download:
            raise GeopruneError(
                f"{name} not found in: {', '.join(map(str, searched))}",
                "pass --data-dir with the extracted torchvision archive, or allow a download with --download")
        ds = cls(str(_cache_dir(data_dir)), train=split == "train", download=True)
    mean, std = _STATS[name]
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return ImageSet(name, images, torch.tensor(ds.targets, dtype=torch.long), tuple(ds.classes), mean, std, flip=True)


@register_dataset("imagefolder", "an image folder: PATH/train/<class>/…, PATH/test/<class>/… or PATH/val/…",
                  argument="PATH")
def _image_folder(arg: str, split: str, data_dir, download: bool) -> FolderImages:
    path = Path(arg)
    names = ("train",) if split == "train" else ("test", "val")
    roots = [path / n for n in names if (path / n).is_dir()]
    if not roots:
        raise GeopruneError(f"image folder {path} has no {' or '.join(names)} subfolder",
                            "lay it out as PATH/train/<class>/*.png and PATH/test/<class>/*.png")
    import torchvision

    root = roots[0]
    try:
        if split != "train" and (path / "train").is_dir():
            _same_classes(path, root)
        folder = torchvision.datasets.ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as exc:
        raise GeopruneError(f"cannot read image folder {root}: {exc}",
                            "put images in one subfolder per class") from None
    _check_images(folder, root)
    mean, std = _STATS["imagefolder"]
    return FolderImages(f"imagefolder:{path}", folder, torch.tensor(folder.targets, dtype=torch.long),
                        tuple(folder.classes), mean, std)


# Above this many files, the up-front check says what it is doing before it does it.
CHECK_PROGRESS_FILES = 300


def _decode(folder: torchvision.datasets.ImageFolder, path: str) -> Image.Image:
    """One image as an RGB PIL image: what ``FolderImages`` loads, and what the up-front check tries."""
    return folder.loader(path).convert("RGB")


def _check_images(folder: torchvision.datasets.ImageFolder, root: Path) -> None:
    """Decode every image of the split once: an unreadable file stops the run here, named, before Ray starts."""
    from PIL import UnidentifiedImageError

    if len(folder.samples) > CHECK_PROGRESS_FILES:
        log.info("checking that the %d images under %s decode", len(folder.samples), root)
    for path, _ in folder.samples:
        try:
            _decode(folder, path)
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError… for bad files
            reason = "not an image format Pillow can read" if isinstance(exc, UnidentifiedImageError) \
                else first_line(exc)
            raise GeopruneError(f"image {path} cannot be decoded: {reason}",
                                "delete or replace it: every image file under train/, test/ and val/ "
                                "must be a readable image") from None


def _same_classes(path: Path, root: Path) -> None:
    """The evaluation split's class folders must be named as train/'s: labels are positions in the sorted names."""
    from torchvision.datasets.folder import find_classes

    train, other = set(find_classes(path / "train")[0]), set(find_classes(root)[0])
    if train == other:
        return
    extra, missing = sorted(other - train), sorted(train - other)
    parts = ([f"has classes {extra} that train/ lacks"] if extra else []) + ([f"lacks {missing}"] if missing else [])
    raise GeopruneError(f"imagefolder {path}: {root.name}/ {' and '.join(parts)}",
                        f"name the class folders of {root.name}/ as those of train/: a label is its folder's "
                        "position among the sorted class names, so other names make every label wrong")


def _fit_channels(images: Tensor, channels: int, name: str) -> Tensor:
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1:
        return images.expand(-1, channels, -1, -1)
    if channels == 1:
        return _tf().rgb_to_grayscale(images)
    raise GeopruneError(f"{name} has {have} channels but the model takes {channels}",
                        "build the model with in_channels=3")


def _fit_stats(stats: tuple[float, ...], channels: int) -> tuple[float, ...]:
    if len(stats) == channels:
        return stats
    return (sum(stats) / len(stats),) * channels


def _fit_size(images: Tensor, size: int) -> Tensor:
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    if h <= size and w <= size and size - min(h, w) <= min(h, w) // 4:  # 28 → 32: pad, as is customary
        top, left = (size - h) // 2, (size - w) // 2
        return torch.nn.functional.pad(images, (left, size - w - left, top, size - h - top))
    return _tf().resize(images, [size, size], antialias=True)


def balanced_indices(labels: Tensor, num_classes: int, per_class: int, cap: int, seed: int) -> Tensor:
    """A seeded, class-balanced sample: the same number of examples from every class.

    ``min(per_class, cap // num_classes, smallest class)`` from each; every class must be present.
    """
    counts = torch.bincount(labels, minlength=num_classes)
    absent = [c for c in range(num_classes) if counts[c] == 0]
    if absent:
        raise GeopruneError(f"classes {absent} have no examples in the training split",
                            "every class must be present to measure the geometry of classes")
    take = min(per_class, cap // num_classes, int(counts.min()))
    if take < 2:
        raise GeopruneError(f"only {take} example(s) per class can be sampled for calibration",
                            "every class needs at least 2 training examples (raise calib_cap or add data)")
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        picks.append(members[torch.randperm(len(members), generator=gen)[:take]])
    return torch.cat(picks)


def seeded_subset(n: int, count: int, seed: int) -> Tensor:
    """``count`` distinct indices out of ``n`` (all of them if fewer), in a seeded random order."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[: min(n, count)]


def stratified_halves(labels: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Split positions 0..N-1 into two disjoint halves with each class split evenly."""
    gen = torch.Generator().manual_seed(seed)
    first, second = [], []
    for c in labels.unique(sorted=True):
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        half = len(members) // 2
        first.append(members[:half])
        second.append(members[half: 2 * half])
    return torch.cat(first), torch.cat(second)
