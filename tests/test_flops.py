import pytest
from torch import nn

from dsd2.analysis.flops import layer_macs, measure_forward_flops, training_flops
from dsd2.config import ModelConfig
from dsd2.models import REGISTRY, build_model

SHAPES = {"mlp": (1, 8, 8), "lenet300": (1, 28, 28), "lenet5": (1, 28, 28), "vgg": (3, 32, 32),
          "resnet18": (3, 32, 32)}


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


@pytest.mark.parametrize("shape, flat", [((1, 28, 28), 16 * 4 * 4), ((3, 32, 32), 16 * 5 * 5)])
def test_lenet5_multiply_adds_by_hand(shape, flat):
    """Unpadded 5x5 convolutions: 28 -> 24 -> pool 12 -> 8 -> pool 4 (32 -> 28 -> 14 -> 10 -> 5)."""
    c, side = shape[0], shape[1]
    first, second = side - 4, (side - 4) // 2 - 4
    macs = {"features.0.weight": 6 * first * first * c * 25, "features.3.weight": 16 * second * second * 6 * 25,
            "classifier.1.weight": flat * 120, "classifier.3.weight": 120 * 84, "classifier.5.weight": 84 * 10}
    model = build_model(ModelConfig(name="lenet5"), shape, 10)
    assert layer_macs(model, shape) == macs
    f = measure_forward_flops(model, shape)
    assert f.fvcore == f.fvcore_prunable == sum(macs.values())  # ReLU and max-pool count nothing in fvcore's
    assert f.torch_2mac == 2 * sum(macs.values())


def test_lenet300_100_multiply_adds_by_hand():
    model = build_model(ModelConfig(name="lenet300"), (1, 28, 28), 10)
    macs = {"net.1.weight": 784 * 300, "net.3.weight": 300 * 100, "net.5.weight": 100 * 10}
    assert layer_macs(model, (1, 28, 28)) == macs
    f = measure_forward_flops(model, (1, 28, 28))
    assert f.fvcore == sum(macs.values()) and f.torch_2mac == 2 * sum(macs.values())


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
