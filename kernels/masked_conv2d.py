"""Masked 2-D convolution as implicit GEMMs: forward, input gradient and weight gradient, the mask on each tile.

Per group g, with the weight W [OC, C/g, KH, KW] and its mask M (bool, or bit-packed: one bit per weight in
row-major order, `dsd2.ops.pack_mask`; each weight's bit is read as its tile is loaded):

    forward   Y[n, oc, oh, ow]  = sum_(c, kh, kw) X[n, c, ih, iw] (W⊙M)[oc, c, kh, kw]       the W tile masked as
                                  ih = oh*sh - ph + kh*dh, iw = ow*sw - pw + kw*dw           it is loaded
    input     dX[n, c, ih, iw]  = sum_(oc, kh, kw) dY[n, oc, oh, ow] (W⊙M)[oc, c, kh, kw]    over the (oh, ow)
                                  that reach (ih, iw): oh = (ih + ph - kh*dh) / sh exactly     the same
    weight    dW[oc, c, kh, kw] = M * sum_(n, oh, ow) dY[n, oc, oh, ow] X[n, c, ih, iw]      masked before stored

No im2col buffer and no W⊙M tensor: the GEMM operands are gathered from X, dY and W through their strides (NCHW,
channels_last or any view). The reduction axis of each GEMM is ordered with the channels fastest when the gathered
tensor is channels_last (consecutive k then read consecutive addresses), slowest otherwise. The weight gradient's
long reduction (N * OH * OW) is split over programs that each store a masked fp32 partial; the partials are summed
in a fixed order, so results do not depend on scheduling.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .launch import Launch
from .masked_linear import load_keep, mask_operand

# The interpreter's tl.dot multiplies bf16 tiles as raw 16-bit integers; there (only) bf16 operands are widened to
# fp32 first, which gives the same products (a bf16 product is exact in fp32).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

H100_SMS = 132  # the programs a weight-gradient split aims to fill when the device is not a GPU (meta, interpreter)


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    if WIDEN:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _tile_ids(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    # output tiles walked in groups of GROUP_M row tiles, so that neighbouring programs share column tiles in L2
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_here = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows_here, (pid % per_group) // rows_here


@triton.jit
def _keep(m_ptr, t_n, t_k, ok, PACKED: tl.constexpr):
    # the mask at offsets t_n + t_k, the channel term and the (c or oc, kh, kw) term summed first as a vector: bool
    # bytes through pointers (as the kernels first read them: ptxas keeps them without spills), or packed bits
    if PACKED:
        keep = load_keep(m_ptr, t_k + t_n, ok, True)
    else:
        keep = tl.load(m_ptr + t_n + t_k, mask=ok, other=0) != 0
    return keep


@triton.jit
def _split_k(rk, C, KH, KW, C_FAST: tl.constexpr):
    # a reduction index -> (channel, kernel row, kernel column)
    if C_FAST:
        c = rk % C
        r = rk // C
        return c, r // KW, r % KW
    else:
        r = rk % (KH * KW)
        return rk // (KH * KW), r // KW, r % KW


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, m_ptr, y_ptr, bias_ptr,
                     N, C, H, W, OC, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw, Cg, OCg,
                     sxn, sxc, sxh, sxw, swo, swc, swh, sww, smo, smc, smh, smw, syn, syc, syh, syw,
                     HAS_BIAS: tl.constexpr, C_FAST: tl.constexpr, PACKED: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
                     WIDEN: tl.constexpr):
    # GEMM rows: output pixels (n, oh, ow); columns: the group's output channels; reduction: (c, kh, kw)
    g = tl.program_id(1)
    P = N * OH * OW
    K = Cg * KH * KW
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(P, BLOCK_M), tl.cdiv(OCg, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < P
    n_ok = rn < OCg
    n_img = rm // (OH * OW)
    pix = rm % (OH * OW)
    ih0 = (pix // OW) * sh - ph
    iw0 = (pix % OW) * sw - pw
    oc = g * OCg + rn
    x_row = x_ptr + n_img * sxn + (g * Cg) * sxc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        c, kh, kw = _split_k(rk, Cg, KH, KW, C_FAST)
        ih = ih0[:, None] + kh[None, :] * dh
        iw = iw0[:, None] + kw[None, :] * dw
        a_ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_row[:, None] + c[None, :] * sxc + ih * sxh + iw * sxw, mask=a_ok, other=0.0)
        b_ok = k_ok[:, None] & n_ok[None, :]
        b = tl.load(w_ptr + oc[None, :] * swo + c[:, None] * swc + kh[:, None] * swh + kw[:, None] * sww, mask=b_ok,
                    other=0.0)
        keep = _keep(m_ptr, oc[None, :] * smo, (c * smc + kh * smh + kw * smw)[:, None], b_ok, PACKED)
        b = tl.where(keep, b, tl.zeros_like(b))  # a select: a pruned inf or NaN contributes nothing
        acc = _mma(a, b, acc, PRECISION, WIDEN)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + oc, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_off = (n_img * syn + (pix // OW) * syh + (pix % OW) * syw)[:, None] + oc[None, :] * syc
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv_dgrad_kernel(dy_ptr, w_ptr, m_ptr, dx_ptr,
                       N, C, H, W, OC, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw, Cg, OCg,
                       sdn, sdc, sdh, sdw, swo, swc, swh, sww, smo, smc, smh, smw, sxn, sxc, sxh, sxw,
                       C_FAST: tl.constexpr, PACKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    # GEMM rows: input pixels (n, ih, iw); columns: the group's input channels; reduction: (oc, kh, kw), of which
    # only the (oh, ow) that land exactly on an output position contribute
    g = tl.program_id(1)
    P = N * H * W
    K = OCg * KH * KW
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(P, BLOCK_M), tl.cdiv(Cg, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < P
    n_ok = rn < Cg
    n_img = rm // (H * W)
    pix = rm % (H * W)
    ih = pix // W
    iw = pix % W
    c = g * Cg + rn
    dy_row = dy_ptr + n_img * sdn + (g * OCg) * sdc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        oc, kh, kw = _split_k(rk, OCg, KH, KW, C_FAST)
        th = ih[:, None] + ph - kh[None, :] * dh
        tw = iw[:, None] + pw - kw[None, :] * dw
        # divided only where non-negative: integer division of negatives differs between the GPU and the interpreter
        th_c = tl.where(th >= 0, th, 0)
        tw_c = tl.where(tw >= 0, tw, 0)
        oh = th_c // sh
        ow = tw_c // sw
        a_ok = (m_ok[:, None] & k_ok[None, :] & (th >= 0) & (tw >= 0) & (oh * sh == th_c) & (ow * sw == tw_c)
                & (oh < OH) & (ow < OW))
        a = tl.load(dy_row[:, None] + oc[None, :] * sdc + oh * sdh + ow * sdw, mask=a_ok, other=0.0)
        b_ok = k_ok[:, None] & n_ok[None, :]
        occ = g * OCg + oc
        # the weight's channel axis is the channel within the group (rn), the input's the global one (c)
        b = tl.load(w_ptr + occ[:, None] * swo + rn[None, :] * swc + kh[:, None] * swh + kw[:, None] * sww,
                    mask=b_ok, other=0.0)
        keep = _keep(m_ptr, rn[None, :] * smc, (occ * smo + kh * smh + kw * smw)[:, None], b_ok, PACKED)
        b = tl.where(keep, b, tl.zeros_like(b))
        acc = _mma(a, b, acc, PRECISION, WIDEN)
    dx_off = (n_img * sxn + ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv_wgrad_kernel(dy_ptr, x_ptr, m_ptr, out_ptr,
                       N, C, H, W, OC, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw, Cg, OCg, span, splits,
                       sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw, smo, smc, smh, smw, s_os, s_oo, s_ok,
                       C_FAST: tl.constexpr, PACKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    # GEMM rows: the group's output channels; columns: (c, kh, kw); reduction: (n, oh, ow), this program's span of
    # it. out[split, oc, col] receives the masked partial sum (s_os, s_oo, s_ok: its strides).
    g = tl.program_id(1) // splits
    split = tl.program_id(1) % splits
    P = N * OH * OW
    KK = Cg * KH * KW
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(OCg, BLOCK_M), tl.cdiv(KK, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < OCg
    n_ok = rn < KK
    oc = g * OCg + rm
    c, kh, kw = _split_k(rn, Cg, KH, KW, C_FAST)
    cc = g * Cg + c
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    lo = split * span
    hi = tl.minimum(lo + span, P)
    for p0 in range(lo, hi, BLOCK_K):
        rp = p0 + tl.arange(0, BLOCK_K)
        p_ok = rp < hi
        n_img = rp // (OH * OW)
        pix = rp % (OH * OW)
        oh = pix // OW
        ow = pix % OW
        a = tl.load(dy_ptr + oc[:, None] * sdc + (n_img * sdn + oh * sdh + ow * sdw)[None, :],
                    mask=m_ok[:, None] & p_ok[None, :], other=0.0)
        ih = (oh * sh - ph)[:, None] + kh[None, :] * dh
        iw = (ow * sw - pw)[:, None] + kw[None, :] * dw
        b_ok = p_ok[:, None] & n_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(x_ptr + (n_img * sxn)[:, None] + cc[None, :] * sxc + ih * sxh + iw * sxw, mask=b_ok, other=0.0)
        acc = _mma(a, b, acc, PRECISION, WIDEN)
    c_ok = m_ok[:, None] & n_ok[None, :]
    keep = _keep(m_ptr, oc[:, None] * smo, (c * smc + kh * smh + kw * smw)[None, :], c_ok, PACKED)
    acc = tl.where(keep, acc, 0.0)  # the weight-gradient tile masked before it is stored
    col = c * (KH * KW) + kh * KW + kw  # the weight's own (c, kh, kw) order, whichever order the columns ran in
    tl.store(out_ptr + split * s_os + oc[:, None] * s_oo + col[None, :] * s_ok, acc.to(out_ptr.dtype.element_ty),
             mask=c_ok)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) by operand width and dot precision; rows are pixels (many), columns
# channels, narrowed for layers with few channels per group (a network's first conv). The gathers of an implicit
# GEMM hold their index tiles in registers: on sm_90, 64 x 64 x 32 fp32 tiles took 142 (TF32) to 255 and a stack
# (IEEE) registers, and 128 x 64 16-bit tiles of 8 warps up to 199 on NCHW inputs (one CTA per SM); the sizes below
# keep every variant at two CTAs or more without a stack (the AOT check, dsd2.kernels.aot).
_CONV_CONFIGS = {(4, "ieee"): (32, 64, 16, 4, 3), (4, "tf32"): (64, 64, 16, 4, 3), (2, "tf32"): (64, 64, 32, 4, 3)}
_WGRAD_CONFIGS = {(4, "ieee"): (32, 64, 16, 4, 3), (4, "tf32"): (64, 64, 16, 4, 3), (2, "tf32"): (64, 64, 32, 8, 3)}


def _config(table: dict, element_size: int, precision: str, columns: int | None = None
            ) -> tuple[int, int, int, int, int]:
    bm, bn, bk, warps, stages = table[(4, precision) if element_size >= 4 else (2, "tf32")]
    return bm, (32 if columns is not None and columns <= 32 else bn), bk, warps, stages


_GROUP_M = 8
_MIN_SPAN_STEPS = 8  # a split of the weight gradient's reduction covers at least this many BLOCK_K steps


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H100_SMS


def _widen(dtype: torch.dtype) -> bool:
    return INTERPRETED and dtype == torch.bfloat16


def _channels_fast(t: torch.Tensor) -> bool:
    """Whether t [N, C, H, W] holds its channels contiguously (channels_last), so reductions take c fastest."""
    return t.shape[1] > 1 and t.stride(1) == 1


def _geometry(x, weight, out_hw, stride, padding, dilation, groups):
    N, C, H, W = x.shape
    OC, Cg, KH, KW = weight.shape
    return (N, C, H, W, OC, *out_hw, KH, KW, *stride, *padding, *dilation, Cg, OC // groups)


def plan_conv_forward(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
                      y: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
                      dilation: tuple[int, int], groups: int, precision: str = "ieee") -> Launch:
    """The forward launch: y = conv2d(x, W⊙M, bias) into y [N, OC, OH, OW] (any strides)."""
    geo = _geometry(x, weight, y.shape[2:], stride, padding, dilation, groups)
    ocg = geo[-1]
    bm, bn, bk, warps, stages = _config(_CONV_CONFIGS, x.element_size(), precision, ocg)
    m, m_strides, packed = mask_operand(mask, weight.shape)
    if packed and precision == "ieee" and not _channels_fast(x):
        stages = min(stages, 2)  # the bits' offsets and shifts on top of the IEEE tiles: 3 stages spilled on sm_90
    P = y.shape[0] * y.shape[2] * y.shape[3]
    grid = (triton.cdiv(P, bm) * triton.cdiv(ocg, bn), groups)
    return Launch(_conv_fwd_kernel, grid,
                  (x, weight, m, y, bias if bias is not None else y, *geo, *x.stride(), *weight.stride(),
                   *m_strides, *y.stride()),
                  dict(HAS_BIAS=bias is not None, C_FAST=_channels_fast(x), PACKED=packed, BLOCK_M=bm, BLOCK_N=bn,
                       BLOCK_K=bk, GROUP_M=_GROUP_M, PRECISION=precision, WIDEN=_widen(x.dtype)),
                  dict(num_warps=warps, num_stages=stages))


def plan_conv_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, grad_x: torch.Tensor,
                         stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int,
                         precision: str = "ieee") -> Launch:
    """The input-gradient launch: grad_x = conv2d's input gradient through W⊙M, into grad_x [N, C, H, W]."""
    geo = _geometry(grad_x, weight, grad_out.shape[2:], stride, padding, dilation, groups)
    cg = weight.shape[1]
    bm, bn, bk, warps, stages = _config(_CONV_CONFIGS, grad_out.element_size(), precision, cg)
    m, m_strides, packed = mask_operand(mask, weight.shape)
    P = grad_x.shape[0] * grad_x.shape[2] * grad_x.shape[3]
    grid = (triton.cdiv(P, bm) * triton.cdiv(cg, bn), groups)
    return Launch(_conv_dgrad_kernel, grid,
                  (grad_out, weight, m, grad_x, *geo, *grad_out.stride(), *weight.stride(), *m_strides,
                   *grad_x.stride()),
                  dict(C_FAST=_channels_fast(grad_out), PACKED=packed, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                       GROUP_M=_GROUP_M, PRECISION=precision, WIDEN=_widen(grad_out.dtype)),
                  dict(num_warps=warps, num_stages=stages))


