"""`--dataset fmnist`: Fashion-MNIST's IDX files from torchvision's layout, a flat folder or Debian's package, found
and refused in one line; the conv nets it admits. No test needs the package but the one that says so."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_fmnist import idx_bytes, index_of, label_of, torchvision_layout, write_fmnist

from dsd2.cli import main
from dsd2.config import IMAGE_SIDES, ConfigError, build_config
from dsd2.data import DataError, build_splits, load_raw, num_classes
from dsd2.data import fmnist as fmnist_data

REAL = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _no_debian(tmp_path, monkeypatch):
    """Debian's folder is one the test makes (or none), whatever this machine has installed."""
    monkeypatch.setattr(fmnist_data, "DEBIAN_FOLDER", tmp_path / "debian" / "fashion-mnist")


def run_main(args, capsys):
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def check_aligned(raw, n_train, n_test):
    assert raw.train_images.shape == (n_train, 1, 28, 28) and raw.test_images.shape == (n_test, 1, 28, 28)
    assert raw.train_images.dtype == torch.uint8 and raw.train_labels.dtype == torch.int64
    for images, labels in ((raw.train_images, raw.train_labels), (raw.test_images, raw.test_labels)):
        assert np.array_equal(index_of(images), np.arange(len(labels)))  # in file order
        assert np.array_equal(label_of(images), labels.numpy())  # each image with its own label
    assert raw.num_classes == 10 and raw.scale == 255.0 and raw.name == "fmnist"
    assert raw.classes[0] == "T-shirt/top" and raw.classes[9] == "Ankle boot"


@pytest.mark.parametrize("gz", [True, False, "mixed"])
def test_torchvision_layout_gzipped_or_not(tmp_path, gz):
    root = torchvision_layout(tmp_path / "data", train=30, test=12, gz=gz)
    check_aligned(load_raw("fmnist", str(root)), 30, 12)
    assert num_classes("fmnist", str(root)) == 10


def test_a_flat_folder_under_data_root_as_debian_ships_it(tmp_path):
    root = write_fmnist(tmp_path / "flat", train=20, test=10)
    check_aligned(load_raw("fmnist", str(root)), 20, 10)


def test_without_data_root_debian_s_folder_is_read(tmp_path):
    write_fmnist(fmnist_data.DEBIAN_FOLDER, train=20, test=10)
    check_aligned(load_raw("fmnist"), 20, 10)


def test_the_uncompressed_copy_is_read_where_torchvision_left_both(tmp_path):
    folder = tmp_path / "data" / "FashionMNIST" / "raw"
    write_fmnist(folder, train=20, test=10, gz=False, seed=1)
    wanted = load_raw("fmnist", str(tmp_path / "data")).train_labels
    write_fmnist(folder, train=20, test=10, gz=True, seed=2)  # other labels, beside the uncompressed files
    assert torch.equal(load_raw("fmnist", str(tmp_path / "data")).train_labels, wanted)


def missing_message(root) -> str:
    with pytest.raises(DataError) as info:
        load_raw("fmnist", root)
    message = str(info.value)
    assert "\n" not in message and message.startswith("fmnist not found: ")
    return message


def test_missing_without_data_root_names_the_three_ways(tmp_path):
    message = missing_message(None)
    assert f"'{fmnist_data.DEBIAN_FOLDER}' does not exist" in message
    assert "install Debian's package dataset-fashion-mnist" in message
    assert "--data-root a folder holding FashionMNIST/raw/ (torchvision's layout)" in message
    assert "--download" in message


def test_missing_under_data_root_names_the_path_and_the_three_ways(tmp_path):
    message = missing_message(str(tmp_path / "nowhere"))
    assert f"'{tmp_path / 'nowhere' / 'FashionMNIST' / 'raw'}' does not exist" in message
    assert f"put torchvision's FashionMNIST/raw/ files into '{tmp_path / 'nowhere'}'" in message
    assert "rerun with --download" in message and "Debian's package dataset-fashion-mnist" in message


