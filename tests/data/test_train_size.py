"""`--train-size N`: N training images drawn for the seed from what the validation split leaves; the validation
split, the label noise and the test set stay those of the whole training set; impossible sizes are one sentence."""

import dataclasses

import numpy as np
import pytest
import torch
from fake_fmnist import index_of, torchvision_layout

from dsd2.cli import main
from dsd2.config import ConfigError, DataConfig, build_config, identity_fields
from dsd2.data import DataError, build_splits, load_raw

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """200 training and 30 test images, each carrying its index in the files."""
    return load_raw("fmnist", str(torchvision_layout(tmp_path_factory.mktemp("fmnist"), train=200, test=30)))


def data(**kw) -> DataConfig:
    return DataConfig(**{"dataset": "fmnist", "noise": 0.3, "val_fraction": 0.2, **kw})


def indices(split) -> np.ndarray:
    return index_of(split.images)


def test_the_subset_is_drawn_from_what_the_validation_split_leaves(raw):
    whole = build_splits(data(), 0, CPU, raw)
    sub = build_splits(data(train_size=50), 0, CPU, raw)
    assert (len(whole.train), len(whole.val), len(sub.train), len(sub.val)) == (160, 40, 50, 40)
    picked = indices(sub.train)
    assert np.all(np.diff(picked) > 0)  # sorted, no repeats
    assert set(picked) <= set(indices(whole.train))  # never a validation image
    assert np.array_equal(indices(sub.val), indices(whole.val)) and torch.equal(sub.val.labels, whole.val.labels)
    assert torch.equal(sub.test.images, whole.test.images) and len(sub.test) == 30  # the full test set


def test_the_subset_keeps_each_image_s_noisy_label(raw):
    whole = build_splits(data(), 0, CPU, raw)
    sub = build_splits(data(train_size=50), 0, CPU, raw)
    at = torch.from_numpy(np.searchsorted(indices(whole.train), indices(sub.train)))
    assert torch.equal(sub.train.labels, whole.train.labels[at])
    assert torch.equal(sub.train_clean_labels, whole.train_clean_labels[at])
    assert torch.equal(sub.noisy_mask, sub.train.labels != sub.train_clean_labels)
    assert torch.equal(sub.noise_indices, whole.noise_indices)  # the noise is drawn over the whole pool
    flat = sub.train.images.float().flatten(1)
    assert torch.allclose(sub.mean, flat.mean().reshape(1)) and torch.allclose(sub.std, flat.std().reshape(1))


def test_the_subset_is_the_same_for_a_seed_and_another_for_another_seed(raw):
    first, again = (indices(build_splits(data(train_size=50), 3, CPU, raw).train) for _ in range(2))
    other = indices(build_splits(data(train_size=50), 4, CPU, raw).train)
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_the_whole_rest_as_the_subset_is_the_run_without_it(raw):
    whole = build_splits(data(), 0, CPU, raw)
    same = build_splits(data(train_size=160), 0, CPU, raw)
    for split in ("train", "val", "test"):
        a, b = getattr(whole, split), getattr(same, split)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    for name in ("train_clean_labels", "noisy_mask", "noise_indices", "noise_original", "mean", "std"):
        assert torch.equal(getattr(whole, name), getattr(same, name)), name


def test_a_dataset_s_own_validation_split_stays_and_the_subset_comes_from_the_rest(raw):
    own = dataclasses.replace(raw, fixed_val=20)  # the last 20 pool images are the validation split (a val/ folder)
    s = build_splits(data(train_size=30), 0, CPU, own)
    assert np.array_equal(indices(s.val), np.arange(180, 200))
    assert len(s.train) == 30 and indices(s.train).max() < 180


def test_digits_take_a_subset_too():
    s = build_splits(build_config(None, None, {"data": {"train_size": 300}}).data, 0, CPU)
    assert (len(s.train), len(s.val), len(s.test)) == (300, 200, 597)


def test_more_than_the_rest_is_one_sentence(raw):
    with pytest.raises(DataError) as info:
        build_splits(data(train_size=161), 0, CPU, raw)
    assert str(info.value) == ("--train-size 161 is not possible: fmnist has 200 training images and the validation "
                               "split takes 40 of them, which leaves 160 to draw from; allowed: 1 to 160")


@pytest.mark.parametrize("size", [0, -5])
def test_no_images_or_fewer_is_one_sentence(size):
    with pytest.raises(ConfigError, match=f"^train size {size} must be a whole number >= 1$"):
        build_config(None, None, {"data": {"train_size": size}})


def test_unset_leaves_the_run_name_as_it_was_and_a_size_names_another_run():
    assert "data.train_size" not in identity_fields(build_config())
    sized = build_config(None, None, {"data": {"train_size": 500}})
    assert identity_fields(sized)["data.train_size"] == 500 and sized.run_hash() != build_config().run_hash()


@pytest.mark.parametrize("size, words", [("100000", "--train-size 100000 is not possible: fmnist has 200 training "
                                                    "images and the validation split takes 20 of them"),
                                         ("0", "train size 0 must be a whole number >= 1")])
def test_impossible_sizes_through_the_cli_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, size, words):
    root = torchvision_layout(tmp_path / "data", train=200, test=30)
    out = tmp_path / "run"
    try:
        code = main(["train", "--epochs", "1", "--dense-epochs", "1", "--levels", "1", "--quiet", "--students", "none",
                     "--dataset", "fmnist", "--data-root", str(root), "--val-fraction", "0.1", "--train-size", size,
                     "--out", str(out)])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert not out.exists()
