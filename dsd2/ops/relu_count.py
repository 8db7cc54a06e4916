"""ReLU on/off-state counting: exact integer counts per neuron (or per channel), fused into the ReLU itself.

The usual entropy hook materialises a float copy of every ReLU output, `(x > 0).float().mean(0)`, per batch.
`count_positive_` reads the activation once and adds integer counts; `CountingReLU` is a drop-in `nn.ReLU`
that, while counting is on, applies the ReLU and updates its counters in the same pass.

Granularity: "element" counts every output element of a sample separately (DSD² eq. 1: a conv neuron is one
(channel, y, x) position); "channel" pools the positions of a channel. Threshold: x > 0 (default) or, with
`inclusive=True`, x >= 0, because published implementations differ.
"""

from __future__ import annotations

import torch
from torch import nn

from dsd2.config import GRANULARITIES
from dsd2.ops._backend import cpp_extension, pick


def counts_shape(x: torch.Tensor, per_channel: bool) -> int:
    if per_channel:
        return x.shape[1] if x.dim() > 1 else 1
    return x[0].numel() if x.dim() > 1 else 1


def count_positive_reference(x: torch.Tensor, counts: torch.Tensor, inclusive: bool = False,
                             per_channel: bool = False) -> torch.Tensor:
    """The oracle: plain PyTorch, exact (integer sums of booleans)."""
    state = (x >= 0) if inclusive else (x > 0)
    if per_channel and x.dim() > 2:  # pool each channel's positions
        counts += state.transpose(0, 1).reshape(x.shape[1], -1).sum(1)
    else:  # per element, or per channel of a [B, C] input (one position per channel)
        counts += state.reshape(x.shape[0], -1).sum(0)
    return counts


def _pick(x: torch.Tensor, backend: str | None) -> str:
    return pick("relu_count", x, backend, extension=cpp_extension)


def _check(x: torch.Tensor, counts: torch.Tensor, per_channel: bool) -> None:
    if counts.dtype != torch.int64:
        raise ValueError(f"counts must be int64, got {counts.dtype}")
    expected = counts_shape(x, per_channel)
    if counts.numel() != expected:
        raise ValueError(f"counts has {counts.numel()} entries; x of shape {tuple(x.shape)} needs {expected} "
                         f"({'per channel' if per_channel else 'per element'})")


def count_positive_(x: torch.Tensor, counts: torch.Tensor, *, inclusive: bool = False,
                    per_channel: bool = False, backend: str | None = None) -> torch.Tensor:
    """counts += number of samples (dim 0) with x > 0, per element of x[0] (or per channel). In place; exact."""
    _check(x, counts, per_channel)
    backend = _pick(x, backend)
    if x.dim() == 1:
        x = x.unsqueeze(1)
    if backend == "triton":
        from dsd2.kernels.relu_count import count_positive_ as triton_count

        return triton_count(x, counts, inclusive, per_channel)
    if backend == "cpp":
        cpp_extension().count_positive_(x, counts, inclusive, per_channel)
        return counts
    return count_positive_reference(x, counts, inclusive, per_channel)


def relu_count(x: torch.Tensor, counts: torch.Tensor, *, inclusive: bool = False, per_channel: bool = False,
               backend: str | None = None) -> torch.Tensor:
    """relu(x), updating counts in the same read of x."""
    _check(x, counts, per_channel)
    backend = _pick(x, backend)
    if backend == "triton":
        from dsd2.kernels.relu_count import relu_count as triton_relu_count

        return triton_relu_count(x, counts, inclusive, per_channel)
    if backend == "cpp" and not per_channel and x.dim() > 1:
        return cpp_extension().relu_count(x, counts, inclusive)
    count_positive_(x, counts, inclusive=inclusive, per_channel=per_channel, backend=backend)
    return torch.relu(x)


class ReLUSiteError(RuntimeError):
    """The ReLU call sites of a model cannot be counted apart (untraceable code, a ReLU hidden in torch, or a
    ReLU module that one forward calls twice under `swap_in_counting_relus`)."""


