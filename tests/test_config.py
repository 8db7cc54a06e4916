import pytest

from dsd2.config import PRESETS, Config, ConfigError, build_config


def test_default_is_the_embedded_digits_preset():
    cfg = build_config()
    assert cfg.data.dataset == "digits" and cfg.model.name == "mlp"
    assert cfg.data.noise == 0.5 and cfg.optim.optimizer == "adam" and cfg.prune.levels == 28


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate(name):
    cfg = build_config(name)
    assert isinstance(cfg, Config)


def test_fmnist_lenet5_pairs_a_conv_teacher_with_a_smaller_mlp_student(tmp_path):
    from dsd2.models import build_model
    from dsd2.run.experiment import student_config

    cfg = build_config("fmnist-lenet5")
    assert (cfg.data.dataset, cfg.data.train_size, cfg.model.name, cfg.precision) == ("fmnist", 2000, "lenet5", "fp32")
    student = student_config(cfg, "kd-sparse", tmp_path, "0" * 12, 3)
    assert student.model.name == "mlp" and student.model.hidden == (32, 32)
    teacher_n = sum(p.numel() for p in build_model(cfg.model, (1, 28, 28), 10).parameters())
    student_n = sum(p.numel() for p in build_model(student.model, (1, 28, 28), 10).parameters())
    assert student_n == 784 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10 == 26506 < teacher_n == 44426


def test_paper_cifar_recipe():
    o = build_config("cifar10-resnet18").optim
    assert (o.optimizer, o.lr, o.momentum, o.weight_decay, o.batch_size, o.epochs) == ("sgd", 0.1, 0.9, 1e-4, 128, 160)
    assert o.milestones == (0.5, 0.75)


def test_hash_is_stable_and_ignores_data_root():
    a = build_config(overrides={"data": {"data_root": "/x"}})
    b = build_config(overrides={"data": {"data_root": "/y"}})
    c = build_config(overrides={"seed": 1})
    assert a.run_hash() == b.run_hash() != c.run_hash()
    assert len(a.run_hash()) == 12


def test_yaml_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 3\noptim:\n  epochs: 7\n  lr: 0.01\n")
    cfg = build_config(None, str(f), {"optim": {"lr": 0.5}})
    assert cfg.seed == 3 and cfg.optim.epochs == 7 and cfg.optim.lr == 0.5


@pytest.mark.parametrize("override, words", [
    ({"data": {"noise": 1.0}}, "noise 1.0 is outside [0, 1)"),
    ({"data": {"noise": -0.1}}, "outside [0, 1)"),
    ({"model": {"name": "alexnet"}}, "model 'alexnet' is not known"),
    ({"data": {"dataset": "mnist"}}, "dataset 'mnist' is not known"),
    ({"prune": {"prune_fraction": 1.5}}, "prune fraction"),
    ({"optim": {"epochs": 0}}, "epochs 0"),
    ({"bogus": 1}, "unknown config key 'bogus'"),
    ({"optim": {"bogus": 1}}, "unknown config key 'optim.bogus'"),
    ({"device": "tpu"}, "device 'tpu'"),
])
def test_bad_values_name_the_value(override, words):
    with pytest.raises(ConfigError, match=None) as info:
        build_config(None, None, override)
    assert words in str(info.value)


def test_bad_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(None, str(f))
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(None, str(tmp_path / "missing.yaml"))


def test_target_sparsity_sets_levels():
    cfg = build_config(overrides={"prune": {"target_sparsity": 0.9, "prune_fraction": 0.2}})
    n = cfg.num_levels()
    assert 0.8 ** n <= 0.1 < 0.8 ** (n - 1)


def test_validation_split_defaults():
    assert build_config("cifar10-resnet18").data.val_fraction == 0.1
    assert build_config().data.val_fraction == pytest.approx(1 / 6)  # digits: 1000 train / 200 validation


