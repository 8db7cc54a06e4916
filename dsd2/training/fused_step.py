"""The CPU training step of Linear/ReLU chains (the loop's MLPs): a whole epoch in one C++ call.

A step of a small MLP is a few million multiply-adds, so on the CPU its time is glue: Python dispatching some
eighty ATen ops, autograd building and walking the graph, the optimizer looping over tensors. `mlp_epoch`
(csrc/mlp_epoch.cpp) runs the same ATen ops in the same order with the same scalars, below autograd, for a whole
epoch: the forward, the loss (cross-entropy, or dsd2's KD loss to cached teacher logits), autograd's backward
formulas, the gradient accumulated as autograd accumulates it, and MaskedAdam's (torch.optim.Adam's single-tensor
update) or MaskedSGD's step. Its epochs are therefore the eager epochs bit for bit: weights, optimizer state,
losses and metrics (tests/test_fused_step.py), and a run may switch between the two paths, resume included.

Chosen once per run by `make_executor` (`--cpu-step auto`, the default: fused where the model is a chain of
Flatten / Linear / ReLU modules on the CPU in fp32 without augmentation, eager otherwise; `--cpu-step eager`
keeps the eager step; `--cpu-step fused` refuses a run it cannot take). Per epoch, anything the C++ epoch does
not do (the counting epoch of online entropy, a custom objective or optimizer) runs the eager epoch instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from dsd2.ops import MaskedSGD, cpp_extension, pick
from dsd2.ops.masked_layers import MaskedLinear
from dsd2.training.objectives import CrossEntropy, DistillationObjective

CPU_STEPS = ("auto", "fused", "eager")


@dataclass(frozen=True)
class Chain:
    """x -> flatten -> [linear_i, then relu if relu_after[i]] -> logits."""

    layers: tuple[nn.Linear, ...]
    relu_after: tuple[bool, ...]

    def arguments(self) -> tuple[list, list, list, list]:
        return ([m.weight for m in self.layers], [m.bias for m in self.layers],
                [m.mask if isinstance(m, MaskedLinear) else None for m in self.layers], list(self.relu_after))


class _LeafTracer(fx.Tracer):
    """Traces a model down to its Linear, ReLU and Flatten modules (subclasses included: masked and counting)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Linear, nn.ReLU, nn.Flatten, nn.Identity)) or super().is_leaf_module(m, qualname)