def test_a_folder_lacking_one_file_names_it(tmp_path):
    folder = write_fmnist(tmp_path / "data" / "FashionMNIST" / "raw", train=20, test=10)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    message = missing_message(str(tmp_path / "data"))
    assert f"'{folder}' lacks t10k-labels-idx1-ubyte(.gz);" in message


class FakeDownloader:
    """torchvision.datasets.FashionMNIST's download: writes the four files into ROOT/FashionMNIST/raw/."""

    calls: list = []

    def __init__(self, root, train=True, download=False):
        FakeDownloader.calls.append((root, download))
        torchvision_layout(root, train=20, test=10)


def test_download_fetches_into_data_root_only_when_the_files_are_missing(tmp_path, monkeypatch):
    import torchvision

    FakeDownloader.calls = []
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeDownloader)
    root = tmp_path / "fetched"
    check_aligned(load_raw("fmnist", str(root), download=True), 20, 10)
    assert FakeDownloader.calls == [(str(root), True)]
    load_raw("fmnist", str(root), download=True)
    assert len(FakeDownloader.calls) == 1  # found there: nothing fetched again


def test_download_needs_a_root_and_a_failed_one_is_one_line(tmp_path, monkeypatch):
    import torchvision

    with pytest.raises(DataError, match="--download needs --data-root: the folder to fetch fmnist into"):
        load_raw("fmnist", None, download=True)

    def offline(root, train=True, download=False):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DataError) as info:
        load_raw("fmnist", str(tmp_path / "r"), download=True)
    assert "downloading fmnist into" in str(info.value) and "failed (RuntimeError)" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("which, array, words", [
    ("train-images-idx3-ubyte", np.zeros((20, 32, 32), np.uint8), "not Fashion-MNIST's uint8 28x28 images"),
    ("train-labels-idx1-ubyte", np.zeros(19, np.uint8), "not one uint8 label for each of the 20 images"),
    ("train-labels-idx1-ubyte", np.full(20, 10, np.uint8), "holds label 10, outside Fashion-MNIST's classes 0..9"),
])
def test_files_that_are_idx_but_not_fashion_mnist_are_refused(tmp_path, which, array, words):
    folder = write_fmnist(tmp_path / "flat", train=20, test=10, gz=False)
    (folder / which).write_bytes(idx_bytes(array))
    with pytest.raises(DataError) as info:
        load_raw("fmnist", str(folder))
    assert words in str(info.value) and str(folder / which) in str(info.value)


TINY = ["--epochs", "1", "--dense-epochs", "1", "--quiet", "--students", "none", "--batch-size", "16"]


