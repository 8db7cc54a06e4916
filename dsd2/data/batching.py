"""On-device batching and augmentation: index slices of a seeded permutation, batched tensor ops."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from dsd2.data import DeviceDataset


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, C, H, W] -> normalised float."""
    shape = (1, -1, 1, 1)
    return ((images.to(dtype) - mean.view(shape).to(dtype)) / std.view(shape).to(dtype))


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with `pad`-pixel zero padding and horizontal flip for a whole batch at once."""
    b, _, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(dev)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(dev)
    flip = (torch.rand(b, generator=generator) < 0.5).to(dev)
    rows = oy[:, None] + torch.arange(h, device=dev)[None]  # [B, H]
    cols = ox[:, None] + torch.arange(w, device=dev)[None]  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2)


def epoch_generator(seed: int, level: int, epoch: int) -> torch.Generator:
    """Shuffling and augmentation randomness derived from (seed, level, epoch): resumable exactly."""
    return torch.Generator().manual_seed((seed * 1_000_003 + level * 10_007 + epoch) % (2**63))


def train_batches(data: DeviceDataset, batch_size: int, generator: torch.Generator,
                  augment: bool, drop_last: bool = False, shard: Callable[[int], slice] | None = None,
                  world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images, labels, sample indices) for one shuffled epoch.

    With `shard` (data-parallel ranks), every rank draws the same global batch and augmentation, then keeps
    its own contiguous share; a final batch smaller than the number of ranks is skipped on all of them.
    """
    n = len(data)
    perm = torch.randperm(n, generator=generator).to(data.images.device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = perm[start:start + batch_size]
        x = data.images[idx]
        if augment:
            x = random_crop_flip(x, generator)
        if shard is not None:
            if idx.numel() < world:
                continue
            part = shard(idx.numel())
            idx, x = idx[part], x[part]
        yield x, data.labels[idx], idx


def eval_batches(data: DeviceDataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(data), batch_size):
        yield data.images[start:start + batch_size], data.labels[start:start + batch_size]
