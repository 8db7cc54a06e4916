"""max_pool2d: `F.max_pool2d` with a C++ kernel for the 2x2, stride-2 pooling of CPU training, and `MaxPool2d`, its
drop-in module.

torch's CPU kernel stores an int64 index per output and, backward, zero-fills the whole input gradient before
scattering into it: with its fill, ~10 % of the VGG-like's 99.6 %-sparse epoch (torch.profiler, a 2-core Intel
Xeon, AVX-512). Here (`cpp`) forward stores the max and its place in the window in one byte, and
backward writes each input gradient element once, the max's gradient or 0 (`benchmarks/ops/bench_pooling.py`).
Backends:

- **cpp** (CPU, float32, channels_last, kernel 2, stride 2, no padding, dilation 1, floor mode, no indices
  returned, with a gradient to compute): the window's first max in torch's order (top left, top right, bottom
  left, bottom right), a NaN taken wherever one is, so outputs and gradients are torch's bit for bit.
- **reference**: `torch.nn.functional.max_pool2d` itself (everything else: CUDA, eval and no_grad, other shapes
  and dtypes, tracing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsd2.ops._backend import cpp_extension

BACKENDS = ("cpp", "reference")


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _cpp_applies(x: torch.Tensor, kernel_size, stride, padding, dilation, ceil_mode, return_indices) -> bool:
    stride = kernel_size if stride is None or (isinstance(stride, (tuple, list)) and not stride) else stride
    return (x.dim() == 4 and x.dtype == torch.float32 and x.device.type == "cpu" and x.requires_grad
            and torch.is_grad_enabled() and x.shape[2] >= 2 and x.shape[3] >= 2 and x.numel() > 0
            and x.is_contiguous(memory_format=torch.channels_last)
            and _pair(kernel_size) == (2, 2) and _pair(stride) == (2, 2) and _pair(padding) == (0, 0)
            and _pair(dilation) == (1, 1) and not ceil_mode and not return_indices
            and not torch.jit.is_tracing() and not torch.is_autocast_enabled("cpu"))


class _CppMaxPool2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y, idx = cpp_extension().max_pool2_forward(x)
        ctx.save_for_backward(x, idx)
        ctx.mark_non_differentiable(idx)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, idx = ctx.saved_tensors
        if torch.is_grad_enabled():  # a double backward: torch's own gradient, which records its graph
            with torch.enable_grad():
                xd = x.detach().requires_grad_()
                y = F.max_pool2d(xd, 2, 2)
            (dx,) = torch.autograd.grad(y, xd, grad, create_graph=True)
            return dx
        return cpp_extension().max_pool2_backward(grad, idx, list(x.shape))


def max_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False, *, backend: str | None = None):
    """`torch.nn.functional.max_pool2d`, the same arguments and results (bit for bit), with dsd2's CPU kernel where
    it applies (the module docstring). `backend`: cpp or reference, else cpp on the CPU where dsd2._C is built."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend '{backend}' is not known for max_pool2d; allowed: {', '.join(BACKENDS)}")
    chosen = backend or ("cpp" if x.device.type == "cpu" and cpp_extension() is not None else "reference")
    if chosen == "cpp" and cpp_extension() is None:
        raise ValueError("the cpp max_pool2d needs dsd2._C, which is not built; use backend='reference'")
    if chosen == "cpp" and _cpp_applies(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
        return _CppMaxPool2.apply(x)
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
                        return_indices=return_indices)


class MaxPool2d(nn.MaxPool2d):
    """`nn.MaxPool2d` (the same arguments and results, bit for bit) that trains on dsd2's CPU kernel where it
    applies (`max_pool2d`)."""

    def forward(self, x: torch.Tensor):
        return max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
                          self.return_indices)


def swap_in_max_pools(model: nn.Module) -> nn.Module:
    """The model with a `MaxPool2d` in place of every `nn.MaxPool2d` (that class exactly), the containers on the way
    shallow copies, as `swap_in_batch_norms` does."""
    from dsd2.ops.masked_layers import _swap_exact  # masked_layers imports dsd2.pruning, which imports ops

    return _swap_exact(model, nn.MaxPool2d, MaxPool2d)
