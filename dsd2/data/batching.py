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


def crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """Random crop with `pad`-pixel zero padding and horizontal flip for a whole batch at once.

    The offsets and flips are drawn on the batch's device (from `generator`, which must live there, or from
    the device's default generator inside a captured CUDA graph): no host tensor is made or copied per batch.
    """
    b, _, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
    flip = torch.rand(b, generator=generator, device=dev) < 0.5
    rows = oy[:, None] + torch.arange(h, device=dev)[None]  # [B, H]
    cols = ox[:, None] + torch.arange(w, device=dev)[None]  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2)


def train_batches(data: DeviceDataset, batch_size: int, perm: torch.Tensor, augment: torch.Generator | None,
                  shard: Callable[[int], slice] | None = None,
                  world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images, labels, sample indices) for one epoch in the order `perm` (on the data's device);
    `augment`: the generator (on the data's device) of the crops and flips, or None for none.

    With `shard` (data-parallel ranks), every rank draws the same global batch and augmentation, then keeps
    its own contiguous share; a final batch smaller than the number of ranks is skipped on all of them.
    """
    for start in range(0, perm.numel(), batch_size):
        idx = perm[start:start + batch_size]
        x = data.images[idx]
        if augment is not None:
            x = crop_flip(x, augment)
        if shard is not None:
            if idx.numel() < world:
                continue
            part = shard(idx.numel())
            idx, x = idx[part], x[part]
        yield x, data.labels[idx], idx