def linear_relu_chain(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[Chain | None, str]:
    """The model as a Linear/ReLU chain over inputs of `input_shape` (one sample's), or None and why not."""
    try:
        if isinstance(model, fx.GraphModule):
            graph, root = model.graph, model
        else:
            graph, root = _LeafTracer().trace(model), model
    except Exception as exc:  # a forward fx cannot trace (data-dependent control flow): not a chain
        return None, f"its forward cannot be traced ({type(exc).__name__})"
    layers: list[nn.Linear] = []
    relu_after: list[bool] = []
    flat = len(input_shape) == 1
    current = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if current is not None:
                return None, "its forward takes more than one input"
            current = node
            continue
        if node.op == "output":
            if node.args != (current,) or not layers or relu_after[-1]:
                return None, "it does not end in a linear layer"
            break
        if node.op == "call_module" and node.args == (current,) and not node.kwargs:
            module = root.get_submodule(node.target)
        elif ((node.op == "call_function" and node.target is torch.flatten)
              or (node.op == "call_method" and node.target == "flatten")) and node.args == (current, 1):
            module = nn.Flatten()
        else:
            return None, f"'{node.name}' is not a Linear, ReLU or Flatten module applied to the previous output"
        if isinstance(module, nn.Identity):
            pass
        elif isinstance(module, nn.Flatten):
            if layers or module.start_dim != 1 or module.end_dim != -1:
                return None, f"'{node.name}' flattens other than the input's sample dimensions"
            flat = True
        elif isinstance(module, nn.Linear):
            if type(module).forward not in (nn.Linear.forward, MaskedLinear.forward):
                return None, f"'{node.name}' has a forward of its own"
            if not flat:
                return None, "its first linear layer sees unflattened images"
            if layers and not relu_after[-1]:
                return None, f"'{node.name}' follows a linear layer without a ReLU between"
            layers.append(module)
            relu_after.append(False)
        elif isinstance(module, nn.ReLU):
            if not layers or relu_after[-1]:
                return None, f"'{node.name}' does not follow a linear layer"
            relu_after[-1] = True
        else:
            return None, f"'{node.name}' is a {type(module).__name__}"
        current = node
    why = _check_layers(layers, input_shape)
    return (None, why) if why else (Chain(tuple(layers), tuple(relu_after)), "")


def _check_layers(layers: list[nn.Linear], input_shape: tuple[int, ...]) -> str:
    """Why the chain's layers cannot run in the fused epoch, or ''."""
    if not layers:
        return "it has no linear layer"
    features = 1
    for d in input_shape:
        features *= d
    if layers[0].in_features != features:
        return f"its first linear layer takes {layers[0].in_features} features, not the input's {features}"
    for m in layers:
        if m.weight.dtype != torch.float32 or m.weight.device.type != "cpu" or not m.weight.is_contiguous():
            return "its weights are not contiguous float32 CPU tensors"
    return ""


def _scalar_dtype() -> torch.dtype:
    """The dtype of torch.optim.Adam's step counter on the CPU (its _get_scalar_dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _adam_plan(optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    from dsd2.training.optim import MaskedAdam

    if type(optimizer) is not MaskedAdam or len(optimizer.param_groups) != 1:
        return None
    g = optimizer.param_groups[0]
    if (g["amsgrad"] or g["maximize"] or g["capturable"] or g["differentiable"] or g.get("fused")
            or g.get("foreach") or g.get("decoupled_weight_decay") or torch.is_tensor(g["lr"])
            or any(torch.is_tensor(b) for b in g["betas"])):
        return None
    params = list(g["params"])
    for p in params:  # the lazy state torch.optim.Adam's first step makes (its _init_group)
        state = optimizer.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=_scalar_dtype(), device="cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    masks = [optimizer.masks.get(id(p)) for p in params]
    beta1, beta2 = g["betas"]
    return dict(params=params, param_masks=masks, state1=[optimizer.state[p]["exp_avg"] for p in params],
                state2=[optimizer.state[p]["exp_avg_sq"] for p in params],
                steps=[optimizer.state[p]["step"] for p in params], optimizer="adam", lr=float(g["lr"]),
                beta1=float(beta1), beta2=float(beta2), eps=float(g["eps"]), weight_decay=float(g["weight_decay"]),
                momentum=0.0, nesterov=False)


def _sgd_plan(optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    if type(optimizer) is not MaskedSGD or len(optimizer.param_groups) != 1:
        return None
    g = optimizer.param_groups[0]
    params = list(g["params"])
    if torch.is_tensor(g["lr"]) or pick("masked_sgd", params[0], None if optimizer.backend == "auto"
                                        else optimizer.backend, extension=cpp_extension) != "cpp":
        return None
    if g["momentum"]:
        for p in params:  # MaskedSGD's first step makes its buffers as zeros
            optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
    bufs = [optimizer.state[p].get("momentum_buffer") for p in params]
    return dict(params=params, param_masks=[optimizer.masks.get(id(p)) for p in params], state1=bufs,
                state2=[None] * len(params), steps=[None] * len(params), optimizer="sgd", lr=float(g["lr"]),
                beta1=0.0, beta2=0.0, eps=0.0, weight_decay=float(g["weight_decay"]),
                momentum=float(g["momentum"]), nesterov=bool(g["nesterov"]))


def _objective_plan(objective, logits_rows: int) -> dict[str, Any] | None:
    if type(objective) is CrossEntropy:
        return dict(teacher=None, alpha=0.0, temperature=1.0, kd_sums=None, kd_one=None)
    if type(objective) is DistillationObjective:
        if objective.alpha == 0.0:
            return dict(teacher=None, alpha=0.0, temperature=1.0, kd_sums=None, kd_one=None)
        cached = objective.cached
        if (cached is None or cached.dim() != 2 or cached.shape[0] != logits_rows or cached.device.type != "cpu"
                or pick("kd_loss", cached, None, extension=cpp_extension) != "cpp"):
            return None
        if objective.sums is None:  # what its first call makes
            objective.sums = torch.zeros(3, device=cached.device)
            objective.one = torch.ones((), device=cached.device)
        return dict(teacher=cached, alpha=float(objective.alpha), temperature=float(objective.temperature),
                    kd_sums=objective.sums, kd_one=objective.one)
    return None


def fused_epoch(chain: Chain, inputs: torch.Tensor, labels: torch.Tensor, perm: torch.Tensor, batch_size: int,
                optimizer: torch.optim.Optimizer, objective) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One epoch through `mlp_epoch`, or None (nothing done) when the optimizer or objective is not one it runs.
    Returns the epoch's (loss sum, correct count) tensors, as `train_epoch` accumulates them."""
    ext = cpp_extension()
    if ext is None or not hasattr(ext, "mlp_epoch"):
        return None
    plan = _adam_plan(optimizer) or _sgd_plan(optimizer)
    obj = _objective_plan(objective, inputs.shape[0])
    if plan is None or obj is None:
        return None
    weights, biases, layer_masks, relu_after = chain.arguments()
    mine = {id(w) for w in weights} | {id(b) for b in biases if b is not None}
    if {id(p) for p in plan["params"]} != mine or len(plan["params"]) != len(mine):
        return None  # the optimizer steps tensors the chain does not hold, or misses some
    # MaskedAdam masks each gradient before its step; a masked layer's gradient already is (a bitwise no-op then)
    by_weight = {id(w): m for w, m in zip(weights, layer_masks)}
    grad_masks = []
    for p, m in zip(plan["params"], plan["param_masks"]):
        own = by_weight.get(id(p))
        grad_masks.append(None if m is None or (own is not None and torch.equal(own, m)) else m)
    if plan["optimizer"] == "sgd":
        grad_masks = [None] * len(grad_masks)
    loss_sum, correct = ext.mlp_epoch(inputs, labels, perm, batch_size, weights, biases, layer_masks, relu_after,
                                      plan["params"], grad_masks, plan["param_masks"], plan["state1"],
                                      plan["state2"], plan["steps"], plan["optimizer"], plan["lr"], plan["beta1"],
                                      plan["beta2"], plan["eps"], plan["weight_decay"], plan["momentum"],
                                      plan["nesterov"], obj["teacher"], obj["alpha"], obj["temperature"],
                                      obj["kd_sums"], obj["kd_one"])
    return loss_sum, correct


def fused_predict(chain: Chain, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Float32 logits of a normalised, flattened split through the chain, as `predict` computes them."""
    weights, biases, layer_masks, relu_after = chain.arguments()
    return cpp_extension().mlp_forward(inputs, batch_size, weights, biases, layer_masks, relu_after)
