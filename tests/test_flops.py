import pytest
from torch import nn

from dsd2.analysis.flops import layer_macs, measure_forward_flops, training_flops
from dsd2.config import ModelConfig
from dsd2.models import REGISTRY, build_model

SHAPES = {"mlp": (1, 8, 8), "lenet300": (1, 28, 28), "vgg": (3, 32, 32), "resnet18": (3, 32, 32)}


def test_small_known_layers_by_hand():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    macs = layer_macs(net, (3, 8, 8))
    assert macs == {"0.weight": 4 * 8 * 8 * 3 * 3 * 3, "3.weight": 256 * 5}
    f = measure_forward_flops(net, (3, 8, 8))
    assert f.fvcore_prunable == 6912 + 1280
    assert f.torch_2mac == 2 * (6912 + 1280)
    # half the conv weights zero: its multiply-adds halve, the linear layer's stay
    assert f.effective({"0.weight": 0.5, "3.weight": 1.0}) == f.fvcore - 3456
    assert f.effective({"0.weight": 0.5, "3.weight": 1.0}, "2mac") == 2 * (6912 + 1280) - 6912


@pytest.mark.parametrize("name", list(REGISTRY))
def test_analytic_count_equals_fvcore_on_every_model(name):
    model = build_model(ModelConfig(name=name), SHAPES[name], 10)
    f = measure_forward_flops(model, SHAPES[name])
    assert sum(f.layers.values()) == f.fvcore_prunable
    assert f.torch_2mac == 2 * f.fvcore_prunable  # flop_counter counts conv/linear only, 2 per multiply-add


def test_paper_table1_level_cost_uses_the_fvcore_convention():
    """VGG-like d=5 g=5 on CIFAR-10: 50,000 images x 160 epochs x 3 x forward ~ 1.63 PFLOPs per level."""
    model = build_model(ModelConfig(name="vgg", depth=5, width=5), (3, 32, 32), 10)
    f = measure_forward_flops(model, (3, 32, 32))
    per_level = training_flops(50_000 * 160, f.dense("fvcore")) / 1e15
    assert per_level == pytest.approx(1.63, rel=0.01)
    assert 30 * per_level == pytest.approx(48.84, rel=0.01) and 3 * per_level == pytest.approx(4.88, rel=0.01)
    assert training_flops(50_000 * 160, f.dense("2mac")) / 1e15 == pytest.approx(3.24, rel=0.01)


def test_teacher_forward_adds_per_image():
    assert training_flops(10, 100.0, teacher_forward_per_sample=50.0) == 10 * (300 + 50)
