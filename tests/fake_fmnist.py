"""Tiny Fashion-MNIST files written for tests: IDX encoded here from the format's definition, gzipped or not."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_bytes(array: np.ndarray) -> bytes:
    """uint8 IDX: 00 00 08 ndim, big-endian sizes, the bytes."""
    assert array.dtype == np.uint8
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def images_of(labels: np.ndarray) -> np.ndarray:
    """28x28 images that say their class (every pixel 20 x label + 5) and their index (pixels [0, 0], [0, 1])."""
    images = np.repeat((labels * 20 + 5).astype(np.uint8)[:, None, None], 28 * 28, 1).reshape(-1, 28, 28)
    index = np.arange(len(labels))
    images[:, 0, 0], images[:, 0, 1] = index % 256, index // 256
    return images


def index_of(images) -> np.ndarray:
    """The index each image of `images_of` carries, from uint8 [N, 1, 28, 28]."""
    a = np.asarray(images, dtype=np.int64)
    return a[:, 0, 0, 0] + 256 * a[:, 0, 0, 1]


def label_of(images) -> np.ndarray:
    return (np.asarray(images, dtype=np.int64)[:, 0, 5, 5] - 5) // 20


def write_fmnist(folder: str | Path, train: int = 60, test: int = 20, gz: bool | str = True, seed: int = 0) -> Path:
    """The four files in `folder`: `train` and `test` images with balanced random labels; gz: all gzipped, False:
    none, "mixed": the image files gzipped and the label files not."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        for stem, array in zip(STEMS[split], (images_of(labels), labels)):
            packed = gz is True or (gz == "mixed" and array.ndim == 3)
            data = idx_bytes(array)
            (folder / (f"{stem}.gz" if packed else stem)).write_bytes(gzip.compress(data) if packed else data)
    return folder


def torchvision_layout(root: str | Path, **kwargs) -> Path:
    """ROOT/FashionMNIST/raw/ holding the files (torchvision's layout); returns ROOT."""
    write_fmnist(Path(root) / "FashionMNIST" / "raw", **kwargs)
    return Path(root)
