"""Typed run configuration: presets, YAML loading, flag overrides, validation and the run hash.

Every field carries its command-line description in its `metadata` (see `option`), so the CLI's flags are
generated from these dataclasses: adding a config field is one edit, here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# ---- the choice lists: defined here once; the CLI, models, pruning, analysis and ops import them -------------

# how the loop draws its random numbers (dsd2/rng.py: named streams seeded by a hash); part of every run hash, so a
# run directory made with other draws is never resumed or taken as finished
RANDOM_STREAMS = "named-blake2b-v1"
DATASETS = ("digits", "fmnist", "cifar10", "cifar100", "folder")
MODELS = ("mlp", "lenet300", "lenet5", "vgg", "resnet18")
CUSTOM = "custom"  # the model or data is given to the Python API (dsd2.prune), named by its fingerprint
CONV_MODELS = ("lenet5", "vgg", "resnet18")
# the side of each built-in dataset's square images (folder: --image-size); tests/data holds it to the data read
IMAGE_SIDES = {"digits": 8, "fmnist": 28, "cifar10": 32, "cifar100": 32}
NOISE_TYPES = ("symmetric", "asymmetric", "pairflip")
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("multistep", "cosine", "constant")
CRITERIA = ("magnitude", "random", "gradient")
PERTURBATIONS = ("none", "rewind", "reinit")
RETRAIN_SCHEDULES = ("restart", "finetune", "lr-rewind")
PRECISIONS = ("auto", "fp32", "bf16")
ENTROPY_MODES = ("pass", "online", "off")
GRANULARITIES = ("element", "channel")
EARLY_STOP_RULES = ("none", "entropy", "val")
STUDENT_KINDS = ("vanilla", "kd-dense", "kd-sparse")
FOLDER_ONLY = ("test_fraction", "image_size")  # data fields read only by --dataset folder
MAX_IMAGE_SIZE = 1024
LAUNCHERS = ("local", "slurm", "submitit-local")  # how `sweep` runs its grid
DEVICE_HELP = "cpu, cuda, cuda:N or auto"


class ConfigError(ValueError):
    """A user-facing configuration problem; its message is one sentence naming the value."""


# ---- a field and its flag -----------------------------------------------------------------------------------

OPTION_KEYS = ("help", "flag", "choices", "metavar", "label")


def option(default: Any, help: str, *, flag: str | None = "", choices: tuple[str, ...] | None = None,
           metavar: str | None = None, label: str | None = None) -> Any:
    """A config field described for the command line; the description is the field's `metadata`:

    help     what the flag means (every field has one)
    flag     the flag's name without the dashes, where it is not the field's name with '-' for '_';
             None: no flag, the program sets the field
    choices  the allowed values (of each item, for a tuple field); `validate` checks them too
    metavar  the value's placeholder in --help
    label    the field's name in error sentences, where it is not the field's name with ' ' for '_'
    """
    meta: dict[str, Any] = {"help": help}
    if flag != "":
        meta["flag"] = flag
    for key, value in (("choices", choices), ("metavar", metavar), ("label", label)):
        if value is not None:
            meta[key] = value
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    dataset: str = option("digits", "the embedded handwritten digits, Fashion-MNIST (fmnist: Debian's package "
                          "dataset-fashion-mnist, or from --data-root), CIFAR read from --data-root, or the images of "
                          "--data-root in torchvision's ImageFolder layout (folder)", choices=(*DATASETS, CUSTOM))
    fingerprint: str = option("", "fingerprint of data given to the Python API (dsd2.prune): shapes, classes and a "
                              "hash of the tensors; set by the API", flag=None)
    data_root: str | None = option(None, "folder holding CIFAR or Fashion-MNIST in torchvision's layout, or "
                                   "(--dataset folder) train/<class>/ images with optional val/ and test/",
                                   metavar="DIR")
    download: bool = option(False, "fetch CIFAR or Fashion-MNIST into --data-root")
    noise: float = option(0.5, "fraction of training labels corrupted, in [0, 1)")
    noise_type: str = option("symmetric", "a corrupted label is any other class (symmetric), the CIFAR-10 class "
                             "map's (asymmetric) or the next class (pairflip)", choices=NOISE_TYPES)
    val_fraction: float = option(0.1, "fraction of the training set held out for validation (it selects w_best)")
    train_size: int | None = option(None, "train on this many images, drawn for the seed from those the validation "
                                    "split leaves; the validation split and the label noise stay those of the whole "
                                    "training set (unset: train on all of them)", metavar="N")
    test_fraction: float = option(0.2, "--dataset folder without test/: fraction of the train/ images held out as "
                                  "the test set")
    image_size: int = option(32, "--dataset folder: images are made RGB, their shorter side resized to this and "
                             "center-cropped to a square", metavar="PX")
    clean_val: bool = option(False, "keep validation labels clean")
    augment: bool = option(False, "random crop (pad 4) and horizontal flip of the training images")


@dataclass
class ModelConfig:
    name: str = option("mlp", "the network (the teacher, in the DSD² experiment)", flag="model", label="model",
                       choices=(*MODELS, CUSTOM))
    hidden: tuple[int, ...] = option((256, 256), "MLP widths, e.g. 256,256", metavar="W1,W2")
    depth: int = option(5, "VGG-like blocks (delta)")
    width: int = option(5, "VGG-like log2 of first-block filters (gamma)")
    module: str = option("", "fingerprint of a model given to the Python API (dsd2.prune): its class, parameter "
                         "names and shapes; set by the API, empty for the built-in models", flag=None)


@dataclass
class OptimConfig:
    optimizer: str = option("adam", "SGD (with --momentum) or Adam; pruned weights stay 0 either way",
                            choices=OPTIMIZERS)
    lr: float = option(1e-3, "peak learning rate: the schedule starts from it")
    momentum: float = option(0.9, "SGD momentum, in [0, 1)")
    weight_decay: float = option(0.0, "L2 weight decay")
    nesterov: bool = option(False, "Nesterov momentum (SGD)")
    batch_size: int = option(64, "training batch size")
    epochs: int = option(40, "epochs per pruning level")
    dense_epochs: int | None = option(120, "epochs of the dense level 0 (unset: --epochs)")
    lr_schedule: str = option("cosine", "learning-rate schedule of a level: steps at --milestones, cosine or "
                              "constant", choices=LR_SCHEDULES)
    milestones: tuple[float, ...] = option((0.5, 0.75), "fractions of a level's epochs where multistep multiplies "
                                           "the learning rate by --lr-decay, e.g. 0.5,0.75", metavar="F1,F2")
    gamma: float = option(0.1, "factor multistep multiplies the learning rate by at each milestone",
                          flag="lr-decay", label="lr decay factor")


@dataclass
class PruneConfig:
    levels: int = option(28, "pruning levels after the dense one")
    target_sparsity: float | None = option(None, "stop at this sparsity (overrides --levels)")
    prune_fraction: float = option(0.2, "fraction of remaining weights removed per level")
    criterion: str = option("magnitude", "global score of every Conv/Linear weight: |w|, random, or |w·dL/dw| "
                            "over a few batches", choices=CRITERIA, label="pruning criterion")
    gradient_batches: int = option(4, "batches whose gradients score the weights (--criterion gradient)")
    perturb: str = option("none", "after each prune: keep the trained weights, rewind to the initial ones, or "
                          "re-draw them", choices=PERTURBATIONS, label="perturbation")
    rewind_iteration: int = option(0, "rewind to the weights after this many dense epochs")
    retrain: str = option("restart", "each level restarts the schedule, fine-tunes at a reduced learning rate, "
                          "or replays the dense schedule's last epochs", choices=RETRAIN_SCHEDULES,
                          label="retrain schedule")
    finetune_lr_scale: float = option(0.01, "learning rate of --retrain finetune, as a fraction of --lr")
    include: tuple[str, ...] = option(("*",), "which Conv/Linear weights are pruned: name patterns (fnmatch), e.g. "
                                      "'layer*'", flag="prune-include", metavar="P1,P2")
    exclude: tuple[str, ...] = option((), "Conv/Linear weights kept dense: name patterns, e.g. conv1.weight,fc.weight "
                                      "(the first conv and the classifier)", flag="prune-exclude", metavar="P1,P2")


@dataclass
class AnalysisConfig:
    entropy: str = option("pass", "ReLU-state entropy: a counting pass over the training split after each level, "
                          "online in the last epoch, or off", choices=ENTROPY_MODES, label="entropy mode")
    granularity: str = option("element", "entropy per output element (eq. 1) or per channel",
                              flag="entropy-granularity", choices=GRANULARITIES, label="entropy granularity")
    inclusive: bool = option(False, "on-state is x >= 0 (else x > 0)", flag="entropy-inclusive")
    early_stop: str = option("none", "stop the pruning loop: never, once the entropy falls, or once validation "
                             "stops improving", choices=EARLY_STOP_RULES, label="early-stop rule")
    patience: int = option(3, "levels without validation improvement before stopping")
    entropy_tolerance: float = option(0.05, "relative fall below the running maximum that counts as decreasing")
    dodge_margin: float = option(0.01, "a dip whose 95 % upper bound stays below this accuracy fraction counts as "
                                 "dodged (default 0.01 = 1 point); read by the verdicts, not by training")


@dataclass
class DistillConfig:
    """The DSD² experiment: teacher curve, then students pruned by the same loop (vanilla or distilled).

    On a student's own run, `teacher` names its KD teacher as "RUN_DIR:LEVEL" (None: plain cross-entropy)
    and `teacher_id` is that teacher's run hash and level, which names the student run.
    """

    students: tuple[str, ...] = option(STUDENT_KINDS, "student curves after the teacher's: any of "
                                       f"{','.join(STUDENT_KINDS)}, or none", choices=STUDENT_KINDS,
                                       label="student")
    teacher_level: str | int = option("best", "teacher for kd-sparse: best (validation), dense, or a level number")
    alpha: float = option(0.8, "weight of the KD term (default 0.8)")
    temperature: float = option(10.0, "KD temperature tau (default 10)")
    student_model: str = option("mlp", "the students' network", choices=MODELS)
    student_hidden: tuple[int, ...] = option((128, 128), "the students' MLP widths", metavar="W1,W2")
    student_depth: int = option(5, "the students' VGG-like blocks (delta)")
    student_width: int = option(5, "the students' VGG-like log2 of first-block filters (gamma)")
    teacher: str | None = option(None, "a student run's KD teacher, RUN_DIR:LEVEL (set by `distill` and the "
                                 "experiment)", flag=None)
    teacher_id: str | None = option(None, "the teacher's run hash and level, which names a student run", flag=None)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    seed: int = option(0, "seed of every random stream (initialisation, noise, shuffling, augmentation)")
    seeds: tuple[int, ...] = option((), "run the configuration once per seed, each in ROOT/seed-S, and aggregate "
                                    "them (mean ± std, 95 % intervals, verdicts), e.g. 0,1,2", metavar="S1,S2")
    device: str = option("cpu", DEVICE_HELP)
    precision: str = option("auto", "auto (default): bf16 autocast for conv nets where the CPU or GPU computes "
                            "bf16 natively (AVX-512 BF16, AMX, Ampere and later), else fp32; made concrete for the "
                            "model built before the run is named (dsd2/training/precision.py)", choices=PRECISIONS)
    channels_last: bool = option(True, "conv nets in the channels_last memory format")
    cuda_graphs: bool | None = option(None, "capture the training step, evaluation and the counting pass as CUDA "
                                      "graphs (default: on with CUDA in a single process)")
    cpu_step: str = option("auto", "the CPU training step: auto (default) runs a whole epoch of a Linear/ReLU "
                           "chain (the MLPs) as one C++ call, the eager epoch's ops bit for bit, and the eager step "
                           "for anything else; eager keeps the eager step; fused refuses a run it cannot take",
                           choices=("auto", "fused", "eager"))
    sparse_kernels: str = option("auto", "the masked layers' products over their kept weights only (fp32; C++ on "
                                 "the CPU, dsd2/ops/sparse_layers.py; torch.sparse CSR, i.e. cuSPARSE, on CUDA "
                                 "outside CUDA graphs, dsd2/ops/sparse_csr.py): auto (default) takes them on a "
                                 "layer at least as sparse as the crossover measured for its shape on this machine "
                                 "and cached, "
                                 "on takes them on every layer, off keeps the dense masked products; the results "
                                 "differ by fp32 reduction order only", choices=("auto", "on", "off"))
    checkpoint_every: float = option(10.0, "seconds between a level's checkpoints for resume (default 10): an "
                                     "epoch ends with one when this long has passed since the last, and a level's "
                                     "last epoch always does; 0 = after every epoch. A killed run resumes from the "
                                     "last one and recomputes the same epochs", metavar="S")
    epoch_eval: str = option("every", "every (default): each epoch's row in epochs.jsonl carries validation "
                             "and test accuracy and loss, one pass over both splits per epoch; level: only the "
                             "level's row measures them (metrics.jsonl is the same), which saves that pass: about "
                             "half an epoch's time for a conv net on the 10,000 Fashion-MNIST test images",
                             choices=("every", "level"))
    jobs: int = option(0, "independent runs side by side on the CPU (the seeds, the experiment's parts that do "
                       "not wait for each other, a study's settings), each in its own process at one thread: 0 "
                       "(default) = one per core for MLP runs and one at a time for anything else, 1 = one after "
                       "another; the numbers do not depend on it", metavar="N")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def run_hash(self) -> str:
        """A stable name for the run: a hash of the fields that differ from their defaults and change its results
        (OpenLTH's rule), so a field added with a default that changes nothing renames no run. Pinned by literal
        hashes in tests/test_run_identity.py."""
        text = json.dumps(identity_fields(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def legacy_run_hash(self) -> str:
        """The name release 0.1.0 gave this run (`legacy_run_hash`), by which its old folders are found."""
        return legacy_run_hash(self.to_dict())

    def num_levels(self) -> int:
        """Pruning levels after the dense one, from `levels` or from `target_sparsity`."""
        if self.prune.target_sparsity is None:
            return self.prune.levels
        keep = 1.0 - self.prune.target_sparsity
        return math.ceil(math.log(keep) / math.log(1.0 - self.prune.prune_fraction) - 1e-9)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# fields that say where a run's inputs live, how its results are judged, what is logged beside them (epoch_eval)
# or how the same results are computed (the
# fused CPU step is the eager step bit for bit; the sparse kernels compute the masked layers' function in another
# fp32 reduction order, as another CPU kernel level does), not what they are; the data root and the
# folder-only fields name the data only for --dataset folder (an image folder is its own dataset)
NOT_IDENTITY = ("data.download", "distill.teacher", "analysis.dodge_margin", "cpu_step", "jobs",
                "checkpoint_every", "sparse_kernels", "epoch_eval")
FOLDER_IDENTITY = ("data.data_root", *(f"data.{name}" for name in FOLDER_ONLY))
FIRST_RANDOM_STREAMS = "named-blake2b-v1"  # the draws every run before a change of RANDOM_STREAMS made


@functools.cache
def _default_values() -> dict[str, Any]:
    return {opt.path: _plain(opt.value(Config())) for opt in config_options()}


def identity_fields(cfg: Config) -> dict[str, Any]:
    """What names a run: {"section.field": value} for every field that differs from its default and changes the
    run's results. A new field's default must leave a run's results as they were: then no old run is renamed."""
    defaults = _default_values()
    out: dict[str, Any] = {}
    for opt in config_options():
        if opt.path in NOT_IDENTITY or (cfg.data.dataset != "folder" and opt.path in FOLDER_IDENTITY):
            continue
        value = _plain(opt.value(cfg))
        if value != defaults[opt.path]:
            out[opt.path] = value
    if RANDOM_STREAMS != FIRST_RANDOM_STREAMS:  # a run made with other draws is another run
        out["random_streams"] = RANDOM_STREAMS
    return out


# Release 0.1.0 hashed every field it had. Its field list is frozen here, so fields added since are left out and
# the folders it wrote are still recognised (dsd2/run/identity.py renames and upgrades them).
LEGACY_FIELDS: dict[str | None, tuple[str, ...]] = {
    "data": ("dataset", "fingerprint", "data_root", "download", "noise", "noise_type", "val_fraction",
             "test_fraction", "image_size", "clean_val", "augment"),
    "model": ("name", "hidden", "depth", "width", "module"),
    "optim": ("optimizer", "lr", "momentum", "weight_decay", "nesterov", "batch_size", "epochs", "dense_epochs",
              "lr_schedule", "milestones", "gamma"),
    "prune": ("levels", "target_sparsity", "prune_fraction", "criterion", "gradient_batches", "perturb",
              "rewind_iteration", "retrain", "finetune_lr_scale", "include", "exclude"),
    "analysis": ("entropy", "granularity", "inclusive", "early_stop", "patience", "entropy_tolerance",
                 "dodge_margin"),
    "distill": ("students", "teacher_level", "alpha", "temperature", "student_model", "student_hidden",
                "student_depth", "student_width", "teacher", "teacher_id"),
    None: ("seed", "seeds", "device", "precision", "channels_last", "cuda_graphs"),
}


def legacy_run_hash(config: dict[str, Any]) -> str:
    """Release 0.1.0's run hash of a config in its plain form (`Config.to_dict`, or a stored config.yaml's)."""
    payload: dict[str, Any] = {name: config[name] for name in LEGACY_FIELDS[None] if name in config}
    for section, names in LEGACY_FIELDS.items():
        if section is not None:
            payload[section] = {name: config[section][name] for name in names if name in config.get(section, {})}
    payload["random_streams"] = FIRST_RANDOM_STREAMS
    if payload["data"].get("dataset") != "folder":
        for name in ("data_root", *FOLDER_ONLY):
            payload["data"].pop(name, None)
    payload["data"].pop("download", None)
    payload["distill"].pop("teacher", None)
    payload["analysis"].pop("dodge_margin", None)
    if not payload.get("seeds"):
        payload.pop("seeds", None)
    text = json.dumps(_plain(payload), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _cifar_preset(dataset: str, model: dict[str, Any], distill: dict[str, Any]) -> dict[str, Any]:
    """The paper's CIFAR recipe: SGD 0.1, momentum 0.9, wd 1e-4, batch 128, 160 epochs per level with lr x0.1
    at 50 % and 75 %, crop + flip, 20 % symmetric noise, 30 levels of 20 %."""
    return {
        "data": {"dataset": dataset, "noise": 0.2, "val_fraction": 0.1, "augment": True},
        "model": model,
        "optim": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 128,
                  "epochs": 160, "dense_epochs": None, "lr_schedule": "multistep"},
        "prune": {"levels": 30},
        "distill": {"student_model": "vgg", "student_depth": 5, "student_width": 5, **distill},
    }


PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: real handwritten digits shipped with scikit-learn, 50 % symmetric noise,
    # an MLP that interpolates the noise when dense. 1000 train / 200 val / 597 test.
    "digits-mlp": {"data": {"val_fraction": 1 / 6}},
    # the same over three seeds, aggregated with intervals and verdicts: the README's claims
    "digits-mlp-3seeds": {"data": {"val_fraction": 1 / 6}, "seeds": (0, 1, 2)},
    # Fashion-MNIST (10,000 test images, enough to decide the verdicts): 5,000 training images drawn for the
    # seed, 20 % symmetric noise, MLP 784-256-256-10 teacher, 784-128-128-10 students, 26 levels of 20 %
    "fmnist-mlp": {"data": {"dataset": "fmnist", "noise": 0.2, "train_size": 5000, "val_fraction": 0.1},
                   "optim": {"batch_size": 128}, "prune": {"levels": 26}},
    # the paper's pairing on Fashion-MNIST: a LeNet-5-style conv teacher, a smaller MLP student (784-32-32-10).
    # 2,000 training images (at 5,000 the conv net does not memorise 20 % noise), 20 levels of 20 %, fp32
    # (bf16 autocast makes so small a conv net slower on CPUs without AMX), validation once per level
    "fmnist-lenet5": {"data": {"dataset": "fmnist", "noise": 0.2, "train_size": 2000, "val_fraction": 0.1},
                      "model": {"name": "lenet5"}, "prune": {"levels": 20},
                      "distill": {"student_model": "mlp", "student_hidden": (32, 32)},
                      "precision": "fp32", "epoch_eval": "level"},
    # teacher ResNet-18, student VGG-like (5, 5)
    "cifar10-resnet18": _cifar_preset("cifar10", {"name": "resnet18"}, {}),
    "cifar100-resnet18": _cifar_preset("cifar100", {"name": "resnet18"}, {}),
    # the VGG-like network's own curve, no students
    "cifar10-vgg": _cifar_preset("cifar10", {"name": "vgg", "depth": 5, "width": 5}, {"students": []}),
}
DEFAULT_PRESET = "digits-mlp"


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "prune": PruneConfig,
                             "analysis": AnalysisConfig, "distill": DistillConfig}


