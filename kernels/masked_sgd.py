"""Multi-tensor masked SGD step (momentum, weight decay, Nesterov) for all parameters in one kernel launch."""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from .launch import Launch

# The kernel reaches every tensor through raw addresses read from int64 tables, so one launch serves any number of
# tensors of mixed dtypes. This also runs under TRITON_INTERPRET=1 with CPU tensors (the interpreter dereferences
# host addresses directly); CUDA tensors under the interpreter would not work, as it only copies direct arguments.
_BLOCK = 2048
_ALIGN = 16  # bytes: the widest global load or store, and what the CUDA allocator guarantees for a fresh tensor
# One int64 row per tensor: p, grad, buf, mask data pointers; p, grad, buf dtype codes; has-mask flag.
_N_COLS = 8
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Device tables keyed by everything they contain, so a hit is exactly the table that would be rebuilt; steady-state
# steps (and CUDA-graph replays, after one warm-up call) then do no host-to-device copy at all.
_TABLE_CACHE: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
_TABLE_CACHE_SIZE = 64


@triton.jit
def _typed(addr, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    # An address read from a table carries no alignment for the compiler; the launcher checked that every one is
    # 16-byte aligned when ALIGNED, and saying so lets a full block move 16 bytes per load or store instruction.
    ptr = addr.to(tl.pointer_type(dtype))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _load(ptr, offs, mask, FULL: tl.constexpr):
    # A FULL block needs no mask; a mask bounded by a length read at run time would keep every access scalar.
    if FULL:
        return tl.load(ptr + offs)
    else:
        return tl.load(ptr + offs, mask=mask, other=0)


@triton.jit
def _store(ptr, offs, v, mask, FULL: tl.constexpr):
    if FULL:
        tl.store(ptr + offs, v.to(ptr.dtype.element_ty))
    else:
        tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_f32(addr, offs, mask, code, FULL: tl.constexpr, ALIGNED: tl.constexpr):
    # The element type is a per-tensor runtime value (one launch covers every dtype); the branch is uniform
    # within a program because a block never straddles two tensors.
    if code == 0:
        v = _load(_typed(addr, tl.float32, ALIGNED), offs, mask, FULL)
    elif code == 1:
        v = _load(_typed(addr, tl.float16, ALIGNED), offs, mask, FULL).to(tl.float32)
    else:
        v = _load(_typed(addr, tl.bfloat16, ALIGNED), offs, mask, FULL).to(tl.float32)
    return v


@triton.jit
def _store_f32(addr, offs, v, mask, code, FULL: tl.constexpr, ALIGNED: tl.constexpr):
    if code == 0:
        _store(_typed(addr, tl.float32, ALIGNED), offs, v, mask, FULL)
    elif code == 1:
        _store(_typed(addr, tl.float16, ALIGNED), offs, v, mask, FULL)
    else:
        _store(_typed(addr, tl.bfloat16, ALIGNED), offs, v, mask, FULL)


@triton.jit
def _step_block(row, offs, ok, lr, momentum, weight_decay, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                FULL: tl.constexpr, ALIGNED: tl.constexpr):
    p_addr = tl.load(row + 0)
    p_dt = tl.load(row + 4)
    p = _load_f32(p_addr, offs, ok, p_dt, FULL, ALIGNED)
    g = _load_f32(tl.load(row + 1), offs, ok, tl.load(row + 5), FULL, ALIGNED)
    if tl.load(row + 7) != 0:
        keep = _load(_typed(tl.load(row + 3), tl.int8, ALIGNED), offs, ok, FULL) != 0
    else:
        keep = ok
    # where() rather than g * mask: a pruned entry stays exactly 0 even if its gradient is inf/NaN
    d = tl.where(keep, g, 0.0) + weight_decay * p
    if HAS_MOMENTUM:
        b_addr = tl.load(row + 2)
        b_dt = tl.load(row + 6)
        buf = tl.where(keep, momentum * _load_f32(b_addr, offs, ok, b_dt, FULL, ALIGNED) + d, 0.0)
        _store_f32(b_addr, offs, buf, ok, b_dt, FULL, ALIGNED)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    p = tl.where(keep, p - lr * d, 0.0)
    _store_f32(p_addr, offs, p, ok, p_dt, FULL, ALIGNED)


@triton.jit
def _masked_sgd_kernel(tensors_ptr, blocks_ptr, numel_ptr, lr_ptr, lr_val, momentum, weight_decay,
                       N_COLS: tl.constexpr, LR_FROM_PTR: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                       NESTEROV: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    tidx = tl.load(blocks_ptr + 2 * pid)
    blk = tl.load(blocks_ptr + 2 * pid + 1).to(tl.int64)
    row = tensors_ptr + tidx * N_COLS
    numel = tl.load(numel_ptr + tidx)
    # a block starts at a multiple of BLOCK and covers BLOCK consecutive elements
    offs = tl.max_contiguous(tl.multiple_of(blk * BLOCK + tl.arange(0, BLOCK), BLOCK), BLOCK)
    ok = offs < numel
    if LR_FROM_PTR:
        # read on the device so a captured CUDA graph follows a scheduler that writes the tensor in place
        lr = tl.load(lr_ptr).to(tl.float32)
    else:
        lr = lr_val
    # every block of a tensor but its last is full: those run unmasked (vector accesses), the last one masked
    if (blk + 1) * BLOCK <= numel:
        _step_block(row, offs, ok, lr, momentum, weight_decay, HAS_MOMENTUM, NESTEROV, True, ALIGNED)
    else:
        _step_block(row, offs, ok, lr, momentum, weight_decay, HAS_MOMENTUM, NESTEROV, False, ALIGNED)


def _code(t: torch.Tensor) -> int:
    try:
        return _DTYPE_CODE[t.dtype]
    except KeyError:
        raise TypeError(f"masked_sgd_step_ supports float32/float16/bfloat16, got {t.dtype}") from None


def _layout(t: torch.Tensor) -> tuple[int, ...]:
    # size-1 dims do not affect the memory order (their strides are arbitrary, e.g. [O, I, 1, 1] channels_last)
    return tuple(st for s, st in zip(t.shape, t.stride()) if s != 1)


def _dense(t: torch.Tensor) -> bool:
    """True when t covers exactly numel() consecutive elements from data_ptr(), in any dim order."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _tables(device: torch.device, rows: list[tuple[int, ...]], numels: list[int]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    key = (device, tuple(rows), tuple(numels))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    counts = torch.tensor([triton.cdiv(n, _BLOCK) for n in numels], dtype=torch.int64)
    owner = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(owner.numel(), dtype=torch.int64) - first[owner]
    blocks = torch.stack([owner, local], 1).to(torch.int32).contiguous()
    tensors = torch.tensor(rows, dtype=torch.int64)
    numel_t = torch.tensor(numels, dtype=torch.int64)
    out = (tensors.to(device), blocks.to(device), numel_t.to(device))
    _TABLE_CACHE[key] = out
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return out


def pointer_tables() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every pointer table cached now, each (tensors, blocks, numels). A captured step reads its tables by address
    and the cache is bounded: a CUDA graph holds this list for as long as it lives, so none is freed under it."""
    return list(_TABLE_CACHE.values())


def masked_sgd_step_(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor | None],
                     masks: list[torch.Tensor | None], lr: float | torch.Tensor, momentum: float, weight_decay: float,
                     nesterov: bool) -> None:
    """One SGD step for every tensor in place, in a single launch: d = g * mask + wd * p; with momentum
    buf = (momentum * buf + d) * mask and d = d + momentum * buf (Nesterov) or buf; then p = (p - lr * d) * mask.

    mask: bool, same layout as its parameter, or None (unmasked). bufs[i] may be None only when momentum == 0 (zeroed
    buffers reproduce torch.optim.SGD's first step, buf = d). lr: a float, or a 0-dim device tensor read in the
    kernel. params/grads/bufs: float32/float16/bfloat16, math in fp32; each group of p, g, buf, mask must share one
    dense memory layout (it is walked as flat storage). No host synchronisation; the pointer tables are cached, so
    after a first (warm-up) call with the same tensors the step is CUDA-graph capturable.
    """
    if not (len(params) == len(grads) == len(bufs) == len(masks)):
        raise ValueError("params, grads, bufs and masks must have the same length")
    has_momentum = momentum != 0
    rows, numels = [], []
    for p, g, b, m in zip(params, grads, bufs, masks):
        if p.numel() == 0:
            continue
        if not _dense(p):
            raise ValueError("parameters must be dense (contiguous in some dimension order)")
        group = [g] + ([b] if has_momentum else []) + ([m] if m is not None else [])
        for t in group:
            if t is None:
                raise ValueError("momentum != 0 needs a momentum buffer for every parameter")
            if t.shape != p.shape or _layout(t) != _layout(p) or t.device != p.device:
                raise ValueError("grad, buffer and mask must share their parameter's shape, strides and device")
        if m is not None and m.dtype != torch.bool:
            raise TypeError(f"masks must be bool, got {m.dtype}")
        b_ptr, b_code = (b.data_ptr(), _code(b)) if has_momentum else (0, 0)
        m_ptr = m.data_ptr() if m is not None else 0
        rows.append((p.data_ptr(), g.data_ptr(), b_ptr, m_ptr, _code(p), _code(g), b_code, int(m is not None)))
        numels.append(p.numel())
    if not rows:
        return
    device = params[0].device
    if any(p.device != device for p in params):
        raise ValueError("all parameters of one step must be on one device")
    tensors, blocks, numel_t = _tables(device, rows, numels)
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or lr.device != device:
            raise ValueError("a tensor lr must hold one value on the parameters' device")
    aligned = all(addr % _ALIGN == 0 for row in rows for addr in row[:4])
    plan_sgd(tensors, blocks, numel_t, lr, momentum, weight_decay, nesterov, aligned)()


def plan_sgd(tensors: torch.Tensor, blocks: torch.Tensor, numel_t: torch.Tensor, lr: float | torch.Tensor,
             momentum: float, weight_decay: float, nesterov: bool, aligned: bool = False) -> Launch:
    """The launch over the pointer tables; a tensor lr is read by the kernel (CUDA-graph replays follow it).
    `aligned`: every address in the tables (0 for an absent buffer or mask included) is a multiple of 16 bytes,
    so full blocks use vector loads and stores."""
    lr_from_ptr = isinstance(lr, torch.Tensor)
    lr_ptr, lr_val = (lr, 0.0) if lr_from_ptr else (tensors, float(lr))
    return Launch(_masked_sgd_kernel, (blocks.shape[0],),
                  (tensors, blocks, numel_t, lr_ptr, lr_val, float(momentum), float(weight_decay)),
                  dict(N_COLS=_N_COLS, LR_FROM_PTR=lr_from_ptr, HAS_MOMENTUM=momentum != 0, NESTEROV=bool(nesterov),
                       BLOCK=_BLOCK, ALIGNED=bool(aligned)),
                  # no contraction into fused multiply-adds: the same rounding as the C++ and multi-tensor paths
                  dict(num_warps=8, enable_fp_fusion=False))
