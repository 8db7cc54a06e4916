"""ReLU call sites: one counter per place the forward applies a ReLU, with counts equal to an independent
per-call recording; outputs, gradients and state dicts equal to the original model's; untraceable code refused."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

from dsd2.config import ModelConfig
from dsd2.models import build_model
from dsd2.ops import CountingReLU, ReLUSiteError, count_relu_call_sites, swap_in_counting_relus


def per_element_counts(y: torch.Tensor) -> torch.Tensor:
    return (y > 0).reshape(y.shape[0], -1).sum(0)


def counted_pass(traced, counters, x):
    for c in counters.values():
        c.counting = True
        c.reset_counts()
    return traced(x)


def assert_counts_equal(counters, recorded, samples):
    assert len(counters) == len(recorded)
    for (name, counter), want in zip(counters.items(), recorded):
        assert counter.observations == samples, name
        assert torch.equal(counter.counts, want), name


def random_images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---- torchvision: reused and in-place ReLU modules -----------------------------------------------------------

def test_resnet18_has_17_sites_with_the_counts_of_per_call_hooks():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = random_images(6)
    recorded = []  # forward hooks fire once per call of a module: one entry per call site, in execution order
    hooks = [m.register_forward_hook(lambda m, i, out: recorded.append(per_element_counts(out)))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        want = model(x)
    for h in hooks:
        h.remove()
    traced, counters = count_relu_call_sites(model)
    assert len(counters) == 17
    assert list(counters)[:5] == ["relu", "layer1.0.relu", "layer1.0.relu#2", "layer1.1.relu", "layer1.1.relu#2"]
    assert list(counters)[-1] == "layer4.1.relu#2"
    with torch.no_grad():
        out = counted_pass(traced, counters, x)
    assert torch.equal(out, want)
    assert_counts_equal(counters, recorded, samples=6)
    assert all(c.inplace for c in counters.values())  # torchvision's ReLUs are inplace=True, and stay so


def test_resnet18_state_dict_is_the_originals():
    model = torchvision.models.resnet18(num_classes=10)
    traced, _ = count_relu_call_sites(model)
    ours, theirs = traced.state_dict(), model.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].data_ptr() == theirs[k].data_ptr() for k in ours)  # shared, not copied
    traced.load_state_dict(torchvision.models.resnet18(num_classes=10).state_dict())  # a checkpoint loads
    assert torch.equal(model.fc.weight, traced.fc.weight)
    assert list(copy.deepcopy(traced).state_dict()) == list(theirs)


@pytest.mark.parametrize("builder, sites", [
    (torchvision.models.resnet50, 1 + 16 * 3),  # stem, then three ReLU calls (one module) per bottleneck
    (torchvision.models.vgg11_bn, 8 + 2),  # eight convs and two hidden linears
])
def test_torchvision_models_trace_to_the_right_number_of_sites(builder, sites):
    model = builder(num_classes=10).eval()
    traced, counters = count_relu_call_sites(model)
    assert len(counters) == sites
    x = random_images(2)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(counted_pass(traced, counters, x), want)
    assert {c.observations for c in counters.values()} == {2}


# ---- every kind of functional and module ReLU, one layer each -------------------------------------------------

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return F.relu(self.fc(x)).clamp(-1.0, 6.0)  # a clamp with other bounds is no ReLU


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(8 if i else 5, 8) for i in range(11))
        self.shared = nn.ReLU()
        self.act = nn.ReLU(inplace=True)
        self.block = Block()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        f = self.fcs
        x = self.shared(f[0](x))
        x = self.shared(f[1](x))  # the same module again: a second layer
        x = self.act(f[2](x))
        x = F.relu(f[3](x))
        x = torch.relu(f[4](x))
        x = f[5](x).relu()
        x = f[6](x).clamp_min(0)
        x = F.relu(f[7](x), inplace=True)
        y = f[8](x)
        y.relu_()  # in place: later uses of y see the ReLU's output
        x = torch.clamp(f[9](y), min=0).clamp(max=2.0)
        x = self.block(f[10](x) + y)
        return self.head(self.block(x))  # the block twice: its F.relu twice


MIXED_SITES = ["shared", "shared#2", "act", "relu()", "relu()#2", "relu()#3", "clamp_min()", "relu()#4",
               "relu_()", "clamp()", "block.relu()", "block.relu()#2"]


def is_relu_call(func, args, kwargs) -> bool:
    """The test's own definition of a ReLU call, for recording: a ReLU function or method, or a clamp with lower
    bound 0 and no upper bound."""
    name = getattr(func, "__name__", "")
    if name in ("relu", "relu_"):
        return True
    if name in ("clamp", "clamp_min"):
        low = args[1] if len(args) > 1 else kwargs.get("min")
        high = args[2] if len(args) > 2 else kwargs.get("max")
        return low == 0 and high is None
    return False


class RecordReLUCalls(TorchFunctionMode):
    """Records the on-state counts of every ReLU call's output, in call order (modules call F.relu)."""

    def __init__(self):
        super().__init__()
        self.recorded = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if is_relu_call(func, args, kwargs or {}):
            self.recorded.append(per_element_counts(out))
        return out