@dataclass(frozen=True)
class ConfigOption:
    """One config field as the command line and the validation see it, read from its declaration."""

    section: str | None  # None: a top-level field of Config
    name: str
    kind: str  # "int", "float", "bool" or "str": the type of the value, or of each item of a tuple
    is_list: bool  # a tuple field, given on the command line as comma-separated items
    optional: bool  # None is allowed
    help: str
    flag: str | None  # without the dashes; None: no flag
    choices: tuple[str, ...] | None
    metavar: str | None
    label: str

    @property
    def path(self) -> str:
        return self.name if self.section is None else f"{self.section}.{self.name}"

    @property
    def dest(self) -> str | None:
        """The flag's name with '_' for '-': its argparse attribute and its short name in sweep grids."""
        return None if self.flag is None else self.flag.replace("-", "_")

    def value(self, cfg: Config) -> Any:
        return getattr(cfg if self.section is None else getattr(cfg, self.section), self.name)


def _describe(section: str | None, f: dataclasses.Field) -> ConfigOption:
    # annotations are text here (from __future__ import annotations): "int | None", "tuple[int, ...]"
    types = [part.strip() for part in str(f.type).split("|")]
    main = next(t for t in types if t != "None")
    is_list = main.startswith("tuple[")
    meta = f.metadata
    if not meta.get("help"):
        raise TypeError(f"config field '{f.name}' has no help text; declare it with option()")
    return ConfigOption(
        section=section, name=f.name, kind=main[len("tuple["):].split(",")[0] if is_list else main,
        is_list=is_list, optional="None" in types, help=meta["help"],
        flag=meta.get("flag", f.name.replace("_", "-")), choices=meta.get("choices"),
        metavar=meta.get("metavar"), label=meta.get("label", f.name.replace("_", " ")),
    )


