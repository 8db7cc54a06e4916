"""The level loop on masked layers: the prunable layers are MaskedLinear / MaskedConv2d, the curves on the digits
MLP and on a VGG-like (synthetic CIFAR, bf16 autocast where native, channels_last) equal the plain layers' bit for
bit, a pruned weight is exactly 0.0 after every optimizer step, checkpoints keep the plain-layer layout, and a run
killed by release 0.1.0 (plain layers) resumes on masked layers exactly as on plain ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import dsd2.run.loop as loop_module
from dsd2.ops import MaskedConv2d, MaskedLinear, masked_layers
from dsd2.pruning import prunable_weights
from dsd2.run import LevelLoop
from dsd2.runs import RunDir, load_checkpoint, read_jsonl

VOLATILE = {"wall_time_s", "train_time_s", "images_per_s", "achieved_flop_per_s", "best", "kernels"}
KILLED = Path(__file__).parent / "fixtures" / "runs-0.1.0" / "killed"


def stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def plain_layers(monkeypatch):
    """The loop as it was before the switch: its layers stay the model's own."""
    monkeypatch.setattr(loop_module, "swap_in_masked_layers", lambda model, **kwargs: (model, {}))


def run(cfg, path):
    engine = LevelLoop(cfg, RunDir(path), progress=False, log=lambda s: None)
    engine.run()
    return engine, stable(read_jsonl(path / "metrics.jsonl")), stable(read_jsonl(path / "epochs.jsonl"))


@pytest.mark.slow
def test_the_digits_curve_is_the_plain_layers_bit_for_bit(tmp_path, tiny_config, monkeypatch):
    cfg = tiny_config()
    masked, rows, epochs = run(cfg, tmp_path / "masked")
    assert {type(m) for m in masked_layers(masked.model).values()} == {MaskedLinear}
    assert set(masked_layers(masked.model)) == set(prunable_weights(masked.model))
    plain_layers(monkeypatch)
    plain, plain_rows, plain_epochs = run(cfg, tmp_path / "plain")
    assert not masked_layers(plain.model)
    assert rows == plain_rows and epochs == plain_epochs
    assert [r["level"] for r in rows] == [0, 1, 2, 3]