def wgrad_splits(tiles: int, reduction: int, block_k: int, sms: int) -> tuple[int, int]:
    """(splits, span) of the weight gradient's reduction: enough splits for two programs per SM over the `tiles`
    output tiles, each split at least _MIN_SPAN_STEPS steps of block_k long; span is a multiple of block_k."""
    steps = triton.cdiv(max(reduction, 1), block_k)
    want = triton.cdiv(2 * sms, max(tiles, 1))
    splits = max(1, min(want, steps // _MIN_SPAN_STEPS))
    span = triton.cdiv(steps, splits) * block_k
    return triton.cdiv(max(reduction, 1), span), span


def plan_conv_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, weight_shape: torch.Size,
                          stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int,
                          precision: str = "ieee", out: torch.Tensor | None = None) -> tuple[Launch, torch.Tensor]:
    """The weight-gradient launch and the fp32 tensor [splits, OC, C/g * KH * KW] it fills with masked partial
    sums (`out`, when given, must have that shape); their sum over the splits is dW."""
    OC, Cg, KH, KW = weight_shape
    ocg = OC // groups
    bm, bn, bk, warps, stages = _config(_WGRAD_CONFIGS, x.element_size(), precision)
    tiles = triton.cdiv(ocg, bm) * triton.cdiv(Cg * KH * KW, bn) * groups
    P = grad_out.shape[0] * grad_out.shape[2] * grad_out.shape[3]
    splits, span = wgrad_splits(tiles, P, bk, _sm_count(x.device))
    if out is None:
        out = torch.empty((splits, OC, Cg * KH * KW), dtype=torch.float32, device=x.device)
    m, m_strides, packed = mask_operand(mask, weight_shape)
    geo = (*x.shape, OC, *grad_out.shape[2:], KH, KW, *stride, *padding, *dilation, Cg, ocg)
    launch = Launch(_conv_wgrad_kernel, (triton.cdiv(ocg, bm) * triton.cdiv(Cg * KH * KW, bn), groups * splits),
                    (grad_out, x, m, out, *geo, span, splits, *grad_out.stride(), *x.stride(), *m_strides,
                     *out.stride()),
                    dict(C_FAST=_channels_fast(x), PACKED=packed, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                         GROUP_M=_GROUP_M, PRECISION=precision, WIDEN=_widen(x.dtype)),
                    dict(num_warps=warps, num_stages=stages))
    return launch, out


def _precision(dtype: torch.dtype) -> str:
    return "tf32" if dtype != torch.float32 or torch.backends.cudnn.allow_tf32 else "ieee"


def conv_out_hw(h: int, w: int, kernel: tuple[int, int], stride, padding, dilation) -> tuple[int, int]:
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                 for size, k, s, p, d in zip((h, w), kernel, stride, padding, dilation))


