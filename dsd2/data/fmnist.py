"""Fashion-MNIST (60,000 training and 10,000 test images, 28x28 grey, 10 classes) from its four IDX files.

Where the files are read, in order:
  * with --data-root DIR: DIR/FashionMNIST/raw/ (torchvision's layout), else DIR itself (the four files side by
    side); with --download, torchvision's downloader fetches them into DIR/FashionMNIST/raw/ when neither holds
    them;
  * without --data-root: Debian's package dataset-fashion-mnist, /usr/share/datasets/fashion-mnist/.
Each file may be gzipped (`.gz`) or not; an uncompressed copy is preferred, as torchvision leaves both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dsd2.data.idx import read_idx
from dsd2.data.raw import DataError, RawDataset

NAME = "fmnist"
DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
TORCHVISION_FOLDER = Path("FashionMNIST") / "raw"
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
SIDE = 28
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FIX = f"reinstall {DEBIAN_PACKAGE}, or replace the file (--download fetches a fresh copy into --data-root)"


def idx_file(folder: Path, stem: str) -> Path | None:
    """The file of `stem` in `folder`, uncompressed or gzipped, or None."""
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def missing_files(folder: Path) -> list[str]:
    return [stem for stem in FILES.values() if idx_file(folder, stem) is None]


def candidate_folders(root: str | None) -> list[Path]:
    if root is None:
        return [DEBIAN_FOLDER]
    base = Path(root).expanduser()
    return [base / TORCHVISION_FOLDER, base]


def not_found(root: str | None, folders: list[Path]) -> DataError:
    """The one line naming where fmnist was looked for and the three ways to get it."""
    where = next((f for f in folders if f.is_dir() and len(missing_files(f)) < len(FILES)), folders[0])
    lacking = missing_files(where)
    found = (f"'{where}' lacks {', '.join(f'{s}(.gz)' for s in lacking)}" if len(lacking) < len(FILES) else
             f"'{where}' holds none of its IDX files" if where.is_dir() else f"'{where}' does not exist")
    if root is None:
        return DataError(f"{NAME} not found: {found}; install Debian's package {DEBIAN_PACKAGE}, give --data-root a "
                         f"folder holding {TORCHVISION_FOLDER}/ (torchvision's layout), or add --download with "
                         "--data-root to fetch it there")
    return DataError(f"{NAME} not found: {found}; put torchvision's {TORCHVISION_FOLDER}/ files into '{root}', rerun "
                     f"with --download, or drop --data-root to read Debian's package {DEBIAN_PACKAGE} "
                     f"('{DEBIAN_FOLDER}')")


def find_folder(root: str | None, download: bool = False) -> Path:
    """The folder holding the four files; with `download` and a root that lacks them, fetched there first."""
    if download and root is None:
        raise DataError(f"--download needs --data-root: the folder to fetch {NAME} into (as {TORCHVISION_FOLDER}/)")
    folders = candidate_folders(root)
    for folder in folders:
        if not missing_files(folder):
            return folder
    if download:
        import torchvision

        try:
            torchvision.datasets.FashionMNIST(str(Path(root).expanduser()), train=True, download=True)
        except (OSError, RuntimeError) as exc:  # torchvision raises RuntimeError once every mirror has failed
            raise DataError(f"downloading {NAME} into '{folders[0]}' failed ({exc.__class__.__name__}); check the "
                            f"network, or install Debian's package {DEBIAN_PACKAGE} and drop --data-root") from None
        if not missing_files(folders[0]):
            return folders[0]
    raise not_found(root, folders)


def read_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 1, 28, 28] images and int64 [N] labels of the `split` ("train" or "test") files."""
    image_path = idx_file(folder, FILES[f"{split}_images"])
    label_path = idx_file(folder, FILES[f"{split}_labels"])
    images, labels = read_idx(image_path, FIX), read_idx(label_path, FIX)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
        raise DataError(f"'{image_path}' holds {images.dtype} values of shape {images.shape}, not Fashion-MNIST's "
                        f"uint8 {SIDE}x{SIDE} images; {FIX}")
    if labels.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"'{label_path}' holds {labels.dtype} values of shape {labels.shape}, not one uint8 label "
                        f"for each of the {len(images):,} images of '{image_path}'; {FIX}")
    if len(labels) and int(labels.max()) >= len(CLASSES):
        raise DataError(f"'{label_path}' holds label {int(labels.max())}, outside Fashion-MNIST's classes "
                        f"0..{len(CLASSES) - 1}; {FIX}")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_fmnist(root: str | None = None, download: bool = False) -> RawDataset:
    folder = find_folder(root, download)
    train_x, train_y = read_split(folder, "train")
    test_x, test_y = read_split(folder, "test")
    return RawDataset(train_x, train_y, test_x, test_y, len(CLASSES), 255.0, NAME, classes=CLASSES)