@functools.cache
def config_options() -> tuple[ConfigOption, ...]:
    """Every leaf field of Config, section by section, then the top-level ones, in declaration order."""
    out = [_describe(name, f) for name, cls in SECTIONS.items() for f in fields(cls)]
    out += [_describe(None, f) for f in fields(Config) if f.name not in SECTIONS]
    return tuple(out)


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested plain data, rejecting unknown keys with a clear message."""
    top_fields = {f.name: f for f in fields(Config)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in top_fields:
            raise ConfigError(f"unknown config key '{key}'; allowed: {', '.join(sorted(top_fields))}")
        if key in SECTIONS:
            kwargs[key] = _section_from_dict(key, value)
        else:
            value = tuple(value) if isinstance(value, list) else value
            _check_type(key, value, top_fields[key].type)
            kwargs[key] = value
    cfg = Config(**kwargs)
    validate(cfg)
    if cfg.data.dataset == "folder":
        # made absolute here, so the stored config and the run hash name the folder the run reads, from any cwd
        cfg.data.data_root = str(Path(cfg.data.data_root).expanduser().absolute())
    return cfg


def _section_from_dict(section: str, value: Any) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"config section '{section}' must be a mapping, got {value!r}")
    cls = SECTIONS[section]
    allowed = {f.name: f for f in fields(cls)}
    sub = {}
    for k, v in value.items():
        if k not in allowed:
            raise ConfigError(f"unknown config key '{section}.{k}'; allowed: {', '.join(sorted(allowed))}")
        v = tuple(v) if isinstance(v, list) else v
        _check_type(f"{section}.{k}", v, allowed[k].type)
        sub[k] = v
    return cls(**sub)


_TYPES = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,), "None": (type(None),),
          "tuple": (tuple,)}


def _check_type(name: str, value: Any, annotation: Any) -> None:
    """Reject a value whose type the field's annotation (e.g. 'float', 'int | None', 'tuple[int, ...]') rules out."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    names = [part.strip().split("[")[0] for part in text.split("|")]
    allowed = tuple(t for n in names for t in _TYPES.get(n, (object,)))
    bad = not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)
    if isinstance(value, tuple) and "tuple[int, ...]" in text:
        bad = bad or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if bad:
        raise ConfigError(f"config value {name} = {value!r} has the wrong type; expected {text}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{p}' is not a text file (not UTF-8); give a YAML config file") from None
    except OSError as exc:
        raise ConfigError(f"config file '{p}' cannot be read ({exc.strerror or exc.__class__.__name__})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{p}' is not valid YAML ({exc.__class__.__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping at the top level")
    return data