def masked_conv2d_forward(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
                          stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                          groups: int) -> torch.Tensor:
    """y = conv2d(x, W⊙M, bias, ...) for x [N, C, H, W]; y in x's dtype and memory format."""
    oh, ow = conv_out_hw(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    fmt = torch.channels_last if _channels_fast(x) else torch.contiguous_format
    y = torch.empty((x.shape[0], weight.shape[0], oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    plan_conv_forward(x, weight, mask, bias, y, stride, padding, dilation, groups, _precision(x.dtype))()
    return y


def masked_conv2d_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                           stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int,
                           need_x: bool, need_w: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dX through W⊙M, dW masked: pruned entries exactly 0.0), each only when asked for."""
    grad_out = grad_out.to(x.dtype)
    precision = _precision(x.dtype)
    grad_x = grad_w = None
    if need_x:
        grad_x = torch.empty_like(x)
        if grad_x.numel():
            plan_conv_input_grad(grad_out, weight, mask, grad_x, stride, padding, dilation, groups, precision)()
    if need_w:
        if grad_out.numel() == 0 or weight.numel() == 0:
            grad_w = torch.zeros_like(weight)
        else:
            launch, partial = plan_conv_weight_grad(grad_out, x, mask, weight.shape, stride, padding, dilation,
                                                    groups, precision)
            launch()
            grad_w = (partial[0] if partial.shape[0] == 1 else partial.sum(0)).view(weight.shape).to(weight.dtype)
    return grad_x, grad_w
