"""Bit-packed masks: one bit per weight instead of a bool byte, for the masked ops and the compressed export.

Bit j of byte i holds element 8i + j of the mask in row-major order (the weight's own index order, whatever its
strides); the last byte's unused high bits are 0. A `PackedMask` is what `masked_linear` / `masked_conv2d` take in
place of a bool mask: on CUDA the Triton kernels read the bit of each weight as its tile is loaded (the mask's bytes
in memory and in every tile load are an eighth of a bool mask's); the CPU and reference paths unpack it once per
call (a bool mask is their fast input).
"""

from __future__ import annotations

import math

import torch

_BIT_VALUES = torch.arange(8, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """The bool `mask` as uint8 bytes [ceil(numel / 8)], bit j of byte i = element 8i + j (row-major)."""
    bits = mask.reshape(-1)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    shifts = _BIT_VALUES.to(mask.device)
    return (bits.view(-1, 8).to(torch.uint8) << shifts).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The bool mask of `shape` that `pack_bits` packed into `packed`."""
    numel = math.prod(shape)
    bits = (packed.unsqueeze(1) >> _BIT_VALUES.to(packed.device)) & 1
    return bits.reshape(-1)[:numel].bool().reshape(shape)


class PackedMask:
    """A bool mask of `shape` held as `bits` (uint8, `pack_bits`'s layout): `PackedMask.pack(mask)` /
    `dsd2.ops.pack_mask(mask)` make one, `.unpack()` gives the bool mask back. Deep-copies and pickles as its two
    fields."""

    __slots__ = ("bits", "shape")

    def __init__(self, bits: torch.Tensor, shape: tuple[int, ...]):
        shape = torch.Size(shape)
        need = math.ceil(shape.numel() / 8)
        if not torch.is_tensor(bits) or bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != need:
            what = f"{bits.dtype} of shape {tuple(bits.shape)}" if torch.is_tensor(bits) else type(bits).__name__
            raise ValueError(f"the packed bits of a mask of shape {tuple(shape)} must be a 1-D uint8 tensor of "
                             f"{need} bytes, not {what}")
        self.bits = bits.contiguous()
        self.shape = shape

    @classmethod
    def pack(cls, mask: torch.Tensor) -> PackedMask:
        if not torch.is_tensor(mask) or mask.dtype != torch.bool:
            what = mask.dtype if torch.is_tensor(mask) else type(mask).__name__
            raise TypeError(f"only a bool mask (True = kept) can be packed, not {what}")
        return cls(pack_bits(mask), tuple(mask.shape))

    def unpack(self) -> torch.Tensor:
        return unpack_bits(self.bits, tuple(self.shape))

    @property
    def device(self) -> torch.device:
        return self.bits.device

    def to(self, device) -> PackedMask:
        return PackedMask(self.bits.to(device), tuple(self.shape))

    def __getstate__(self):
        return {"bits": self.bits, "shape": tuple(self.shape)}

    def __setstate__(self, state):
        self.bits, self.shape = state["bits"], torch.Size(state["shape"])

    def __repr__(self) -> str:
        return f"PackedMask(shape={tuple(self.shape)}, bytes={self.bits.numel()}, device={self.device})"


def pack_mask(mask: torch.Tensor) -> PackedMask:
    """A bool mask packed one bit per weight, for `masked_linear` / `masked_conv2d` (`PackedMask.pack`)."""
    return PackedMask.pack(mask)