def build_config(preset: str | None = None, yaml_path: str | None = None,
                 overrides: dict[str, Any] | None = None) -> Config:
    """Preset, then YAML file, then flag overrides (later wins)."""
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; allowed: {', '.join(PRESETS)}")
    raw = dataclasses.asdict(Config())
    raw = merge(raw, PRESETS[name])
    if yaml_path:
        loaded = load_yaml(yaml_path)
        raw = merge(raw, loaded)
    if overrides:
        raw = merge(raw, overrides)
    return from_dict(raw)


def check_device(name: str) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ConfigError(f"device '{name}' is not known; allowed: cpu, cuda, cuda:N, auto")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} '{value}' is not known; allowed: {', '.join(allowed)}")


def validate(cfg: Config) -> None:
    """Every rule a config must follow, each broken one a ConfigError of one sentence."""
    for opt in config_options():
        if opt.choices is not None:
            value = opt.value(cfg)
            for item in value if opt.is_list else (value,):
                _choice(opt.label, item, opt.choices)
    _validate_custom(cfg)
    _validate_data(cfg.data)
    _validate_model(cfg.model, cfg.data)
    _validate_optim(cfg.optim)
    _validate_prune(cfg.prune, cfg.optim)
    _validate_analysis(cfg.analysis)
    check_device(cfg.device)
    _validate_distill(cfg)
    _validate_seeds(cfg.seeds)
    if not cfg.checkpoint_every >= 0:
        raise ConfigError(f"checkpoint every {cfg.checkpoint_every} s must be a number of seconds >= 0 (0: after "
                          "every epoch)")
    if cfg.jobs < 0:
        raise ConfigError(f"jobs {cfg.jobs} must be 0 (one per thread for MLP runs on the CPU) or a positive number "
                          "of runs side by side")


