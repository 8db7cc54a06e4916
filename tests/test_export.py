"""`dsd2-engine export` and `dsd2.load_compressed`: the loaded model gives the dense-masked model's logits (the
digits MLP, and a VGG-like on synthetic CIFAR), on the sparse path; bitmask and CSR each where it is smaller; a
level past 95 % sparsity takes at most 1/10 of the dense weights' bytes; bad inputs get one sentence and exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dsd2
from dsd2.cli import main
from dsd2.config import from_dict
from dsd2.data import build_splits
from dsd2.export import ExportError, _decode, _encode, export_level
from dsd2.ops import masked_layers, set_sparse_kernels
from dsd2.run import LevelLoop
from dsd2.run.loop import build_run_model, input_format
from dsd2.run.state import Checkpointer
from dsd2.runs import RunDir


def train(cfg, path):
    LevelLoop(cfg, RunDir(path), progress=False, log=lambda s: None).run()
    return path


def dense_logits(run_path, level):
    """The run's model at `level` on the dense masked path, on its test split, as the loop computes them."""
    run = RunDir(run_path)
    stored = run.stored_config()
    cfg = from_dict(stored["config"])
    splits = build_splits(cfg.data, cfg.seed, torch.device("cpu"))
    model, relus = build_run_model(cfg, splits, torch.device("cpu"), counting=False)
    Checkpointer(stored["run_hash"], model, relus, torch.device("cpu")).load(run.level_path(level))
    set_sparse_kernels(model, "off")
    fmt = input_format(cfg, splits, torch.device("cpu"), model)
    with torch.no_grad():
        return model.eval()(fmt.prepare(splits.test.images)), splits.test.images


def check_same_logits(run_path, level, out):
    export_level(f"{run_path}:{level}", out)
    loaded = dsd2.load_compressed(out)
    assert {layer.sparse_kernels for layer in masked_layers(loaded.net).values()} == {"auto"}
    set_sparse_kernels(loaded.net, "on")  # the sparse path itself, whatever this machine's crossover
    expected, images = dense_logits(run_path, level)
    with torch.no_grad():
        got = loaded(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert {layer.sparse_path for layer in masked_layers(loaded.net).values()} == {"sparse"}
    return loaded


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from conftest import tiny_overrides

    from dsd2.config import build_config

    cfg = build_config(None, None, tiny_overrides(prune__prune_fraction=0.5, prune__levels=5))
    return train(cfg, tmp_path_factory.mktemp("digits") / "run")


@pytest.mark.slow
def test_export_gives_the_dense_masked_logits_and_is_small(digits_run, tmp_path, capsys):
    loaded = check_same_logits(digits_run, 5, tmp_path / "l5.safetensors")
    assert loaded.meta["sparsity"] > 0.95
    assert "csr" in {info["encoding"] for info in loaded.meta["layers"].values()}  # globally pruned: per layer
    assert main(["export", f"{digits_run}:5", "--out", str(tmp_path / "again.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "smaller" in printed and "96.8" in printed
    full = {k: v.contiguous() for k, v in dense_state(digits_run, 5).items()}
    save_file(full, tmp_path / "dense.safetensors")
    assert (tmp_path / "l5.safetensors").stat().st_size <= (tmp_path / "dense.safetensors").stat().st_size / 10
    level0 = check_same_logits(digits_run, 0, tmp_path / "l0.safetensors")  # nothing pruned: bitmask is smaller
    assert {info["encoding"] for info in level0.meta["layers"].values()} == {"bitmask"}
    expected, images = dense_logits(digits_run, 5)
    for mode, path in (("on", "chain"), ("off", "layers")):  # the MLP in one C++ call (the engine's fused chain)
        loaded.stack = mode
        with torch.no_grad():
            torch.testing.assert_close(loaded(images), expected, rtol=1e-4, atol=1e-5)
        assert loaded.inference_path == path


def dense_state(run_path, level):
    from dsd2.runs import load_checkpoint

    tensors, _ = load_checkpoint(RunDir(run_path).level_path(level))
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


@pytest.mark.slow
def test_an_exported_vgg_like_gives_the_dense_masked_logits(tmp_path, fake_cifar, tiny_config):
    cfg = tiny_config(data__dataset="cifar10", data__data_root=str(fake_cifar), model__name="vgg", model__depth=3,
                      model__width=2, optim__optimizer="sgd", optim__lr=0.01, optim__batch_size=16,
                      prune__levels=2, precision="fp32")
    run = train(cfg, tmp_path / "vgg")
    loaded = check_same_logits(run, 2, tmp_path / "vgg.safetensors")
    assert loaded.meta["channels_last"] and loaded.meta["model"]["name"] == "vgg"
    expected, images = dense_logits(run, 2)
    for mode, path in (("on", "stack"), ("off", "layers"), ("auto", None)):  # the feature stack on grids, or not
        loaded.stack = mode
        with torch.no_grad():
            got = loaded(images)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert loaded.inference_path == (path or loaded.inference_path)
    loaded.stack = "on"
    loaded(images[:2])  # with gradients on the stack does not apply: the layers
    assert loaded.inference_path == "layers"
    loaded.stack = "fast"
    with pytest.raises(ValueError, match="stack 'fast' is not known; allowed: auto, on, off"):
        loaded(images[:2])


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("shape", [(7, 5), (6, 3, 3, 3), (3, 40000)])
def test_both_encodings_round_trip_and_the_smaller_is_chosen(shape, sparsity):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) >= sparsity
    parts, info = _encode(w, mask)
    weight, got_mask = _decode({f"x.{k}": v for k, v in parts.items()}, info, "x")
    assert torch.equal(got_mask, mask) and torch.equal(weight, torch.where(mask, w, 0.0))
    index_bytes = sum(v.numel() * v.element_size() for k, v in parts.items() if k != "values")
    assert index_bytes <= max(4 * (shape[0] + 1) + int(mask.sum()) * 4, (mask.numel() + 7) // 8)
    if info["encoding"] == "csr":
        assert index_bytes < (mask.numel() + 7) // 8
    if len(shape) == 2 and shape[1] > 2**15:
        assert info["encoding"] == "bitmask" or parts["cols"].dtype == torch.int32


@pytest.mark.slow
def test_bad_inputs_get_one_sentence_and_exit_2(digits_run, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    cases = [
        ([f"{digits_run}:9", "--out", str(out)], "level 9 of"),
        ([f"{digits_run}", "--out", str(tmp_path / "x.pt")], "must name a .safetensors file"),
        ([str(tmp_path / "nothing"), "--out", str(out)], "does not exist"),
    ]
    for args, words in cases:
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    assert not out.exists()
    with pytest.raises(ExportError, match="is not a dsd2 export"):
        dsd2.load_compressed(RunDir(digits_run).level_path(1))  # a checkpoint, not an export
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ExportError, match="is not a safetensors file"):
        dsd2.load_compressed(tmp_path / "junk.safetensors")
    export_level(f"{digits_run}:2", out)
    with safe_open(str(out), framework="pt") as fh:
        header, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    meta = json.loads(header["meta"])
    meta["model"]["hidden"] = [128, 128]  # another architecture than the weights'
    save_file(tensors, tmp_path / "wrong.safetensors", metadata={**header, "meta": json.dumps(meta)})
    with pytest.raises(ExportError, match="has shape .* the architecture's"):
        dsd2.load_compressed(tmp_path / "wrong.safetensors")
