"""Activations beyond ReLU: GELU, SiLU, Hardswish and LeakyReLU counted by the sign of their input, ReLU6 and
Hardtanh by their three regimes, one counter per call site, with counts equal to an independent per-call
recording and outputs and gradients equal to the original model's; the three-state entropy; the drop-in
`swap_in_counting_relus` refusing a module called twice; a model with no supported activation in the loop."""

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

import dsd2
from dsd2.analysis.entropy import neuron_entropy_bits, summarize
from dsd2.ops import (
    SUPPORTED_ACTIVATIONS,
    CountingReLU,
    ReLUSiteError,
    StateCounter,
    count_positive_reference,
    count_relu_call_sites,
    swap_in_counting_relus,
)
from dsd2.runs import read_jsonl

# the test's own table: the functional each activation reaches (modules call these), and its thresholds
SIGN = {"gelu", "silu", "hardswish", "leaky_relu", "leaky_relu_"}
RELU6 = {"relu6"}
HARDTANH = {"hardtanh", "hardtanh_"}


def thresholds_of(name, args, kwargs):
    if name in SIGN:
        return (0.0,)
    if name in RELU6:
        return (0.0, 6.0)
    if name in HARDTANH:
        low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        high = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
        return (float(low), float(high))
    return None


class RecordActivationInputs(TorchFunctionMode):
    """Per call of a supported non-ReLU activation, in call order: how many samples had each input element
    above each threshold (computed before the call: in-place activations overwrite their input)."""

    def __init__(self):
        super().__init__()
        self.recorded = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ts = thresholds_of(getattr(func, "__name__", ""), args, kwargs)
        if ts is not None:
            x = args[0]
            rows = [(x > t).reshape(x.shape[0], -1).sum(0) for t in ts]
            self.recorded.append((ts, rows[0] if len(rows) == 1 else torch.stack(rows)))
        return func(*args, **kwargs)


class Acts(nn.Module):
    def __init__(self):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(6 if i == 0 else 8, 8) for i in range(11))
        self.gelu = nn.GELU()
        self.silu = nn.SiLU()
        self.hs = nn.Hardswish()
        self.leaky = nn.LeakyReLU(0.1)
        self.relu6 = nn.ReLU6(inplace=True)
        self.ht = nn.Hardtanh(-2.0, 3.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        f = self.fcs
        x = self.gelu(f[0](x))
        x = self.gelu(f[1](x))  # the same module again: a second layer
        x = self.silu(f[2](x))
        x = self.hs(f[3](x) * 4)
        x = self.leaky(f[4](x))
        x = self.relu6(f[5](x) * 12)  # scaled so that some inputs saturate
        x = self.ht(f[6](x) * 4)
        x = F.gelu(f[7](x), approximate="tanh")
        x = F.hardtanh(f[8](x) * 3, -0.5, 0.5)
        x = F.relu6(f[9](x) * 20)
        x = torch.tanh(F.leaky_relu(f[10](x), 0.2))  # tanh: no states counted
        return self.head(x)


ACTS_SITES = {"gelu": (0.0,), "gelu#2": (0.0,), "silu": (0.0,), "hs": (0.0,), "leaky": (0.0,),
              "relu6": (0.0, 6.0), "ht": (-2.0, 3.0), "gelu()": (0.0,), "hardtanh()": (-0.5, 0.5),
              "relu6()": (0.0, 6.0), "leaky_relu()": (0.0,)}


def counted_pass(traced, counters, x):
    for c in counters.values():
        c.counting = True
        c.reset_counts()
    return traced(x)


def test_every_supported_activation_is_one_layer_with_exact_counts_outputs_and_gradients():
    torch.manual_seed(0)
    model = Acts()
    x = torch.randn(33, 6)
    with RecordActivationInputs() as recorder:
        want = model(x)
    want.sum().backward()
    want_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    traced, counters = count_relu_call_sites(model)
    assert {n: c.thresholds for n, c in counters.items()} == ACTS_SITES
    assert all(isinstance(c, StateCounter) for c in counters.values())
    out = counted_pass(traced, counters, x)
    assert torch.equal(out, want)
    out.sum().backward()
    assert all(torch.equal(p.grad, want_grads[k]) for k, p in traced.named_parameters())
    assert len(recorder.recorded) == len(counters)
    for (name, counter), (ts, counts) in zip(counters.items(), recorder.recorded):
        assert counter.thresholds == ts and counter.observations == 33, name
        assert torch.equal(counter.counts, counts), name
    # the three-regime sites saw every regime, so the test reaches the saturated rows
    for name in ("relu6", "ht", "hardtanh()", "relu6()"):
        above_low, above_high = counters[name].counts
        assert int(above_high.sum()) > 0 and int((above_low - above_high).sum()) > 0, name
    assert list(traced.state_dict()) == list(model.state_dict())


def test_relus_and_other_activations_mix_in_execution_order():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4), nn.ReLU6(),
                          nn.Linear(4, 2))
    traced, counters = count_relu_call_sites(model, granularity="element", inclusive=True)
    assert list(counters) == ["1", "3", "5"]
    assert [type(c) for c in counters.values()] == [CountingReLU, StateCounter, StateCounter]
    assert all(c.inclusive for c in counters.values())
    x = torch.randn(7, 4)
    assert torch.equal(counted_pass(traced, counters, x), model(x))