def _validate_seeds(seeds: tuple[int, ...]) -> None:
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds {','.join(map(str, seeds))} must be distinct numbers >= 0")


def _validate_custom(cfg: Config) -> None:
    """'custom' names a model or data given to the Python API, which sets its fingerprint; nothing else can."""
    for what, name, fingerprint in (("model", cfg.model.name, cfg.model.module),
                                    ("dataset", cfg.data.dataset, cfg.data.fingerprint)):
        if (name == CUSTOM) != bool(fingerprint):
            allowed = ", ".join(MODELS if what == "model" else DATASETS)
            raise ConfigError(f"{what} 'custom' is one given to the Python API (dsd2.prune), which fingerprints it; "
                              f"choose one of {allowed}")
    if cfg.model.name == CUSTOM and cfg.seeds:
        raise ConfigError(f"seeds {','.join(map(str, cfg.seeds))}: the Python API trains the model it is given, once; "
                          "call dsd2.prune once per seed, with config={'seed': S} and a fresh model each time")


def _validate_data(d: DataConfig) -> None:
    if not isinstance(d.noise, (int, float)) or not 0.0 <= d.noise < 1.0:
        raise ConfigError(f"noise {d.noise!r} is outside [0, 1)")
    if d.noise_type == "asymmetric" and d.dataset == "cifar100":
        raise ConfigError("noise type 'asymmetric' is the CIFAR-10 class map; use symmetric or pairflip")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"val fraction {d.val_fraction!r} is outside (0, 1): the validation split selects w_best")
    if d.dataset == "folder" and not d.data_root:
        raise ConfigError("dataset 'folder' needs --data-root: a folder holding train/<class>/ images "
                          "(torchvision's ImageFolder layout)")
    if not 0.0 < d.test_fraction < 1.0:
        raise ConfigError(f"test fraction {d.test_fraction!r} is outside (0, 1)")
    if not isinstance(d.image_size, int) or not 1 <= d.image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"image size {d.image_size!r} must be a whole number of pixels in 1..{MAX_IMAGE_SIZE}")
    if d.train_size is not None:  # more than the data holds is refused where the data is read (dsd2/data/)
        _whole("train size", d.train_size, 1)


