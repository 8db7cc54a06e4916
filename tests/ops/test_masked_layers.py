"""MaskedLinear / MaskedConv2d and the torch.nn.utils.prune bridge: state dicts, pruned weights exactly 0.0 under
plain optimizers, a LeNet pruned by prune.global_unstructured fused, trained 20 steps against its hooked original
(the same numbers), deep-copied, pickled and unfused; the loop's swap leaves the given model's modules alone."""

import copy
import pickle

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from dsd2.ops import (
    MaskedConv2d,
    MaskedLinear,
    count_relu_call_sites,
    fuse_torch_prune,
    masked_layers,
    masks_from_torch_prune,
    set_layer_masks,
    swap_in_masked_layers,
    unfuse_torch_prune,
)


def lenet(seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                         nn.Linear(84, 10))


def pruned_lenet(amount=0.7, seed=0) -> nn.Sequential:
    net = lenet(seed)
    params = [(m, "weight") for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    return net


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def test_state_dict_is_weight_bias_mask_and_loads_back():
    conv = MaskedConv2d(3, 4, 3, padding=1)
    assert list(conv.state_dict()) == ["weight", "bias", "mask"] and conv.mask.dtype == torch.bool
    linear = MaskedLinear(5, 2)
    with torch.no_grad():
        linear.mask[0, :3] = False
    other = MaskedLinear(5, 2)
    other.load_state_dict(linear.state_dict())
    assert torch.equal(other.mask, linear.mask) and torch.equal(other.weight, linear.weight)
    assert "kept=7/10" in repr(other)


def test_from_dense_shares_the_parameters_and_to_dense_gives_them_back():
    dense = nn.Conv2d(2, 3, 3)
    mask = torch.rand(dense.weight.shape) < 0.5
    masked = MaskedConv2d.from_dense(dense, mask)
    assert masked.weight is dense.weight and masked.bias is dense.bias and torch.equal(masked.mask, mask)
    assert type(dense) is nn.Conv2d and "mask" not in dense.state_dict()  # the dense layer is left as it was
    back = masked.to_dense()
    assert type(back) is nn.Conv2d and back.weight is dense.weight and "mask" not in back.state_dict()
    x = torch.randn(2, 2, 6, 6)
    torch.testing.assert_close(masked(x), nn.functional.conv2d(x, dense.weight * mask, dense.bias))


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True),
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-4),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
], ids=["sgd-nesterov-wd", "adam-wd", "adamw"])
def test_plain_optimizers_keep_pruned_weights_exactly_zero(make_optimizer):
    """The gradient is masked where it is made: a pruned weight that is 0.0 stays 0.0 after every step of an
    optimizer that knows nothing of masks, weight decay and momentum included."""
    net = fuse_torch_prune(pruned_lenet())
    with torch.no_grad():
        for layer in masked_layers(net).values():
            layer.weight.mul_(layer.mask)
    opt = make_optimizer(net.parameters())
    for x, y in batches(10):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        for layer in masked_layers(net).values():
            assert bool((layer.weight.grad[~layer.mask] == 0).all())
        opt.step()
        for layer in masked_layers(net).values():
            assert bool((layer.weight[~layer.mask] == 0).all())


def test_a_lenet_pruned_by_global_unstructured_fuses_and_trains_as_its_hooked_original():
    hooked, fused = pruned_lenet(), fuse_torch_prune(pruned_lenet())
    assert all(isinstance(m, (MaskedConv2d, MaskedLinear)) for m in fused if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert not any(m._forward_pre_hooks for m in fused.modules())
    assert all(torch.equal(fused[i].weight, hooked[i].weight_orig) and
               torch.equal(fused[i].mask, hooked[i].weight_mask.bool()) for i in (0, 3, 7, 9, 11))
    opts = [torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3) for net in (hooked, fused)]
    for x, y in batches(20):
        losses = []
        for net, opt in zip((hooked, fused), opts):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1])
    for i in (0, 3, 7, 9, 11):  # weight_orig's pruned entries decay alike in both (weight decay, no gradient)
        assert torch.equal(fused[i].weight, hooked[i].weight_orig) and torch.equal(fused[i].bias, hooked[i].bias)
    x = batches(1, seed=9)[0][0]
    assert torch.equal(fused(x), hooked(x))