@pytest.mark.parametrize("inclusive", [False, True])
@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_state_counter_counts_each_threshold_exactly_and_passes_its_input_on(granularity, inclusive):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-3, 9, (5, 3, 4, 4), generator=g).float()  # integers: many inputs exactly on a bound
    counter = StateCounter((0.0, 6.0), granularity=granularity, inclusive=inclusive)
    assert counter(x) is x and counter.counts is None  # not counting: nothing kept
    counter.counting = True
    assert counter(x) is x
    per_channel = granularity == "channel"
    for row, t in zip(counter.counts, (0.0, 6.0)):
        want = count_positive_reference(x - t, torch.zeros_like(row), inclusive=inclusive, per_channel=per_channel)
        assert torch.equal(row, want)
    assert counter.observations == (5 * 16 if per_channel else 5)
    with pytest.raises(ValueError, match=r"thresholds \(6.0, 0.0\) must be"):
        StateCounter((6.0, 0.0))


def test_three_state_entropy_by_hand():
    # 10 observations; counts above lo, above hi per neuron
    counts = torch.tensor([[10, 5, 10, 0, 6],
                           [0, 0, 5, 0, 3]])
    h = neuron_entropy_bits(counts, 10)
    # neuron 0: always linear (0 bits); 1: half off, half linear (1 bit, as the two-state value);
    # 2: half linear, half saturated (1 bit); 3: always off; 4: 0.4 / 0.3 / 0.3
    want = [0.0, 1.0, 1.0, 0.0, -(0.4 * math.log2(0.4) + 2 * 0.3 * math.log2(0.3))]
    assert torch.allclose(h, torch.tensor(want, dtype=torch.float64), atol=1e-12)
    assert float(neuron_entropy_bits(counts[0], 10)[1]) == 1.0
    uniform = neuron_entropy_bits(torch.tensor([[20], [10]]), 30)
    assert abs(float(uniform) - math.log2(3)) < 1e-12
    summary = summarize({"a": (counts, 10), "b": (torch.tensor([5, 10]), 10)})
    assert abs(summary.per_layer["b"] - 0.5) < 1e-12 and summary.neurons == 7


def test_mobilenet_v2_counts_its_35_relu6_sites_exactly():
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), RecordActivationInputs() as recorder:
        want = model(x)
    traced, counters = count_relu_call_sites(model)
    assert len(counters) == 35 and {c.thresholds for c in counters.values()} == {(0.0, 6.0)}
    assert list(counters)[:2] == ["features.0.2", "features.1.conv.0.2"]
    with torch.no_grad():
        assert torch.equal(counted_pass(traced, counters, x), want)  # ReLU6(inplace=True) stays in place
    assert all(torch.equal(c.counts, r) for c, (_, r) in zip(counters.values(), recorder.recorded))
    e = summarize({n: (c.counts, c.observations) for n, c in counters.items()})
    assert 0.0 < e.mean_over_layers < math.log2(3)


