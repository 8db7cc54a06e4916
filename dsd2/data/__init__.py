"""Datasets on the compute device: noisy training split, validation split, test set, fast batching."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsd2 import rng
from dsd2.config import DataConfig
from dsd2.data.noise import apply_noise
from dsd2.data.sources import DataError, RawDataset, load_raw, num_classes

__all__ = ["DataError", "DeviceDataset", "Splits", "build_splits", "load_raw", "num_classes", "training_subset"]


@dataclass
class DeviceDataset:
    """One split held on the device as uint8 images and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.numel()


@dataclass
class Splits:
    train: DeviceDataset  # noisy labels
    val: DeviceDataset
    test: DeviceDataset
    train_clean_labels: torch.Tensor  # on device, for the memorisation measure
    noisy_mask: torch.Tensor  # bool [n_train] on device: label was corrupted
    noise_indices: torch.Tensor  # indices into the full training pool (CPU), for the record
    noise_original: torch.Tensor  # their original labels (CPU)
    num_classes: int
    mean: torch.Tensor  # [C] in pixel units
    std: torch.Tensor
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.images.shape[1:])


def training_subset(rest: torch.Tensor, size: int | None, seed: int, pool: str) -> torch.Tensor:
    """`size` of the pool indices `rest` (what the validation split leaves), drawn by the seed's `subset` stream
    and sorted; all of them when `size` is None. `pool` says where `rest` comes from, for the error."""
    if size is None:
        return rest
    if not 0 < size <= len(rest):
        raise DataError(f"--train-size {size} is not possible: {pool}, which leaves {len(rest):,} to draw from; "
                        f"allowed: 1 to {len(rest)}")
    pick = torch.randperm(len(rest), generator=rng.generator("subset", seed))[:size]
    return rest[pick].sort().values


def build_splits(cfg: DataConfig, seed: int, device: torch.device,
                 raw: RawDataset | None = None) -> Splits:
    """Noise over the whole training pool, then the validation split (noisy unless clean_val): a seeded hold-out
    of `val_fraction`, or the dataset's own (an image folder's val/, the last `raw.fixed_val` pool images); the
    training split is the rest, or `train_size` images drawn from it (`training_subset`)."""
    if raw is None:
        raw = load_raw(cfg.dataset, cfg.data_root, cfg.download, image_size=cfg.image_size,
                       test_fraction=cfg.test_fraction)
    pool_labels = raw.train_labels
    if cfg.noise > 0 and cfg.noise_type == "asymmetric" and raw.num_classes != 10:
        raise DataError(f"noise type 'asymmetric' is the CIFAR-10 class map and needs 10 classes; {raw.name} has "
                        f"{raw.num_classes}: use symmetric or pairflip")
    noisy, idx = apply_noise(pool_labels, cfg.noise, cfg.noise_type, raw.num_classes, rng.stream_seed("noise", seed))
    n = pool_labels.numel()
    if raw.fixed_val:
        val_idx, train_idx = torch.arange(n - raw.fixed_val, n), torch.arange(n - raw.fixed_val)
    else:
        n_val = round(cfg.val_fraction * n)
        if not 0 < n_val < n:
            left = "no validation images" if n_val == 0 else "no training images"
            raise DataError(f"{raw.name} has {n} training images and --val-fraction {cfg.val_fraction} leaves {left}; "
                            "change the fraction or add images")
        perm = torch.randperm(n, generator=rng.generator("split", seed))
        val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    train_idx = training_subset(train_idx, cfg.train_size, seed, f"{raw.name} has {n:,} training images and "
                                f"the validation split takes {len(val_idx):,} of them")
    val_labels = pool_labels[val_idx] if cfg.clean_val else noisy[val_idx]
    corrupted = torch.zeros(n, dtype=torch.bool)
    corrupted[idx] = True

    train_x = raw.train_images[train_idx]
    flat = train_x.float().transpose(0, 1).reshape(train_x.shape[1], -1)
    mean, std = flat.mean(1), flat.std(1).clamp_min(1e-3)

    def put(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().to(device)

    return Splits(
        train=DeviceDataset(put(train_x), put(noisy[train_idx])),
        val=DeviceDataset(put(raw.train_images[val_idx]), put(val_labels)),
        test=DeviceDataset(put(raw.test_images), put(raw.test_labels)),
        train_clean_labels=put(pool_labels[train_idx]),
        noisy_mask=put(corrupted[train_idx]),
        noise_indices=idx,
        noise_original=pool_labels[idx],
        num_classes=raw.num_classes,
        mean=put(mean),
        std=put(std),
        name=raw.name,
    )