@pytest.mark.parametrize("override, words", [
    ({"optim": {"lr": "abc"}}, "optim.lr = 'abc' has the wrong type"),
    ({"model": {"hidden": 256}}, "model.hidden = 256 has the wrong type"),
    ({"distill": {"alpha": "x"}}, "distill.alpha = 'x' has the wrong type"),
    ({"optim": {"lr": float("nan")}}, "learning rate nan"),
    ({"data": {"val_fraction": 0.0}}, "val fraction 0.0 is outside (0, 1)"),
    ({"prune": {"perturb": "rewind", "rewind_iteration": 500}}, "rewind iteration 500"),
    ({"optim": {"momentum": 1.5}}, "momentum 1.5"),
    ({"distill": {"teacher_level": 99}}, "teacher level 99 is beyond"),
    ({"distill": {"student_model": "vgg"}}, "student model 'vgg' needs 32x32"),
])
def test_wrong_types_and_ranges_are_one_sentence(override, words):
    with pytest.raises(ConfigError) as info:
        build_config(None, None, override)
    assert words in str(info.value)


# ---- the fields' own descriptions: help, flag, choices --------------------------------------------------------


def test_every_field_is_declared_with_help_and_known_metadata_keys():
    from dataclasses import fields

    from dsd2.config import OPTION_KEYS, SECTIONS, config_options

    leaves = [f for cls in SECTIONS.values() for f in fields(cls)]
    leaves += [f for f in fields(Config) if f.name not in SECTIONS]
    assert len(config_options()) == len(leaves)
    for f in leaves:
        assert f.metadata.get("help", "").strip(), f"config field {f.name} has no help"
        assert set(f.metadata) <= set(OPTION_KEYS), f.name


def test_choice_defaults_are_allowed_choices():
    from dsd2.config import config_options

    cfg = Config()
    for opt in config_options():
        if opt.choices is not None:
            value = opt.value(cfg)
            assert set(value if opt.is_list else [value]) <= set(opt.choices), opt.path


def _bad_choice_cases():
    from dsd2.config import config_options

    for opt in config_options():
        if opt.choices is not None:
            value = ("bogus",) if opt.is_list else "bogus"
            override = {opt.name: value} if opt.section is None else {opt.section: {opt.name: value}}
            yield pytest.param(override, f"{opt.label} 'bogus' is not known; allowed: {', '.join(opt.choices)}",
                               id=opt.path)


@pytest.mark.parametrize("override, sentence", list(_bad_choice_cases()))
def test_every_choice_field_is_validated_in_one_sentence(override, sentence):
    with pytest.raises(ConfigError) as info:
        build_config(None, None, override)
    assert str(info.value) == sentence


def test_field_descriptions():
    from dsd2.config import CRITERIA, config_options

    opts = {o.path: o for o in config_options()}
    assert (opts["model.hidden"].kind, opts["model.hidden"].is_list) == ("int", True)
    assert (opts["optim.milestones"].kind, opts["optim.milestones"].is_list) == ("float", True)
    assert (opts["optim.dense_epochs"].kind, opts["optim.dense_epochs"].optional) == ("int", True)
    assert (opts["cuda_graphs"].kind, opts["cuda_graphs"].optional) == ("bool", True)
    assert opts["distill.teacher_level"].kind == "str"
    assert opts["model.name"].flag == "model" and opts["analysis.granularity"].flag == "entropy-granularity"
    assert opts["prune.criterion"].choices == CRITERIA and opts["prune.criterion"].label == "pruning criterion"
    assert opts["distill.teacher"].flag is None and opts["distill.teacher_id"].flag is None
    assert opts["optim.batch_size"].flag == "batch-size" and opts["optim.batch_size"].label == "batch size"


def test_new_ranges_are_one_sentence():
    with pytest.raises(ConfigError, match="gradient batches 0 must be a whole number >= 1"):
        build_config(overrides={"prune": {"gradient_batches": 0}})
    with pytest.raises(ConfigError, match="nesterov momentum needs momentum > 0"):
        build_config(overrides={"optim": {"optimizer": "sgd", "momentum": 0.0, "nesterov": True}})