class ComputedBounds(nn.Module):
    def forward(self, x):
        return F.hardtanh(x, -1.0, x.shape[1] * 1.0 + x.mean())


def test_bounds_computed_in_the_forward_are_refused():
    with pytest.raises(ReLUSiteError, match=r"hardtanh\(\) .*bounds computed in the forward"):
        count_relu_call_sites(ComputedBounds())


def test_a_gelu_hidden_inside_a_torch_layer_is_refused():
    model = nn.Sequential(nn.Linear(8, 8), nn.TransformerEncoderLayer(8, 2, 16, activation="gelu",
                                                                       batch_first=True))
    with pytest.raises(ReLUSiteError, match=r"submodule '1' \(TransformerEncoderLayer\) applies gelu"):
        count_relu_call_sites(model)
    held = nn.Sequential(nn.Linear(8, 8), nn.TransformerEncoderLayer(8, 2, 16, activation=nn.GELU(),
                                                                     batch_first=True))
    with pytest.raises(ReLUSiteError, match=r"holds an activation module \('activation', GELU\)"):
        count_relu_call_sites(held)


# ---- the drop-in: one counter per module, a second call in one forward refused ---------------------------------

def test_swap_in_counting_relus_refuses_resnet18s_twice_called_relus():
    model = torchvision.models.resnet18(num_classes=10).eval()
    relus = swap_in_counting_relus(model)
    assert len(relus) == 9  # one module per BasicBlock, called twice
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)  # not counting: nothing to merge
        for r in relus.values():
            r.counting = True
        with pytest.raises(ReLUSiteError) as err:
            model(x)
    message = str(err.value)
    assert "'layer1.0.relu' ran twice in one forward of ResNet" in message
    assert "count_relu_call_sites" in message and "\n" not in message
    # the per-call-site path counts all 17, and a submodule called on its own is not a whole forward
    traced, counters = count_relu_call_sites(torchvision.models.resnet18(num_classes=10))
    assert len(counters) == 17 and "layer1.0.relu#2" in counters
    relu = model.layer1[0].relu
    relu.reset_counts()
    with torch.no_grad():
        relu(torch.randn(2, 4))
        relu(torch.randn(2, 4))
    assert relu.observations == 4


def test_swapped_relus_called_once_count_and_survive_deepcopy_and_pickle():
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    relus = swap_in_counting_relus(model)
    assert swap_in_counting_relus(model).keys() == relus.keys()  # again: the same counters, no second hooks
    assert len(model._forward_pre_hooks) == 1
    x = torch.randn(8, 5)
    for copied in (model, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        counters = [m for m in copied.modules() if isinstance(m, CountingReLU)]
        for r in counters:
            r.counting, r.counts, r.observations = True, None, 0
        with torch.no_grad():
            copied(x)
            copied(x)  # two forwards: each counter once per forward
        assert [r.observations for r in counters] == [16, 16]


# ---- the loop: entropy on GELU models, one sentence when nothing is counted ------------------------------------

def tiny_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 6, 6), generator=g, dtype=torch.uint8), torch.randint(0, 3, (n,), generator=g)


CONFIG = {"optim": {"optimizer": "sgd", "lr": 0.05, "epochs": 1, "dense_epochs": 1, "batch_size": 16},
          "prune": {"levels": 1}, "precision": "fp32"}


@pytest.mark.parametrize("activation, entropy", [(nn.GELU, True), (nn.Hardtanh, True), (nn.Tanh, False)])
def test_the_loop_counts_other_activations_or_says_why_not(tmp_path, activation, entropy):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), activation(), nn.Linear(16, 3))
    lines = []
    summary = dsd2.prune(model, tiny_data(64, 1), tiny_data(32, 2), val=tiny_data(32, 3), out=tmp_path / "run",
                         config=CONFIG, log=lines.append)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert summary["levels"] == 2
    said = [line for line in lines if "entropy and the entropy early stop are off" in line]
    if entropy:
        assert all(0.0 <= r["entropy_mean"] <= math.log2(3) for r in rows) and not said
        assert summary["relu_layers"] == ["2"]
    else:
        assert all("entropy_mean" not in r for r in rows)
        assert len(said) == 1 and SUPPORTED_ACTIVATIONS in said[0]
