"""masked_conv2d: a 2-D convolution that computes with W⊙M, the weight where its mask keeps it and 0 elsewhere.

Autograd gives dX through W⊙M, dW already masked (pruned entries exactly 0.0) and db. Backends:

- **triton** (CUDA): implicit-GEMM kernels for the forward, the input gradient and the weight gradient
  (`dsd2.kernels.masked_conv2d`). The weight tile is masked as it is loaded, the weight-gradient tile before it is
  stored; no W⊙M tensor and no im2col buffer is in memory. fp32 runs TF32 where `torch.backends.cudnn.allow_tf32`
  allows it (as `nn.Conv2d` does on cuDNN), else IEEE. A tensor of 2**31 elements or more runs the reference.
- **cpp** (CPU): oneDNN's convolution (torch's `conv2d`) on W⊙M from `dsd2._C.masked_weight` (the weight
  itself when it is already 0 wherever pruned, else a copy masked in one vectorised pass), whose backward masks dW
  in place. On maps of at most 16 positions dW is one matrix product over the unfolded input, as dsd2's own
  Conv2d computes it (so the loop's curves are unchanged by the switch). No C++ convolution: the masking is the
  whole cost over the plain layer, measured in `benchmarks/ops/bench_masked_layers.py` and the README's
  masked-layers section.
- **reference**: `F.conv2d(x, torch.where(mask, weight, 0), bias, ...)`, the oracle.

stride, padding (an int, a pair, "valid" or "same"), dilation and groups are `F.conv2d`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsd2.ops._backend import cpp_extension
from dsd2.ops.bitmask import PackedMask
from dsd2.ops.masked_linear import (
    autocast_inputs,
    check_mask,
    check_same_dtype,
    mask_for,
    masked_weight_reference,
    pick_masked,
)

SMALL_MAP = 16  # input positions per channel (4x4) up to which the CPU weight gradient is one matrix product
INT32_MAX = 2**31 - 1


def _pair(v, name: str) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or not all(isinstance(i, int) for i in pair):
        raise ValueError(f"{name} {v!r} must be an int or a pair of ints")
    return pair


def conv_padding(x: torch.Tensor, kernel: tuple[int, int], padding, stride: tuple[int, int],
                 dilation: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """(x, symmetric padding) for `padding` as F.conv2d takes it: "same" with an odd total pads x's end by one
    more, as torch does."""
    if not isinstance(padding, str):
        return x, _pair(padding, "padding")
    if padding == "valid":
        return x, (0, 0)
    if padding != "same":
        raise ValueError(f"padding '{padding}' is not known; allowed: an int, a pair, 'valid', 'same'")
    if stride != (1, 1):
        raise ValueError(f"padding='same' needs stride 1, not {stride}")
    total = [d * (k - 1) for d, k in zip(dilation, kernel)]
    left = (total[0] // 2, total[1] // 2)
    extra = (total[0] - 2 * left[0], total[1] - 2 * left[1])
    if any(extra):
        x = F.pad(x, [0, extra[1], 0, extra[0]])
    return x, left


def masked_conv2d_reference(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                            bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
                            groups: int = 1) -> torch.Tensor:
    """The oracle: `F.conv2d` on W⊙M."""
    return F.conv2d(x, masked_weight_reference(weight, mask), bias, stride, padding, dilation, groups)


class SmallMapConv(torch.autograd.Function):
    """Conv2d (groups 1) whose weight gradient is unfold + one matrix product. On small feature maps (the last
    blocks of VGG-like and ResNet-18 on 32x32 inputs: 2x2 and 4x4) oneDNN's CPU backward-weights kernel is several
    times slower than the same product as a plain GEMM (29 ms against 5 ms for 512->512 at 2x2, batch 128)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        if torch.is_autocast_enabled("cpu"):  # custom functions see autocast but do not apply it
            dtype = torch.get_autocast_dtype("cpu")
            x_c, w_c = x.to(dtype), weight.to(dtype)
            b_c = bias.to(dtype) if bias is not None else None
        else:
            x_c, w_c, b_c = x, weight, bias
        ctx.save_for_backward(x_c, w_c)
        ctx.conf = (stride, padding, dilation, bias is not None, x.dtype, weight.dtype,
                    bias.dtype if bias is not None else None)
        return F.conv2d(x_c, w_c, b_c, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        stride, padding, dilation, has_bias, x_dtype, w_dtype, b_dtype = ctx.conf
        grad_out = grad_out.to(x.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, w, None, list(stride), list(padding), list(dilation), False, [0, 0], 1,
                [True, False, False])[0].to(x_dtype)
        if ctx.needs_input_grad[1]:
            cols = F.unfold(x, w.shape[-2:], dilation, padding, stride)  # [B, Cin*k*k, L]
            grad_w = torch.einsum("bol,bkl->ok", grad_out.flatten(2), cols).view_as(w).to(w_dtype)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.float().sum((0, 2, 3)).to(b_dtype)
        return grad_x, grad_w, grad_b, None, None, None


class _TritonMaskedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, mask, bias, stride, padding, dilation, groups):
        from dsd2.kernels.masked_conv2d import masked_conv2d_forward

        ctx.save_for_backward(x, weight, mask)
        ctx.conf = (stride, padding, dilation, groups, bias is not None, bias.dtype if bias is not None else None)
        return masked_conv2d_forward(x, weight, mask, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        from dsd2.kernels.masked_conv2d import masked_conv2d_backward

        x, weight, mask = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias, b_dtype = ctx.conf
        need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
        grad_x, grad_w = masked_conv2d_backward(grad_out, x, weight, mask, stride, padding, dilation, groups,
                                                need_x, need_w)
        grad_b = grad_out.float().sum((0, 2, 3)).to(b_dtype) if has_bias and need_b else None
        return grad_x, grad_w, None, grad_b, None, None, None, None


def _check_shapes(x: torch.Tensor, weight: torch.Tensor, groups: int) -> None:
    if weight.dim() != 4:
        raise ValueError(f"the weight must be [out_channels, in_channels / groups, kH, kW], not {tuple(weight.shape)}")
    if x.dim() != 4:
        raise ValueError(f"the input must be [N, C, H, W] or [C, H, W], not {tuple(x.shape)}")
    if groups < 1 or weight.shape[0] % groups or x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"groups={groups} does not fit an input of {x.shape[1]} channels and a weight of shape "
                         f"{tuple(weight.shape)}: need in_channels = weight.shape[1] * groups and out_channels "
                         "divisible by groups")


