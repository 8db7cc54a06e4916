import pytest
import torch

from dsd2 import rng
from dsd2.config import DataConfig
from dsd2.data import DataError, build_splits, load_raw
from dsd2.data.batching import crop_flip, train_batches


def test_digits_split_sizes_and_recorded_noise():
    s = build_splits(DataConfig(val_fraction=1 / 6), seed=0, device=torch.device("cpu"))  # the digits preset
    assert (len(s.train), len(s.val), len(s.test)) == (1000, 200, 597)
    assert s.train.images.dtype == torch.uint8 and s.input_shape == (1, 8, 8)
    # noise over the 1200-sample pool: exactly 600 corrupted, recorded with original labels
    assert s.noise_indices.numel() == 600
    assert 450 < int(s.noisy_mask.sum()) < 600  # the rest of the 600 fell into the validation split
    assert torch.equal(s.noisy_mask, s.train.labels != s.train_clean_labels)


def test_clean_val_keeps_true_labels():
    raw = load_raw("digits")
    noisy = build_splits(DataConfig(val_fraction=1 / 6), 0, torch.device("cpu"), raw)
    clean = build_splits(DataConfig(val_fraction=1 / 6, clean_val=True), 0, torch.device("cpu"), raw)
    assert torch.equal(noisy.train.labels, clean.train.labels)
    assert (noisy.val.labels != clean.val.labels).float().mean() > 0.3


def test_cifar_from_local_folder(fake_cifar):
    s = build_splits(DataConfig(dataset="cifar10", data_root=str(fake_cifar), noise=0.2, val_fraction=0.1),
                     0, torch.device("cpu"))
    assert len(s.train) + len(s.val) == 60 and len(s.test) == 16 and s.input_shape == (3, 32, 32)
    s100 = build_splits(DataConfig(dataset="cifar100", data_root=str(fake_cifar), noise=0.0, val_fraction=0.1),
                        0, torch.device("cpu"))
    assert s100.num_classes == 100


def test_missing_cifar_names_path_and_fix(tmp_path):
    with pytest.raises(DataError) as info:
        load_raw("cifar10", str(tmp_path / "nowhere"))
    msg = str(info.value)
    assert "nowhere" in msg and "--download" in msg and "\n" not in msg


def shuffled(n, epoch):
    return torch.randperm(n, generator=rng.generator("shuffle", 0, 0, epoch))


def test_batches_cover_the_epoch_once():
    s = build_splits(DataConfig(), seed=0, device=torch.device("cpu"))
    seen = torch.cat([idx for _, _, idx in train_batches(s.train, 64, shuffled(len(s.train), 0), None)])
    assert torch.equal(seen.sort().values, torch.arange(len(s.train)))


def test_crop_flip_is_a_shifted_window_of_the_padded_image():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6) + 1
    g = torch.Generator().manual_seed(0)
    out = crop_flip(x, g, pad=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        found = False
        for oy in range(5):
            for ox in range(5):
                win = padded[b, :, oy:oy + 6, ox:ox + 6]
                if torch.equal(out[b], win) or torch.equal(out[b], win.flip(2)):
                    found = True
        assert found


def test_sharded_batches_split_every_global_batch_between_ranks():
    from dsd2.training.distributed import DistContext

    s = build_splits(DataConfig(), seed=0, device=torch.device("cpu"))
    # augmentation on: every rank draws the crops of the whole global batch, then keeps its share
    def batches(**shard):
        perm, augment = shuffled(len(s.train), 1), torch.Generator().manual_seed(3)
        return [(x, idx) for x, _, idx in train_batches(s.train, 64, perm, augment, **shard)]

    whole = batches()
    parts = [batches(shard=DistContext(rank, 2).shard, world=2) for rank in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for (wx, wi), (ax, ai), (bx, bi) in zip(whole, *parts):
        assert torch.equal(torch.cat([ai, bi]), wi)
        assert torch.equal(torch.cat([ax, bx]), wx)


def test_cifar_reader_refuses_pickled_code(tmp_path):
    import pickle

    from fake_data import write_fake_cifar

    root = tmp_path / "cifar"
    folder = write_fake_cifar(root, "cifar10", train_per_file=4, test_size=4)

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": Payload(), b"labels": [0]}, fh)
    with pytest.raises(DataError, match="cannot read CIFAR file .*data_batch_1"):
        load_raw("cifar10", str(root))