def test_the_fused_model_deep_copies_and_pickles_and_unfuses_back():
    hooked = pruned_lenet()
    with pytest.raises(RuntimeError):  # pytorch#37322: the pruning hook's weight is not a graph leaf
        copy.deepcopy(hooked)
    x = batches(1)[0][0]
    expected = hooked(x)
    fused = fuse_torch_prune(hooked)
    assert torch.equal(copy.deepcopy(fused)(x), expected)
    assert torch.equal(pickle.loads(pickle.dumps(fused))(x), expected)
    weights = [m.weight for m in masked_layers(fused).values()]
    back = unfuse_torch_prune(fused)
    assert all(type(m) in (nn.Conv2d, nn.Linear) and prune.is_pruned(m) for m in masked_layers_of_dense(back))
    assert [m.weight_orig for m in masked_layers_of_dense(back)] == weights  # the same parameters, not copies
    assert torch.equal(back(x), expected)
    assert all(torch.equal(a, b) for a, b in zip(masks_from_torch_prune(back).values(),
                                                 masks_from_torch_prune(pruned_lenet()).values()))


def masked_layers_of_dense(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_masks_are_read_from_fused_layers_too():
    hooked = pruned_lenet()
    masks = masks_from_torch_prune(hooked)
    fused = fuse_torch_prune(pruned_lenet())
    assert all(torch.equal(masks[k], v) for k, v in masks_from_torch_prune(fused).items())


def test_a_model_that_is_one_pruned_layer_fuses_into_the_masked_layer():
    layer = nn.Linear(4, 3)
    prune.random_unstructured(layer, "weight", 0.5)
    prune.l1_unstructured(layer, "weight", 0.3)  # pruned twice: a PruningContainer
    mask = layer.weight_mask.bool()
    fused = fuse_torch_prune(layer)
    assert isinstance(fused, MaskedLinear) and torch.equal(fused.mask, mask)
    assert list(fused.state_dict()) == ["weight", "bias", "mask"]
    assert isinstance(unfuse_torch_prune(fused), nn.Linear)


def test_what_cannot_be_fused_is_refused_in_one_sentence():
    net = nn.Sequential(nn.Linear(3, 3), nn.Conv1d(2, 2, 3))
    prune.l1_unstructured(net[1], "weight", 0.5)
    with pytest.raises(ValueError, match=r"'1' \(Conv1d\) is pruned by torch.nn.utils.prune but only Linear and "
                                         "Conv2d have masked layers"):
        fuse_torch_prune(net)
    assert prune.is_pruned(net[1])  # nothing changed
    net = nn.Sequential(nn.Linear(3, 3))
    prune.l1_unstructured(net[0], "bias", 0.5)
    with pytest.raises(ValueError, match=r"'0' \(Linear\) has its bias pruned by torch.nn.utils.prune; masked layers "
                                         "mask weights only"):
        fuse_torch_prune(net)


@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
def test_conv_padding_modes(padding_mode):
    dense = nn.Conv2d(2, 3, 3, padding=1, padding_mode=padding_mode)
    mask = torch.rand(dense.weight.shape) < 0.5
    masked = MaskedConv2d.from_dense(dense, mask)
    x = torch.randn(1, 2, 5, 5)
    with torch.no_grad():
        dense.weight.mul_(mask)
    torch.testing.assert_close(masked(x), dense(x), rtol=0, atol=0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.body = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
        self.head = nn.Linear(5, 2)
        self.custom = SwishLinear(2, 2)

    def forward(self, x):
        return self.custom(self.head(self.body(self.stem(x))))


class SwishLinear(nn.Linear):
    """A Linear subclass with its own forward: not the plain layer's computation, so never swapped."""

    def forward(self, x):
        return super().forward(x) * torch.sigmoid(x)


def test_swap_leaves_the_given_model_as_it_was_and_shares_its_parameters():
    net = Net()
    before = {name: type(m) for name, m in net.named_modules()}
    swapped, layers = swap_in_masked_layers(net)
    assert set(layers) == {"stem.weight", "body.2.weight", "head.weight"}  # not custom: its own forward
    assert {name: type(m) for name, m in net.named_modules()} == before
    assert isinstance(swapped.body[2], MaskedLinear) and swapped.body[0] is net.body[0]
    assert type(swapped.custom) is SwishLinear and swapped.custom is net.custom
    assert dict(swapped.named_parameters()).keys() == dict(net.named_parameters()).keys()
    assert all(a is b for a, b in zip(swapped.parameters(), net.parameters()))
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(swapped(x), net(x), rtol=0, atol=0)


def test_swap_of_chosen_names_then_masks_set_in_place_and_relu_sites_trace_through():
    net = Net()
    swapped, layers = swap_in_masked_layers(net, ["head.weight"])
    assert list(layers) == ["head.weight"] and type(swapped.stem) is nn.Conv2d
    mask = layers["head.weight"].mask
    address = mask.data_ptr()
    new = torch.rand(2, 5) < 0.5
    set_layer_masks(swapped, {"head.weight": new, "stem.weight": torch.ones(4, 3, 3, 3, dtype=torch.bool)})
    assert mask.data_ptr() == address and torch.equal(mask, new)
    with pytest.raises(ValueError, match=r"the mask for head.weight has shape \(5, 2\), the layer's weight \(2, 5\)"):
        set_layer_masks(swapped, {"head.weight": new.t()})
    traced, relus = count_relu_call_sites(swapped)
    assert list(relus) == ["body.0"]
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(traced(x), swapped(x), rtol=0, atol=0)


def test_swap_on_a_traced_model_keeps_both_runnable():
    """The level loop swaps after tracing the ReLU call sites: the traced module is copied too, not changed."""
    net = Net()
    traced, relus = count_relu_call_sites(net)
    swapped, layers = swap_in_masked_layers(traced)
    assert set(layers) == {"stem.weight", "body.2.weight", "head.weight"} and list(relus) == ["body.0"]
    assert type(traced.stem) is nn.Conv2d and isinstance(swapped.stem, MaskedConv2d)
    with torch.no_grad():
        layers["stem.weight"].mask[0] = False
    x = torch.randn(2, 3, 6, 6)
    expected = net.custom(net.head(net.body(nn.functional.conv2d(x, net.stem.weight * layers["stem.weight"].mask,
                                                                 net.stem.bias))))
    torch.testing.assert_close(swapped(x), expected, rtol=0, atol=0)
    assert swapped.state_dict().keys() == {*traced.state_dict(), "stem.mask", "body.2.mask", "head.mask"}


@pytest.mark.parametrize("bias", [True, False])
def test_masked_linear_uses_the_weight_bias_and_mask_wherever_they_live(bias):
    """The CPU call reads the tensors from the module's own dicts: a weight under a parametrization (a property of
    the class), tensors swapped in by torch.func.functional_call and a plain attribute must be the ones used."""
    import torch.nn.utils.parametrize as parametrize

    torch.manual_seed(0)
    layer = MaskedLinear(6, 4, bias=bias)
    with torch.no_grad():
        layer.mask.copy_(torch.rand(4, 6) < 0.5)
    x = torch.randn(3, 6, requires_grad=True)

    def expected(weight, b, mask):
        return nn.functional.linear(x, torch.where(mask, weight, 0.0), b)

    torch.testing.assert_close(layer(x), expected(layer.weight, layer.bias, layer.mask), rtol=0, atol=0)
    w2, m2 = torch.randn(4, 6), torch.ones(4, 6, dtype=torch.bool)
    b2 = torch.randn(4) if bias else None
    swapped = {"weight": w2, "mask": m2, **({"bias": b2} if bias else {})}
    torch.testing.assert_close(torch.func.functional_call(layer, swapped, (x,)), expected(w2, b2, m2),
                               rtol=0, atol=0)

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(layer, "weight", Doubled())
    out = layer(x)
    torch.testing.assert_close(out, expected(layer.weight, layer.bias, layer.mask), rtol=0, atol=0)
    out.sum().backward()  # the gradient reaches the parametrization's original, masked
    assert torch.all(layer.parametrizations.weight.original.grad[~layer.mask] == 0)
    if bias:
        del layer.bias
        layer.bias = torch.zeros(4)  # a plain attribute now, outside _parameters
        torch.testing.assert_close(layer(x), expected(layer.weight, torch.zeros(4), layer.mask), rtol=0, atol=0)