@pytest.mark.parametrize("damage", ["truncate", "magic"])
def test_a_damaged_file_through_the_cli_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, damage):
    root = torchvision_layout(tmp_path / "data", train=20, test=10, gz=False)
    path = root / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    data = path.read_bytes()
    path.write_bytes(data[:-100] if damage == "truncate" else b"\x08\x03" + data[2:])
    out = tmp_path / "run"
    code, err = run_main(["train", *TINY, "--dataset", "fmnist", "--data-root", str(root), "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and f"'{path}'" in err, err
    assert ("is truncated" if damage == "truncate" else "is not an IDX file") in err
    assert not out.exists()


def test_a_missing_dataset_through_the_cli_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_main(["train", *TINY, "--dataset", "fmnist", "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and "fmnist not found" in err and "dataset-fashion-mnist" in err
    assert not out.exists()


def test_image_sides_are_those_of_the_data(tmp_path, fake_cifar):
    root = torchvision_layout(tmp_path / "data", train=20, test=10)
    for name in IMAGE_SIDES:
        raw = load_raw(name, str(root) if name == "fmnist" else str(fake_cifar))
        assert raw.train_images.shape[-2:] == (IMAGE_SIDES[name],) * 2, name


@pytest.mark.parametrize("model, dataset, words", [
    ({"name": "lenet5"}, "digits", "model 'lenet5' needs 16x16 images or larger (its two 5x5 convolutions and two "
                                   "halvings); dataset 'digits' is 8x8: use mlp or lenet300"),
    ({"name": "vgg", "depth": 5}, "fmnist", "model 'vgg' needs 32x32 images or larger (its 5 blocks halve the "
                                            "image 5 times); dataset 'fmnist' is 28x28: use --depth 4 or less"),
    ({"name": "resnet18"}, "digits", "model 'resnet18' is a conv net, and conv nets are not run on dataset 'digits'"),
    ({"name": "vgg", "depth": 3}, "digits", "model 'vgg' is a conv net, and conv nets are not run on dataset 'digits'"),
])
def test_conv_nets_too_big_for_the_images_are_one_sentence(model, dataset, words):
    with pytest.raises(ConfigError) as info:
        build_config(None, None, {"data": {"dataset": dataset}, "model": model, "distill": {"students": []}})
    assert str(info.value).startswith(words), str(info.value)


def test_the_student_is_held_to_the_same_sizes():
    with pytest.raises(ConfigError, match="student model 'vgg' needs 32x32 images or larger .*use --student-depth 4"):
        build_config(None, None, {"data": {"dataset": "fmnist"}, "distill": {"student_model": "vgg"}})
    with pytest.raises(ConfigError, match="student model 'lenet5' convolves twice by 5x5 and halves the image twice "
                                          "and needs --image-size 16 or more, not 12"):
        build_config(None, None, {"data": {"dataset": "folder", "data_root": "x", "image_size": 12},
                                  "distill": {"student_model": "lenet5"}})


@pytest.mark.parametrize("model", [{"name": "lenet5"}, {"name": "vgg", "depth": 4}, {"name": "resnet18"},
                                   {"name": "lenet300"}])
def test_fmnist_admits_lenet5_the_mlps_and_conv_nets_that_fit_28x28(model):
    cfg = build_config(None, None, {"data": {"dataset": "fmnist"}, "model": model,
                                    "distill": {"student_model": "lenet5"}})
    assert cfg.model.name == model["name"]


@pytest.mark.skipif(not REAL.is_dir(), reason=f"Debian's package dataset-fashion-mnist is not installed ({REAL})")
def test_debian_s_package_holds_the_whole_dataset(monkeypatch):
    monkeypatch.setattr(fmnist_data, "DEBIAN_FOLDER", REAL)
    raw = load_raw("fmnist")
    assert raw.train_images.shape == (60_000, 1, 28, 28) and raw.test_images.shape == (10_000, 1, 28, 28)
    assert torch.equal(raw.train_labels.bincount(), torch.full((10,), 6_000))
    assert torch.equal(raw.test_labels.bincount(), torch.full((10,), 1_000))


# ---- end to end: `dsd2-engine train --dataset fmnist` on a tiny copy ----------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("model, relu_layers", [(["--model", "mlp", "--hidden", "32,32"], 2),
                                                (["--model", "lenet5"], 4)])
def test_train_on_a_tiny_fmnist(tmp_path, capsys, model, relu_layers):
    from dsd2.config import from_dict
    from dsd2.runs import RunDir

    root = torchvision_layout(tmp_path / "data", train=60, test=20, gz="mixed")
    out = tmp_path / "run"
    code, err = run_main(["train", *TINY, *model, "--levels", "2", "--dataset", "fmnist", "--data-root", str(root),
                          "--val-fraction", "0.25", "--train-size", "40", "--noise", "0.2", "--out", str(out)],
                         capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and len(summary["relu_layers"]) == relu_layers
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["level"] for r in rows] == [0, 1, 2] and rows[2]["sparsity"] == pytest.approx(1 - 0.8 ** 2, abs=0.01)
    assert all(0.0 <= r["test_acc"] <= 1.0 and r["entropy_mean"] is not None for r in rows)
    cfg = from_dict(RunDir(out).stored_config()["config"])
    s = build_splits(cfg.data, cfg.seed, torch.device("cpu"))
    assert (len(s.train), len(s.val), len(s.test)) == (40, 15, 20) and s.input_shape == (1, 28, 28)