def _validate_model(m: ModelConfig, d: DataConfig) -> None:
    if m.name == "vgg" and not (1 <= m.depth <= 8 and 1 <= m.width <= 10):
        raise ConfigError(f"VGG-like depth {m.depth} / width {m.width} outside 1..8 / 1..10")
    if m.name == "mlp" and (not m.hidden or any(int(h) < 1 for h in m.hidden)):
        raise ConfigError(f"MLP hidden widths {m.hidden!r} must be one or more positive numbers")
    _check_image_fits("model", m.name, m.depth, "--depth", d)


def _check_image_fits(what: str, name: str, depth: int, depth_flag: str, d: DataConfig) -> None:
    """A conv net's images must be large enough for its architecture: LeNet-5's two 5x5 convolutions and two
    halvings need 16 pixels, VGG-like halves them `depth` times. The 8x8 digits are for the MLPs alone."""
    if name not in CONV_MODELS or d.dataset == CUSTOM:
        return
    side = d.image_size if d.dataset == "folder" else IMAGE_SIDES[d.dataset]
    need, why, does = {
        "lenet5": (16, "two 5x5 convolutions and two halvings", "convolves twice by 5x5 and halves the image twice"),
        "vgg": (2 ** depth, f"{depth} blocks halve the image {depth} times",
                f"with {depth} blocks halves the image {depth} times"),
    }.get(name, (1, "", ""))
    if side < need and d.dataset == "folder":
        raise ConfigError(f"{what} '{name}' {does} and needs --image-size {need} or more, not {side}")
    if side < need:
        fix = "use mlp or lenet300" if d.dataset == "digits" else f"use {depth_flag} {side.bit_length() - 1} or less"
        raise ConfigError(f"{what} '{name}' needs {need}x{need} images or larger (its {why}); dataset "
                          f"'{d.dataset}' is {side}x{side}: {fix}")
    if d.dataset == "digits":
        raise ConfigError(f"{what} '{name}' is a conv net, and conv nets are not run on dataset 'digits' (8x8 "
                          "images): use mlp or lenet300, or a conv net on fmnist, cifar10, cifar100 or folder")


