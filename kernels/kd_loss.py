"""Fused knowledge-distillation loss (CE + temperature-scaled KL) and its gradient w.r.t. the student logits."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Launch

# Rows up to this many classes live in registers as a [BLOCK_ROWS, next_pow2(C)] tile (one read of the logits);
# wider rows stream over C in chunks: one statistics sweep with an online softmax (3 exp per element, the running
# sums rescaled once per chunk), then one gradient sweep that re-reads the row, which the first sweep left in L2.
TILE_MAX_C = 4096
# Tile shape per padded width C: (most rows per program, warps), 8 elements per thread up to C = 1024. Sized from
# the sm_90 cubins (tests/test_aot.py asserts it): at most 128 registers per thread at 4 warps, 64 at 8, 32 at 16 is
# what keeps >= 2 CTAs per SM; the narrow tiles once packed 16 rows per thread and needed 139-155 registers.
_TILE_SHAPES = {16: (64, 4), 32: (32, 4), 64: (8, 4), 128: (4, 4), 256: (2, 4), 512: (4, 8), 1024: (2, 8),
                2048: (1, 8), 4096: (1, 16)}
CHUNK_C = 4096  # with 16 warps: 8 elements per thread per sweep, 32 KB of fp32 logits in flight per SM
H100_SMS = 132
SPLIT_CHUNK_C = 1024  # finer spans for the split path: more programs for a small batch
# Below this many programs a row is split over C (two launches: partial statistics, then the merged gradient), so
# that a small batch still fills the GPU (B = 8 rows would leave 124 of an H100's 132 SMs idle).
SPLIT_MIN_PROGRAMS = 2 * H100_SMS
MAX_SPLITS = 64
# Finite stand-in for -inf as the initial running max: exp(m_old - m_new) stays well defined (never -inf - -inf).
_NEG_BIG = -3.0e38
_LOG2E = 1.4426950408889634


@triton.jit
def _kd_tile_kernel(s_ptr, t_ptr, y_ptr, n_ptr, grad_ptr, ce_ptr, kl_ptr,
                    B, C, s_stride, t_stride, ignore_index, w_ce, w_kl, inv_t,
                    BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr, LOG2E: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < B
    # rows start on ALIGN-element boundaries and C is a multiple of ALIGN (the planner checks both): with these hints
    # C = 100 is read in 16-byte vectors and a warp holds whole rows, so the row reductions stay within a warp
    col_ok = tl.max_constancy(cols < C, ALIGN)
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (y != ignore_index)
    rows64 = rows.to(tl.int64)
    s_off = tl.multiple_of(rows64 * s_stride, ALIGN)
    t_off = tl.multiple_of(rows64 * t_stride, ALIGN)
    g_off = tl.multiple_of(rows64 * C, ALIGN)
    # ignored rows and rows past B read nothing and stay finite (0), whatever an ignored row holds; padding is -inf
    ld_mask = valid[:, None] & col_ok[None, :]
    s = tl.load(s_ptr + s_off[:, None] + cols[None, :], mask=ld_mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + t_off[:, None] + cols[None, :], mask=ld_mask, other=0.0).to(tl.float32)
    s = tl.where(col_ok[None, :], s, float("-inf"))
    t = tl.where(col_ok[None, :], t, float("-inf"))

    s_sh = s - tl.max(s, axis=1)[:, None]
    e1 = tl.exp2(s_sh * LOG2E)
    # max(s / T) == max(s) / T for T > 0, so one shift serves both student softmaxes
    s_sh_t = s_sh * inv_t
    e2 = tl.exp2(s_sh_t * LOG2E)
    t_sh_t = (t - tl.max(t, axis=1)[:, None]) * inv_t
    e3 = tl.exp2(t_sh_t * LOG2E)
    z1 = tl.sum(e1, axis=1)
    z2 = tl.sum(e2, axis=1)
    z3 = tl.sum(e3, axis=1)
    # one division per row: each z holds its max's exp(0), so 1 <= z <= C and z1 z2 z3 cannot overflow
    rz = 1.0 / (z1 * z2 * z3)
    r3 = (z1 * z2) * rz
    # KL = sum p (log p - log q) with p = e3 / z3 and sum p = 1; e3 == 0 (teacher -inf, padding) adds 0, not 0 * inf
    kl_row = tl.sum(tl.where(e3 > 0, e3 * (t_sh_t - s_sh_t), 0.0), axis=1) * r3 - tl.log(z3) + tl.log(z2)
    onehot = cols[None, :] == y[:, None]
    ce_row = tl.log(z1) - tl.sum(tl.where(onehot, s_sh, 0.0), axis=1)

    # one factor per row for each softmax (weight / (n z)): multiplies per element, no division
    k = tl.where(valid, 1.0 / tl.maximum(tl.load(n_ptr), 1).to(tl.float32), 0.0)
    w1 = w_ce * k
    k1 = w1 * ((z2 * z3) * rz)
    k2 = (w_kl * k) * ((z1 * z3) * rz)
    k3 = (w_kl * k) * r3
    g = e1 * k1[:, None] + e2 * k2[:, None] - e3 * k3[:, None] - tl.where(onehot, w1[:, None], 0.0)
    st_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(grad_ptr + g_off[:, None] + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=st_mask)
    tl.store(ce_ptr + rows, tl.where(valid, ce_row, 0.0), mask=row_ok)
    tl.store(kl_ptr + rows, tl.where(valid, kl_row, 0.0), mask=row_ok)


@triton.jit
def _kd_span_stats(s_row, t_row, c_lo, c_hi, inv_t, live, NEG_BIG: tl.constexpr, BLOCK_C: tl.constexpr,
                   LOG2E: tl.constexpr):
    # One sweep over columns [c_lo, c_hi) with an online softmax: the running maxes ms, mt and the sums
    # z1 = sum exp(s - ms), z2 = sum exp((s - ms) / T), z3 = sum exp((t - mt) / T) and
    # a = sum exp((t - mt) / T) * ((t - mt) - (s - ms)) / T. Three exp per element; the sums are rescaled once per
    # chunk (scalars), not per element. a is kept relative to the running maxes (not as sum p * (t - s)) so that
    # logits with a large common offset (+-1e4) never cancel as big numbers at the end.
    cols = tl.arange(0, BLOCK_C)
    ms = tl.full((), NEG_BIG, tl.float32)
    mt = tl.full((), NEG_BIG, tl.float32)
    z1 = tl.full((), 0.0, tl.float32)
    z2 = tl.full((), 0.0, tl.float32)
    z3 = tl.full((), 0.0, tl.float32)
    a = tl.full((), 0.0, tl.float32)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c0 + cols
        ok = (c < c_hi) & live
        # kept in L2 for the gradient sweep that follows
        s = tl.load(s_row + c, mask=ok, other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
        t = tl.load(t_row + c, mask=ok, other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
        ms_new = tl.maximum(ms, tl.max(s, axis=0))
        mt_new = tl.maximum(mt, tl.max(t, axis=0))
        # the maxes start at a finite NEG_BIG, so d_s, d_t are never inf - inf; they may overflow to -inf, which only
        # matters (and is only used) once z3 > 0
        d_s = ms - ms_new
        d_t = mt - mt_new
        f_t = tl.exp2(d_t * inv_t * LOG2E)
        s_sh = s - ms_new
        t_sh_t = (t - mt_new) * inv_t
        e3 = tl.exp2(t_sh_t * LOG2E)
        term = tl.sum(tl.where(e3 > 0, e3 * (t_sh_t - s_sh * inv_t), 0.0), axis=0)
        a = (a + tl.where(z3 > 0, z3 * ((d_t - d_s) * inv_t), 0.0)) * f_t + term
        z1 = z1 * tl.exp2(d_s * LOG2E) + tl.sum(tl.exp2(s_sh * LOG2E), axis=0)
        z2 = z2 * tl.exp2(d_s * inv_t * LOG2E) + tl.sum(tl.exp2(s_sh * (inv_t * LOG2E)), axis=0)
        z3 = z3 * f_t + tl.sum(e3, axis=0)
        ms = ms_new
        mt = mt_new
    return ms, mt, z1, z2, z3, a


@triton.jit
def _kd_merge_spans(m_s, m_t, z1, z2, z3, a3, inv_t, LOG2E: tl.constexpr):
    # the row's maxes (ms, mt) and its sums from per-span statistics (vectors over spans; a missing span holds
    # m = NEG_BIG and zero sums), every span rescaled to the row's maxes
    ms = tl.max(m_s, axis=0)
    f_s = m_s - ms
    zs1 = tl.sum(z1 * tl.exp2(f_s * LOG2E), axis=0)
    zs2 = tl.sum(z2 * tl.exp2(f_s * inv_t * LOG2E), axis=0)
    mt = tl.max(m_t, axis=0)
    f_t = tl.exp2((m_t - mt) * inv_t * LOG2E)
    zt = tl.sum(z3 * f_t, axis=0)
    at = tl.sum((a3 + tl.where(z3 > 0, z3 * ((m_t - mt) - f_s) * inv_t, 0.0)) * f_t, axis=0)
    return ms, mt, zs1, zs2, zt, at


@triton.jit
def _kd_row_finish(s_row, y, valid, C, n_ptr, ms, z1, z2, z3, a, w_ce, w_kl):
    # the row's CE and KL, and the gradient's factors: one division for the row (1 <= z <= C, as in the tile), none
    # per element
    y_ok = valid & (y >= 0) & (y < C)
    s_y = tl.load(s_row + y, mask=y_ok, other=0.0).to(tl.float32)
    ce_row = tl.where(valid, (ms - s_y) + tl.log(z1), 0.0)
    rz = 1.0 / (z1 * z2 * z3)
    r3 = (z1 * z2) * rz
    # log p - log q = ((t - mt) - (s - ms)) / T - log z3 + log z2, and sum p = 1
    kl_row = tl.where(valid, a * r3 - tl.log(z3) + tl.log(z2), 0.0)
    k = tl.where(valid, 1.0 / tl.maximum(tl.load(n_ptr), 1).to(tl.float32), 0.0)
    w1 = w_ce * k
    return ce_row, kl_row, w1 * ((z2 * z3) * rz), (w_kl * k) * ((z1 * z3) * rz), (w_kl * k) * r3, w1


@triton.jit
def _kd_span_grad(s_row, t_row, g_row, y, c_lo, c_hi, ms, mt, k1, k2, k3, w1, live, inv_t,
                  BLOCK_C: tl.constexpr, LOG2E: tl.constexpr):
    # g = k1 exp(s - ms) + k2 exp((s - ms) / T) - k3 exp((t - mt) / T) - w1 [c == y], zero on an ignored row
    cols = tl.arange(0, BLOCK_C)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c0 + cols
        ok = c < c_hi
        s = tl.load(s_row + c, mask=ok & live, other=0.0, eviction_policy="evict_first").to(tl.float32)
        t = tl.load(t_row + c, mask=ok & live, other=0.0, eviction_policy="evict_first").to(tl.float32)
        s_sh = (s - ms) * LOG2E
        g = k1 * tl.exp2(s_sh) + k2 * tl.exp2(s_sh * inv_t) - k3 * tl.exp2((t - mt) * (inv_t * LOG2E))
        g = tl.where(live, g - tl.where(c == y, w1, 0.0), 0.0)
        tl.store(g_row + c, g.to(g_row.dtype.element_ty), mask=ok)


@triton.jit
def _kd_chunked_kernel(s_ptr, t_ptr, y_ptr, n_ptr, grad_ptr, ce_ptr, kl_ptr,
                       B, C, s_stride, t_stride, ignore_index, w_ce, w_kl, inv_t,
                       NEG_BIG: tl.constexpr, BLOCK_C: tl.constexpr, LOG2E: tl.constexpr):
    # persistent: one program per SM walks rows pid, pid + grid, ..., so that at most `grid` rows are between their
    # two sweeps at any time and the gradient sweep re-reads its row from L2, not from memory
    for r in range(tl.program_id(0), B, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        y = tl.load(y_ptr + row)
        valid = y != ignore_index
        s_row = s_ptr + row * s_stride
        t_row = t_ptr + row * t_stride
        ms, mt, z1, z2, z3, a = _kd_span_stats(s_row, t_row, 0, C, inv_t, valid, NEG_BIG, BLOCK_C, LOG2E)
        ce_row, kl_row, k1, k2, k3, w1 = _kd_row_finish(s_row, y, valid, C, n_ptr, ms, z1, z2, z3, a, w_ce, w_kl)
        tl.store(ce_ptr + row, ce_row)
        tl.store(kl_ptr + row, kl_row)
        _kd_span_grad(s_row, t_row, grad_ptr + row * C, y, 0, C, ms, mt, k1, k2, k3, w1, valid, inv_t, BLOCK_C,
                      LOG2E)


@triton.jit
def _kd_split_stats_kernel(s_ptr, t_ptr, y_ptr, part_ptr, C, s_stride, t_stride, span, ignore_index, inv_t,
                           NEG_BIG: tl.constexpr, BLOCK_C: tl.constexpr, LOG2E: tl.constexpr):
    # program (row, split): the statistics of columns [split * span, (split + 1) * span) into part[row, split, :6]
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    valid = tl.load(y_ptr + row) != ignore_index
    c_lo = split * span
    c_hi = tl.minimum(c_lo + span, C)
    ms, mt, z1, z2, z3, a = _kd_span_stats(s_ptr + row * s_stride, t_ptr + row * t_stride, c_lo, c_hi, inv_t, valid,
                                           NEG_BIG, BLOCK_C, LOG2E)
    out = part_ptr + (row * tl.num_programs(1) + split) * 6
    tl.store(out, ms)
    tl.store(out + 1, mt)
    tl.store(out + 2, z1)
    tl.store(out + 3, z2)
    tl.store(out + 4, z3)
    tl.store(out + 5, a)


@triton.jit
def _kd_split_grad_kernel(s_ptr, t_ptr, y_ptr, n_ptr, part_ptr, grad_ptr, ce_ptr, kl_ptr,
                          C, s_stride, t_stride, span, ignore_index, w_ce, w_kl, inv_t,
                          NEG_BIG: tl.constexpr, SPLITS: tl.constexpr, BLOCK_C: tl.constexpr, LOG2E: tl.constexpr):
    # program (row, split): merges the row's span statistics, then writes the gradient of its own span
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    y = tl.load(y_ptr + row)
    valid = y != ignore_index
    s_row = s_ptr + row * s_stride
    lanes = tl.arange(0, SPLITS)
    on = lanes < nsplit
    p = part_ptr + (row * nsplit + lanes) * 6
    ms, mt, z1, z2, z3, a = _kd_merge_spans(
        tl.load(p, mask=on, other=NEG_BIG), tl.load(p + 1, mask=on, other=NEG_BIG), tl.load(p + 2, mask=on, other=0.0),
        tl.load(p + 3, mask=on, other=0.0), tl.load(p + 4, mask=on, other=0.0), tl.load(p + 5, mask=on, other=0.0),
        inv_t, LOG2E)
    ce_row, kl_row, k1, k2, k3, w1 = _kd_row_finish(s_row, y, valid, C, n_ptr, ms, z1, z2, z3, a, w_ce, w_kl)
    tl.store(ce_ptr + row, ce_row, mask=split == 0)
    tl.store(kl_ptr + row, kl_row, mask=split == 0)
    c_lo = split * span
    _kd_span_grad(s_row, t_ptr + row * t_stride, grad_ptr + row * C, y, c_lo, tl.minimum(c_lo + span, C), ms, mt,
                  k1, k2, k3, w1, valid, inv_t, BLOCK_C, LOG2E)


@triton.jit
def _kd_count_kernel(y_ptr, n_ptr, B, ignore_index, BLOCK: tl.constexpr):
    # n = the number of kept rows, needed by every program of the main kernel (one launch, not ne + sum)
    acc = tl.zeros([BLOCK], tl.int64)
    for start in range(0, B, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += (tl.load(y_ptr + offs, mask=offs < B, other=ignore_index) != ignore_index).to(tl.int64)
    tl.store(n_ptr, tl.sum(acc, axis=0))


@triton.jit
def _kd_finish_kernel(ce_rows_ptr, kl_rows_ptr, n_ptr, loss_ptr, ce_ptr, kl_ptr, B, w_ce, w_kl_t,
                      BLOCK: tl.constexpr):
    # the batch means and the weighted loss in one program, in a fixed order (the same sum on every run), instead of
    # nine small kernels
    ce = tl.zeros([BLOCK], tl.float32)
    kl = tl.zeros([BLOCK], tl.float32)
    for start in range(0, B, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ce += tl.load(ce_rows_ptr + offs, mask=offs < B, other=0.0)
        kl += tl.load(kl_rows_ptr + offs, mask=offs < B, other=0.0)
    inv_n = 1.0 / tl.maximum(tl.load(n_ptr), 1).to(tl.float32)
    ce_mean = tl.sum(ce, axis=0) * inv_n
    kl_mean = tl.sum(kl, axis=0) * inv_n
    tl.store(ce_ptr, ce_mean)
    tl.store(kl_ptr, kl_mean)
    tl.store(loss_ptr, w_ce * ce_mean + w_kl_t * kl_mean)


@triton.jit
def _kd_scale_kernel(g_ptr, scale_ptr, N, BLOCK: tl.constexpr):
    # the saved gradient times the loss's incoming gradient, in place; for the usual 1 (loss.backward()) every
    # program reads one scalar and moves no data
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        step = tl.num_programs(0) * BLOCK
        for start in range(tl.program_id(0) * BLOCK, N, step):
            offs = start + tl.arange(0, BLOCK).to(tl.int64)
            ok = offs < N
            g = tl.load(g_ptr + offs, mask=ok).to(tl.float32)
            tl.store(g_ptr + offs, (g * scale).to(g_ptr.dtype.element_ty), mask=ok)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; an H100's 132 elsewhere (the interpreter, meta tensors)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H100_SMS


def _row_alignment(strides: tuple[int, ...], limit: int) -> int:
    """The largest power of two up to `limit` (a 16-byte vector) dividing every row stride, in elements."""
    align = limit
    while align > 1 and any(stride % align for stride in strides):
        align //= 2
    return align


def _split_plan(B: int, C: int) -> tuple[int, int]:
    """(splits, span) of a row of C > TILE_MAX_C classes: one split when B rows already fill the GPU, else enough
    spans of whole chunks for about SPLIT_MIN_PROGRAMS programs."""
    chunks = triton.cdiv(C, SPLIT_CHUNK_C)
    splits = min(MAX_SPLITS, chunks, triton.cdiv(SPLIT_MIN_PROGRAMS, max(B, 1)))
    span = triton.cdiv(chunks, splits) * SPLIT_CHUNK_C
    return triton.cdiv(C, span), span


def plan_kd(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, n: torch.Tensor, grad: torch.Tensor,
            ce_rows: torch.Tensor, kl_rows: torch.Tensor, alpha: float, temperature: float,
            ignore_index: int) -> list[Launch]:
    """The launches for [B, C] logits, in order: the register tile up to C = 4096; beyond, one program per row
    (chunked online softmax), or for a small batch each row split over C (statistics, then gradient)."""
    B, C = student.shape
    student = _rows_contiguous(student)
    teacher = _rows_contiguous(teacher)
    target = target.contiguous()
    w_ce, w_kl, inv_t = 1.0 - float(alpha), float(alpha) * float(temperature), 1.0 / float(temperature)
    strides = (student.stride(0), teacher.stride(0))
    block_c = triton.next_power_of_2(C)
    if block_c <= TILE_MAX_C:
        rows, warps = _TILE_SHAPES[max(block_c, 16)]
        # fewer rows per program where the batch would otherwise give under SPLIT_MIN_PROGRAMS programs
        # (B = 8192, C = 10: 512 programs of 16 rows, not 128 of 64)
        rows = min(rows, 1 << max(0, (B // SPLIT_MIN_PROGRAMS).bit_length() - 1))
        align = _row_alignment((*strides, C), 16 // student.element_size())
        return [Launch(_kd_tile_kernel, (triton.cdiv(B, rows),),
                       (student, teacher, target, n, grad, ce_rows, kl_rows, B, C, *strides, ignore_index, w_ce, w_kl,
                        inv_t), dict(BLOCK_ROWS=rows, BLOCK_C=block_c, ALIGN=align, LOG2E=_LOG2E),
                       dict(num_warps=warps))]
    splits, span = _split_plan(B, C)
    if splits == 1:
        return [Launch(_kd_chunked_kernel, (min(B, _sm_count(student.device)),),
                       (student, teacher, target, n, grad, ce_rows, kl_rows, B, C, *strides, ignore_index, w_ce, w_kl,
                        inv_t), dict(NEG_BIG=_NEG_BIG, BLOCK_C=CHUNK_C, LOG2E=_LOG2E), dict(num_warps=16))]
    consts = dict(NEG_BIG=_NEG_BIG, BLOCK_C=SPLIT_CHUNK_C, LOG2E=_LOG2E)
    part = torch.empty((B, splits, 6), dtype=torch.float32, device=student.device)
    return [Launch(_kd_split_stats_kernel, (B, splits),
                   (student, teacher, target, part, C, *strides, span, ignore_index, inv_t), consts, dict(num_warps=4)),
            Launch(_kd_split_grad_kernel, (B, splits),
                   (student, teacher, target, n, part, grad, ce_rows, kl_rows, C, *strides, span, ignore_index, w_ce,
                    w_kl, inv_t), dict(consts, SPLITS=triton.next_power_of_2(splits)), dict(num_warps=4))]


_REDUCE_BLOCK = 1024


def plan_kd_reductions(target: torch.Tensor, n: torch.Tensor, ce_rows: torch.Tensor, kl_rows: torch.Tensor,
                       parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], alpha: float, temperature: float,
                       ignore_index: int) -> tuple[Launch, Launch]:
    """The launches around the main one: counting the kept rows into n (before), and the means into
    parts = (loss, ce, kl) (after)."""
    B = target.shape[0]
    target = target.contiguous()
    w_ce, w_kl_t = 1.0 - float(alpha), float(alpha) * float(temperature) ** 2
    return (Launch(_kd_count_kernel, (1,), (target, n, B, ignore_index), dict(BLOCK=_REDUCE_BLOCK),
                   dict(num_warps=4)),
            Launch(_kd_finish_kernel, (1,), (ce_rows, kl_rows, n, *parts, B, w_ce, w_kl_t), dict(BLOCK=_REDUCE_BLOCK),
                   dict(num_warps=4)))


_SCALE_BLOCK = 4096
_SCALE_PROGRAMS = 1024


def plan_kd_scale(grad: torch.Tensor, grad_loss: torch.Tensor) -> Launch:
    """The in-place scaling of a saved KD gradient by the loss's incoming gradient (a device scalar)."""
    n = grad.numel()
    return Launch(_kd_scale_kernel, (max(1, min(_SCALE_PROGRAMS, triton.cdiv(n, _SCALE_BLOCK))),),
                  (grad, grad_loss, n), dict(BLOCK=_SCALE_BLOCK), dict(num_warps=8))


