"""The Python API: any nn.Module and any image data through the level loop (dsd2.prune)."""

import json

import pytest
import torch
import torchvision
from safetensors.torch import load_file

import dsd2
import dsd2.api
from dsd2.analysis.entropy import summarize
from dsd2.runs import RunError, read_jsonl

# fp32: the entropy is checked against counts made in fp32 (auto would train this conv net in bf16 where native)
CONFIG = {"optim": {"optimizer": "sgd", "lr": 0.05, "epochs": 1, "dense_epochs": 1, "batch_size": 32},
          "prune": {"levels": 2}, "precision": "fp32"}


def random_images(n, seed, classes=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, classes, (n,),
                                                                                                 generator=g)


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    train, val, test = random_images(64, 1), random_images(32, 2), random_images(32, 3)
    out = tmp_path_factory.mktemp("api") / "resnet18"
    summary = dsd2.prune(model, train, test, val=val, out=out, config=CONFIG,
                         exclude=("conv1.weight", "fc.weight"), log=lambda s: None)
    return model, train, out, summary


def relu_states_by_hooks(model, images, mean, std):
    """Independent counts: a forward hook on every nn.ReLU records each of its calls' outputs separately."""
    calls = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: calls.append((id(mod), (out > 0).sum(0))))
             for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    model.eval()
    x = (images.float() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    with torch.no_grad():  # in the layout the loop feeds a conv net, so the convolutions run the same kernels
        model(x.contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    return [c.flatten().long() for _, c in calls]


@pytest.mark.slow
def test_resnet18_runs_two_levels_with_one_entropy_layer_per_relu_call_site(resnet_run):
    model, (images, _), out, summary = resnet_run
    assert summary["levels"] == 3 and len(summary["relu_layers"]) == 17  # BasicBlock's one ReLU is called twice
    assert "layer1.0.relu#2" in summary["relu_layers"]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["level"] for r in rows] == [0, 1, 2] and all(len(r["entropy_layers"]) == 17 for r in rows)
    # the last level's entropy, from counts made independently with hooks on the trained model
    train = images.float().transpose(0, 1).reshape(3, -1)
    mean, std = train.mean(1), train.std(1).clamp_min(1e-3)
    counts = relu_states_by_hooks(model, images, mean, std)
    assert len(counts) == 17
    expected = summarize({str(i): (c, len(images)) for i, c in enumerate(counts)})
    assert rows[-1]["entropy_mean"] == pytest.approx(expected.mean_over_layers, rel=1e-9)
    assert rows[-1]["entropy_layers"] == pytest.approx([round(v, 6) for v in expected.per_layer.values()],
                                                       abs=1e-6)


@pytest.mark.slow
def test_excluded_weights_stay_dense_and_the_rest_is_pruned(resnet_run):
    model, _, out, summary = resnet_run
    masks = {k[5:]: v for k, v in load_file(out / "checkpoints" / "level_02.safetensors").items()
             if k.startswith("mask.")}
    assert "conv1.weight" not in masks and "fc.weight" not in masks and "layer1.0.conv1.weight" in masks
    assert bool((model.conv1.weight != 0).all()) and bool((model.fc.weight != 0).all())
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert kept == pytest.approx(0.64, abs=1e-3)  # two levels of 20 % over the chosen weights only
    assert summary["final_sparsity"] == pytest.approx(0.36, abs=1e-3)


@pytest.mark.slow
def test_a_second_call_resumes_and_another_model_is_refused_in_the_same_folder(resnet_run):
    model, train, out, summary = resnet_run
    test = random_images(32, 3)
    again = dsd2.prune(model, train, test, val=random_images(32, 2), out=out, config=CONFIG,
                       exclude=("conv1.weight", "fc.weight"), log=lambda s: None)
    assert again["best_level"] == summary["best_level"]
    other = torchvision.models.resnet34(num_classes=10)
    with pytest.raises(RunError, match="different run"):
        dsd2.prune(other, train, test, out=out, config=CONFIG, log=lambda s: None)
    assert json.loads((out / "summary.json").read_text())["run_hash"] == summary["run_hash"]


@pytest.mark.slow
def test_map_style_datasets_of_pil_images_and_a_teacher_module(tmp_path):
    from PIL import Image

    def dataset(n, seed):
        images, labels = random_images(n, seed, classes=3)
        return [(Image.fromarray(x.permute(1, 2, 0).numpy()), int(y)) for x, y in zip(images, labels)]

    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 16), torch.nn.ReLU(),
                                  torch.nn.Linear(16, 3))
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
    summary = dsd2.prune(student, dataset(40, 1), dataset(16, 2), out=tmp_path / "kd", teacher=teacher,
                         config={**CONFIG, "distill": {"alpha": 0.5, "temperature": 2.0}}, log=lambda s: None)
    rows = read_jsonl(tmp_path / "kd" / "metrics.jsonl")
    assert summary["teacher"]["module"] == "Sequential" and all("kd_kl" in r for r in rows)
    assert summary["relu_layers"] == ["2"]


def test_bad_data_and_patterns_are_refused_in_one_sentence(tmp_path):
    model = torchvision.models.resnet18(num_classes=10)
    train, test = random_images(16, 1), random_images(8, 2)
    with pytest.raises(dsd2.api.DataError, match=r"^the training data must be images \[N, C, H, W\]"):
        dsd2.prune(model, (train[0][:, 0, 0], train[1]), test, out=tmp_path / "a")
    with pytest.raises(dsd2.api.ConfigError, match="pattern 'head.weight' matches none"):
        dsd2.prune(model, train, test, out=tmp_path / "b", exclude=("head.weight",), config=CONFIG)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