@pytest.mark.slow
def test_a_vgg_like_curve_on_synthetic_cifar_is_the_plain_layers_bit_for_bit(tmp_path, fake_cifar, tiny_config,
                                                                          monkeypatch):
    """Four blocks reach a 4x4 map (the CPU's small-map weight gradient); bf16 autocast where the CPU has it."""
    cfg = tiny_config(data__dataset="cifar10", data__data_root=str(fake_cifar), data__noise=0.2,
                      data__augment=True, model__name="vgg", model__depth=4, model__width=2,
                      optim__optimizer="sgd", optim__lr=0.01, optim__batch_size=16, prune__levels=2)
    masked, rows, epochs = run(cfg, tmp_path / "masked")
    kinds = {type(m) for m in masked_layers(masked.model).values()}
    assert kinds == {MaskedConv2d, MaskedLinear} and len(masked_layers(masked.model)) == 9
    plain_layers(monkeypatch)
    _, plain_rows, plain_epochs = run(cfg, tmp_path / "plain")
    assert rows == plain_rows and epochs == plain_epochs
    assert rows[-1]["sparsity"] == pytest.approx(0.36, abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_pruned_weight_is_exactly_zero_after_every_optimizer_step(tmp_path, tiny_config, monkeypatch, optimizer):
    steps = {"n": 0}
    build = loop_module.build_optimizer

    def checked(model, masks, cfg):
        opt = build(model, masks, cfg)
        step = opt.step

        def step_and_check(*args, **kwargs):
            out = step(*args, **kwargs)
            for name, layer in masked_layers(model).items():
                assert torch.equal(layer.mask, masks[name])
                assert bool((layer.weight[~layer.mask] == 0).all())
            steps["n"] += 1
            return out

        opt.step = step_and_check
        return opt

    monkeypatch.setattr(loop_module, "build_optimizer", checked)
    # the eager step, whose optimizer steps one by one (the fused CPU epoch equals it bit for bit: below)
    run(tiny_config(optim__optimizer=optimizer, optim__lr=0.01, cpu_step="eager"), tmp_path / "run")
    assert steps["n"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_fused_cpu_epoch_gives_the_eager_curve_bit_for_bit(tmp_path, tiny_config, optimizer):
    """The digits curve with the fused CPU epoch (the default here) equals --cpu-step eager's, every metric and
    epoch row, the final weights and masks; pruned weights are 0.0 at the end of every epoch."""
    cfg = tiny_config(optim__optimizer=optimizer, optim__lr=0.01)
    fused, rows, epochs = run(cfg, tmp_path / "fused")
    assert fused.executor.mode == "fused-cpu"
    eager, eager_rows, eager_epochs = run(tiny_config(optim__optimizer=optimizer, optim__lr=0.01, cpu_step="eager"),
                                          tmp_path / "eager")
    assert eager.executor.mode == "eager" and fused.run_hash == eager.run_hash  # one run, two ways to compute it
    assert rows == eager_rows and epochs == eager_epochs
    a, b = fused.model.state_dict(), eager.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for layer in masked_layers(fused.model).values():
        assert bool((layer.weight[~layer.mask] == 0).all())


@pytest.mark.slow
def test_checkpoints_keep_the_plain_layer_layout(tmp_path, tiny_config, monkeypatch):
    cfg = tiny_config(prune__levels=1)
    run(cfg, tmp_path / "masked")
    plain_layers(monkeypatch)
    run(cfg, tmp_path / "plain")
    for name in ("init", "level_00", "level_01", "last"):
        masked, _ = load_checkpoint(tmp_path / "masked" / "checkpoints" / f"{name}.safetensors")
        plain, _ = load_checkpoint(tmp_path / "plain" / "checkpoints" / f"{name}.safetensors")
        assert masked.keys() == plain.keys() and not any(k.endswith(".mask") for k in masked)
        assert all(torch.equal(masked[k], plain[k]) for k in masked if not k.startswith("rng."))


@pytest.mark.slow
def test_a_run_killed_with_plain_layers_resumes_on_masked_layers(tmp_path, monkeypatch):
    """tests/fixtures/runs-0.1.0/killed was written by 0.1.0 (plain layers), stopped inside level 1 with a pruned
    mask in its last checkpoint: its masks load into the masked layers, and the resumed run gives what resuming on
    plain layers gives, bit for bit."""
    from dsd2.cli import main
    from dsd2.run.state import Checkpointer

    loaded = []
    load = Checkpointer.load

    def load_and_check(self, path):
        restored = load(self, path)
        for name, layer in masked_layers(self.model).items():
            assert torch.equal(layer.mask, restored.masks[name])
            loaded.append(int((~layer.mask).sum()))
        return restored

    monkeypatch.setattr(Checkpointer, "load", load_and_check)
    results = []
    for layers in ("masked", "plain"):
        if layers == "plain":
            plain_layers(monkeypatch)
        killed = tmp_path / layers
        shutil.copytree(KILLED, killed)
        assert main(["train", "--resume", str(killed), "--quiet"]) == 0
        results.append((stable(read_jsonl(killed / "metrics.jsonl")), stable(read_jsonl(killed / "epochs.jsonl"))))
    assert len(loaded) == 3 and sum(loaded) > 0  # the three masked layers took the checkpoint's pruned masks
    assert results[0] == results[1]
    assert [r["level"] for r in results[0][0]] == [0, 1, 2]


@pytest.mark.slow
def test_a_vgg_like_curve_trains_on_dsd2_batchnorm_as_on_torchs(tmp_path, fake_cifar, tiny_config, monkeypatch):
    """fp32, so the CPU kernels run: every BatchNorm of the loop's model is dsd2's, each with the ReLU before it
    fused in (the curve and its entropies the unfused one's, bit for bit), every max pool is dsd2's (torch's
    results bit for bit, so the curve is the same with torch's pools), the checkpoints keep nn.BatchNorm2d's
    layout, and the curve is torch's BatchNorm's within fp32 reduction-order noise."""
    from torch import nn

    from dsd2.ops import BatchNorm2d, MaxPool2d

    cfg = tiny_config(data__dataset="cifar10", data__data_root=str(fake_cifar), model__name="vgg", model__depth=2,
                      model__width=2, optim__optimizer="sgd", optim__lr=0.01, optim__batch_size=16, prune__levels=1,
                      precision="fp32")
    ours, rows, _ = run(cfg, tmp_path / "ours")
    norms = [m for m in ours.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(type(m) is BatchNorm2d for m in norms)
    assert all(m.relu_before is not None for m in norms)  # conv -> ReLU -> BatchNorm: each ReLU fused in
    pools = [m for m in ours.model.modules() if isinstance(m, nn.MaxPool2d)]
    assert pools and all(type(m) is MaxPool2d for m in pools)
    with monkeypatch.context() as patch:  # torch's pools instead: the same curve, bit for bit
        patch.setattr(loop_module, "swap_in_max_pools", lambda model: model)
        _, torch_pool_rows, _ = run(cfg, tmp_path / "torch_pools")
    assert torch_pool_rows == rows
    with monkeypatch.context() as patch:  # the ReLUs fused or not: the same curve and entropies, bit for bit
        patch.setattr(loop_module, "fuse_relu_batch_norms", lambda model: model)
        _, unfused_rows, _ = run(cfg, tmp_path / "unfused")
    assert unfused_rows == rows and all("entropy_mean" in r for r in rows)
    monkeypatch.setattr(loop_module, "swap_in_batch_norms", lambda model: model)
    torchs, torch_rows, _ = run(cfg, tmp_path / "torch")
    assert not any(type(m) is BatchNorm2d for m in torchs.model.modules())
    assert len(rows) == len(torch_rows) == 2
    for a, b in zip(rows, torch_rows):
        assert a["level"] == b["level"] and a["sparsity"] == b["sparsity"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert abs(a["test_acc"] - b["test_acc"]) <= 1 / 16  # at most one of the 16 test images flips
    for name in ("level_00", "last"):
        a, _ = load_checkpoint(tmp_path / "ours" / "checkpoints" / f"{name}.safetensors")
        b, _ = load_checkpoint(tmp_path / "torch" / "checkpoints" / f"{name}.safetensors")
        assert a.keys() == b.keys()
