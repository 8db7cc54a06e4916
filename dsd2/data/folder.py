"""Image folders in torchvision's ImageFolder layout, decoded once into uint8 tensors (and cached on disk).

`ROOT/train/<class>/*.png|jpg|...` is required; `ROOT/val/` and `ROOT/test/`, with the same class folders, are
optional. Classes and their indices follow ImageFolder's sorted order, and so does the file discovery (reused
from torchvision). Every image is made RGB (torchvision's loader does the same: grey is replicated, alpha
dropped), its shorter side resized to `image_size` (PIL bilinear, which antialiases when shrinking) and
center-cropped to a square. Without `test/`, a fixed (seed-independent) random `test_fraction` of the train/
images is the test set, as the digits' test set is fixed: every seed of a config is measured on the same test
set.

The decoded tensors are cached in `$DSD2_CACHE_DIR` (default `$XDG_CACHE_HOME/dsd2`, else `~/.cache/dsd2`;
`DSD2_CACHE_DIR=off` turns the cache off) as `folder-<ROOT and size>-<listing>.safetensors`. The listing part is
a hash of every image's path, size in bytes and modification time, so adding, removing or changing a file
decodes the folder again; the older entry of the same folder and size is then deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsd2.data.raw import DataError, RawDataset

SPLIT_FOLDERS = ("train", "val", "test")
CACHE_FORMAT = "dsd2-folder-v1"
TEST_SPLIT_SEED = 0  # the test set split off train/ is the same for every run seed


@dataclass
class FolderListing:
    """What an image folder holds, found without decoding anything."""

    root: Path
    classes: list[str]
    files: dict[str, list[tuple[str, int]]]  # split folder present -> (image path, class index), sorted

    def fingerprint(self) -> str:
        """A hash of every image's path, size and modification time: changes when any of them does."""
        h = hashlib.sha256(CACHE_FORMAT.encode())
        for split, items in self.files.items():
            for path, label in items:
                st = os.stat(path)
                h.update(f"{split}\0{os.path.relpath(path, self.root)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n"
                         .encode())
        return h.hexdigest()[:16]


def _class_folders(folder: Path) -> list[str]:
    from torchvision.datasets.folder import find_classes

    try:
        return find_classes(folder)[0]
    except FileNotFoundError:
        raise DataError(f"'{folder}' holds no class folders; put each class's images in '{folder}/<class>/'") from None


def _require_train(root: Path) -> Path:
    if not root.is_dir():
        raise DataError(f"image folder '{root}' does not exist; --data-root must name a folder holding "
                        "train/<class>/ images")
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"image folder '{root}' has no train/ folder; put the training images in '{train}/<class>/'")
    return train


def folder_classes(root: str | Path) -> list[str]:
    """The class names of an image folder, in index order (its train/ class folders, sorted)."""
    return _class_folders(_require_train(Path(root).expanduser()))


def list_image_folder(root: str | Path) -> FolderListing:
    """Find the images of every split folder; refuse, naming the path, a layout the loader cannot use."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    root = Path(root).expanduser()
    train = _require_train(root)
    classes = _class_folders(train)
    if len(classes) < 2:
        raise DataError(f"'{train}' holds one class folder ('{classes[0]}'); a classifier needs two or more")
    files: dict[str, list[tuple[str, int]]] = {}
    for split in SPLIT_FOLDERS:
        folder = root / split
        if not folder.is_dir():
            continue
        if split != "train":
            found = _class_folders(folder)
            if found != classes:
                missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
                parts = ([f"lacks {', '.join(missing)}"] if missing else []) + \
                        ([f"has {', '.join(extra)} besides"] if extra else [])
                raise DataError(f"the class folders of '{folder}' do not match those of '{train}': it "
                                f"{' and '.join(parts)}")
        items = make_dataset(str(folder), {c: i for i, c in enumerate(classes)}, extensions=IMG_EXTENSIONS,
                             allow_empty=True)
        counts = np.bincount([label for _, label in items], minlength=len(classes))
        for c in np.flatnonzero(counts == 0):
            raise DataError(f"class folder '{folder / classes[c]}' holds no images (allowed: "
                            f"{', '.join(IMG_EXTENSIONS)})")
        files[split] = items
    return FolderListing(root, classes, files)


def decode_image(path: str, size: int) -> np.ndarray:
    """One image as uint8 [3, size, size]: RGB, shorter side resized to `size`, center-cropped."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")  # decodes the whole file: a truncated one fails here
            w, h = img.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image '{path}' ({exc.__class__.__name__}): replace or remove the file") from None


