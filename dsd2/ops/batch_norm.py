"""batch_norm: `F.batch_norm` with a C++ kernel for training on the CPU, and `BatchNorm2d`, its drop-in module.

On the CPU torch's kernel is several times slower than the reads and writes a batch norm needs: on the VGG-like's
first block (128x32x32x32, channels_last) its forward + backward took 9.5 ms, nearly the 11 ms of the 99.5 %-sparse
convolution before it, where these kernels take 4.2 ms (`benchmarks/ops/bench_batch_norm.py`, a 2-core Xeon,
AVX-512). Backends:

- **cpp** (CPU, float32, training): two passes forward (per-channel sums about a shift, then the normalisation),
  two backward (the sums of dy and dy * (x - mean), then the input gradient), each at memory speed. Sums are fp32
  over at most 256 rows, then double, in a fixed order: the result does not depend on the thread count, and the
  running statistics are updated as torch updates them (unbiased variance, momentum or the cumulative average).
- **reference**: `torch.nn.functional.batch_norm` itself (cuDNN on CUDA; eval mode, other dtypes, tracing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsd2.ops._backend import cpp_extension

BACKENDS = ("cpp", "reference")  # no Triton kernel: on CUDA the reference is cuDNN's


def _cpp_applies(x: torch.Tensor, tensors: tuple[torch.Tensor | None, ...]) -> bool:
    return (x.dim() == 4 and x.numel() > 0 and x.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.jit.is_tracing() and not torch.is_autocast_enabled("cpu")
            and all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in tensors))


class _CppBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor, eps):
        y, _, invstd, shift, offset = cpp_extension().batch_norm_forward(x, weight, bias, running_mean, running_var,
                                                                         factor, eps)
        ctx.save_for_backward(x, weight, bias, invstd, shift, offset)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, invstd, shift, offset = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # a double backward: torch's own gradient, which records its graph
            inputs = [t for t, need in ((x, need_x), (weight, need_w), (bias, need_b)) if need]
            y = F.batch_norm(x, None, None, weight, bias, True, 0.0, ctx.eps)
            found = iter(torch.autograd.grad(y, inputs, grad, create_graph=True))
            dx, dw, db = (next(found) if need else None for need in (need_x, need_w, need_b))
        else:
            dx, dw, db = cpp_extension().batch_norm_backward(grad, x, weight, invstd, shift, offset, need_x,
                                                             need_w and weight is not None,
                                                             need_b and bias is not None)
        return dx, dw, db, None, None, None, None


def batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, backend: str | None = None) -> torch.Tensor:
    """`torch.nn.functional.batch_norm`, the same arguments and results (within fp32 reduction-order tolerance),
    with dsd2's CPU kernel where it applies: training mode on a 4-D float32 CPU map (channels_last read as rows of
    channels, any other layout as contiguous planes), outside autocast and tracing. `backend`: cpp or reference,
    else cpp on the CPU where dsd2._C is built and the reference elsewhere."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend '{backend}' is not known for batch_norm; allowed: {', '.join(BACKENDS)}")
    chosen = backend or ("cpp" if x.device.type == "cpu" and cpp_extension() is not None else "reference")
    if chosen == "cpp" and cpp_extension() is None:
        raise ValueError("the cpp batch_norm needs dsd2._C, which is not built; use backend='reference'")
    applies = training and _cpp_applies(x, (running_mean, running_var, weight, bias))
    if chosen == "cpp" and applies:
        if x.numel() // x.shape[1] <= 1:
            F._verify_batch_size(x.size())  # torch's sentence for one value per channel
        return _CppBatchNorm.apply(x, weight, bias, running_mean, running_var, float(momentum), float(eps))
    if chosen == "cpp" and backend == "cpp":
        raise ValueError(f"the cpp batch_norm trains on 4-D float32 CPU tensors outside autocast; this call has "
                         f"training={training} and a {x.dim()}-D {x.dtype} input on {x.device}")
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


class BatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` (the same parameters, buffers, state dict and results within fp32 reduction-order
    tolerance) that trains on dsd2's CPU kernel (`batch_norm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nn.BatchNorm2d's own forward, with `batch_norm` for F.batch_norm
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        training = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return batch_norm(x, self.running_mean if keep else None, self.running_var if keep else None, self.weight,
                          self.bias, training, factor, self.eps)


def swap_in_batch_norms(model: nn.Module) -> nn.Module:
    """The model with a `BatchNorm2d` in place of every `nn.BatchNorm2d` (that class exactly, not a subclass with a
    forward of its own), each over the layer's own parameters and buffers. As with `swap_in_masked_layers`, the
    containers on the way are shallow copies, so `model` itself keeps its layers."""
    from dsd2.ops.masked_layers import _replace, _transplant  # masked_layers imports dsd2.pruning, which imports ops

    copied: dict[str, nn.Module] = {}
    root = model
    for path, module in list(model.named_modules()):
        if type(module) is nn.BatchNorm2d:
            new = _transplant(module, BatchNorm2d)
            if not path:
                return new  # the model is the layer
            root = _replace(model, path, new, copied)
    return root
