"""MaskedSGD: SGD whose step masks gradient, momentum and weight in one pass, so pruned weights stay 0.0.

Conv/Linear layers then run on plain dense weights: no per-forward `weight_orig * mask` as with
`torch.nn.utils.prune`, no extra weight copies, and pruned entries take neither gradient nor
momentum. For kept entries the update is `torch.optim.SGD`'s.

One formula on every path (C++ at every CPU level, multi-tensor, reference), each product and sum rounded on its
own, with no fused multiply-add, so they agree bit for bit:

    d = g * m + wd * p;   buf = (momentum * buf + d) * m;   d = d + momentum * buf (Nesterov) or buf
    p = (p - lr * d) * m
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from dsd2.ops._backend import OP_BACKENDS, cpp_extension, pick

BACKENDS = ("auto", *OP_BACKENDS["masked_sgd"])


def masked_sgd_reference(params: list[torch.Tensor], grads: list[torch.Tensor],
                         bufs: list[torch.Tensor | None], masks: list[torch.Tensor | None], *,
                         lr: float, momentum: float, weight_decay: float, nesterov: bool,
                         first: bool) -> None:
    """The oracle, in plain PyTorch, tensor by tensor (updates params and bufs in place)."""
    for p, g, buf, mask in zip(params, grads, bufs, masks):
        d = g * mask if mask is not None else g.clone()
        if weight_decay:
            d = d + p * weight_decay
        if momentum and buf is not None:
            if first:
                buf.copy_(d)
            else:
                buf.mul_(momentum).add_(d)
            if mask is not None:
                buf.mul_(mask)
            d = d + buf * momentum if nesterov else buf
        p.sub_(d * lr)
        if mask is not None:
            p.mul_(mask)


def masked_sgd_foreach(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor | None],
                       masks: list[torch.Tensor | None], *, lr: float | torch.Tensor, momentum: float,
                       weight_decay: float, nesterov: bool, first: bool) -> None:
    """Multi-tensor path for devices without a fused kernel: a handful of launches for all tensors. No `alpha=`
    arguments: ATen computes `a + alpha * b` as one fused multiply-add on some CPUs and not on others."""
    d = [g * m if m is not None else g.clone() for g, m in zip(grads, masks)]
    if weight_decay:
        torch._foreach_add_(d, torch._foreach_mul(params, weight_decay))
    if momentum:
        if first:
            torch._foreach_copy_(bufs, d)
        else:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, d)
        mb = [(b, m) for b, m in zip(bufs, masks) if m is not None]
        if mb:
            torch._foreach_mul_([b for b, _ in mb], [m for _, m in mb])
        if nesterov:
            torch._foreach_add_(d, torch._foreach_mul(bufs, momentum))
        else:
            d = bufs
    # lr may be a device tensor: read by the kernels, never by the host
    torch._foreach_sub_(params, torch._foreach_mul(d, lr))
    pm = [(p, m) for p, m in zip(params, masks) if m is not None]
    if pm:
        torch._foreach_mul_([p for p, _ in pm], [m for _, m in pm])


def pair_masks(params: list[torch.Tensor], masks: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, mask) pairs from the forms a masked optimizer takes for `masks`: None; a dict keyed by the
    parameter tensor or by its position in `params`; or a list (or tuple) parallel to `params`, torch style,
    None for a parameter without a mask. Refuses, in one sentence, a list of another length, a key that is not
    one of `params`, or a mask whose shape is not its parameter's."""
    if masks is None:
        return []
    if torch.is_tensor(masks) or not isinstance(masks, (Mapping, list, tuple)):
        raise TypeError(f"masks must be a dict {{parameter or position: mask}} or a list parallel to the parameters, "
                        f"not {type(masks).__name__}")
    if isinstance(masks, Mapping):
        position = {id(p): i for i, p in enumerate(params)}
        by_position: dict[int, Any] = {}
        for key, mask in masks.items():
            i = key if isinstance(key, int) and not isinstance(key, bool) else position.get(id(key))
            if i is None or not 0 <= i < len(params):
                what = (f"position {key}" if isinstance(key, int) and not isinstance(key, bool)
                        else "a tensor" if torch.is_tensor(key) else f"a {type(key).__name__}")
                raise ValueError(f"a mask is keyed by {what}, which is not one of the optimizer's {len(params)} "
                                 "parameters; key masks by the parameter tensor or its position in params")
            by_position[i] = mask
        masks = [by_position.get(i) for i in range(len(params))]
    if len(masks) != len(params):
        raise ValueError(f"got {len(masks)} masks for {len(params)} parameters; give one mask (or None) per "
                         "parameter, in the order of params")
    pairs = []
    for i, (p, mask) in enumerate(zip(params, masks)):
        if mask is None:
            continue
        if not torch.is_tensor(mask):
            raise TypeError(f"the mask of parameter {i} is a {type(mask).__name__}, not a tensor (or None)")
        if mask.shape != p.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} of parameter {i} differs from its shape {tuple(p.shape)}")
        pairs.append((p, mask))
    return pairs


class MaskedSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay that keeps masked weights exactly zero.

    `masks` maps a parameter (the tensor object) or its position in `params` to a bool mask of the
    same shape (True = kept), or is a list parallel to `params` (torch style; None for no mask): see
    `pair_masks`. Parameters without a mask (biases, BatchNorm) step as plain SGD.
    Masks are read at every step, so updating them in place after a prune needs no new optimizer.
    """

    def __init__(self, params: Iterable[torch.Tensor],
                 masks: Mapping[torch.Tensor | int, torch.Tensor] | list[torch.Tensor | None] | None = None,
                 lr: float | torch.Tensor = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4,
                 nesterov: bool = False, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend '{backend}' is not known; allowed: {', '.join(BACKENDS)}")
        self.backend = backend
        if not torch.is_tensor(lr) and lr < 0:
            raise ValueError(f"learning rate {lr} must be >= 0")
        if nesterov and momentum <= 0:
            raise ValueError("nesterov momentum needs momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov))
        self.masks: dict[int, torch.Tensor] = {}
        for p, m in pair_masks([p for group in self.param_groups for p in group["params"]], masks):
            self.set_mask(p, m)

    def set_mask(self, param: torch.Tensor, mask: torch.Tensor) -> None:
        if mask.shape != param.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from parameter shape {tuple(param.shape)}")
        # stored in the parameter's own memory layout (e.g. channels_last) so one flat pass pairs them
        self.masks[id(param)] = torch.empty_like(param, dtype=torch.bool).copy_(mask)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            momentum = group["momentum"]
            bufs, first = [], False
            for p in params:
                state = self.state[p]
                if momentum and "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                    first = True
                bufs.append(state.get("momentum_buffer"))
            grads = [p.grad for p in params]
            masks = [self.masks.get(id(p)) for p in params]
            backend = pick("masked_sgd", params[0], None if self.backend == "auto" else self.backend,
                           extension=cpp_extension)
            if backend == "triton":
                # one launch for every tensor; lr may be a device tensor (changed without CUDA-graph recapture)
                from dsd2.kernels.masked_sgd import masked_sgd_step_ as triton_step

                triton_step(params, grads, bufs, masks, group["lr"], momentum, group["weight_decay"],
                            group["nesterov"])
                continue
            if torch.is_tensor(group["lr"]):
                if self.backend in ("cpp", "reference"):
                    raise ValueError(f"backend '{self.backend}' takes a float learning rate; a tensor learning rate "
                                     "needs backend auto, foreach or triton")
                # a learning rate held in a tensor (CUDA-graph replays change it without recapture) is passed to
                # the multi-tensor path as a tensor: reading it back would be a host sync inside a capture
                masked_sgd_foreach(params, grads, bufs, masks, lr=group["lr"], momentum=momentum,
                                   weight_decay=group["weight_decay"], nesterov=group["nesterov"], first=first)
                continue
            kwargs = dict(lr=float(group["lr"]), momentum=momentum, weight_decay=group["weight_decay"],
                          nesterov=group["nesterov"], first=first)
            if backend == "cpp":
                cpp_extension().masked_sgd_step_(params, grads, bufs, masks, kwargs["lr"], momentum,
                                                 group["weight_decay"], group["nesterov"], first)
            elif backend == "foreach":
                masked_sgd_foreach(params, grads, bufs, masks, **kwargs)
            else:
                masked_sgd_reference(params, grads, bufs, masks, **kwargs)
        return loss