def _whole(name: str, value: Any, least: int) -> None:
    if not isinstance(value, int) or value < least:
        raise ConfigError(f"{name} {value!r} must be a whole number >= {least}")


def _validate_optim(o: OptimConfig) -> None:
    _whole("epochs", o.epochs, 1)
    if o.dense_epochs is not None:
        _whole("dense epochs", o.dense_epochs, 1)
    _whole("batch size", o.batch_size, 1)
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise ConfigError(f"learning rate {o.lr!r} must be a finite number > 0")
    if not 0.0 <= o.momentum < 1.0:
        raise ConfigError(f"momentum {o.momentum!r} is outside its range ([0, 1))")
    for name, value in (("weight decay", o.weight_decay), ("lr decay factor", o.gamma)):
        if not 0.0 <= value < float("inf"):
            raise ConfigError(f"{name} {value!r} is outside its range (>= 0)")
    if o.nesterov and o.optimizer == "sgd" and o.momentum <= 0:
        raise ConfigError("nesterov momentum needs momentum > 0; set --momentum or drop --nesterov")


def _validate_prune(p: PruneConfig, o: OptimConfig) -> None:
    if not 0.0 < p.prune_fraction < 1.0:
        raise ConfigError(f"prune fraction {p.prune_fraction!r} is outside (0, 1)")
    if p.target_sparsity is not None and not 0.0 < p.target_sparsity < 1.0:
        raise ConfigError(f"target sparsity {p.target_sparsity!r} is outside (0, 1)")
    _whole("levels", p.levels, 0)
    _whole("gradient batches", p.gradient_batches, 1)
    if not 0.0 <= p.finetune_lr_scale < float("inf"):
        raise ConfigError(f"finetune lr scale {p.finetune_lr_scale!r} is outside its range (>= 0)")
    dense = o.dense_epochs or o.epochs
    if not 0 <= p.rewind_iteration <= dense:
        raise ConfigError(f"rewind iteration {p.rewind_iteration!r} must be between 0 and the {dense} dense epochs")
    if p.retrain == "lr-rewind" and o.epochs > dense:
        raise ConfigError(f"retrain 'lr-rewind' replays the last {o.epochs} epochs of the dense schedule, which has "
                          f"{dense}; use --epochs at most {dense} or more --dense-epochs")