def _small_map(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    return (groups == 1 and x.shape[-1] * x.shape[-2] <= SMALL_MAP and torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad))


def masked_conv2d(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | PackedMask,
                  bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1, groups: int = 1, *,
                  backend: str | None = None) -> torch.Tensor:
    """`F.conv2d(x, W⊙M, bias, stride, padding, dilation, groups)` without W⊙M in memory on the GPU; dW comes
    back masked (pruned entries 0.0). mask: bool, the weight's shape (True = kept), or a `PackedMask` of that
    shape (`dsd2.ops.pack_mask`: one bit per weight, read bit by bit by the Triton kernels). `backend`: triton,
    cpp or reference, else the one `dsd2.ops.pick` chooses for x."""
    check_mask(weight, mask)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    _check_shapes(x, weight, groups)
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    x, pad = conv_padding(x, weight.shape[2:], padding, stride, dilation)
    chosen = pick_masked("masked_conv2d", x, backend, cpp_extension)
    if chosen == "triton" and max(x.numel(), weight.numel()) * max(1, weight.shape[0] // max(x.shape[1], 1)) \
            > INT32_MAX:
        chosen = "reference"  # the kernels index in 32 bits
    mask = mask_for(chosen, mask)
    if chosen == "triton":
        x, weight, bias = autocast_inputs(x.device.type, x, weight, bias)
        check_same_dtype(x, weight)
        out = _TritonMaskedConv2d.apply(x, weight, mask, bias, stride, pad, dilation, groups)
    elif chosen == "cpp" and _small_map(x, weight, groups):
        out = SmallMapConv.apply(x, cpp_extension().masked_weight(weight, mask), bias, stride, pad, dilation)
    elif chosen == "cpp":
        out = cpp_extension().masked_conv2d(x, weight, mask, bias, stride, pad, dilation, groups)
    else:
        out = masked_conv2d_reference(x, weight, mask, bias, stride, pad, dilation, groups)
    return out.squeeze(0) if unbatched else out
