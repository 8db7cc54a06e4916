"""ReLU fused with exact counting of active units (x > 0) over the batch, per element or per channel."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import Launch

# Elements per [rows, columns] tile; the row count of the tile adapts so narrow layers still fill it.
_TILE_ELEMS = 2048
_MAX_BLOCK_COLS = 1024
# Enough programs to fill a large GPU; below this the batch is split across programs, which then add their
# partial counts atomically (int64 atomics are exact, so the split never changes the result).
_TARGET_PROGRAMS = 1024


@triton.jit
def _count_tile(x_ptr, y_ptr, offs, m, WRITE_OUT: tl.constexpr, INCLUSIVE: tl.constexpr):
    # on-states of one masked tile as int32, storing relu(x) on the way when WRITE_OUT;
    # x < 0 -> 0 rather than x > 0 -> x keeps NaN as NaN, like torch.relu
    x = tl.load(x_ptr + offs, mask=m, other=0)
    if INCLUSIVE:
        pos = x >= 0
    else:
        pos = x > 0
    if WRITE_OUT:
        tl.store(y_ptr + offs, tl.where(x < 0, tl.zeros_like(x), x), mask=m)
    return (pos & m).to(tl.int32)


@triton.jit
def _count_cols_kernel(x_ptr, y_ptr, counts_ptr, R, N, rows_per_prog, C, HW,
                       BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, WRITE_OUT: tl.constexpr,
                       INCLUSIVE: tl.constexpr, NHWC: tl.constexpr, ATOMIC: tl.constexpr):
    # x is a dense [R, N] matrix; counts[col] += number of rows r with x[r, col] > 0.
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    r_lo = pid_r * rows_per_prog
    r_hi = tl.minimum(r_lo + rows_per_prog, R)
    acc = tl.zeros([BLOCK_R, BLOCK_N], tl.int32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < r_hi)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        acc += _count_tile(x_ptr, y_ptr, offs, m, WRITE_OUT, INCLUSIVE)
    total = tl.sum(acc, axis=0).to(tl.int64)
    if NHWC:
        # memory column (h * W + w) * C + c of a channels_last sample -> logical index c * H * W + h * W + w
        idx = (cols % C) * HW + cols // C
    else:
        idx = cols
    if ATOMIC:
        tl.atomic_add(counts_ptr + idx, total, mask=col_ok, sem="relaxed")  # only the sum matters: no ordering
    else:
        # this program alone owns these columns: a plain read-modify-write is race-free
        old = tl.load(counts_ptr + idx, mask=col_ok, other=0)
        tl.store(counts_ptr + idx, old + total, mask=col_ok)


@triton.jit
def _count_channels_kernel(x_ptr, y_ptr, counts_ptr, B, C, S, items_per_prog,
                           BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, WRITE_OUT: tl.constexpr,
                           INCLUSIVE: tl.constexpr, ATOMIC: tl.constexpr):
    # x is a dense [B, C, S] tensor (S > 1); counts[c] += number of (b, s) with x[b, c, s] > 0.
    # The reduced space is split as (sample, chunk of S) work items, so even B = 1 with a large S spreads over
    # many programs.
    pid_c = tl.program_id(0)
    pid_w = tl.program_id(1)
    chans = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = chans < C
    sp = tl.arange(0, BLOCK_S)
    n_s = tl.cdiv(S, BLOCK_S)
    w_lo = pid_w * items_per_prog
    w_hi = tl.minimum(w_lo + items_per_prog, B * n_s)
    acc = tl.zeros([BLOCK_C, BLOCK_S], tl.int32)
    for w in range(w_lo, w_hi):
        b = w // n_s
        s = (w - b * n_s) * BLOCK_S + sp
        m = c_ok[:, None] & (s < S)[None, :]
        offs = ((b.to(tl.int64) * C + chans.to(tl.int64)) * S)[:, None] + s[None, :]
        acc += _count_tile(x_ptr, y_ptr, offs, m, WRITE_OUT, INCLUSIVE)
    total = tl.sum(acc, axis=1).to(tl.int64)
    if ATOMIC:
        tl.atomic_add(counts_ptr + chans, total, mask=c_ok, sem="relaxed")
    else:
        old = tl.load(counts_ptr + chans, mask=c_ok, other=0)
        tl.store(counts_ptr + chans, old + total, mask=c_ok)


def _is_nhwc(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _split(n_col_programs: int, rows: int, block_rows: int) -> tuple[int, int]:
    """(rows per program, number of row splits): split the reduced dimension only when columns are too few."""
    want = max(1, _TARGET_PROGRAMS // max(n_col_programs, 1))
    splits = min(want, triton.cdiv(rows, block_rows))
    per = triton.cdiv(triton.cdiv(rows, splits), block_rows) * block_rows
    return per, triton.cdiv(rows, per)


def _warps(tile: int) -> int:
    # ~8 elements per thread keeps the int32 accumulator tile in registers without spilling
    return max(1, min(8, tile // 256))


def _cols_launch(x, y, counts, R, N, C, HW, write_out, inclusive, nhwc) -> Launch:
    block_n = min(triton.next_power_of_2(N), _MAX_BLOCK_COLS)
    block_r = min(max(_TILE_ELEMS // block_n, 1), triton.next_power_of_2(R))
    n_col = triton.cdiv(N, block_n)
    per, splits = _split(n_col, R, block_r)
    return Launch(_count_cols_kernel, (n_col, splits), (x, y, counts, R, N, per, C, HW),
                  dict(BLOCK_R=block_r, BLOCK_N=block_n, WRITE_OUT=write_out, INCLUSIVE=inclusive, NHWC=nhwc,
                       ATOMIC=splits > 1), dict(num_warps=_warps(block_r * block_n)))


def _channels_launch(x, y, counts, B, C, S, write_out, inclusive) -> Launch:
    block_s = min(triton.next_power_of_2(S), _MAX_BLOCK_COLS)
    block_c = min(max(_TILE_ELEMS // block_s, 1), triton.next_power_of_2(C))
    n_c = triton.cdiv(C, block_c)
    per, splits = _split(n_c, B * triton.cdiv(S, block_s), 1)
    return Launch(_count_channels_kernel, (n_c, splits), (x, y, counts, B, C, S, per),
                  dict(BLOCK_C=block_c, BLOCK_S=block_s, WRITE_OUT=write_out, INCLUSIVE=inclusive,
                       ATOMIC=splits > 1), dict(num_warps=_warps(block_c * block_s)))


def plan_counting(x: torch.Tensor, counts: torch.Tensor, inclusive: bool, per_channel: bool,
                  write_out: bool) -> tuple[Launch | None, torch.Tensor | None]:
    """(the launch, or None for an empty x; the ReLU output when write_out) after checking the arguments."""
    if counts.dtype != torch.int64 or not counts.is_contiguous():
        raise ValueError("counts must be a contiguous int64 tensor")
    if x.dim() == 0:
        raise ValueError("x needs a batch dimension")
    nhwc = _is_nhwc(x)
    if not nhwc:
        x = x.contiguous()
    # empty_like keeps channels_last, so the output is written in the input's own layout without a permute
    y = torch.empty_like(x) if write_out else None
    out = y if write_out else x
    B = x.shape[0]
    if per_channel:
        if x.dim() < 2:
            raise ValueError("per_channel counting needs x of shape [B, C, ...]")
        C = x.shape[1]
        S = math.prod(x.shape[2:])
        if counts.numel() != C:
            raise ValueError(f"counts has {counts.numel()} entries, x has {C} channels")
        if x.numel() == 0:
            return None, y
        if nhwc:
            # NHWC memory is a dense [B * H * W, C] matrix: channel = memory position % C
            return _cols_launch(x, out, counts, B * S, C, C, 1, write_out, inclusive, False), y
        if S == 1:
            return _cols_launch(x, out, counts, B, C, C, 1, write_out, inclusive, False), y
        return _channels_launch(x, out, counts, B, C, S, write_out, inclusive), y
    N = math.prod(x.shape[1:])
    if counts.numel() != N:
        raise ValueError(f"counts has {counts.numel()} entries, x[0] has {N}")
    if x.numel() == 0:
        return None, y
    C = x.shape[1] if nhwc else 1
    HW = N // C
    return _cols_launch(x, out, counts, B, N, C, HW, write_out, inclusive, nhwc), y


def _run(x: torch.Tensor, counts: torch.Tensor, inclusive: bool, per_channel: bool,
         write_out: bool) -> torch.Tensor | None:
    launch, y = plan_counting(x, counts, inclusive, per_channel, write_out)
    if launch is not None:
        launch()
    return y


def count_positive_(x: torch.Tensor, counts: torch.Tensor, inclusive: bool = False,
                    per_channel: bool = False) -> torch.Tensor:
    """counts += number of samples b with x[b, ...] > 0 (>= 0 when inclusive), exactly, in place; returns counts.

    Per element (counts.numel() == x[0].numel(), logical [C, H, W] order also for channels_last x), or per channel
    (x viewed as [B, C, S], counts has C entries, pooled over batch and positions). counts: contiguous int64.
    """
    _run(x, counts, inclusive, per_channel, write_out=False)
    return counts


def relu_count(x: torch.Tensor, counts: torch.Tensor, inclusive: bool = False,
               per_channel: bool = False) -> torch.Tensor:
    """relu(x) and, in the same single read of x, the count update of count_positive_.

    The result has x's dtype and shape; it is contiguous, or channels_last when x is channels_last (then no copy
    of x is made, as torch.relu would keep that layout too).
    """
    return _run(x, counts, inclusive, per_channel, write_out=True)