def kd_scale_grad_(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """grad *= grad_loss in place, without reading grad_loss on the host; no data moves when grad_loss is 1."""
    if grad.numel():
        plan_kd_scale(grad, grad_loss.detach().reshape(()).to(torch.float32))()
    return grad


def kd_loss_forward(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float,
                    temperature: float, ignore_index: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1 - alpha) * CE(student, target) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    student, teacher: [B, C] logits (float32/float16/bfloat16, each its own dtype, any strides), read as they are
    and widened to fp32 in registers; target: integer [B]. Rows whose target is ignore_index are excluded and the
    means divide by max(n, 1), n = number of kept rows, counted on the device. Returns (loss, ce, kl, grad): three
    fp32 0-dim tensors and d loss / d student (student's dtype, contiguous [B, C], zero on ignored rows). No host
    synchronisation, so the call can be captured in a CUDA graph.
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
    n = torch.empty((), dtype=torch.int64, device=dev)
    parts = tuple(torch.empty((), dtype=torch.float32, device=dev) for _ in range(3))
    count, finish = plan_kd_reductions(target, n, ce_rows, kl_rows, parts, alpha, temperature, ignore_index)
    # three launches in all for a batch (count, loss and gradient, means), none of them reading back to the host
    count()
    if B > 0 and C > 0:
        for launch in plan_kd(student, teacher, target, n, grad, ce_rows, kl_rows, alpha, temperature, ignore_index):
            launch()
    else:
        ce_rows.zero_()
        kl_rows.zero_()
        grad.zero_()
    finish()
    loss, ce, kl = parts
    return loss, ce, kl, grad
