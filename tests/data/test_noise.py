import torch

from dsd2.data.noise import CIFAR10_ASYMMETRIC, apply_noise


def labels(n=1000, c=10, seed=0):
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))


def test_symmetric_exact_count_and_always_a_different_class():
    y = labels()
    noisy, idx = apply_noise(y, 0.37, "symmetric", 10, seed=1)
    assert idx.numel() == round(0.37 * 1000)
    changed = (noisy != y).nonzero().flatten()
    assert torch.equal(changed, idx)
    assert noisy.min() >= 0 and noisy.max() < 10


def test_symmetric_targets_are_spread_over_other_classes():
    y = torch.zeros(20000, dtype=torch.long)
    noisy, idx = apply_noise(y, 0.5, "symmetric", 10, seed=2)
    counts = torch.bincount(noisy[idx], minlength=10)
    assert counts[0] == 0
    assert counts[1:].min() > 0.8 * 10000 / 9


def test_seeded_and_zero_noise():
    y = labels()
    a, ia = apply_noise(y, 0.2, "symmetric", 10, seed=5)
    b, ib = apply_noise(y, 0.2, "symmetric", 10, seed=5)
    c, _ = apply_noise(y, 0.2, "symmetric", 10, seed=6)
    assert torch.equal(a, b) and torch.equal(ia, ib) and not torch.equal(a, c)
    z, iz = apply_noise(y, 0.0, "symmetric", 10, seed=5)
    assert torch.equal(z, y) and iz.numel() == 0


def test_pairflip_moves_to_next_class():
    y = labels(c=7)
    noisy, idx = apply_noise(y, 0.3, "pairflip", 7, seed=0)
    assert idx.numel() == 300
    assert torch.equal(noisy[idx], (y[idx] + 1) % 7)


def test_asymmetric_uses_cifar10_map_per_class():
    y = torch.arange(10).repeat_interleave(100)
    noisy, idx = apply_noise(y, 0.4, "asymmetric", 10, seed=0)
    assert idx.numel() == 40 * len(CIFAR10_ASYMMETRIC)
    for src, dst in CIFAR10_ASYMMETRIC.items():
        moved = (y == src) & (noisy != y)
        assert int(moved.sum()) == 40 and bool((noisy[moved] == dst).all())
    untouched = [c for c in range(10) if c not in CIFAR10_ASYMMETRIC]
    for c in untouched:
        assert bool((noisy[y == c] == c).all())
