"""`--dataset folder`: images in torchvision's ImageFolder layout, decoded once, split, and refused clearly."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dsd2.cli import main
from dsd2.config import ConfigError, build_config
from dsd2.data import DataError, build_splits, num_classes
from dsd2.data import folder as folder_data

TINY = ["--epochs", "1", "--dense-epochs", "1", "--levels", "1", "--quiet", "--model", "mlp", "--hidden", "16",
        "--image-size", "16"]
CLASSES = ("cat", "dog", "fish")  # ImageFolder's sorted order: 0, 1, 2
RED = {0: 30, 1: 130, 2: 230}  # each class's solid red level, so a decoded image names its class
SHAPES = [(20, 12), (9, 30), (16, 16), (40, 25)]  # (width, height), none of them 16x16 after a resize alone
MODES = ["RGB", "L", "RGBA", "P"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSD2_CACHE_DIR", str(tmp_path / "cache"))


def write_image(path, label, i, red=None):
    """A solid image of its class: mixed sizes, modes (RGB, grey, RGBA, palette) and formats (PNG, JPEG)."""
    v = RED[label] if red is None else red
    w, h = SHAPES[i % len(SHAPES)]
    mode = MODES[i % len(MODES)]
    color = {"RGB": (v, 255 - v, v // 2), "L": v, "RGBA": (v, 40, 200, 255), "P": (v, 10, 10)}[mode]
    img = Image.new("RGB" if mode == "P" else mode, (w, h), color)
    if mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE)
    jpeg = i % 3 == 1 and mode in ("RGB", "L")
    path = path.with_suffix(".jpg" if jpeg else ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def make_tree(root, **per_split):
    """root/<split>/<class>/img_i.{png,jpg}: per_split maps a split folder to its images per class."""
    for split, n in per_split.items():
        for label, name in enumerate(CLASSES):
            for i in range(n):
                write_image(root / split / name / f"img_{i}", label, i)
    return root


def labels_from_pixels(images):
    """The class each solid image shows, from its red level (JPEG is off by a few units at most)."""
    red = images[:, 0].float().mean((1, 2))
    levels = torch.tensor([RED[k] for k in range(len(CLASSES))], dtype=torch.float32)
    return (red[:, None] - levels[None]).abs().argmin(1)


def run_main(args, capsys):
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def splits_of(out):
    from dsd2.config import from_dict
    from dsd2.runs import RunDir

    cfg = from_dict(RunDir(out).stored_config()["config"])
    return cfg, build_splits(cfg.data, cfg.seed, torch.device("cpu"))


def test_train_on_a_folder_splits_by_the_fractions(tmp_path, capsys):
    root = make_tree(tmp_path / "imgs", train=10)  # 30 images: 6 test, 24 pool: 6 validation, 18 training
    out = tmp_path / "run"
    code, err = run_main(["train", *TINY, "--dataset", "folder", "--data-root", str(root), "--students", "none",
                          "--test-fraction", "0.2", "--val-fraction", "0.25", "--out", str(out)], capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["finished"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # dense + 1 level
    cfg, s = splits_of(out)
    assert cfg.data.data_root == str(root) and cfg.data.image_size == 16
    assert (len(s.train), len(s.val), len(s.test)) == (18, 6, 6)
    assert s.num_classes == 3 and s.input_shape == (3, 16, 16) and s.train.images.dtype == torch.uint8
    assert torch.equal(labels_from_pixels(s.train.images), s.train_clean_labels)
    assert torch.equal(labels_from_pixels(s.test.images), s.test.labels)
    assert torch.equal(s.noisy_mask, s.train.labels != s.train_clean_labels)  # noise on top of the folder labels


def test_explicit_val_and_test_folders(tmp_path, capsys):
    root = make_tree(tmp_path / "imgs", train=8, val=2, test=3)
    out = tmp_path / "run"
    code, err = run_main(["train", *TINY, "--dataset", "folder", "--data-root", str(root), "--students", "none",
                          "--clean-val", "--out", str(out)], capsys)
    assert code == 0, err
    _, s = splits_of(out)
    assert (len(s.train), len(s.val), len(s.test)) == (24, 6, 9)  # the folders' sizes, not the fractions
    assert torch.equal(s.val.labels, torch.arange(3).repeat_interleave(2))  # clean, in folder order
    assert torch.equal(labels_from_pixels(s.val.images), s.val.labels)
    assert torch.equal(s.test.labels, torch.arange(3).repeat_interleave(3))
    assert torch.equal(labels_from_pixels(s.test.images), s.test.labels)
    assert torch.equal(labels_from_pixels(s.train.images), s.train_clean_labels)


def test_distilled_students_take_the_class_count_from_the_folders(tmp_path, capsys):
    root = make_tree(tmp_path / "imgs", train=6)
    assert num_classes("folder", str(root)) == 3
    out = tmp_path / "run"
    code, err = run_main(["train", *TINY, "--dataset", "folder", "--data-root", str(root), "--students", "kd-dense",
                          "--student-hidden", "8", "--out", str(out)], capsys)
    assert code == 0, err
    assert (out / "students" / "kd-dense" / "summary.json").exists()


def test_images_are_rgb_resized_by_the_shorter_side_and_center_cropped(tmp_path):
    path = tmp_path / "wide.png"
    pixels = np.zeros((10, 40), dtype=np.uint8)  # grey, 40 wide and 10 high: 4 stripes of 10 columns
    for k in range(4):
        pixels[:, 10 * k:10 * (k + 1)] = 60 * k
    Image.fromarray(pixels, "L").save(path)
    out = folder_data.decode_image(str(path), 5)  # resized to 20x5: the crop keeps the middle two stripes
    assert out.shape == (3, 5, 5) and out.dtype == np.uint8
    assert (out[0] == out[1]).all() and (out[1] == out[2]).all()  # grey made RGB
    assert out[0, 0, 0] <= 62 and out[0, 0, -1] >= 118 and out[0, 0, 1] == 60


def test_the_second_load_reads_the_cache_and_a_changed_file_decodes_again(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "imgs", train=4)
    first = folder_data.load_image_folder(root, 8, 0.25)
    with monkeypatch.context() as m:
        m.setattr(folder_data, "decode_image", lambda *a: pytest.fail("decoded although cached"))
        again = folder_data.load_image_folder(root, 8, 0.25)
    assert torch.equal(first.train_images, again.train_images) and torch.equal(first.test_labels, again.test_labels)
    target = sorted((root / "train" / "cat").iterdir())[0]
    target.unlink()
    write_image(root / "train" / "cat" / target.stem, 0, int(target.stem[4:]), red=90)
    changed = folder_data.load_image_folder(root, 8, 0.25)
    assert not torch.equal(torch.cat([first.train_images, first.test_images]),
                           torch.cat([changed.train_images, changed.test_images]))
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the stale entry is gone


def break_empty_class(root):
    for p in (root / "train" / "dog").iterdir():
        p.unlink()
    return root / "train" / "dog"


def break_corrupt_image(root):
    path = root / "train" / "fish" / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really an image" * 4)
    return path


def break_val_classes(root):
    make_tree(root, val=1)
    (root / "val" / "fish").rename(root / "val" / "whale")
    return root / "val"


def break_missing_train(root):
    (root / "train").rename(root / "training")
    return root


@pytest.mark.parametrize("damage, words", [
    (break_empty_class, "holds no images"),
    (break_corrupt_image, "cannot read image"),
    (break_val_classes, "lacks fish and has whale besides"),
    (break_missing_train, "has no train/ folder"),
])
def test_a_bad_folder_is_one_line_exit_2_and_touches_nothing(tmp_path, capsys, damage, words):
    root = make_tree(tmp_path / "imgs", train=3)
    named = damage(root)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("precious")  # a claim would refuse this folder: the data error comes first
    before = snapshot(out)
    code, err = run_main(["train", *TINY, "--dataset", "folder", "--data-root", str(root), "--students", "none",
                          "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert words in err and f"'{named}" in err
    assert snapshot(out) == before


def test_a_missing_root_names_it(tmp_path, capsys):
    code, err = run_main(["train", *TINY, "--dataset", "folder", "--data-root", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and f"'{tmp_path / 'nope'}' does not exist" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, words", [
    ([], "dataset 'folder' needs --data-root"),
    (["--data-root", "x", "--image-size", "0"], "image size 0 must be a whole number of pixels in 1..1024"),
    (["--data-root", "x", "--test-fraction", "1.5"], "test fraction 1.5 is outside (0, 1)"),
    (["--data-root", "x", "--model", "vgg", "--depth", "5"], "needs --image-size 32 or more, not 16"),
    (["--data-root", "x", "--students", "vanilla", "--student-model", "vgg"], "student model 'vgg' with 5 blocks"),
])
def test_bad_folder_settings_are_refused(tmp_path, capsys, args, words):
    out = tmp_path / "run"
    code, err = run_main(["train", *TINY, "--dataset", "folder", *args, "--out", str(out)], capsys)
    assert code == 2 and words in err and err.count("\n") == 1, err
    assert not out.exists()


def test_asymmetric_noise_needs_ten_class_folders(tmp_path):
    root = make_tree(tmp_path / "imgs", train=3)
    cfg = build_config(overrides={"data": {"dataset": "folder", "data_root": str(root), "noise_type": "asymmetric"}})
    with pytest.raises(DataError, match="needs 10 classes; folder '.*' has 3"):
        build_splits(cfg.data, 0, torch.device("cpu"))


def test_too_few_images_for_the_fractions(tmp_path):
    root = make_tree(tmp_path / "imgs", train=1)  # 3 images
    with pytest.raises(DataError, match="has 3 images and --test-fraction 0.1 leaves no test images"):
        folder_data.load_image_folder(root, 8, 0.1)


def test_the_folder_names_the_run(tmp_path):
    a, b = make_tree(tmp_path / "a", train=1), make_tree(tmp_path / "b", train=1)
    ca = build_config(overrides={"data": {"dataset": "folder", "data_root": str(a)}})
    cb = build_config(overrides={"data": {"dataset": "folder", "data_root": str(b)}})
    assert ca.run_hash() != cb.run_hash()
    # elsewhere the folder-only fields change nothing
    d1 = build_config(overrides={"data": {"image_size": 64, "test_fraction": 0.5}})
    assert d1.run_hash() == build_config().run_hash()
    with pytest.raises(ConfigError, match="test fraction 0"):
        build_config(overrides={"data": {"test_fraction": 0.0}})
