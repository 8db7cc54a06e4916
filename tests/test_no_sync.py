"""The training loop never reads a device value back inside an epoch: host syncs do not grow with steps."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dsd2.config import DataConfig, ModelConfig, OptimConfig
from dsd2.data import DeviceDataset, build_splits
from dsd2.models import build_model
from dsd2.pruning import full_masks, global_prune, magnitude_scores
from dsd2.training import DistillationObjective, InputFormat, TrainFeed, build_optimizer, cross_entropy, train_epoch

SYNC_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")


@pytest.fixture
def count_syncs(monkeypatch):
    calls = {"n": 0, "ids": []}
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, **kwargs):
            calls["n"] += 1
            calls["ids"].append(id(self))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


def epoch_syncs(count_syncs, n_samples, objective_factory, optimizer="sgd"):
    splits = build_splits(DataConfig(noise=0.5), 0, torch.device("cpu"))
    data = DeviceDataset(splits.train.images[:n_samples], splits.train.labels[:n_samples])
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp"), (1, 8, 8), 10)
    masks = global_prune(magnitude_scores(model), full_masks(model), 0.5)
    opt = build_optimizer(model, masks, OptimConfig(optimizer=optimizer, lr=0.01))
    objective = objective_factory(model, data, splits)
    start = len(count_syncs["ids"])
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    train_epoch(model, opt, TrainFeed(data, 16, InputFormat(splits.mean, splits.std)), objective, perm)
    # torch's CPU Adam reads its step counter, a host-side scalar, once per step: not a device sync
    # (on CUDA the engine builds Adam with capturable=True, whose counters stay on the device)
    host_counters = {id(state["step"]) for state in opt.state.values() if torch.is_tensor(state.get("step"))}
    return sum(1 for i in count_syncs["ids"][start:] if i not in host_counters)


def ce(model, data, splits):
    return cross_entropy


def kd(model, data, splits):
    teacher = build_model(ModelConfig(name="mlp", hidden=(32,)), (1, 8, 8), 10).eval()
    return DistillationObjective(teacher, alpha=0.8, temperature=10.0)


@pytest.mark.parametrize("objective", [ce, kd], ids=["cross-entropy", "distillation"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_syncs_per_epoch_do_not_grow_with_steps(count_syncs, objective, optimizer):
    few = epoch_syncs(count_syncs, 64, objective, optimizer)  # 4 steps
    many = epoch_syncs(count_syncs, 512, objective, optimizer)  # 32 steps
    assert few == many <= 2  # the epoch's loss and accuracy, read once at its end


def predict_syncs(count_syncs, n_samples, graphed):
    from dsd2.ops import swap_in_counting_relus
    from dsd2.training import predict

    splits = build_splits(DataConfig(noise=0.5), 0, torch.device("cpu"))
    data = DeviceDataset(splits.train.images[:n_samples], splits.train.labels[:n_samples])
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp"), (1, 8, 8), 10)
    relus = swap_in_counting_relus(model)
    for r in relus.values():
        r.counting = True  # the counting pass: counts stay on the device too
    start = len(count_syncs["ids"])
    if graphed:
        from graph_emulator import EmulatedGraphs

        from dsd2.training.graphs import GraphedPredictor

        GraphedPredictor(model, 16, InputFormat(splits.mean, splits.std), relus=relus,
                         graphs=EmulatedGraphs()).predict(data)
    else:
        predict(model, data, 16, InputFormat(splits.mean, splits.std))
    return len(count_syncs["ids"]) - start


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graphed"])
def test_evaluation_and_counting_pass_make_no_host_read(count_syncs, graphed):
    assert predict_syncs(count_syncs, 64 + 5, graphed) == predict_syncs(count_syncs, 512 + 5, graphed) == 0


class HostTensors(TorchDispatchMode):
    """Every aten op that makes a CPU tensor or copies one to another device, while the batch lives on `device`;
    host reads of a value answer 0 (a meta tensor holds none) and are counted apart."""

    def __init__(self):
        super().__init__()
        self.host, self.reads = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
            return 0
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        made = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
        if made or any(t.device.type == "cpu" for t in inputs):
            self.host.append(func.__name__)
        return out


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
def test_the_eager_epoch_makes_no_host_tensor_per_batch(augment):
    """The engine's eager epoch with the batch on the meta device, which has no memory: a CPU tensor made per
    batch (a CPU generator's draw moved with `.to(device)`, a table, a constant) shows as an op with a CPU tensor
    in or out. The only host touch allowed is the epoch's one read of its loss and accuracy at the end."""
    splits = build_splits(DataConfig(noise=0.5), 0, torch.device("cpu"))
    meta = torch.device("meta")
    data = DeviceDataset(splits.train.images[:48].to(meta), splits.train.labels[:48].to(meta))
    with meta:
        model = build_model(ModelConfig(name="mlp", hidden=(16,)), (1, 8, 8), 10)
    opt = build_optimizer(model, full_masks(model), OptimConfig(optimizer="sgd", lr=0.01))
    fmt = InputFormat(splits.mean.to(meta), splits.std.to(meta))
    # the engine draws the crops from a generator on the batch's device; meta has no generator of its own, and
    # a CPU one passed to a meta draw makes no CPU tensor
    generator = torch.Generator().manual_seed(0) if augment else None
    with HostTensors() as seen:
        train_epoch(model, opt, TrainFeed(data, 16, fmt, augment=augment), cross_entropy,
                    torch.arange(48, device=meta), generator)
    assert seen.host == []
    assert seen.reads == 2  # float(loss_sum), float(correct)