def _validate_analysis(a: AnalysisConfig) -> None:
    if a.early_stop == "entropy" and a.entropy == "off":
        raise ConfigError("early stop 'entropy' needs the entropy measure: use --entropy pass or online")
    _whole("patience", a.patience, 1)
    if not 0.0 < a.entropy_tolerance < 1.0:
        raise ConfigError(f"entropy tolerance {a.entropy_tolerance!r} is outside (0, 1)")
    if not 0.0 < a.dodge_margin < 1.0:
        raise ConfigError(f"dodge margin {a.dodge_margin!r} is outside (0, 1): it is an accuracy fraction, "
                          "0.01 = 1 point")


def _validate_distill(cfg: Config) -> None:
    k = cfg.distill
    if not 0.0 <= k.alpha <= 1.0:
        raise ConfigError(f"alpha {k.alpha!r} is outside [0, 1]")
    if k.temperature <= 0:
        raise ConfigError(f"temperature {k.temperature!r} must be > 0")
    level = str(k.teacher_level)
    if level not in ("best", "dense") and not level.isdigit():
        raise ConfigError(f"teacher level '{level}' is not known; allowed: best, dense or a level number")
    if level.isdigit() and int(level) > cfg.num_levels():
        raise ConfigError(f"teacher level {level} is beyond the teacher's {cfg.num_levels()} pruning levels")
    if k.students:
        _check_image_fits("student model", k.student_model, k.student_depth, "--student-depth", cfg.data)
