"""The level loop with --sparse-kernels on against off: the same curve within fp32 reduction-order noise, on the
digits default and on a small VGG-like (synthetic CIFAR, fp32), and each level's row names the path every masked
layer took. A step's products differ from the dense ones in the last bits only (tests/ops/test_sparse_layers.py);
training carries those bits forward, and magnitude pruning at a near-tie may keep the other of two weights, so
the bound is on the curve: accuracies within two samples of their split, losses within 2 %, the masks agreeing
on all but 1 % of the kept weights. The VGG-like trains gently (lr 1e-3, no label noise): at lr 1e-2 on its 60
images the last bits grow into 5 % of the masks flipping by level 3, while one step agrees to 1e-6 relative."""

from __future__ import annotations

import pytest
import torch

from dsd2.config import ConfigError
from dsd2.ops import masked_layers
from dsd2.run import LevelLoop
from dsd2.runs import RunDir, read_jsonl


def run(cfg, path):
    engine = LevelLoop(cfg, RunDir(path), progress=False, log=lambda s: None)
    engine.run()
    return engine, read_jsonl(path / "metrics.jsonl")


def assert_same_curve(a, b, engine_a, engine_b):
    splits = engine_a.splits
    sizes = {"train_acc": len(splits.train), "val_acc": len(splits.val), "test_acc": len(splits.test)}
    assert [r["level"] for r in a] == [r["level"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["sparsity"] == rb["sparsity"] and ra["remaining_weights"] == rb["remaining_weights"]
        for key, n in sizes.items():
            assert ra[key] == pytest.approx(rb[key], abs=2 / n + 1e-9), (ra["level"], key)
        assert ra["test_loss"] == pytest.approx(rb["test_loss"], rel=0.02), ra["level"]
    differ = sum(int((engine_a.masks[k] != engine_b.masks[k]).sum()) for k in engine_a.masks)
    assert differ <= 0.01 * a[-1]["remaining_weights"]
    for layer in masked_layers(engine_b.model).values():
        assert bool((layer.weight[~layer.mask] == 0).all())


@pytest.mark.slow
def test_the_digits_curve_with_sparse_kernels_is_the_dense_one(tmp_path, tiny_config):
    off, off_rows = run(tiny_config(sparse_kernels="off"), tmp_path / "off")
    on, on_rows = run(tiny_config(sparse_kernels="on"), tmp_path / "on")
    assert off.run_hash == on.run_hash  # one run, two ways to compute it
    assert_same_curve(off_rows, on_rows, off, on)
    names = set(masked_layers(on.model))
    for row in on_rows:
        assert row["kernels"]["train"] == dict.fromkeys(names, "sparse")
        assert row["kernels"]["eval"] == dict.fromkeys(names, "sparse")
    assert set(off_rows[-1]["kernels"]["train"].values()) == {"fused"}  # the dense C++ epoch of the MLP


@pytest.mark.slow
def test_a_vgg_like_curve_with_sparse_kernels_is_the_dense_one(tmp_path, fake_cifar, tiny_config):
    base = dict(data__dataset="cifar10", data__data_root=str(fake_cifar), data__noise=0.0, data__augment=False,
                model__name="vgg", model__depth=3, model__width=2, optim__optimizer="sgd", optim__lr=0.001,
                optim__batch_size=16, prune__levels=3, precision="fp32", optim__epochs=1, optim__dense_epochs=1)
    off, off_rows = run(tiny_config(sparse_kernels="off", **base), tmp_path / "off")
    on, on_rows = run(tiny_config(sparse_kernels="on", **base), tmp_path / "on")
    assert_same_curve(off_rows, on_rows, off, on)
    assert set(on_rows[-1]["kernels"]["train"].values()) == {"sparse"}
    assert set(off_rows[-1]["kernels"]["train"].values()) == {"dense"}


def test_sparse_kernels_on_refuses_what_it_cannot_compute(tmp_path, tiny_config):
    with pytest.raises(ConfigError, match=r"^--cpu-step fused runs a dense C\+\+ epoch"):
        LevelLoop(tiny_config(sparse_kernels="on", cpu_step="fused"), RunDir(tmp_path / "a"), progress=False,
                  log=lambda s: None).prepare()
    with pytest.raises(ConfigError, match=r"^--sparse-kernels on computes in fp32, but this run's precision is bf16"):
        LevelLoop(tiny_config(sparse_kernels="on", precision="bf16"), RunDir(tmp_path / "b"), progress=False,
                  log=lambda s: None).prepare()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sparse_kernels_on_on_cuda_needs_cuda_graphs_off(tmp_path, tiny_config):
    with pytest.raises(ConfigError, match=r"^--sparse-kernels on computes outside CUDA graphs"):
        LevelLoop(tiny_config(sparse_kernels="on", device="cuda", precision="fp32"), RunDir(tmp_path / "a"),
                  progress=False, log=lambda s: None).prepare()
    assert not (tmp_path / "a").exists()