def test_every_kind_of_relu_is_one_layer_with_exact_counts_outputs_and_gradients():
    torch.manual_seed(0)
    model = Mixed()
    x = torch.randn(9, 5)
    with RecordReLUCalls() as recorder:
        want = model(x)
    want.sum().backward()
    want_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    traced, counters = count_relu_call_sites(model)
    assert list(counters) == MIXED_SITES
    assert [c.inplace for c in counters.values()] == [False, False, True, False, False, False, False, True, True,
                                                      False, False, False]
    out = counted_pass(traced, counters, x)
    assert torch.equal(out, want)
    assert_counts_equal(counters, recorder.recorded, samples=9)
    out.sum().backward()
    assert all(torch.equal(p.grad, want_grads[k]) for k, p in traced.named_parameters())
    assert list(traced.state_dict()) == list(model.state_dict())


def test_counters_are_not_counting_until_asked_and_the_original_model_is_untouched():
    model = Mixed()
    before = [(n, type(m)) for n, m in model.named_modules()]
    traced, counters = count_relu_call_sites(model)
    x = torch.randn(4, 5)
    assert torch.equal(traced(x), model(x))
    assert all(c.counts is None and c.observations == 0 for c in counters.values())
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    assert list(traced.relu_sites) == list(counters.values())


def test_channel_granularity_and_inclusive_reach_every_counter():
    traced, counters = count_relu_call_sites(Mixed(), granularity="channel", inclusive=True)
    assert all(isinstance(c, CountingReLU) and c.granularity == "channel" and c.inclusive
               for c in counters.values())
    with pytest.raises(ValueError, match="granularity 'pixel' is not known"):
        count_relu_call_sites(Mixed(), granularity="pixel")


class ConvWithReLU(nn.Conv2d):
    def forward(self, x):
        return F.relu(super().forward(x))


def test_a_torch_layer_subclass_that_applies_a_relu_is_traced_into():
    model = nn.Sequential(ConvWithReLU(3, 4, 3), nn.Flatten())
    traced, counters = count_relu_call_sites(model)
    assert list(counters) == ["0.relu()"]
    x = random_images(2)
    assert torch.equal(counted_pass(traced, counters, x), model(x))


# ---- dsd2's own models: the same layers as swap_in_counting_relus ---------------------------------------------

@pytest.mark.parametrize("name, shape", [("mlp", (1, 28, 28)), ("lenet300", (1, 28, 28)), ("lenet5", (1, 28, 28)),
                                         ("vgg", (3, 32, 32)), ("resnet18", (3, 32, 32))])
def test_dsd2_models_have_the_layer_names_of_swap_in_counting_relus(name, shape):
    """Every ReLU of dsd2's models is its own module called once: existing runs' `relu_layers` do not change."""
    model = build_model(ModelConfig(name=name), shape, 10).eval()
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    traced, counters = count_relu_call_sites(model)
    with torch.no_grad():
        assert torch.equal(counted_pass(traced, counters, x), want)
    assert {c.observations for c in counters.values()} == {3}
    assert list(counters) == list(swap_in_counting_relus(model))


# ---- refused, in one sentence naming the part -----------------------------------------------------------------

class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return F.relu(x)
        return x


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.fc(x))


def test_data_dependent_control_flow_is_refused_naming_the_submodule_and_the_code():
    with pytest.raises(ReLUSiteError) as err:
        count_relu_call_sites(Gated())
    message = str(err.value)
    assert "submodule 'gate' (Gate)" in message and "`if x.sum() > 0:`" in message
    assert "\n" not in message and message.count(". ") == 0


def test_a_relu_hidden_inside_a_torch_layer_is_refused():
    model = nn.Sequential(nn.Linear(8, 8), nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
    with pytest.raises(ReLUSiteError, match=r"submodule '1' \(TransformerEncoderLayer\) .*ReLU"):
        count_relu_call_sites(model)
