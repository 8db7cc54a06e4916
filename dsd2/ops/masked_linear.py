"""masked_linear: a linear layer that computes with W⊙M, the weight where its mask keeps it and 0 elsewhere.

    y = x @ (W⊙M)^T + b;   dX = dY @ (W⊙M);   dW = (dY^T @ X)⊙M (pruned entries exactly 0.0);   db = sum dY

W⊙M is a select, not a product: a pruned entry contributes nothing even when it holds inf or NaN. Backends:

- **triton** (CUDA): one masked matrix-product kernel for the three products. The mask is applied to each weight
  tile as it is loaded, and the weight-gradient tile is masked before it is stored: no W⊙M tensor is ever in
  memory. fp32 runs TF32 where `torch.backends.cuda.matmul.allow_tf32` allows it (as `nn.Linear` does), else IEEE.
- **cpp** (CPU): MKL's matrix products (the ones `nn.Linear` runs, so the results are its own bit for bit) on
  W⊙M from dsd2._C: the weight itself when one vectorised read finds it 0 wherever it is pruned (a masked layer's
  weight stays so under any optimizer: the level loop's always is), else a copy masked in one vectorised pass; dW
  is masked in place as it comes out of its product. A 2-D input is one autograd node in C++ (a small layer's
  step is mostly glue). No C++ matrix product of our own: the masking and the glue are the whole cost over the
  plain layer, measured in `benchmarks/ops/bench_masked_layers.py` (the README's masked-layers section has the
  table), which bounds what one could gain against MKL's.
- **reference**: `F.linear(x, torch.where(mask, weight, 0), bias)`, the oracle.

The mask is bool (True = kept) or bit-packed (`dsd2.ops.pack_mask`, a `PackedMask`: one bit per weight, an eighth
of the bytes), which the Triton kernels read bit by bit and the other backends unpack once per call.

Inputs may be float32, float64 (reference and cpp), float16 or bfloat16. Under autocast the products run in the
autocast dtype, as `nn.Linear`'s do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsd2.ops._backend import cpp_extension, pick
from dsd2.ops.bitmask import PackedMask

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
TF32_ROUNDOFF = 2.0**-11


def product_tolerance(dtype: torch.dtype, reduction: int, tf32: bool = False) -> float:
    """The error bound of every backend's outputs and gradients against a float64 oracle, elementwise, as a multiple
    of that element's sum of |products| (sum |a b|), the same at every CPU level and vector width:

    - any order of a sum of `reduction` products accumulated in fp32 (float64 for float64): (reduction + 1) units
      of roundoff (16-bit products are exact in fp32);
    - the result stored in `dtype`: two units of that dtype (the Triton interpreter truncates where a GPU rounds);
    - with `tf32`, each product's operands rounded to TF32's 10-bit mantissa: two more of its units."""
    acc = UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]
    return (reduction + 1) * acc + 2 * UNIT_ROUNDOFF[dtype] + (2 * TF32_ROUNDOFF if tf32 else 0.0)


def masked_weight_reference(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """W⊙M in plain PyTorch: the weight where the mask keeps it, else 0 (differentiable in the weight)."""
    return torch.where(mask, weight, weight.new_zeros(()))


def masked_linear_reference(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle: `F.linear` on W⊙M."""
    return F.linear(x, masked_weight_reference(weight, mask), bias)


def check_mask(weight: torch.Tensor, mask: torch.Tensor | PackedMask) -> None:
    """Refuse, in one sentence, a mask that is not a bool tensor (or a `PackedMask`) of the weight's shape on the
    weight's device."""
    if not isinstance(mask, PackedMask) and (not torch.is_tensor(mask) or mask.dtype != torch.bool):
        what = mask.dtype if torch.is_tensor(mask) else type(mask).__name__
        raise TypeError(f"the mask must be a bool tensor (True = kept) or a dsd2.ops.PackedMask, not {what}")
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"the mask is on {mask.device} but the weight on {weight.device}; put them on one device")


_PICKED: dict[tuple, str] = {}