def decode_images(paths: list[str], size: int, desc: str) -> torch.Tensor:
    """uint8 [N, 3, size, size], decoded by a few threads (PIL releases the GIL while it decodes and resizes),
    with a progress bar on a terminal."""
    from tqdm import tqdm

    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    workers = max(1, min(8, os.cpu_count() or 1))
    chunk = 256  # a bounded number of images in flight, however large the folder
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(paths), desc=desc, unit="img", disable=None,
                                                   leave=False) as bar:
        for start in range(0, len(paths), chunk):
            batch = paths[start:start + chunk]
            for i, array in enumerate(pool.map(decode_image, batch, [size] * len(batch)), start):
                out[i].numpy()[...] = array
            bar.update(len(batch))
    return out


# ---- the cache ------------------------------------------------------------------------------------------------

def cache_dir() -> Path | None:
    where = os.environ.get("DSD2_CACHE_DIR")
    if where is not None:
        return None if where.strip().lower() in ("", "off", "0", "none") else Path(where).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dsd2"


def _cache_path(listing: FolderListing, size: int) -> tuple[Path, str] | None:
    folder = cache_dir()
    if folder is None:
        return None
    prefix = "folder-" + hashlib.sha256(f"{listing.root.absolute()}\0{size}".encode()).hexdigest()[:12]
    return folder / f"{prefix}-{listing.fingerprint()}.safetensors", prefix


def _read_cache(path: Path, listing: FolderListing) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != CACHE_FORMAT or json.loads(meta.get("classes", "null")) != listing.classes:
                return None
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception:  # missing, damaged or foreign: decode again (safetensors raises several types)
        return None


def _write_cache(path: Path, prefix: str, tensors: dict[str, torch.Tensor], listing: FolderListing) -> None:
    """Best effort: a cache that cannot be written only costs the next run a decode."""
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={"format": CACHE_FORMAT, "root": str(listing.root.absolute()),
                                               "classes": json.dumps(listing.classes)})
        os.replace(tmp, path)
        for old in path.parent.glob(f"{prefix}-*.safetensors"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError:
        pass


def decoded_splits(listing: FolderListing, size: int,
                   decode: Callable[[list[str], int, str], torch.Tensor] = decode_images) -> dict[str, torch.Tensor]:
    """'<split>.images' and '<split>.labels' of every split folder: from the cache when it holds this listing."""
    where = _cache_path(listing, size)
    if where is not None and where[0].exists():
        cached = _read_cache(where[0], listing)
        if cached is not None:
            return cached
    tensors: dict[str, torch.Tensor] = {}
    for split, items in listing.files.items():
        tensors[f"{split}.images"] = decode([p for p, _ in items], size, f"decoding {listing.root / split}")
        tensors[f"{split}.labels"] = torch.tensor([label for _, label in items], dtype=torch.int64)
    if where is not None:
        _write_cache(where[0], where[1], tensors, listing)
    return tensors


# ---- the dataset ------------------------------------------------------------------------------------------------

def split_off_test(n: int, test_fraction: float, train_folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(test indices, training-pool indices), sorted: a fixed random `test_fraction` of n images."""
    n_test = round(test_fraction * n)
    if not 0 < n_test < n:
        left = "no test images" if n_test == 0 else "no training images"
        raise DataError(f"'{train_folder}' has {n} images and --test-fraction {test_fraction} leaves {left}; "
                        "change the fraction, add images or give a test/ folder")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(TEST_SPLIT_SEED))
    return perm[:n_test].sort().values, perm[n_test:].sort().values


def load_image_folder(root: str | Path, image_size: int, test_fraction: float) -> RawDataset:
    """The training pool (train/, then val/ when present: its last `fixed_val` images) and the test set
    (test/, else split off train/)."""
    listing = list_image_folder(root)
    t = decoded_splits(listing, image_size)
    train_x, train_y = t["train.images"], t["train.labels"]
    if "test.images" in t:
        test_x, test_y = t["test.images"], t["test.labels"]
    else:
        test_idx, pool_idx = split_off_test(len(train_y), test_fraction, listing.root / "train")
        test_x, test_y, train_x, train_y = train_x[test_idx], train_y[test_idx], train_x[pool_idx], train_y[pool_idx]
    fixed_val = 0
    if "val.images" in t:
        fixed_val = len(t["val.labels"])
        train_x, train_y = torch.cat([train_x, t["val.images"]]), torch.cat([train_y, t["val.labels"]])
    return RawDataset(train_x, train_y, test_x, test_y, len(listing.classes), 255.0, f"folder '{listing.root}'",
                      fixed_val=fixed_val, classes=tuple(listing.classes))

