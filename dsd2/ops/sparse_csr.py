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

The autograd functions around them are `dsd2.ops.sparse_layers`' own (its linear and unfolded convolution), with
`CsrProducts` in place of the C++ `RowProducts`. It runs wherever torch.sparse does (CUDA and the CPU; the tests
run it on the CPU against the float64 oracle, with the C++ path's cases and bounds).
fp32 outside autocast; not while a CUDA graph is captured (a captured step's layers stay dense). `auto` takes it on
a CUDA layer only from the crossover measured there (`dsd2.ops.sparse_tune`), so a GPU run stays dense wherever
cuSPARSE does not measure faster than cuDNN / cuBLAS on W⊙M.
"""

from __future__ import annotations

import warnings

import torch

from dsd2.ops.sparse_layers import SparsePlan, sparse_linear, unfolded_conv2d

_BETA = "Sparse CSR tensor support is in beta state"
_beta_warning_spent = False


def _indices(plan: SparsePlan, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The plan's row pointers and columns on `device`, by output row and by operand row, copied once per device."""
    held = plan.device_indices.get(device)
    if held is None:
        held = tuple(t.to(device) for t in (plan.rowptr, plan.unfold_row, plan.t_rowptr_unfold, plan.t_col))
        plan.device_indices[device] = held
    return held


def _csr(rowptr, col, values, size) -> torch.Tensor:
    global _beta_warning_spent
    if not _beta_warning_spent:  # torch warns once per process that CSR tensors are a beta feature: that once is
        # silenced here, rather than a filter left in the caller's warnings (the products used are the stable ones)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_BETA)
            made = torch.sparse_csr_tensor(rowptr, col, values, size=size, check_invariants=False)
        _beta_warning_spent = True
        return made
    return torch.sparse_csr_tensor(rowptr, col, values, size=size, check_invariants=False)


class CsrProducts:
    """`dsd2.ops.sparse_layers.RowProducts` on torch.sparse CSR products: (W⊙M) @ operand, its transpose @ gradient
    rows, and the weight gradient at the kept entries (`sampled_addmm`)."""

    def __init__(self, plan: SparsePlan, weight: torch.Tensor):
        self.plan, self.weight = plan, weight
        self.rowptr, self.col, self.t_rowptr, self.t_col = _indices(plan, weight.device)
        self.rows = plan.shape[0]
        self.cols = plan.t_rowptr_unfold.numel() - 1  # in features, or C * kh * kw

    def forward(self, operand: torch.Tensor) -> torch.Tensor:
        """[cols, L] -> [rows, L]."""
        w = _csr(self.rowptr, self.col, self.plan.values(self.weight), (self.rows, self.cols))
        return torch.sparse.mm(w, operand)

    def transposed(self, grad_rows: torch.Tensor, cols: int) -> torch.Tensor:
        """[rows, L] -> [cols, L]."""
        w_t = _csr(self.t_rowptr, self.t_col, self.plan.values(self.weight, transposed=True), (cols, self.rows))
        return torch.sparse.mm(w_t, grad_rows)

    def weight_grad(self, grad_rows: torch.Tensor, operand: torch.Tensor) -> torch.Tensor:
        """grad_rows [rows, L] times operand [cols, L] at the kept entries, in the weight's layout, 0.0 elsewhere."""
        pattern = _csr(self.rowptr, self.col, grad_rows.new_zeros(self.plan.nnz), (self.rows, self.cols))
        sampled = torch.sparse.sampled_addmm(pattern, grad_rows, operand.t(), beta=0.0)
        return self.plan.gradient(self.weight, sampled.values())


def csr_linear(x: torch.Tensor, weight: torch.Tensor, plan: SparsePlan,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, W⊙M, bias)` over the kept weights of `plan` only, on torch.sparse CSR products."""
    return sparse_linear(x, weight, plan, bias, products=CsrProducts)


def csr_conv2d(x: torch.Tensor, weight: torch.Tensor, plan: SparsePlan, bias: torch.Tensor | None = None,
               stride=(1, 1), padding=(0, 0), dilation=(1, 1)) -> torch.Tensor:
    """`F.conv2d(x, W⊙M, bias, stride, padding, dilation, groups)` over the kept weights of `plan` only (its groups
    are the plan's), on torch.sparse CSR products of the unfolded input; padding a pair of ints."""
    return unfolded_conv2d(x, weight, plan, bias, stride, padding, dilation, CsrProducts)
