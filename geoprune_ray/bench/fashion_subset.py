"""Write the first N Fashion-MNIST training images (and the whole test split) as IDX .gz files: a subset small enough
to travel with Ray's wheels in one device call (20,000 images: 8.8 MB + 4.4 MB).

    python -m geoprune_ray.bench.fashion_subset 20000 .data/fashion-20k
"""

from __future__ import annotations

import gzip
import shutil
import sys
from pathlib import Path

import numpy as np

from geoprune_ray.core.data import SYSTEM_FASHION_MNIST, read_idx


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def main(count: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        write_idx(out / f"{stem}.gz", read_idx(SYSTEM_FASHION_MNIST / f"{stem}.gz")[:count])
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(SYSTEM_FASHION_MNIST / f"{stem}.gz", out / f"{stem}.gz")
    print(f"wrote {out}: {count} training images, the full test split")


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
