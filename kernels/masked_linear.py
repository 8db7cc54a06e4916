"""Masked matrix products for a linear layer: C = A @ (B⊙M), or C = (A @ B)⊙M, with the mask applied to each tile.

One kernel serves the three products of a masked linear layer, W [O, I] and its mask M (bool, or bit-packed:
one bit per weight, read as each tile is loaded):

    forward  Y  = X @ (W⊙M)^T (+ b)     the weight tile masked as it is loaded
    dX       dX = dY @ (W⊙M)            the same, W not transposed
    dW       dW = (dY^T @ X)⊙M          the output tile masked before it is stored

Every operand is read through its strides (any layout, transposes for free); accumulation is fp32 (tl.dot), the
result is stored in the output's dtype. No W⊙M tensor is ever written to memory.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .launch import Launch

# The interpreter's tl.dot multiplies bf16 tiles as raw 16-bit integers; there (only) bf16 operands are widened to
# fp32 first, which gives the same products (a bf16 product is exact in fp32).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    if WIDEN:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def load_keep(m_ptr, off, ok, PACKED: tl.constexpr):
    # Whether the mask keeps the weights at element offsets `off` (through the mask's strides): a bool byte each,
    # or, PACKED, bit (off & 7) of byte off >> 3 (the row-major bit order of dsd2.ops.pack_mask).
    if PACKED:
        byte = tl.load(m_ptr + (off >> 3), mask=ok, other=0).to(tl.int32)
        keep = ((byte >> (off & 7)) & 1) != 0
    else:
        keep = tl.load(m_ptr + off, mask=ok, other=0) != 0
    return keep


@triton.jit
def _masked_matmul_kernel(a_ptr, b_ptr, m_ptr, c_ptr, bias_ptr, M, N, K,
                          s_am, s_ak, s_bk, s_bn, s_mr, s_mc, s_cm, s_cn,
                          MASK_B: tl.constexpr, MASK_C: tl.constexpr, HAS_BIAS: tl.constexpr, PACKED: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    # C[M, N] = A[M, K] @ B[K, N]. The mask has B's shape (MASK_B: its strides s_mr, s_mc run along K and N) or C's
    # (MASK_C: along M and N). Programs walk the output in groups of GROUP_M row tiles so that consecutive programs
    # share their B tiles in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_here = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_here
    pid_n = (pid % per_group) // rows_here
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(a_ptr + rm[:, None] * s_am + kk[None, :] * s_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b_ok = k_ok[:, None] & n_ok[None, :]
        b = tl.load(b_ptr + kk[:, None] * s_bk + rn[None, :] * s_bn, mask=b_ok, other=0.0)
        if MASK_B:
            # a select, not a product: a pruned weight holding inf or NaN still contributes nothing
            keep = load_keep(m_ptr, kk[:, None] * s_mr + rn[None, :] * s_mc, b_ok, PACKED)
            b = tl.where(keep, b, tl.zeros_like(b))
        acc = _mma(a, b, acc, PRECISION, WIDEN)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ok = m_ok[:, None] & n_ok[None, :]
    if MASK_C:
        keep = load_keep(m_ptr, rm[:, None] * s_mr + rn[None, :] * s_mc, c_ok, PACKED)
        acc = tl.where(keep, acc, 0.0)
    tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty), mask=c_ok)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) by operand width and dot precision. IEEE fp32 multiplies on the FMA
# units with both operand tiles in registers: a 64 x 64 x 32 tile took 255 registers and spilled on sm_90, 32 x 64
# x 16 keeps it near 128 (four CTAs per SM); a 128 x 64 16-bit tile took 254. The sizes are the AOT check's
# (dsd2.kernels.aot): no spills, >= 2 CTAs per SM.
_CONFIGS = {(4, "ieee"): (32, 64, 16, 4, 3), (4, "tf32"): (64, 64, 32, 4, 3), (2, "tf32"): (64, 64, 32, 4, 3)}
_GROUP_M = 8


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """tl.dot's input precision: TF32 for fp32 only where torch allows it for the layer's own product, else IEEE;
    16-bit operands multiply exactly in any mode."""
    return "tf32" if dtype != torch.float32 or allow_tf32 else "ieee"


def _widen(dtype: torch.dtype) -> bool:
    return INTERPRETED and dtype == torch.bfloat16


def is_packed(mask: torch.Tensor) -> bool:
    """Whether a kernel's mask argument is bit-packed (uint8 bytes, dsd2.ops.pack_mask's layout) or bool."""
    return mask.dtype == torch.uint8


def bit_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A packed mask's bit offset of one step along each axis of `shape`: the row-major strides."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def mask_operand(mask: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...], bool]:
    """(the tensor a kernel reads, the offset of one step along each axis of the mask of `shape`, packed): a bool
    mask as bytes through its own strides, packed bits through their row-major bit offsets."""
    if is_packed(mask):
        return mask, bit_strides(shape), True
    return mask.view(torch.uint8), mask.stride(), False


def plan_matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None, *,
                mask_b: bool = False, mask_c: bool = False, bias: torch.Tensor | None = None,
                precision: str = "ieee", mask_strides: tuple[int, int] | None = None) -> Launch:
    """The launch computing c = a @ b for 2-D views a [M, K], b [K, N], c [M, N] (any strides), with the mask (b's
    shape with mask_b, c's with mask_c) applied as b's tiles are loaded or before c's are stored. The mask is a
    bool view read through its strides, or packed bits (uint8) read through `mask_strides`, the bit offsets of
    one step along each of the view's two axes."""
    M, K = a.shape
    N = b.shape[1]
    if mask_b == mask_c:
        raise ValueError("plan_matmul masks either b (mask_b) or c (mask_c)")
    packed = is_packed(mask)
    if packed != (mask_strides is not None):
        raise ValueError("plan_matmul needs mask_strides with packed bits, and only then")
    bm, bn, bk, warps, stages = _CONFIGS[(4, precision) if a.element_size() >= 4 else (2, "tf32")]
    m = mask if packed else mask.view(torch.uint8)
    s_mr, s_mc = mask_strides if packed else m.stride()
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    return Launch(_masked_matmul_kernel, grid,
                  (a, b, m, c, bias if bias is not None else c, M, N, K, a.stride(0), a.stride(1), b.stride(0),
                   b.stride(1), s_mr, s_mc, c.stride(0), c.stride(1)),
                  dict(MASK_B=mask_b, MASK_C=mask_c, HAS_BIAS=bias is not None, PACKED=packed, BLOCK_M=bm,
                       BLOCK_N=bn, BLOCK_K=bk, GROUP_M=_GROUP_M, PRECISION=precision, WIDEN=_widen(a.dtype)),
                  dict(num_warps=warps, num_stages=stages))


def _precision(dtype: torch.dtype) -> str:
    return dot_precision(dtype, torch.backends.cuda.matmul.allow_tf32)


def masked_linear_forward(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ (W⊙M)^T + bias for x [B, I], W [O, I] and its mask (bool [O, I], or packed bits: uint8
    [ceil(O * I / 8)], dsd2.ops.pack_mask's layout); y [B, O] in x's dtype."""
    y = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    if x.shape[1] == 0:
        return y.copy_(bias.expand_as(y) if bias is not None else torch.zeros_like(y))
    if is_packed(mask):  # b = W^T: one step along K (in) is one bit, along N (out) a row of bits
        strides = bit_strides(weight.shape)
        plan_matmul(x, weight.t(), y, mask, mask_b=True, bias=bias, precision=_precision(x.dtype),
                    mask_strides=(strides[1], strides[0]))()
    else:
        plan_matmul(x, weight.t(), y, mask.t(), mask_b=True, bias=bias, precision=_precision(x.dtype))()
    return y


def masked_linear_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                           need_x: bool, need_w: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dX = dY @ (W⊙M), dW = (dY^T @ X)⊙M), each only when asked for; dW has pruned entries exactly 0.0."""
    grad_out = grad_out.to(x.dtype)
    precision = _precision(x.dtype)
    bits = bit_strides(weight.shape) if is_packed(mask) else None
    grad_x = grad_w = None
    if need_x:
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
        if grad_x.numel():
            if weight.shape[0] == 0:
                grad_x.zero_()
            else:
                plan_matmul(grad_out, weight, grad_x, mask, mask_b=True, precision=precision, mask_strides=bits)()
    if need_w:
        grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        if grad_w.numel():
            if x.shape[0] == 0:
                grad_w.zero_()
            else:
                plan_matmul(grad_out.t(), x, grad_w, mask, mask_c=True, precision=precision, mask_strides=bits)()
    return grad_x, grad_w
