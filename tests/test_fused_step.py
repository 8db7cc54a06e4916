"""The fused CPU epoch of Linear/ReLU chains (csrc/mlp_epoch.cpp, dsd2/training/fused_step.py): the eager epoch
bit for bit (weights, gradients, optimizer state, loss and accuracy sums) for Adam and SGD, cross-entropy and KD,
masked and unmasked layers, a last batch smaller than the others, and weights not yet zero where pruned; the
evaluation pass likewise; which models it takes, and the eager fallback and refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dsd2 import rng
from dsd2.config import ConfigError, ModelConfig, OptimConfig
from dsd2.data import DeviceDataset
from dsd2.models import MLP, build_model
from dsd2.ops import CountingReLU, cpp_extension, swap_in_counting_relus
from dsd2.ops.masked_layers import set_layer_masks, swap_in_masked_layers
from dsd2.pruning import global_prune, prunable_weights, select_prunable
from dsd2.training import InputFormat, TrainFeed, build_optimizer, cross_entropy
from dsd2.training.distributed import DistContext
from dsd2.training.executor import EagerExecutor, FusedCpuExecutor, make_executor
from dsd2.training.fused_step import linear_relu_chain
from dsd2.training.objectives import DistillationObjective

pytestmark = pytest.mark.skipif(cpp_extension() is None, reason="dsd2._C is not built")

N, SIDE, CLASSES = 203, 6, 7  # 203 = 3 batches of 64 and one of 11


def data(seed: int = 0) -> DeviceDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (N, 1, SIDE, SIDE), dtype=torch.uint8, generator=g)
    return DeviceDataset(images, torch.randint(0, CLASSES, (N,), generator=g))


def model_and_masks(hidden=(32, 24), sparsity=0.7, bias=True, exclude_last=False, dirty=False):
    torch.manual_seed(3)
    model = MLP(SIDE * SIDE, hidden, CLASSES)
    if not bias:
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.bias = None
    if exclude_last:  # the last layer left out of pruning: a plain nn.Linear in the chain
        last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        select_prunable(model, exclude=(f"{last}.weight",))
    weights = prunable_weights(model)
    masks = global_prune({k: w.detach().abs() for k, w in weights.items()},
                         {k: torch.ones_like(w, dtype=torch.bool) for k, w in weights.items()}, sparsity)
    if not dirty:
        with torch.no_grad():
            for k, w in weights.items():
                w.mul_(masks[k])
    return model, masks


def masked(model, masks):
    model, _ = swap_in_masked_layers(model)
    model_masks = {k: m for k, m in masks.items()}
    set_layer_masks(model, model_masks)
    return model


def feed_of(d: DeviceDataset, batch: int = 64) -> TrainFeed:
    return TrainFeed(d, batch, InputFormat(torch.tensor([120.0]), torch.tensor([70.0])))


def optimizer_for(model, masks, kind: str, weight_decay: float = 0.0, nesterov: bool = False):
    cfg = OptimConfig(optimizer=kind, lr=0.01 if kind == "sgd" else 1e-3, momentum=0.9, weight_decay=weight_decay,
                      nesterov=nesterov)
    return build_optimizer(model, masks, cfg)


def executors(model, masks, objective_of, kind, batch=64, **opt):
    d = data()
    out = []
    for fused in (False, True):
        m = copy.deepcopy(model)
        pm = {k: v.clone() for k, v in masks.items()}
        m = masked(m, pm)
        objective = objective_of(m, d)
        cls = FusedCpuExecutor if fused else EagerExecutor
        kwargs = {"chain": linear_relu_chain(m, (1, SIDE, SIDE))[0], "required": True} if fused else {}
        ex = cls(m, feed_of(d, batch), objective, {}, 0, CLASSES, dist_ctx=DistContext(), **kwargs)
        out.append((ex, optimizer_for(m, pm, kind, **opt), pm))
    return out


def state(ex, opt):
    params = {k: v.detach().clone() for k, v in ex.model.state_dict().items()}
    grads = {k: p.grad.clone() for k, p in ex.model.named_parameters() if p.grad is not None}
    opt_state = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for s in opt.state.values()]
    return params, grads, opt_state


def assert_same(a, b):
    pa, ga, sa = a
    pb, gb, sb = b
    assert pa.keys() == pb.keys() and ga.keys() == gb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    for k in ga:
        assert torch.equal(ga[k], gb[k]), k
        # the sign of a zero too: the fused path accumulates as autograd does
        assert torch.equal(torch.signbit(ga[k]), torch.signbit(gb[k])), k
    assert len(sa) == len(sb)
    for x, y in zip(sa, sb):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k]


def ce(model, d):
    return cross_entropy


def kd(model, d):
    g = torch.Generator().manual_seed(5)
    return DistillationObjective(nn.Identity(), 0.8, 4.0, torch.randn(N, CLASSES, generator=g) * 3)


CASES = {
    "adam": dict(kind="adam"),
    "adam-weight-decay": dict(kind="adam", weight_decay=1e-3),
    "sgd-momentum-decay": dict(kind="sgd", weight_decay=5e-4),
    "sgd-nesterov": dict(kind="sgd", nesterov=True),
}


@pytest.mark.parametrize("objective", [ce, kd], ids=["ce", "kd"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_the_fused_epoch_is_the_eager_epoch_bit_for_bit(case, objective):
    model, masks = model_and_masks()
    (eager, eopt, emasks), (fused, fopt, fmasks) = executors(model, masks, objective, **CASES[case])
    for epoch in range(3):
        lr = 0.01 / (epoch + 1) if CASES[case]["kind"] == "sgd" else 1e-3 / (epoch + 1)
        a = eager.train_epoch(eopt, 1, epoch, lr)
        b = fused.train_epoch(fopt, 1, epoch, lr)
        assert a == b
        assert_same(state(eager, eopt), state(fused, fopt))
        for name, w in prunable_weights(fused.model).items():
            assert torch.all(w[~fmasks[name]] == 0)
    if objective is kd:
        assert "kd_ce" in a and a["kd_kl"] > 0
    # evaluation: the fused pass gives the eager logits
    d = data(1)
    assert torch.equal(eager.predict(d), fused.predict(d))


@pytest.mark.parametrize("variant", ["no-bias", "unpruned-last-layer", "dirty-weights", "one-hidden", "batch-1000"])
def test_the_fused_epoch_matches_in_the_corners(variant):
    kw = {"no-bias": dict(bias=False), "unpruned-last-layer": dict(exclude_last=True),
          "dirty-weights": dict(dirty=True), "one-hidden": dict(hidden=(40,))}.get(variant, {})
    batch = 1000 if variant == "batch-1000" else 64  # one batch bigger than the split
    model, masks = model_and_masks(**kw)
    (eager, eopt, _), (fused, fopt, _) = executors(model, masks, ce, "adam", batch=batch)
    for epoch in range(2):
        assert eager.train_epoch(eopt, 0, epoch, 1e-3) == fused.train_epoch(fopt, 0, epoch, 1e-3)
        assert_same(state(eager, eopt), state(fused, fopt))


def test_a_counting_epoch_and_a_counting_pass_run_eagerly_and_count_the_same():
    model, masks = model_and_masks()
    counts = []
    for cls in (EagerExecutor, FusedCpuExecutor):
        m = masked(copy.deepcopy(model), {k: v.clone() for k, v in masks.items()})
        relus = swap_in_counting_relus(m)
        d = data()
        kwargs = {"chain": linear_relu_chain(m, (1, SIDE, SIDE))[0]} if cls is FusedCpuExecutor else {}
        ex = cls(m, feed_of(d), cross_entropy, relus, 0, CLASSES, dist_ctx=DistContext(), **kwargs)
        opt = optimizer_for(m, masks, "adam")
        ex.train_epoch(opt, 0, 0, 1e-3)
        ex.train_epoch(opt, 0, 1, 1e-3, counting=True)
        online = [r.counts.clone() for r in relus.values()]
        ex.count(d)
        counts.append((online, [r.counts.clone() for r in relus.values()], m.state_dict()))
    (o1, p1, s1), (o2, p2, s2) = counts
    assert all(torch.equal(a, b) for a, b in zip(o1, o2)) and all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_another_optimizer_runs_the_eager_epoch_unless_fused_is_required():
    model, masks = model_and_masks()
    m = masked(model, masks)
    d = data()
    chain = linear_relu_chain(m, (1, SIDE, SIDE))[0]
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    ex = FusedCpuExecutor(m, feed_of(d), cross_entropy, {}, 0, CLASSES, dist_ctx=DistContext(), chain=chain)
    stats = ex.train_epoch(opt, 0, 0, 0.01)  # plain torch.optim.SGD: the eager epoch
    assert 0 <= stats["train_acc"] <= 1
    required = FusedCpuExecutor(m, feed_of(d), cross_entropy, {}, 0, CLASSES, dist_ctx=DistContext(), chain=chain,
                                required=True)
    with pytest.raises(ConfigError, match="--cpu-step fused runs MaskedAdam or MaskedSGD"):
        required.train_epoch(opt, 0, 0, 0.01)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(36, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(self.a(x.flatten(1)))


class _Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.relu = nn.Linear(36, 8), nn.ReLU()

    def forward(self, x):
        h = self.a(x.flatten(1))
        return self.relu(h) + h


@pytest.mark.parametrize("model, why", [
    (lambda: build_model(ModelConfig(name="lenet5"), (1, 28, 28), 10), "cannot be traced"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(32, 3)), "is a Conv2d"),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.Dropout(0.5), nn.Linear(8, 3)), "is a Dropout"),
    (_Twice, "follows a linear layer without a ReLU between"),
    (_Branch, "is not a Linear, ReLU or Flatten module applied to the previous output"),
    (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), "sees unflattened images"),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU()), "does not end in a linear layer"),
])
def test_models_that_are_not_a_linear_relu_chain_are_named_with_the_reason(model, why):
    chain, reason = linear_relu_chain(model(), (1, SIDE, SIDE))
    assert chain is None and why in reason


def test_the_mlps_and_their_traced_counting_form_are_chains():
    for name, hidden in (("mlp", (256, 256)), ("lenet300", ())):
        model = build_model(ModelConfig(name=name, hidden=hidden) if hidden else ModelConfig(name=name),
                            (1, 8, 8) if name == "mlp" else (1, 28, 28), 10)
        shape = (1, 8, 8) if name == "mlp" else (1, 28, 28)
        chain, _ = linear_relu_chain(model, shape)
        assert chain is not None and chain.relu_after[-1] is False and all(chain.relu_after[:-1])
    from dsd2.ops.relu_sites import count_relu_call_sites

    traced, relus = count_relu_call_sites(MLP(36, (8, 8), 3))
    chain, _ = linear_relu_chain(traced, (1, 6, 6))
    assert chain is not None and len(chain.layers) == 3 and isinstance(next(iter(relus.values())), CountingReLU)


def test_make_executor_picks_the_fused_epoch_only_where_it_runs():
    model, masks = model_and_masks()
    m = masked(model, masks)
    d = data()
    args = (m, feed_of(d), cross_entropy, {}, 0, CLASSES)
    assert make_executor(*args, dist_ctx=DistContext()).mode == "fused-cpu"
    assert make_executor(*args, dist_ctx=DistContext(), cpu_step="eager").mode == "eager"
    bf16 = TrainFeed(d, 64, InputFormat(torch.tensor([120.0]), torch.tensor([70.0]), "bf16"))
    assert make_executor(m, bf16, cross_entropy, {}, 0, CLASSES, dist_ctx=DistContext()).mode == "eager"
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(32, CLASSES))
    with pytest.raises(ConfigError, match="--cpu-step fused needs a chain of Flatten, Linear and ReLU modules.*"
                                          "use --cpu-step auto or eager"):
        make_executor(conv, feed_of(d), cross_entropy, {}, 0, CLASSES, dist_ctx=DistContext(), cpu_step="fused")


def test_the_shuffle_order_is_the_eager_epochs():
    """Both executors draw their order from the named shuffle stream: the fused one adds no draw of its own."""
    model, masks = model_and_masks()
    m = masked(model, masks)
    ex = FusedCpuExecutor(m, feed_of(data()), cross_entropy, {}, 4, CLASSES, dist_ctx=DistContext(),
                          chain=linear_relu_chain(m, (1, SIDE, SIDE))[0])
    expected = torch.randperm(N, generator=rng.generator("shuffle", 4, 2, 3))
    assert torch.equal(ex.epoch_order(2, 3), expected)
