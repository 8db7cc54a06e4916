"""Fused knowledge-distillation loss (CE + temperature-scaled KL) and its gradient w.r.t. the student logits."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Launch

# Rows up to this many classes live in registers as a [BLOCK_ROWS, next_pow2(C)] tile (one read of the logits);
# wider rows stream over C in chunks with an online softmax and are read twice (statistics, then gradient).
_TILE_MAX_C = 4096
# Elements per tile in the small-C path: small C packs many rows into one program so a C=10 problem is not
# one nearly-empty program per row. Warps are sized for ~8 elements per thread per live array (no spills on sm_90).
_TILE_ELEMS = 2048
_CHUNK_C = 2048
# Finite stand-in for -inf as the initial running max: exp(m_old - m_new) stays well defined (never -inf - -inf).
_NEG_BIG = -3.0e38


@triton.jit
def _kd_tile_kernel(s_ptr, t_ptr, y_ptr, n_ptr, grad_ptr, ce_ptr, kl_ptr,
                    B, C, s_stride, t_stride, ignore_index, w_ce, w_kl, inv_t,
                    BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < B
    col_ok = cols < C
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (y != ignore_index)
    rows64 = rows.to(tl.int64)
    ld_mask = row_ok[:, None] & col_ok[None, :]
    # rows past B load 0 (not -inf) so every row of the tile stays finite; padding columns become -inf
    s = tl.load(s_ptr + rows64[:, None] * s_stride + cols[None, :], mask=ld_mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + rows64[:, None] * t_stride + cols[None, :], mask=ld_mask, other=0.0).to(tl.float32)
    s = tl.where(col_ok[None, :], s, float("-inf"))
    t = tl.where(col_ok[None, :], t, float("-inf"))

    s_sh = s - tl.max(s, axis=1)[:, None]
    e1 = tl.exp(s_sh)
    z1 = tl.sum(e1, axis=1)
    # max(s / T) == max(s) / T for T > 0, so one shift serves both student softmaxes
    s_sh_t = s_sh * inv_t
    e2 = tl.exp(s_sh_t)
    z2 = tl.sum(e2, axis=1)
    t_sh_t = (t - tl.max(t, axis=1)[:, None]) * inv_t
    e3 = tl.exp(t_sh_t)
    z3 = tl.sum(e3, axis=1)

    p = e3 / z3[:, None]
    log_ratio = (t_sh_t - tl.log(z3)[:, None]) - (s_sh_t - tl.log(z2)[:, None])
    # p == 0 (teacher -inf, or padding) contributes exactly 0 instead of 0 * inf = NaN
    kl_row = tl.sum(tl.where(p > 0, p * log_ratio, 0.0), axis=1)
    onehot = cols[None, :] == y[:, None]
    ce_row = tl.log(z1) - tl.sum(tl.where(onehot, s_sh, 0.0), axis=1)

    inv_n = 1.0 / tl.maximum(tl.load(n_ptr), 1).to(tl.float32)
    g = w_ce * (e1 / z1[:, None] - onehot.to(tl.float32)) + w_kl * (e2 / z2[:, None] - p)
    g = tl.where(valid[:, None], g * inv_n, 0.0)
    tl.store(grad_ptr + rows64[:, None] * C + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=ld_mask)
    tl.store(ce_ptr + rows, tl.where(valid, ce_row, 0.0), mask=row_ok)
    tl.store(kl_ptr + rows, tl.where(valid, kl_row, 0.0), mask=row_ok)


@triton.jit
def _kd_lane_stats(s_row, t_row, C, inv_t, NEG_BIG: tl.constexpr, BLOCK_C: tl.constexpr):
    # Per-lane running statistics of one row, merged across lanes only once at the end (no per-chunk reductions):
    # maxes m_s, m_t; z1 = sum exp(s - m_s), z2 = sum exp((s - m_s) / T), z3 = sum exp((t - m_t) / T) and
    # a3 = sum exp((t - m_t) / T) * ((t - m_t) - (s - m_s)) / T. a3 is kept relative to the running maxes (not as
    # sum p * (t - s)) so that logits with a large common offset (+-1e4) never cancel as big numbers at the end.
    cols = tl.arange(0, BLOCK_C)
    m_s = tl.full([BLOCK_C], NEG_BIG, tl.float32)
    m_t = tl.full([BLOCK_C], NEG_BIG, tl.float32)
    z1 = tl.zeros([BLOCK_C], tl.float32)
    z2 = tl.zeros([BLOCK_C], tl.float32)
    z3 = tl.zeros([BLOCK_C], tl.float32)
    a3 = tl.zeros([BLOCK_C], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        ok = c < C
        s = tl.load(s_row + c, mask=ok, other=float("-inf")).to(tl.float32)
        t = tl.load(t_row + c, mask=ok, other=float("-inf")).to(tl.float32)
        m_s_new = tl.maximum(m_s, s)
        m_t_new = tl.maximum(m_t, t)
        # the maxes start at a finite NEG_BIG, so this is never inf - inf, but it may overflow to +-inf when T < 1:
        # it only matters (and is only used) where the lane already holds teacher mass (z3 > 0)
        shift = ((m_s_new - m_s) - (m_t_new - m_t)) * inv_t
        d_s = m_s - m_s_new
        z1 = z1 * tl.exp(d_s) + tl.exp(s - m_s_new)
        z2 = z2 * tl.exp(d_s * inv_t) + tl.exp((s - m_s_new) * inv_t)
        scale_t = tl.exp((m_t - m_t_new) * inv_t)
        e3 = tl.exp((t - m_t_new) * inv_t)
        # e3 == 0 (teacher -inf, padding) must add 0, not 0 * inf
        term = tl.where(e3 > 0, e3 * ((t - m_t_new) - (s - m_s_new)) * inv_t, 0.0)
        a3 = (a3 + tl.where(z3 > 0, z3 * shift, 0.0)) * scale_t + term
        z3 = z3 * scale_t + e3
        m_s = m_s_new
        m_t = m_t_new
    return m_s, m_t, z1, z2, z3, a3


@triton.jit
def _kd_merge_lanes(m_s, m_t, z1, z2, z3, a3, inv_t):
    # the row's maxes (ms, mt) and its sums, every lane rescaled to them: zs1, zs2, zt from z1, z2, z3 and at from
    # a3, so that KL = at / zt - log zt + log zs2
    ms = tl.max(m_s, axis=0)
    f_s = m_s - ms
    zs1 = tl.sum(z1 * tl.exp(f_s), axis=0)
    zs2 = tl.sum(z2 * tl.exp(f_s * inv_t), axis=0)
    mt = tl.max(m_t, axis=0)
    f_t = tl.exp((m_t - mt) * inv_t)
    zt = tl.sum(z3 * f_t, axis=0)
    at = tl.sum((a3 + tl.where(z3 > 0, z3 * ((m_t - mt) - f_s) * inv_t, 0.0)) * f_t, axis=0)
    return ms, mt, zs1, zs2, zt, at


@triton.jit
def _kd_chunked_kernel(s_ptr, t_ptr, y_ptr, n_ptr, grad_ptr, ce_ptr, kl_ptr,
                       C, s_stride, t_stride, ignore_index, w_ce, w_kl, inv_t,
                       NEG_BIG: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(y_ptr + row)
    valid = y != ignore_index
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = grad_ptr + row * C
    cols = tl.arange(0, BLOCK_C)

    m_s, m_t, z1, z2, z3, a3 = _kd_lane_stats(s_row, t_row, C, inv_t, NEG_BIG, BLOCK_C)
    ms, mt, zs1, zs2, zt, at = _kd_merge_lanes(m_s, m_t, z1, z2, z3, a3, inv_t)
    log_z1 = tl.log(zs1)
    log_z2 = tl.log(zs2)
    log_z3 = tl.log(zt)
    y_ok = valid & (y >= 0) & (y < C)
    s_y = tl.load(s_row + y, mask=y_ok, other=0.0).to(tl.float32)
    ce_row = (ms - s_y) + log_z1
    # log p - log q = ((t - mt) - (s - ms)) / T - log z3 + log z2, and sum p = 1
    kl_row = at / zt - log_z3 + log_z2
    tl.store(ce_ptr + row, tl.where(valid, ce_row, 0.0))
    tl.store(kl_ptr + row, tl.where(valid, kl_row, 0.0))

    inv_n = 1.0 / tl.maximum(tl.load(n_ptr), 1).to(tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        ok = c < C
        s = tl.load(s_row + c, mask=ok, other=0.0).to(tl.float32)
        t = tl.load(t_row + c, mask=ok, other=0.0).to(tl.float32)
        sm = tl.exp((s - ms) - log_z1)
        q = tl.exp((s - ms) * inv_t - log_z2)
        p = tl.exp((t - mt) * inv_t - log_z3)
        g = w_ce * (sm - (c == y).to(tl.float32)) + w_kl * (q - p)
        g = tl.where(valid, g * inv_n, 0.0)
        tl.store(g_row + c, g.to(grad_ptr.dtype.element_ty), mask=ok)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()


def plan_kd(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, n: torch.Tensor, grad: torch.Tensor,
            ce_rows: torch.Tensor, kl_rows: torch.Tensor, alpha: float, temperature: float,
            ignore_index: int) -> Launch:
    """The launch for [B, C] logits: the register tile up to C = 4096, the chunked online softmax beyond."""
    B, C = student.shape
    student = _rows_contiguous(student)
    teacher = _rows_contiguous(teacher)
    target = target.contiguous()
    args = (student, teacher, target, n, grad, ce_rows, kl_rows)
    w_ce, w_kl, inv_t = 1.0 - float(alpha), float(alpha) * float(temperature), 1.0 / float(temperature)
    block_c = triton.next_power_of_2(C)
    if block_c <= _TILE_MAX_C:
        block_rows = min(max(_TILE_ELEMS // block_c, 1), triton.next_power_of_2(B))
        return Launch(_kd_tile_kernel, (triton.cdiv(B, block_rows),),
                      (*args, B, C, student.stride(0), teacher.stride(0), ignore_index, w_ce, w_kl, inv_t),
                      dict(BLOCK_ROWS=block_rows, BLOCK_C=block_c),
                      dict(num_warps=min(16, max(4, block_rows * block_c // 256))))
    return Launch(_kd_chunked_kernel, (B,),
                  (*args, C, student.stride(0), teacher.stride(0), ignore_index, w_ce, w_kl, inv_t),
                  dict(NEG_BIG=_NEG_BIG, BLOCK_C=_CHUNK_C), dict(num_warps=8))


def kd_loss_forward(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float,
                    temperature: float, ignore_index: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1 - alpha) * CE(student, target) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    student, teacher: [B, C] logits (float32/float16/bfloat16, any strides); target: integer [B]. Rows whose target
    is ignore_index are excluded and the means divide by max(n, 1), n = number of kept rows, counted on the device.
    Returns (loss, ce, kl, grad): three fp32 0-dim tensors and d loss / d student (student's dtype, contiguous
    [B, C], zero on ignored rows). No host synchronisation, so the call can be captured in a CUDA graph.
    """
    if student.dim() != 2 or teacher.shape != student.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must be the same [B, C]")
    if target.dim() != 1 or target.shape[0] != student.shape[0]:
        raise ValueError(f"target {tuple(target.shape)} must be [B] with B = {student.shape[0]}")
    if temperature <= 0:
        raise ValueError(f"temperature {temperature} must be > 0")
    B, C = student.shape
    dev = student.device
    grad = torch.empty((B, C), dtype=student.dtype, device=dev)
    ce_rows = torch.empty(B, dtype=torch.float32, device=dev)
    kl_rows = torch.empty(B, dtype=torch.float32, device=dev)
    n = (target != ignore_index).sum()
    if B > 0 and C > 0:
        plan_kd(student, teacher, target, n, grad, ce_rows, kl_rows, alpha, temperature, ignore_index)()
    else:
        ce_rows.zero_()
        kl_rows.zero_()
        grad.zero_()
    denom = n.clamp_min(1).to(torch.float32)
    ce = ce_rows.sum() / denom
    kl = kl_rows.sum() / denom
    loss = (1.0 - alpha) * ce + (alpha * temperature * temperature) * kl
    return loss, ce, kl, grad