class _OneCallPerForward:
    """Forward hooks of the model `swap_in_counting_relus` swapped into: while its forward runs, a counting ReLU
    that is called a second time raises, since its two call sites would merge into one counter."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.active = False
        self.seen: set[int] = set()

    def before(self, module: nn.Module, args) -> None:
        self.active = True
        self.seen.clear()

    def after(self, module: nn.Module, args, output) -> None:
        self.active = False

    def called(self, relu: nn.Module) -> None:
        if not self.active:  # a submodule called on its own: no whole forward to check
            return
        key = id(relu)
        if key in self.seen:
            raise ReLUSiteError(f"ReLU module '{relu.module_name}' ran twice in one forward of {self.model_name}, and "
                                f"swap_in_counting_relus counts per module, so both call sites would merge into "
                                f"one layer with doubled observations; use dsd2.ops.count_relu_call_sites(model), "
                                f"which gives every call site its own counter")
        self.seen.add(key)


class _ReLUCountFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, inclusive, per_channel):
        y = relu_count(x, counts, inclusive=inclusive, per_channel=per_channel)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        # torch.relu's own backward: one kernel (grad where y > 0, else 0), not a compare, a cast and a multiply
        return torch.ops.aten.threshold_backward(grad, y, 0), None, None, None


class CountingReLU(nn.ReLU):
    """Drop-in `nn.ReLU` that can count on-states of its output neurons.

    `counting = True` switches counting on; `counts` (int64) and `observations` (how many samples, or
    sample-positions per channel, each counter has seen) accumulate until `reset_counts()`. The state
    frequency of neuron i is counts[i] / observations.
    """

    def __init__(self, inplace: bool = False, granularity: str = "element", inclusive: bool = False):
        super().__init__(inplace=inplace)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity '{granularity}' is not known; allowed: {', '.join(GRANULARITIES)}")
        self.granularity = granularity
        self.inclusive = inclusive
        self.counting = False
        self.counts: torch.Tensor | None = None
        self.observations = 0
        self.call_site: str | None = None  # the layer name, when `count_relu_call_sites` made it
        self.calls: _OneCallPerForward | None = None  # set by `swap_in_counting_relus`, with module_name
        self.module_name = ""

    @classmethod
    def from_relu(cls, relu: nn.ReLU, **kwargs) -> CountingReLU:
        return cls(inplace=relu.inplace, **kwargs)

    def reset_counts(self) -> None:
        self.counts, self.observations = None, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.counting:
            return super().forward(x)
        if self.calls is not None:
            self.calls.called(self)
        per_channel = self.granularity == "channel"
        if self.counts is None:
            self.counts = torch.zeros(counts_shape(x, per_channel), dtype=torch.int64, device=x.device)
        self.observations += x.shape[0] * (x[0, 0].numel() if per_channel and x.dim() > 2 else 1)
        if self.inplace:  # keep the in-place semantics: x itself (and every view of it) becomes relu(x)
            count_positive_(x, self.counts, inclusive=self.inclusive, per_channel=per_channel)
            return torch.relu_(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _ReLUCountFunction.apply(x, self.counts, self.inclusive, per_channel)
        return relu_count(x, self.counts, inclusive=self.inclusive, per_channel=per_channel)

    def extra_repr(self) -> str:
        site = f"call_site='{self.call_site}', " if self.call_site else ""
        inplace = "inplace=True, " if self.inplace else ""
        return f"{site}{inplace}granularity={self.granularity}, inclusive={self.inclusive}"


class StateCounter(nn.Module):
    """Counts the states of the activation applied after it at one call site and passes its input on unchanged
    (the same tensor: an in-place activation after it still works in place).

    An activation's state is where its input lies against the activation's kinks, `thresholds` in increasing
    order: one threshold (0) gives the on/off state of a gated activation (GELU, SiLU, Hardswish, LeakyReLU: on
    where the input is positive, as for ReLU); two give ReLU6's and Hardtanh's three regimes (below the lower
    bound, between, above the upper one). `counts` holds, per threshold t, how many observations had an input
    above t (`[neurons]` for one threshold, `[thresholds, neurons]` for more), with `count_positive_` on x - t:
    x - t > 0 exactly when x > t in IEEE arithmetic, so the counts are exact. `inclusive` counts x >= t instead.
    The interface is `CountingReLU`'s: `counting`, `counts`, `observations`, `reset_counts()`, `call_site`.
    """

    def __init__(self, thresholds: tuple[float, ...] = (0.0,), granularity: str = "element",
                 inclusive: bool = False, activation: str = ""):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity '{granularity}' is not known; allowed: {', '.join(GRANULARITIES)}")
        if not thresholds or list(thresholds) != sorted(set(thresholds)):
            raise ValueError(f"thresholds {tuple(thresholds)} must be one or more distinct values in increasing order")
        self.thresholds = tuple(float(t) for t in thresholds)
        self.granularity = granularity
        self.inclusive = inclusive
        self.activation = activation  # what follows: for the repr and the reports
        self.counting = False
        self.counts: torch.Tensor | None = None
        self.observations = 0
        self.call_site: str | None = None

    def reset_counts(self) -> None:
        self.counts, self.observations = None, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.counting:
            return x
        per_channel = self.granularity == "channel"
        if self.counts is None:
            shape = counts_shape(x, per_channel)
            rows = len(self.thresholds)
            self.counts = torch.zeros((rows, shape) if rows > 1 else shape, dtype=torch.int64, device=x.device)
        self.observations += x.shape[0] * (x[0, 0].numel() if per_channel and x.dim() > 2 else 1)
        rows = self.counts if self.counts.dim() == 2 else self.counts.unsqueeze(0)
        with torch.no_grad():
            for t, row in zip(self.thresholds, rows):
                count_positive_(x if t == 0.0 else x - t, row, inclusive=self.inclusive, per_channel=per_channel)
        return x

    def extra_repr(self) -> str:
        site = f"call_site='{self.call_site}', " if self.call_site else ""
        return (f"{site}activation='{self.activation}', thresholds={self.thresholds}, "
                f"granularity={self.granularity}, inclusive={self.inclusive}")


def swap_in_counting_relus(model: nn.Module, **kwargs) -> dict[str, CountingReLU]:
    """Replace every `nn.ReLU` of `model` by a `CountingReLU` in place; returns them by qualified name.

    One counter per module: a forward of `model` that calls one of them twice (torchvision's BasicBlock calls
    its `relu` twice) raises `ReLUSiteError` while counting, naming `count_relu_call_sites`, which counts per
    call site; a ReLU called through a functional (`F.relu`) is not seen here either."""
    swapped: dict[str, CountingReLU] = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.ReLU:
                new = CountingReLU.from_relu(child, **kwargs)
                setattr(module, child_name, new)
                swapped[f"{name}.{child_name}" if name else child_name] = new
            elif isinstance(child, CountingReLU):
                swapped[f"{name}.{child_name}" if name else child_name] = child
    calls = next((r.calls for r in swapped.values() if r.calls is not None), None)
    if swapped and calls is None:
        calls = _OneCallPerForward(type(model).__name__)
        model.register_forward_pre_hook(calls.before)
        model.register_forward_hook(calls.after, always_call=True)  # also when the forward raises
    for qualified, relu in swapped.items():
        relu.calls, relu.module_name = calls, qualified
    return swapped
