"""Sparse layers on torch.sparse CSR: a masked layer's forward and both gradients over its kept weights only, through
torch's sparse-dense products, which are cuSPARSE's on CUDA. dsd2's own sparse kernels (`dsd2.ops.sparse_layers`)
are C++ for the CPU; this is the sparse path of CUDA tensors.

The kept entries come from the layer's `SparsePlan` (listed once per mask); each call gathers their current values
and wraps them with the plan's row pointers and columns, so nothing is converted per step:

- linear: out^T = W_csr @ x^T, then the bias; the input gradient dx^T = (W^T)_csr @ dy^T on the plan's list by
  operand row; the weight gradient at the kept entries only, `torch.sparse.sampled_addmm` (dy^T @ x sampled at
  the mask's pattern, one dot product per kept entry), so pruned entries of dW are exactly 0.0.
- conv2d: the same three products on the unfolded input [C * kh * kw, N * Ho * Wo] (`F.unfold`; groups are the
  plan's block-diagonal columns), the input gradient folded back (`F.fold`).

It runs wherever torch.sparse does (CUDA and the CPU; the tests run it on the CPU against the dense masked path).
fp32 outside autocast; not while a CUDA graph is captured (a captured step's layers stay dense). `auto` takes it on
a CUDA layer only from the crossover measured there (`dsd2.ops.sparse_tune`), so a GPU run stays dense wherever
cuSPARSE does not measure faster than cuDNN / cuBLAS on W⊙M.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from dsd2.ops.sparse_layers import SparsePlan, _layout, _output_size

# torch warns once per process that CSR tensors are a beta feature; the products used here are the stable ones
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def _indices(plan: SparsePlan, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The plan's row pointers and columns on `device`, by output row and by operand row, copied once per device."""
    held = plan.device_indices.get(device)
    if held is None:
        held = tuple(t.to(device) for t in (plan.rowptr, plan.unfold_row, plan.t_rowptr_unfold, plan.t_col))
        plan.device_indices[device] = held
    return held


def _csr(rowptr, col, values, size) -> torch.Tensor:
    return torch.sparse_csr_tensor(rowptr, col, values, size=size, check_invariants=False)


class _Products:
    """The three products of one layer's call, on the plan's CSR lists: W @ B, W^T @ B and dW at the kept entries."""

    def __init__(self, plan: SparsePlan, weight: torch.Tensor):
        self.plan, self.weight = plan, weight
        self.rowptr, self.col, self.t_rowptr, self.t_col = _indices(plan, weight.device)
        self.rows = plan.shape[0]
        self.cols = plan.t_rowptr_unfold.numel() - 1  # in features, or C * kh * kw

    def forward(self, operand: torch.Tensor) -> torch.Tensor:
        """W⊙M @ operand ([cols, L] -> [rows, L])."""
        w = _csr(self.rowptr, self.col, self.plan.values(self.weight), (self.rows, self.cols))
        return torch.sparse.mm(w, operand)

    def transposed(self, grad_rows: torch.Tensor) -> torch.Tensor:
        """(W⊙M)^T @ grad_rows ([rows, L] -> [cols, L])."""
        w_t = _csr(self.t_rowptr, self.t_col, self.plan.values(self.weight, transposed=True),
                   (self.cols, self.rows))
        return torch.sparse.mm(w_t, grad_rows)

    def weight_grad(self, grad_rows: torch.Tensor, operand_t: torch.Tensor) -> torch.Tensor:
        """grad_rows @ operand_t ([rows, L] @ [L, cols]) at the kept entries, in the weight's layout, 0.0 elsewhere."""
        pattern = _csr(self.rowptr, self.col, grad_rows.new_zeros(self.plan.nnz), (self.rows, self.cols))
        sampled = torch.sparse.sampled_addmm(pattern, grad_rows, operand_t, beta=0.0)
        return self.plan.gradient(self.weight, sampled.values())


class _CsrLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, plan: SparsePlan):
        products = _Products(plan, weight)
        out = products.forward(x2.t()).t()
        out = out + bias if bias is not None else out.contiguous()
        ctx.save_for_backward(x2, weight)
        ctx.plan, ctx.has_bias = plan, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight = ctx.saved_tensors
        products = _Products(ctx.plan, weight)
        g_t = grad_out.t()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = products.transposed(g_t).t().contiguous()
        if ctx.needs_input_grad[1]:
            grad_w = products.weight_grad(g_t, x2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0)
        return grad_x, grad_w, grad_b, None


def csr_linear(x: torch.Tensor, weight: torch.Tensor, plan: SparsePlan,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, W⊙M, bias)` over the kept weights of `plan` only, on torch.sparse CSR products."""
    shape = x.shape
    out = _CsrLinear.apply(x.reshape(-1, shape[-1]), weight, bias, plan)
    return out.reshape(*shape[:-1], plan.shape[0])


class _CsrConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, plan: SparsePlan, stride, padding, dilation):
        n, c, h, w = x.shape
        kernel, out_c = plan.shape[2:], plan.shape[0]
        ho = _output_size(h, padding[0], dilation[0], kernel[0], stride[0])
        wo = _output_size(w, padding[1], dilation[1], kernel[1], stride[1])
        cols = F.unfold(x, kernel, dilation, padding, stride)  # [n, c * taps, ho * wo]
        operand = cols.transpose(0, 1).reshape(cols.shape[1], n * ho * wo)
        out_rows = _Products(plan, weight).forward(operand)
        layout = _layout(x)
        out = torch.empty((n, out_c, ho, wo), dtype=x.dtype, device=x.device, memory_format=layout)
        out.copy_(out_rows.view(out_c, n, ho, wo).transpose(0, 1))
        if bias is not None:
            out += bias.view(1, -1, 1, 1)
        ctx.save_for_backward(operand, weight)
        ctx.conf = (plan, x.shape, stride, padding, dilation, bias is not None, layout)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        operand, weight = ctx.saved_tensors
        plan, (n, c, h, w), stride, padding, dilation, has_bias, layout = ctx.conf
        products = _Products(plan, weight)
        g = grad_out.transpose(0, 1).reshape(plan.shape[0], operand.shape[1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            dcols = products.transposed(g)
            folded = F.fold(dcols.view(operand.shape[0], n, -1).transpose(0, 1), (h, w), plan.shape[2:], dilation,
                            padding, stride)
            grad_x = torch.empty((n, c, h, w), dtype=g.dtype, device=g.device, memory_format=layout).copy_(folded)
        if ctx.needs_input_grad[1]:
            grad_w = products.weight_grad(g, operand.t())
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None


def csr_conv2d(x: torch.Tensor, weight: torch.Tensor, plan: SparsePlan, bias: torch.Tensor | None = None,
               stride=(1, 1), padding=(0, 0), dilation=(1, 1)) -> torch.Tensor:
    """`F.conv2d(x, W⊙M, bias, stride, padding, dilation, groups)` over the kept weights of `plan` only (its groups
    are the plan's), on torch.sparse CSR products; padding a pair of ints."""
    return _CsrConv2d.apply(x, weight, bias, plan, tuple(stride), tuple(padding), tuple(dilation))
