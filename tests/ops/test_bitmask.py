"""Bit-packed masks (`dsd2.ops.pack_mask`, `PackedMask`): the bit order pinned by hand, round trips over sizes
that do not fill their last byte, refusals in one sentence, deep copies and pickles (the export's bitmask, the same
packing, is tested through export and load in tests/test_export.py)."""

import copy
import pickle

import pytest
import torch

from dsd2.ops import PackedMask, pack_mask
from dsd2.ops.bitmask import pack_bits, unpack_bits


def test_bit_j_of_byte_i_is_element_8i_plus_j_in_row_major_order():
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 0] = mask[0, 3] = True  # elements 0 and 3: byte 0 = 0b1001
    mask[1, 4] = True               # element 9: byte 1, bit 1
    assert pack_bits(mask).tolist() == [0b1001, 0b10]
    # a transposed view packs in its own (logical) row-major order, not its memory order
    t = mask.t()  # [5, 2]: element (r, c) is index 2r + c; True at (0, 0), (3, 0), (4, 1) -> 0, 6, 9
    assert pack_bits(t).tolist() == [0b1000001, 0b10]


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5), (4, 3, 3, 3), (0, 4)])
def test_pack_then_unpack_gives_the_mask_back(shape):
    g = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=g) < 0.5
    packed = pack_mask(mask)
    assert packed.bits.dtype == torch.uint8 and packed.bits.numel() == -(-mask.numel() // 8)
    assert torch.equal(packed.unpack(), mask) and packed.shape == mask.shape
    if mask.numel() % 8:  # the last byte's unused high bits are 0
        assert int(packed.bits[-1]) >> (mask.numel() % 8) == 0
    assert torch.equal(unpack_bits(pack_bits(mask), shape), mask)


def test_a_packed_mask_deep_copies_pickles_and_moves():
    mask = torch.rand(6, 7, generator=torch.Generator().manual_seed(0)) < 0.3
    packed = pack_mask(mask)
    for other in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed)), packed.to("cpu")):
        assert torch.equal(other.unpack(), mask) and other.shape == packed.shape
    assert "PackedMask(shape=(6, 7), bytes=6" in repr(packed)


def test_bad_packed_masks_are_refused_in_one_sentence():
    with pytest.raises(TypeError, match="only a bool mask \\(True = kept\\) can be packed, not torch.float32"):
        pack_mask(torch.ones(3))
    with pytest.raises(ValueError, match=r"mask of shape \(3, 5\) must be a 1-D uint8 tensor of 2 bytes, not "
                                         r"torch.uint8 of shape \(3,\)"):
        PackedMask(torch.zeros(3, dtype=torch.uint8), (3, 5))
    with pytest.raises(ValueError, match="1-D uint8 tensor of 1 bytes, not torch.int32"):
        PackedMask(torch.zeros(1, dtype=torch.int32), (8,))

