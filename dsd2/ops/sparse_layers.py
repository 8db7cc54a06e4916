"""Sparse layers: a masked layer's forward and both gradients over its kept weights only, on the CPU.

A layer pruned to 99 % computes 1 % of the dense products here, where `masked_linear` / `masked_conv2d` compute
all of them on W⊙M. The kept entries of a mask are listed once per mask (a pruning level), never per step
(`SparsePlan`); each call gathers their current values from the weight and runs two C++ kernels of dsd2._C
(csrc/sparse_layers.cpp):

- `sparse_rows_`: out[r, i] = sum over row r's kept entries of w * x[operand row, shift + i], vectorised along i
  (the batch for a linear layer; the batch and the spatial positions for a convolution). It is the forward on
  the list grouped by output row and the input gradient on the same list grouped by operand row.
- `sparse_dots_`: the weight gradient at the kept entries only (one dot product each); pruned entries of dW are
  exactly 0.0, as the masked layers' are.

A linear layer's operand is x transposed, [in, batch]. A convolution's is one of three layouts:

- **grid** (most convolutions): the padded input as [C, N * Hp * Wp] (`grid_copy_`: one blocked transpose
  from NCHW or channels_last); a tap (kh, kw) is a shift of kh * dh * Wp + kw * dw along that row, so the
  products are long contiguous runs and no im2col buffer is made. Outputs are computed at every position of the
  padded grid and those of the convolution taken (the border dropped, and for a stride s every s-th position),
  when that is at most GRID_WASTE grid positions per output (a 2x2 map padded by 1: 4; stride 2: about 4.5).
  The output and the input gradient go straight from the rows kernel's tiles into their NCHW or channels_last
  tensors (`sparse_rows_map_`): the [C, N * Hp * Wp] grid of the results is never stored.
- **batch-minor** (stride-1 'same' convolutions on the smallest maps, `batch_minor_layout`): the padded input as
  [C, Hp * Wp * N], the images innermost (`batch_minor_copy_`); a tap is a shift of (kh * dh * Wp + kw * dw) * N,
  and one call per output row computes its W * N outputs only, where the grid would compute a 2x2 map's whole 4x4
  grid.
- **unfold** (the rest): the unfolded input (F.unfold) as [C * kh * kw, N * Ho * Wo], shift 0; the input
  gradient is folded back (F.fold).

Every output element's terms are added in a fixed order, so results do not depend on the thread count; against
the dense products they differ by reduction order only (`product_tolerance`). fp32 only: other dtypes, CUDA
tensors and the torch.jit tracer (fvcore's FLOP count) take the dense masked path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsd2.ops._backend import cpp_extension

GRID_WASTE = 8.0  # most padded-grid positions per real output for which a convolution takes the grid layout
BATCH_MINOR_WASTE = 4.0  # from this many padded-grid positions per output, a stride-1 conv takes batch-minor grids
BATCH_MINOR_SOME_WASTE = 2.0  # from this many, it takes them below BATCH_MINOR_SPARSITY
BATCH_MINOR_SPARSITY = 0.985


class SparsePlan:
    """The kept entries of one mask ([out, in] or [out, in / groups, kh, kw]), listed by output row and by operand
    row, with where each one's value lies in the weight. Built once per mask; `valid_for` says whether a mask is
    still the one it was built from."""

    def __init__(self, mask: torch.Tensor, groups: int = 1):
        if mask.dtype != torch.bool or mask.dim() not in (2, 4):
            raise ValueError(f"a sparse plan needs a 2-D or 4-D bool mask, not {mask.dtype} {tuple(mask.shape)}")
        self.shape = tuple(mask.shape)
        self.groups = groups
        self.version = (mask._version, mask.data_ptr())
        out = self.shape[0]
        per_out = mask[0].numel() if out else 0
        self.taps = 1 if mask.dim() == 2 else self.shape[2] * self.shape[3]
        in_per_group = self.shape[1]
        flat = mask.detach().cpu().reshape(out, per_out)
        rows, rest = flat.nonzero(as_tuple=True)
        self.nnz = int(rows.numel())
        self.numel = out * per_out
        self.sparsity = 1.0 - self.nnz / self.numel if self.numel else 0.0
        self.rowptr = _pointers(rows, out)
        group = rows // (out // groups) if groups > 1 else torch.zeros_like(rows)
        # operand rows: of the unfolded input (c * taps + tap; a linear layer's input feature), and of the grid (c)
        self.unfold_row = group * in_per_group * self.taps + rest
        self.channel = self.unfold_row // self.taps
        tap = rest % self.taps
        kw = self.shape[3] if mask.dim() == 4 else 1
        self.tap_h, self.tap_w = tap // kw, tap % kw
        self.logical = rows * per_out + rest  # index in the weight's contiguous layout
        in_rows = in_per_group * groups
        self.t_order = torch.argsort(self.unfold_row, stable=True)  # by operand row, then output row
        self.t_col = rows[self.t_order].contiguous()
        self.t_rowptr_unfold = _pointers(self.unfold_row[self.t_order], in_rows * self.taps)
        self.t_rowptr_grid = _pointers(self.channel[self.t_order], in_rows)
        self.zero = torch.zeros(self.nnz, dtype=torch.int64)
        self.device_indices: dict[torch.device, tuple[torch.Tensor, ...]] = {}  # dsd2.ops.sparse_csr's, per device
        self._positions: dict[tuple, torch.Tensor] = {}
        self._shifts: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._scratch: dict[str, tuple[tuple, torch.Tensor]] = {}
        self.grid_token: object | None = None  # the forward whose input the scratch grid holds

    def scratch(self, name: str, shape: tuple[int, ...], geometry: tuple, zero: bool, keep: bool) -> torch.Tensor:
        """A work buffer: with `keep` (training calls, whose maps have one shape step after step) the one of the
        last call of the same geometry, kept between calls (a fresh allocation of tens of MB per call costs its
        page faults, more than the products at high sparsity); a zeroed one stays zero wherever no call writes,
        since every call of one geometry writes the same positions. Without `keep`, a new one each call."""
        held = self._scratch.get(name)
        if keep and held is not None and held[0] == (shape, geometry):
            return held[1]
        buf = torch.zeros(shape) if zero else torch.empty(shape)
        if keep:
            self._scratch[name] = ((shape, geometry), buf)
        return buf

    def valid_for(self, mask: torch.Tensor) -> bool:
        return self.version == (mask._version, mask.data_ptr()) and tuple(mask.shape) == self.shape

    def _position(self, weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """Where each kept entry's value lies in the weight's storage (any dense layout: channels_last too), in
        output-row order or, `transposed`, in operand-row order; on the weight's device."""
        key = (tuple(weight.stride()), transposed, weight.device)
        pos = self._positions.get(key)
        if pos is None:
            index = torch.unravel_index(self.logical, self.shape)
            pos = torch.as_tensor(sum(i * s for i, s in zip(index, weight.stride())), dtype=torch.int64)
            pos = (pos[self.t_order] if transposed else pos).contiguous().to(weight.device)
            self._positions[key] = pos
        return pos

    def values(self, weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """The kept entries' current values, in output-row order (or in operand-row order, `transposed`), in one
        gather. Gathered every call: an optimizer step in C++ (MaskedSGD) writes the weight without bumping its
        version counter, so no cache keyed on it could tell a changed weight from an unchanged one."""
        return weight.detach().as_strided((weight.numel(),), (1,)).index_select(0, self._position(weight, transposed))

    def gradient(self, weight: torch.Tensor, dval: torch.Tensor) -> torch.Tensor:
        """A dense weight gradient in the weight's layout: dval at the kept entries, exactly 0.0 elsewhere."""
        grad = torch.zeros_like(weight, memory_format=torch.preserve_format)
        grad.as_strided((grad.numel(),), (1,)).index_copy_(0, self._position(weight), dval)
        return grad

    def batch_minor_shifts(self, width: int, dilation: tuple[int, int], n: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                        int]:
        """`shifts` on batch-minor grids of `n` images (a position is n floats)."""
        key = ("batch-minor", width, dilation, n)
        if key not in self._shifts:
            forward, transposed, most = self.shifts(width, dilation)
            self._shifts[key] = (forward * n).contiguous(), (transposed * n).contiguous(), most * n
        return self._shifts[key]

    def shifts(self, width: int, dilation: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Grid layout on rows of padded width `width`: each kept entry's shift in output-row order, in
        operand-row order, and the largest shift a tap can have."""
        key = (width, dilation)
        if key not in self._shifts:
            kh, kw = self.shape[2:]
            forward = (self.tap_h * dilation[0] * width + self.tap_w * dilation[1]).contiguous()
            most = (kh - 1) * dilation[0] * width + (kw - 1) * dilation[1]
            self._shifts[key] = forward, (most - forward[self.t_order]).contiguous(), most
        return self._shifts[key]


def _pointers(sorted_rows: torch.Tensor, rows: int) -> torch.Tensor:
    if sorted_rows.numel() == 0:
        return torch.zeros(rows + 1, dtype=torch.int64)
    counts = torch.bincount(sorted_rows, minlength=rows)
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).contiguous()


def _rows(out: torch.Tensor, n: int, operand: torch.Tensor, rowptr, col, shift, val, bias=None) -> torch.Tensor:
    cpp_extension().sparse_rows_(out, n, operand, rowptr, col, shift, val,
                                 None if bias is None else bias.detach().float().contiguous())
    return out


def _rows_map(out: torch.Tensor, hp: int, wp: int, at: tuple[int, int], step: tuple[int, int], n: int,
              operand: torch.Tensor, rowptr, col, shift, val, bias=None) -> None:
    """`_rows` over n positions of grids hp x wp, straight into the map `out` from (at) every (step) position: the
    rows' grid is never stored (`sparse_rows_map_`, the same sums)."""
    cpp_extension().sparse_rows_map_(out, hp, wp, *at, *step, n, operand, rowptr, col, shift, val,
                                     None if bias is None else bias.detach().float().contiguous())


def _dots(plan: SparsePlan, grad_rows: torch.Tensor, n: int, operand: torch.Tensor, col, shift) -> torch.Tensor:
    dval = torch.empty(plan.nnz, dtype=torch.float32)
    cpp_extension().sparse_dots_(dval, grad_rows, n, operand, plan.rowptr, col, shift)
    return dval


class RowProducts:
    """The three products of one call over the plan's kept entries, by dsd2's C++ kernels: (W⊙M) @ operand, its
    transpose @ gradient rows, and the weight gradient at the kept entries. The linear layer and the unfolded
    convolution run them on [rows, L] operands (L: the batch, or the batch times the output positions);
    `dsd2.ops.sparse_csr.CsrProducts` is the same on torch.sparse CSR products."""

    def __init__(self, plan: SparsePlan, weight: torch.Tensor):
        self.plan, self.weight = plan, weight

    def forward(self, operand: torch.Tensor) -> torch.Tensor:
        """[cols, L] -> [out, L]; `operand` contiguous."""
        plan, length = self.plan, operand.shape[1]
        return _rows(operand.new_empty(plan.shape[0], length), length, operand, plan.rowptr, plan.unfold_row,
                     plan.zero, plan.values(self.weight))

    def transposed(self, grad_rows: torch.Tensor, cols: int) -> torch.Tensor:
        """[out, L] -> [cols, L]; `grad_rows` contiguous."""
        plan, length = self.plan, grad_rows.shape[1]
        return _rows(grad_rows.new_empty(cols, length), length, grad_rows, plan.t_rowptr_unfold, plan.t_col,
                     plan.zero, plan.values(self.weight, transposed=True))

    def weight_grad(self, grad_rows: torch.Tensor, operand: torch.Tensor) -> torch.Tensor:
        """grad_rows [out, L] times operand [cols, L] at the kept entries, in the weight's layout, 0.0 elsewhere."""
        return self.plan.gradient(self.weight, _dots(self.plan, grad_rows, grad_rows.shape[1], operand,
                                                     self.plan.unfold_row, self.plan.zero))


class _SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, plan: SparsePlan, products: type):
        batch, out_features = x2.shape[0], plan.shape[0]
        x_t = x2.t().contiguous()  # [in, batch]: the batch is the vector axis
        out_t = products(plan, weight).forward(x_t)
        out = torch.empty(batch, out_features, dtype=x2.dtype, device=x2.device).copy_(out_t.t())
        if bias is not None:
            out += bias
        ctx.save_for_backward(x_t, weight)
        ctx.plan, ctx.products, ctx.has_bias = plan, products, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_t, weight = ctx.saved_tensors
        products = ctx.products(ctx.plan, weight)
        g_t = grad_out.t().contiguous()  # [out, batch]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = products.transposed(g_t, x_t.shape[0]).t().contiguous()
        if ctx.needs_input_grad[1]:
            grad_w = products.weight_grad(g_t, x_t)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0)
        return grad_x, grad_w, grad_b, None, None


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, plan: SparsePlan, bias: torch.Tensor | None = None,
                  products: type = RowProducts) -> torch.Tensor:
    """`F.linear(x, W⊙M, bias)` over the kept weights of `plan` (built from M) only; fp32 CPU tensors (`products`:
    the C++ kernels; `dsd2.ops.sparse_csr.csr_linear` passes its own)."""
    shape = x.shape
    out = _SparseLinear.apply(x.reshape(-1, shape[-1]), weight, bias, plan, products)
    return out.reshape(*shape[:-1], plan.shape[0])


