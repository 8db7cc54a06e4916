import pytest
import torch
from torch import nn

from dsd2.config import ModelConfig
from dsd2.models import VGGLike, build_model, relu_modules


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_resnet18_cifar_parameter_count_and_relus():
    m = build_model(ModelConfig(name="resnet18"), (3, 32, 32), 10)
    assert n_params(m) == 11_173_962
    assert len(relu_modules(m)) == 17  # stem + 2 per BasicBlock x 8
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_vgg_like_blocks_follow_the_design():
    m = VGGLike(depth=3, width=4, in_channels=3, num_classes=10)
    convs = [x for x in m.features if isinstance(x, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64]
    # conv -> ReLU -> BatchNorm order inside each block
    kinds = [type(x).__name__ for x in m.features][:3]
    assert kinds == ["Conv2d", "ReLU", "BatchNorm2d"]
    assert m.classifier.in_features == 64 * 49
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_vgg_paper_student_size():
    m = build_model(ModelConfig(name="vgg", depth=5, width=5), (3, 32, 32), 10)
    assert len(relu_modules(m)) == 10
    # 5 blocks of 32..512 filters, classifier 512*49 -> 10
    assert n_params(m) == 4_967_082


@pytest.mark.parametrize("name, hidden, expected", [
    ("mlp", (256, 256), 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10),
    ("lenet300", (), 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10),
])
def test_mlps(name, hidden, expected):
    shape = (1, 8, 8) if name == "mlp" else (1, 28, 28)
    m = build_model(ModelConfig(name=name, hidden=hidden or (1,)), shape, 10)
    assert n_params(m) == expected
    assert len(relu_modules(m)) == 2


@pytest.mark.parametrize("shape, flat", [((1, 28, 28), 16 * 4 * 4), ((3, 32, 32), 16 * 5 * 5)])
def test_lenet5_parameters_relus_and_output_by_hand(shape, flat):
    m = build_model(ModelConfig(name="lenet5"), shape, 10)
    c = shape[0]
    assert n_params(m) == (6 * c * 25 + 6) + (16 * 6 * 25 + 16) + (flat * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert [type(x).__name__ for x in m.features] == ["Conv2d", "ReLU", "MaxPool2d"] * 2
    assert len(relu_modules(m)) == 4
    assert m(torch.zeros(2, *shape)).shape == (2, 10)


def test_lenet5_refuses_images_its_layers_cannot_take():
    with pytest.raises(ValueError, match="LeNet-5 needs images of 16x16 or more, not 15x28"):
        build_model(ModelConfig(name="lenet5"), (1, 15, 28), 10)
    assert build_model(ModelConfig(name="lenet5"), (1, 16, 16), 10)(torch.zeros(1, 1, 16, 16)).shape == (1, 10)


@pytest.mark.parametrize("name, shape, neurons", [
    ("lenet5", (1, 28, 28), [6 * 24 * 24, 16 * 8 * 8, 120, 84]),
    ("lenet5", (3, 32, 32), [6 * 28 * 28, 16 * 10 * 10, 120, 84]),
    ("lenet300", (1, 28, 28), [300, 100]),
])
def test_lenet_relu_counts_by_hand(name, shape, neurons):
    """One counter per ReLU call site, one count per output element, each the number of samples whose input to
    that ReLU is positive (read from hooks on the untraced model)."""
    from dsd2.ops.relu_sites import count_relu_call_sites

    model = build_model(ModelConfig(name=name), shape, 10).eval()
    x = torch.randn(7, *shape, generator=torch.Generator().manual_seed(0))
    inputs = []
    hooks = [r.register_forward_hook(lambda mod, args, out: inputs.append(args[0].flatten(1)))
             for r in relu_modules(model).values()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    traced, counters = count_relu_call_sites(model)
    for counter in counters.values():
        counter.counting = True
    with torch.no_grad():
        traced(x)
    assert list(counters) == list(relu_modules(model)) and [c.counts.numel() for c in counters.values()] == neurons
    for counter, pre in zip(counters.values(), inputs):
        assert counter.observations == 7 and torch.equal(counter.counts.flatten(), (pre > 0).sum(0))


@pytest.mark.parametrize("name, depth", [("lenet5", 5), ("vgg", 4), ("resnet18", 5)])
def test_the_conv_nets_fmnist_admits_take_28x28_grey(name, depth):
    m = build_model(ModelConfig(name=name, depth=depth, width=2), (1, 28, 28), 10)
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_every_relu_is_a_distinct_module():
    m = build_model(ModelConfig(name="resnet18"), (3, 32, 32), 10)
    relus = list(relu_modules(m).values())
    assert len({id(r) for r in relus}) == len(relus)


def test_vgg_expand_shortcut_equals_adaptive_pooling():
    m = VGGLike(depth=5, width=2, in_channels=3, num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    feats = m.features(x)
    assert feats.shape[-2:] == (1, 1)
    expected = m.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(feats, 7), 1))
    torch.testing.assert_close(m(x), expected)


@pytest.mark.parametrize("stride, kernel, bias, channels_last, size", [
    (1, 3, True, False, 2), (1, 3, False, True, 4), (2, 3, False, False, 4), (2, 1, False, True, 4),
    (1, 3, True, True, 8),  # above the small-map threshold: the stock path
])
@pytest.mark.parametrize("bf16", [False, True])
def test_small_map_conv_gradients_equal_nn_conv2d(stride, kernel, bias, channels_last, size, bf16):
    from dsd2.models import Conv2d

    torch.manual_seed(0)
    ours = Conv2d(8, 6, kernel, stride, kernel // 2, bias=bias)
    ref = nn.Conv2d(8, 6, kernel, stride, kernel // 2, bias=bias)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 8, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        ya, yb = ours(xa), ref(xb)
    g = torch.randn(ya.shape)
    ya.float().backward(g)
    yb.float().backward(g)
    tol = 1e-2 if bf16 else 1e-6
    assert ya.dtype == yb.dtype and torch.equal(ya, yb)
    for a, b in [(xa.grad, xb.grad), (ours.weight.grad, ref.weight.grad)] + (
            [(ours.bias.grad, ref.bias.grad)] if bias else []):
        assert a.dtype == b.dtype
        assert float((a - b).abs().max() / b.abs().max()) <= tol
