"""Tiny datasets in torchvision's CIFAR layout, written for tests (no download)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from dsd2.data.sources import CIFAR_LAYOUT


def write_fake_cifar(root: str | Path, name: str = "cifar10", train_per_file: int = 20,
                     test_size: int = 20, seed: int = 0) -> Path:
    """Write a tiny dataset in torchvision's CIFAR layout ."""
    folder_name, train_files, test_files, label_key, classes = CIFAR_LAYOUT[name]
    folder = Path(root) / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for fname, n in [(f, train_per_file) for f in train_files] + [(f, test_size) for f in test_files]:
        entry = {
            b"data": rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8),
            label_key: rng.integers(0, classes, size=n).tolist(),
        }
        with open(folder / fname, "wb") as fh:
            pickle.dump(entry, fh)
    return folder
