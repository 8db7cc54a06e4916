import torch
from torch import nn

from dsd2.pruning import (
    count_sparsity,
    full_masks,
    global_prune,
    gradient_scores,
    magnitude_scores,
    masks_from_torch_prune,
    perturb,
    prunable_weights,
    random_scores,
    remaining_after,
    remove_torch_prune,
    to_torch_prune,
)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def test_prunable_weights_are_conv_and_linear_weights_only():
    assert list(prunable_weights(small_net())) == ["0.weight", "4.weight"]


def test_global_magnitude_removes_the_smallest_across_layers():
    a = torch.tensor([[0.1, -5.0, 0.3]])
    b = torch.tensor([0.2, -0.05, 4.0, 0.4])
    masks = {"a": torch.ones_like(a, dtype=torch.bool), "b": torch.ones_like(b, dtype=torch.bool)}
    new = global_prune({"a": a.abs(), "b": b.abs()}, masks, 3 / 7)  # round(3/7 * 7) = 3 removed
    assert new["a"].tolist() == [[False, True, True]]
    assert new["b"].tolist() == [False, False, True, True]
    # next level removes round(0.5 * 4) = 2 of the 4 remaining, never re-adds pruned ones
    again = global_prune({"a": a.abs(), "b": b.abs()}, new, 0.5)
    assert again["a"].tolist() == [[False, True, False]] and again["b"].tolist() == [False, False, True, False]


def test_iterated_levels_follow_the_schedule_and_sparsity_is_counted():
    net = small_net()
    masks = full_masks(net)
    total = sum(m.numel() for m in masks.values())
    expected = remaining_after(total, 0.2, 6)
    for level in range(6):
        masks = global_prune(magnitude_scores(net), masks, 0.2)
        perturb(net, "none", masks, None, 0)
        zeros, n = count_sparsity(net)
        assert n - zeros == expected[level] == sum(int(m.sum()) for m in masks.values())
    assert abs(1 - expected[-1] / total - (1 - 0.8 ** 6)) < 0.01


def test_random_and_gradient_criteria():
    net = small_net()
    masks = full_masks(net)
    s = random_scores(net, generator=torch.Generator().manual_seed(0))
    assert int(sum(m.sum() for m in global_prune(s, masks, 0.5).values())) == (36 + 144 * 5) // 2
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 5, (8,))
    g = gradient_scores(net, loss_batches=[lambda: nn.functional.cross_entropy(net(x), y)])
    net.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    w = net[4].weight
    assert torch.allclose(g["4.weight"], (w * w.grad).abs().detach(), atol=1e-6)


def test_perturbations_keep_mask_and_change_weights_as_named():
    net = small_net()
    init = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    masks = global_prune(magnitude_scores(net), full_masks(net), 0.5)
    perturb(net, "rewind", masks, init, 0)
    w = net[0].weight
    assert torch.equal(w, init["0.weight"] * masks["0.weight"])
    perturb(net, "reinit", masks, None, 123)
    assert not torch.equal(net[0].weight, init["0.weight"] * masks["0.weight"])
    assert bool((net[0].weight[~masks["0.weight"]] == 0).all())


def test_torch_prune_round_trip():
    net = small_net()
    masks = global_prune(magnitude_scores(net), full_masks(net), 0.3)
    to_torch_prune(net, masks)
    assert hasattr(net[0], "weight_orig") and hasattr(net[0], "weight_mask")
    back = masks_from_torch_prune(net)
    assert all(torch.equal(back[k], masks[k]) for k in masks)
    folded = remove_torch_prune(net)
    assert all(torch.equal(folded[k], masks[k]) for k in masks)
    assert not hasattr(net[0], "weight_orig")
    assert bool((net[0].weight[~masks["0.weight"]] == 0).all())