def pick_masked(op: str, x: torch.Tensor, backend: str | None, extension) -> str:
    """The op's backend for x (`extension`: the op's loader of dsd2._C), remembered per device type, dtype and
    loader: a layer calls this every step and the answer cannot change within a process. The reference under
    torch.jit tracing (fvcore's FLOP count), which records torch operators, not a C++ or custom autograd function."""
    key = (op, x.device.type, x.dtype, backend, extension)
    chosen = _PICKED.get(key)
    if chosen is None:
        chosen = _PICKED[key] = pick(op, x, backend, extension=extension)
    return "reference" if chosen == "cpp" and backend is None and torch.jit.is_tracing() else chosen


_CPP_BY_DTYPE: dict[torch.dtype, object] = {}


def cpp_linear_for(x) -> object | None:
    """dsd2._C when `masked_linear` would take its cpp path for x with a bool mask (a CPU tensor of a dtype the
    extension takes, not under torch.jit tracing), else None: a masked layer's per-call shortcut past the checks
    and the choice (about 15 us of a small layer's cold call on a 2-core Xeon; the C++ checks the mask's dtype,
    shape and device itself)."""
    if not isinstance(x, torch.Tensor) or not x.is_cpu or torch.jit.is_tracing():
        return None
    ext = _CPP_BY_DTYPE.get(x.dtype, False)
    if ext is False:
        ext = _CPP_BY_DTYPE[x.dtype] = cpp_extension() if pick_masked("masked_linear", x, None,
                                                                      cpp_extension) == "cpp" else None
    return ext


def check_same_dtype(x: torch.Tensor, weight: torch.Tensor) -> None:
    """The fused kernels multiply x by the weight as they are: refuse two dtypes, as torch's products do."""
    if x.dtype != weight.dtype:
        raise TypeError(f"the input is {x.dtype} but the weight {weight.dtype}; give both one dtype (or use autocast)")


def autocast_inputs(device_type: str, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors in the autocast dtype when autocast is on for `device_type` (custom kernels see autocast but
    do not apply it), so a fused layer computes in the precision `nn.Linear`/`nn.Conv2d` would."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


class _TritonMaskedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, mask, bias):
        from dsd2.kernels.masked_linear import masked_linear_forward

        ctx.save_for_backward(x, weight, mask)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return masked_linear_forward(x, weight, mask, bias)

    @staticmethod
    def backward(ctx, grad_out):
        from dsd2.kernels.masked_linear import masked_linear_backward

        x, weight, mask = ctx.saved_tensors
        need_x, need_w, _, need_b = ctx.needs_input_grad
        grad_x, grad_w = masked_linear_backward(grad_out, x, weight, mask, need_x, need_w)
        grad_b = None
        if ctx.has_bias and need_b:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).float().sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, None, grad_b


def mask_for(chosen: str, mask: torch.Tensor | PackedMask) -> torch.Tensor:
    """The mask as the `chosen` backend takes it: Triton reads packed bits as they are, the others a bool mask
    (a `PackedMask` unpacked once per call)."""
    if not isinstance(mask, PackedMask):
        return mask
    return mask.bits if chosen == "triton" else mask.unpack()


def masked_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | PackedMask,
                  bias: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """`F.linear(x, W⊙M, bias)` without W⊙M in memory on the GPU; dW comes back masked (pruned entries 0.0).

    x: [..., in_features]; weight: [out_features, in_features]; mask: bool of the weight's shape (True = kept), or
    a `PackedMask` (`dsd2.ops.pack_mask`: one bit per weight, read bit by bit by the Triton kernels); bias:
    [out_features] or None. `backend`: triton, cpp or reference, else the one `dsd2.ops.pick` chooses for x."""
    check_mask(weight, mask)
    chosen = pick_masked("masked_linear", x, backend, cpp_extension)
    mask = mask_for(chosen, mask)
    if chosen == "triton":
        x, weight, bias = autocast_inputs(x.device.type, x, weight, bias)
        check_same_dtype(x, weight)
        shape = x.shape
        out = _TritonMaskedLinear.apply(x.reshape(-1, shape[-1]), weight, mask, bias)
        return out.reshape(*shape[:-1], weight.shape[0])
    if chosen == "cpp":
        # oneDNN/MKL's product on W⊙M (the weight itself when it is already 0 where pruned); dW masked in place
        return cpp_extension().masked_linear(x, weight, mask, bias)
    return masked_linear_reference(x, weight, mask, bias)