def is_channels_last(t: torch.Tensor) -> bool:
    """A 4-D tensor in the channels_last layout (and not also contiguous, as a 1x1 map or one channel is)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def _output_size(size: int, pad: int, dilation: int, kernel: int, stride: int) -> int:
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def grid_layout(x_hw: tuple[int, int], kernel: tuple[int, int], stride, padding, dilation) -> bool:
    """Whether a convolution takes the grid layout: at most GRID_WASTE stride-1 grid positions per output (a
    strided convolution is computed at every position of the grid and its outputs taken at the stride)."""
    hp, wp = x_hw[0] + 2 * padding[0], x_hw[1] + 2 * padding[1]
    ho = _output_size(x_hw[0], padding[0], dilation[0], kernel[0], stride[0])
    wo = _output_size(x_hw[1], padding[1], dilation[1], kernel[1], stride[1])
    return ho > 0 and wo > 0 and hp * wp <= GRID_WASTE * ho * wo


class _SparseConvGrid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, plan: SparsePlan, stride, padding, dilation, keep):
        n, c, h, w = x.shape
        (ph, pw), out_c = padding, plan.shape[0]
        hp, wp = h + 2 * ph, w + 2 * pw
        shift, shift_t, most = plan.shifts(wp, dilation)
        length = n * hp * wp
        geometry = (tuple(x.shape), padding, dilation, stride)
        grid = _fill_grid(plan, x, geometry, keep)
        ho = _output_size(h, ph, dilation[0], plan.shape[2], stride[0])
        wo = _output_size(w, pw, dilation[1], plan.shape[3], stride[1])
        layout = _layout(x)
        out = torch.empty((n, out_c, ho, wo), dtype=x.dtype, memory_format=layout)
        # the rows at every grid position, the outputs' taken straight into `out` (the bias added first)
        _rows_map(out, hp, wp, (0, 0), stride, length, grid, plan.rowptr, plan.channel, shift, plan.values(weight),
                  bias)
        ctx.save_for_backward(x, weight)
        ctx.token = plan.grid_token = object()  # the scratch grid holds this call's input until another call
        ctx.grid = None if keep else grid
        ctx.conf = (plan, stride, padding, dilation, bias is not None, layout, keep)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        plan, stride, (ph, pw), dilation, has_bias, layout, keep = ctx.conf
        n, c, h, w = x.shape
        out_c, hp, wp = plan.shape[0], h + 2 * ph, w + 2 * pw
        shift, shift_t, most = plan.shifts(wp, dilation)
        length = n * hp * wp
        geometry = (tuple(x.shape), (ph, pw), dilation, stride)
        grid = ctx.grid
        if grid is None:  # kept: still this call's input unless another call of the layer came in between
            grid = plan.scratch("grid", (c, length + most), geometry, True, True)
            if plan.grid_token is not ctx.token:
                grid = _fill_grid(plan, x, geometry, True)
        # the output gradient on the padded grid, 0 at the dropped border outputs (and between a stride's outputs),
        # after room for the largest shift
        g = plan.scratch("g", (out_c, most + length), geometry, True, keep)
        cpp_extension().grid_copy_(g[:, most:], grad_out, hp, wp, 0, 0, True, *stride)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty((n, c, h, w), dtype=g.dtype, memory_format=layout)
            _rows_map(grad_x, hp, wp, (ph, pw), (1, 1), length, g, plan.t_rowptr_grid, plan.t_col, shift_t,
                      plan.values(weight, transposed=True))
        if ctx.needs_input_grad[1]:
            grad_w = plan.gradient(weight, _dots(plan, g[:, most:], length, grid, plan.channel, shift))
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _fill_grid(plan: SparsePlan, x: torch.Tensor, geometry: tuple, keep: bool) -> torch.Tensor:
    """x on its padded grid, channel-major, zero at the padding and in the room for the largest shift after it."""
    n, c, h, w = x.shape
    (ph, pw), dilation = geometry[1], geometry[2]
    hp, wp = h + 2 * ph, w + 2 * pw
    most = plan.shifts(wp, dilation)[2]
    grid = plan.scratch("grid", (c, n * hp * wp + most), geometry, True, keep)
    cpp_extension().grid_copy_(grid, x, hp, wp, ph, pw, True)
    return grid


def batch_minor_layout(x_hw: tuple[int, int], kernel: tuple[int, int], stride, padding, dilation,
                       sparsity: float = 0.0) -> bool:
    """Whether a convolution takes the batch-minor grids: stride 1, an output the input's size, and a map small
    enough that the padded grid has BATCH_MINOR_WASTE positions per output or more (a 3x3 conv's 2x2 and 1x1 maps: 4
    and 9), or BATCH_MINOR_SOME_WASTE (a 4x4 map: 2.25) at a sparsity below BATCH_MINOR_SPARSITY. The batch-minor
    layout computes no border position, but makes one call per output row: on a 4x4 map it wins where the products
    are large, and loses on the calls' fixed cost at high sparsity (a 2-core Xeon, AVX-512, batch 128, forward +
    backward of 256->256: 7.7 against 11.1 ms at 96.5 %, even at 98.8 %, 3.9 against 3.5 ms at 99.6 %); on an 8x8
    map it loses at every sparsity (9.1 against 8.5 ms for 128->128 at 96.5 %)."""
    h, w = x_hw
    same = all(2 * p == d * (k - 1) for p, d, k in zip(padding, dilation, kernel))
    hp, wp = h + 2 * padding[0], w + 2 * padding[1]
    if tuple(stride) != (1, 1) or not same or h * w == 0:
        return False
    waste = hp * wp / (h * w)
    return waste >= BATCH_MINOR_WASTE or (waste >= BATCH_MINOR_SOME_WASTE and sparsity < BATCH_MINOR_SPARSITY)


def _to_batch_minor(grid: torch.Tensor, t: torch.Tensor, hp: int, wp: int, ph: int, pw: int) -> None:
    """t [N, C, H, W] (any layout) into grid [C, hp * wp * N] at rows ph.., columns pw.. of each channel's padded
    map, the images innermost; the rest of the grid is left as it is (zero, in a scratch grid)."""
    cpp_extension().batch_minor_copy_(grid, t, hp, wp, ph, pw, True)


def _from_batch_minor(rows: torch.Tensor, shape: tuple[int, ...], layout: torch.memory_format) -> torch.Tensor:
    """The map [N, C, H, W] in `layout` of rows [C, H * W * N] (the images innermost)."""
    n, c, h, w = shape
    out = torch.empty(shape, dtype=rows.dtype, memory_format=layout)
    cpp_extension().batch_minor_copy_(rows, out, h, w, 0, 0, False)
    return out


def _batch_minor_rows(out: torch.Tensor, ho: int, wo: int, operand: torch.Tensor, wp: int, n: int, rowptr, col,
                      shift, val, bias=None) -> None:
    """out [R, ho * wo * n] (output row y's positions at y * wo * n, the images innermost) = the rows over the
    batch-minor operand grid (its rows wp * n apart): one `sparse_rows_` call per output row, whose wo * n
    outputs read a contiguous run of each tap's operand row."""
    run = wo * n
    for y in range(ho):
        _rows(out[:, y * run:(y + 1) * run], run, operand[:, y * wp * n:], rowptr, col, shift, val, bias)


class _SparseConvBatchMinor(torch.autograd.Function):
    """A stride-1 'same' convolution on small maps over grids [C, Hp * Wp * N] with the images innermost: a tap's
    shift is (dy * Wp + dx) * N and every output position is a run of N images, so only outputs are computed (the
    padded grid of `_SparseConvGrid` computes every position of a 2x2 map's 4x4 grid), and with N a multiple of 16
    every run starts on a 64-byte line."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan: SparsePlan, padding, dilation, keep):
        n, c, h, w = x.shape
        (ph, pw), out_c = padding, plan.shape[0]
        hp, wp = h + 2 * ph, w + 2 * pw
        shift, _, _ = plan.batch_minor_shifts(wp, dilation, n)
        geometry = ("batch-minor", tuple(x.shape), padding, dilation)
        grid = plan.scratch("grid", (c, hp * wp * n), geometry, True, keep)
        _to_batch_minor(grid, x, hp, wp, ph, pw)
        rows = x.new_empty(out_c, h * w * n)
        _batch_minor_rows(rows, h, w, grid, wp, n, plan.rowptr, plan.channel, shift, plan.values(weight), bias)
        layout = _layout(x)
        out = _from_batch_minor(rows, (n, out_c, h, w), layout)
        ctx.save_for_backward(x, weight)
        ctx.token = plan.grid_token = object()  # the scratch grid holds this call's input until another call
        ctx.grid = None if keep else grid
        ctx.conf = (plan, padding, dilation, bias is not None, layout, keep)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        plan, (ph, pw), dilation, has_bias, layout, keep = ctx.conf
        n, c, h, w = x.shape
        out_c, hp, wp = plan.shape[0], h + 2 * ph, w + 2 * pw
        shift, shift_t, _ = plan.batch_minor_shifts(wp, dilation, n)
        geometry = ("batch-minor", tuple(x.shape), (ph, pw), dilation)
        grid = ctx.grid
        if grid is None:  # kept: still this call's input unless another call of the layer came in between
            grid = plan.scratch("grid", (c, hp * wp * n), geometry, True, True)
            if plan.grid_token is not ctx.token:
                _to_batch_minor(grid, x, hp, wp, ph, pw)
        # the output gradient on the same padded grid, zero at the border
        g = plan.scratch("g", (out_c, hp * wp * n), geometry, True, keep)
        _to_batch_minor(g, grad_out, hp, wp, ph, pw)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            rows = g.new_empty(c, h * w * n)
            _batch_minor_rows(rows, h, w, g, wp, n, plan.t_rowptr_grid, plan.t_col, shift_t,
                              plan.values(weight, transposed=True))
            grad_x = _from_batch_minor(rows, (n, c, h, w), layout)
        if ctx.needs_input_grad[1]:
            run = w * n
            dval = None
            for y in range(h):  # the output gradient's row y (inside the border) against each tap's operand run
                start = ((ph + y) * wp + pw) * n
                part = _dots(plan, g[:, start:start + run], run, grid[:, y * wp * n:], plan.channel, shift)
                dval = part if dval is None else dval.add_(part)
            grad_w = plan.gradient(weight, dval)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None


class _SparseConvUnfold(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, plan: SparsePlan, stride, padding, dilation, products: type):
        n, c, h, w = x.shape
        kernel, out_c = plan.shape[2:], plan.shape[0]
        ho = _output_size(h, padding[0], dilation[0], kernel[0], stride[0])
        wo = _output_size(w, padding[1], dilation[1], kernel[1], stride[1])
        cols = F.unfold(x, kernel, dilation, padding, stride)  # [n, c * taps, ho * wo]
        length = n * ho * wo
        cols_t = cols.transpose(0, 1).reshape(cols.shape[1], length)
        out_rows = products(plan, weight).forward(cols_t)
        layout = _layout(x)
        out = torch.empty((n, out_c, ho, wo), dtype=x.dtype, device=x.device, memory_format=layout)
        out.copy_(out_rows.view(out_c, n, ho, wo).transpose(0, 1))
        if bias is not None:
            out += bias.view(1, -1, 1, 1)
        ctx.save_for_backward(cols_t, weight)
        ctx.conf = (plan, products, x.shape, stride, padding, dilation, bias is not None, layout)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        cols_t, weight = ctx.saved_tensors
        plan, products, (n, c, h, w), stride, padding, dilation, has_bias, layout = ctx.conf
        products = products(plan, weight)
        out_c = plan.shape[0]
        length = cols_t.shape[1]
        g = grad_out.transpose(0, 1).reshape(out_c, length).contiguous()  # rows contiguous whatever the layout
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            dcols = products.transposed(g, cols_t.shape[0])
            folded = F.fold(dcols.view(cols_t.shape[0], n, -1).transpose(0, 1), (h, w), plan.shape[2:], dilation,
                            padding, stride)
            grad_x = torch.empty((n, c, h, w), dtype=g.dtype, device=g.device, memory_format=layout)
            grad_x.copy_(folded)
        if ctx.needs_input_grad[1]:
            grad_w = products.weight_grad(g, cols_t)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None, None


def unfolded_conv2d(x: torch.Tensor, weight: torch.Tensor, plan: SparsePlan, bias: torch.Tensor | None,
                    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                    products: type) -> torch.Tensor:
    """The convolution on the unfolded input (`F.unfold`, the input gradient folded back), its products `products`'
    (`RowProducts`, or `dsd2.ops.sparse_csr.CsrProducts`)."""
    return _SparseConvUnfold.apply(x, weight, bias, plan, tuple(stride), tuple(padding), tuple(dilation), products)


def sparse_conv2d(x: torch.Tensor, weight: torch.Tensor, plan: SparsePlan, bias: torch.Tensor | None = None,
                  stride=(1, 1), padding=(0, 0), dilation=(1, 1)) -> torch.Tensor:
    """`F.conv2d(x, W⊙M, bias, stride, padding, dilation, groups)` over the kept weights of `plan` only (its
    groups are the plan's); x: [N, C, H, W] fp32 on the CPU, padding a pair of ints."""
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    if batch_minor_layout(x.shape[-2:], plan.shape[2:], stride, padding, dilation, plan.sparsity):
        keep = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)  # a training call
        return _SparseConvBatchMinor.apply(x, weight, bias, plan, padding, dilation, keep)
    if grid_layout(x.shape[-2:], plan.shape[2:], stride, padding, dilation):
        keep = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)  # a training call
        return _SparseConvGrid.apply(x, weight, bias, plan, stride, padding, dilation, keep)
    return unfolded_conv2d(x, weight, plan, bias, stride, padding, dilation, RowProducts)
