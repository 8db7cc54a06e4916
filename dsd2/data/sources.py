"""The datasets by name (`SOURCES`), each read into a RawDataset of uint8 image tensors: CIFAR-10/100 from a local
torchvision-layout folder, digits, Fashion-MNIST (dsd2/data/fmnist.py), image folders (dsd2/data/folder.py)."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsd2.data.fmnist import load_fmnist
from dsd2.data.folder import folder_classes, load_image_folder
from dsd2.data.raw import DataError, RawDataset

CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles: rebuild only numpy arrays and plain containers from them, so a
    tampered file in a data folder cannot run code when it is read."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")


def _read_batches(folder: Path, names: list[str], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as fh:
                entry = _CifarUnpickler(fh, encoding="bytes").load()
            data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            target = np.asarray(entry[label_key], dtype=np.int64)
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as exc:
            raise DataError(f"cannot read CIFAR file '{path}' ({exc.__class__.__name__}): "
                            "re-extract the archive or pass --download") from None
        images.append(torch.from_numpy(data.copy()))
        labels.append(torch.from_numpy(target.copy()))
    return torch.cat(images), torch.cat(labels)


def load_cifar(name: str, root: str | None, download: bool = False) -> RawDataset:
    folder_name, train_files, test_files, label_key, classes = CIFAR_LAYOUT[name]
    if root is None:
        raise DataError(f"dataset '{name}' needs --data-root: a folder holding '{folder_name}/' "
                        "(torchvision's layout); add --download to fetch it there")
    folder = Path(root).expanduser() / folder_name
    if not folder.is_dir() and download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        cls(str(Path(root).expanduser()), train=True, download=True)
    if not folder.is_dir():
        raise DataError(f"{name} not found: '{folder}' does not exist; extract the python version "
                        f"of the archive into '{Path(root)}' or rerun with --download")
    tr_x, tr_y = _read_batches(folder, train_files, label_key)
    te_x, te_y = _read_batches(folder, test_files, label_key)
    return RawDataset(tr_x, tr_y, te_x, te_y, classes, 255.0, name)


def load_digits_dataset(test_size: int = 597, seed: int = 0) -> RawDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download).

    A fixed seeded split puts `test_size` images in the test set; the rest form the training
    pool from which the validation split is later held out.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)  # values 0..16
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:test_size], perm[test_size:]
    return RawDataset(images[train], labels[train], images[test], labels[test], 10, 16.0, "digits")


@dataclass(frozen=True)
class DatasetSource:
    """How one dataset name is read: `load(root, download, image_size, test_fraction)` gives its images and labels,
    `classes(root)` its number of classes without reading any image."""

    load: Callable[[str | None, bool, int, float], RawDataset]
    classes: Callable[[str | None], int]


def _cifar(name: str) -> DatasetSource:
    return DatasetSource(lambda root, download, size, frac: load_cifar(name, root, download),
                         lambda root: CIFAR_LAYOUT[name][4])


def _folder_root(root: str | None) -> str:
    if root is None:
        raise DataError("dataset 'folder' needs --data-root: a folder holding train/<class>/ images")
    return root


# the datasets by name, in the order of dsd2.config.DATASETS (tests/test_choices.py holds the two together)
SOURCES: dict[str, DatasetSource] = {
    "digits": DatasetSource(lambda root, download, size, frac: load_digits_dataset(), lambda root: 10),
    "fmnist": DatasetSource(lambda root, download, size, frac: load_fmnist(root, download), lambda root: 10),
    "cifar10": _cifar("cifar10"),
    "cifar100": _cifar("cifar100"),
    "folder": DatasetSource(lambda root, download, size, frac: load_image_folder(_folder_root(root), size, frac),
                            lambda root: len(folder_classes(_folder_root(root)))),
}


def dataset_source(name: str) -> DatasetSource:
    if name not in SOURCES:
        raise DataError(f"dataset '{name}' is not known; allowed: {', '.join(SOURCES)}")
    return SOURCES[name]


def load_raw(name: str, root: str | None = None, download: bool = False, *, image_size: int = 32,
             test_fraction: float = 0.2) -> RawDataset:
    """A dataset by name; `image_size` and `test_fraction` are read by image folders only."""
    return dataset_source(name).load(root, download, image_size, test_fraction)


def num_classes(name: str, root: str | None = None) -> int:
    """The number of classes of a dataset, without loading it (an image folder's: its train/ class folders)."""
    return dataset_source(name).classes(root)
