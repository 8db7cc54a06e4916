"""Masked matrix products for a linear layer: C = A @ (B⊙M), or C = (A @ B)⊙M, with the mask applied to each tile.

One kernel serves the three products of a masked linear layer, W [O, I] and its bool mask M:

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
def _masked_matmul_kernel(a_ptr, b_ptr, m_ptr, c_ptr, bias_ptr, M, N, K,
                          s_am, s_ak, s_bk, s_bn, s_mr, s_mc, s_cm, s_cn,
                          MASK_B: tl.constexpr, MASK_C: tl.constexpr, HAS_BIAS: tl.constexpr,
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
            keep = tl.load(m_ptr + kk[:, None] * s_mr + rn[None, :] * s_mc, mask=b_ok, other=0)
            b = tl.where(keep != 0, b, tl.zeros_like(b))
        acc = _mma(a, b, acc, PRECISION, WIDEN)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ok = m_ok[:, None] & n_ok[None, :]
    if MASK_C:
        keep = tl.load(m_ptr + rm[:, None] * s_mr + rn[None, :] * s_mc, mask=c_ok, other=0)
        acc = tl.where(keep != 0, acc, 0.0)
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


def _as_bytes(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def plan_matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None, *,
                mask_b: bool = False, mask_c: bool = False, bias: torch.Tensor | None = None,
                precision: str = "ieee") -> Launch:
    """The launch computing c = a @ b for 2-D views a [M, K], b [K, N], c [M, N] (any strides), with the bool mask
    (b's shape with mask_b, c's with mask_c) applied as b's tiles are loaded or before c's are stored."""
    M, K = a.shape
    N = b.shape[1]
    if mask_b == mask_c:
        raise ValueError("plan_matmul masks either b (mask_b) or c (mask_c)")
    bm, bn, bk, warps, stages = _CONFIGS[(4, precision) if a.element_size() >= 4 else (2, "tf32")]
    m = _as_bytes(mask)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    return Launch(_masked_matmul_kernel, grid,
                  (a, b, m, c, bias if bias is not None else c, M, N, K, a.stride(0), a.stride(1), b.stride(0),
                   b.stride(1), m.stride(0), m.stride(1), c.stride(0), c.stride(1)),
                  dict(MASK_B=mask_b, MASK_C=mask_c, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                       GROUP_M=_GROUP_M, PRECISION=precision, WIDEN=_widen(a.dtype)),
                  dict(num_warps=warps, num_stages=stages))


def _precision(dtype: torch.dtype) -> str:
    return dot_precision(dtype, torch.backends.cuda.matmul.allow_tf32)


def masked_linear_forward(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ (W⊙M)^T + bias for x [B, I], W and its bool mask [O, I]; y [B, O] in x's dtype."""
    y = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    if x.shape[1] == 0:
        return y.copy_(bias.expand_as(y) if bias is not None else torch.zeros_like(y))
    plan_matmul(x, weight.t(), y, mask.t(), mask_b=True, bias=bias, precision=_precision(x.dtype))()
    return y


def masked_linear_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                           need_x: bool, need_w: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dX = dY @ (W⊙M), dW = (dY^T @ X)⊙M), each only when asked for; dW has pruned entries exactly 0.0."""
    grad_out = grad_out.to(x.dtype)
    precision = _precision(x.dtype)
    grad_x = grad_w = None
    if need_x:
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
        if grad_x.numel():
            if weight.shape[0] == 0:
                grad_x.zero_()
            else:
                plan_matmul(grad_out, weight, grad_x, mask, mask_b=True, precision=precision)()
    if need_w:
        grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        if grad_w.numel():
            if x.shape[0] == 0:
                grad_w.zero_()
            else:
                plan_matmul(grad_out.t(), x, grad_w, mask, mask_c=True, precision=precision)()
    return grad_x, grad_w
