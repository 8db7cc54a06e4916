"""The types every dataset source shares: a raw dataset as uint8 tensors, and the error a source raises."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class DataError(ValueError):
    """A dataset cannot be found or read; the message names the path and the fix."""


@dataclass
class RawDataset:
    train_images: torch.Tensor  # uint8 [N, C, H, W]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    scale: float  # pixel value of full intensity (255 for CIFAR, 16 for digits)
    name: str
    fixed_val: int = 0  # the last `fixed_val` training images are the validation split (a val/ folder); 0: held out
    classes: tuple[str, ...] | None = None  # class names by index, where the dataset has them (image folders)
