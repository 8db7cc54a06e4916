"""Typed run configuration: presets, YAML loading, flag overrides, validation and the run hash."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import platform
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DATASETS = ("digits", "cifar10", "cifar100")
MODELS = ("mlp", "lenet300", "vgg", "resnet18")
CONV_MODELS = ("vgg", "resnet18")
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


class ConfigError(ValueError):
    """A user-facing configuration problem; its message is one sentence naming the value."""


@dataclass
class DataConfig:
    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    noise: float = 0.5
    noise_type: str = "symmetric"
    val_fraction: float = 0.1
    clean_val: bool = False
    augment: bool = False


@dataclass
class ModelConfig:
    name: str = "mlp"
    hidden: tuple[int, ...] = (256, 256)  # MLP widths
    depth: int = 5  # VGG-like delta: number of blocks
    width: int = 5  # VGG-like gamma: first block has 2**gamma filters


@dataclass
class OptimConfig:
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    batch_size: int = 64
    epochs: int = 40  # per pruning level
    dense_epochs: int | None = 120  # level 0; None means `epochs`
    lr_schedule: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the level's epochs (multistep)
    gamma: float = 0.1


@dataclass
class PruneConfig:
    levels: int = 28
    target_sparsity: float | None = None
    prune_fraction: float = 0.2
    criterion: str = "magnitude"
    gradient_batches: int = 4
    perturb: str = "none"
    rewind_iteration: int = 0
    retrain: str = "restart"
    finetune_lr_scale: float = 0.01


@dataclass
class AnalysisConfig:
    entropy: str = "pass"  # counting pass over the training split after each level; "online": last epoch
    granularity: str = "element"  # per output element (eq. 1) or per channel
    inclusive: bool = False  # on-state is x > 0, or x >= 0 when inclusive
    early_stop: str = "none"
    patience: int = 3
    entropy_tolerance: float = 0.05  # relative fall below the running maximum that counts as decreasing


STUDENT_KINDS = ("vanilla", "kd-dense", "kd-sparse")


@dataclass
class DistillConfig:
    """The DSD² experiment: teacher curve, then students pruned by the same loop (vanilla or distilled).

    On a student's own run, `teacher` names its KD teacher as "RUN_DIR:LEVEL" (None: plain cross-entropy)
    and `teacher_id` is that teacher's run hash and level, which names the student run.
    """

    students: tuple[str, ...] = ("vanilla", "kd-dense", "kd-sparse")
    teacher_level: str | int = "best"  # best | dense | a level number
    alpha: float = 0.8
    temperature: float = 10.0
    student_model: str = "mlp"
    student_hidden: tuple[int, ...] = (128, 128)
    student_depth: int = 5
    student_width: int = 5
    teacher: str | None = None
    teacher_id: str | None = None


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    seed: int = 0
    device: str = "cpu"
    precision: str = "auto"  # bf16 for conv nets where the device computes it natively, else fp32
    channels_last: bool = True  # conv nets only
    cuda_graphs: bool | None = None  # None: on when training on a CUDA device (single process)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def run_hash(self) -> str:
        """A stable name for the run: every field that changes its results (the data root does not, nor
        where the teacher lives: `teacher_id` names it)."""
        payload = self.to_dict()
        payload["data"].pop("data_root", None)
        payload["data"].pop("download", None)
        payload["distill"].pop("teacher", None)
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

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


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested plain data, rejecting unknown keys with a clear message."""
    sections = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "prune": PruneConfig,
                "analysis": AnalysisConfig, "distill": DistillConfig}
    top_fields = {f.name for f in fields(Config)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in top_fields:
            raise ConfigError(f"unknown config key '{key}'; allowed: {', '.join(sorted(top_fields))}")
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"config section '{key}' must be a mapping, got {value!r}")
            cls = sections[key]
            allowed = {f.name: f for f in fields(cls)}
            sub = {}
            for k, v in value.items():
                if k not in allowed:
                    raise ConfigError(
                        f"unknown config key '{key}.{k}'; allowed: {', '.join(sorted(allowed))}"
                    )
                v = tuple(v) if isinstance(v, list) else v
                _check_type(f"{key}.{k}", v, allowed[k].type)
                sub[k] = v
            kwargs[key] = cls(**sub)
        else:
            _check_type(key, value, next(f.type for f in fields(Config) if f.name == key))
            kwargs[key] = value
    cfg = Config(**kwargs)
    validate(cfg)
    return cfg


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
        data = yaml.safe_load(p.read_text())
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
    cfg = from_dict(raw)
    if cfg.precision == "auto":
        # made concrete here, so the stored config and the run hash name the precision the run trains in: the
        # same command on a machine where auto means otherwise names another run instead of resuming this one
        cfg = dataclasses.replace(cfg, precision=auto_precision(cfg.device, cfg.model.name in CONV_MODELS))
    return cfg


# ---- what `--precision auto` means on this machine ---------------------------------------------------------

NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86-64 (/proc/cpuinfo flags), aarch64 (Features)


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: str) -> bool:
    """Whether `device` ("cpu", "cuda", "cuda:N", "auto") computes bf16 matrix products and convolutions natively:
    CPUs with AVX-512 BF16, AMX or the aarch64 BF16 extension, GPUs of compute capability 8.0 and later."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if platform.system() == "Darwin":
        return False
    return any(flag in cpu_flags() for flag in NATIVE_BF16_CPU_FLAGS)


def auto_precision(device: str, conv_net: bool) -> str:
    """bf16 for a conv net on a device with native bf16, else fp32 (MLPs lose to autocast's casts either way)."""
    return "bf16" if conv_net and native_bf16(device) else "fp32"


def check_device(name: str) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ConfigError(f"device '{name}' is not known; allowed: cpu, cuda, cuda:N, auto")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} '{value}' is not known; allowed: {', '.join(allowed)}")


def validate(cfg: Config) -> None:
    d, m, o, p = cfg.data, cfg.model, cfg.optim, cfg.prune
    _choice("dataset", d.dataset, DATASETS)
    _choice("model", m.name, MODELS)
    _choice("noise type", d.noise_type, NOISE_TYPES)
    _choice("optimizer", o.optimizer, OPTIMIZERS)
    _choice("lr schedule", o.lr_schedule, LR_SCHEDULES)
    _choice("pruning criterion", p.criterion, CRITERIA)
    _choice("perturbation", p.perturb, PERTURBATIONS)
    _choice("retrain schedule", p.retrain, RETRAIN_SCHEDULES)
    _choice("precision", cfg.precision, PRECISIONS)
    a = cfg.analysis
    _choice("entropy mode", a.entropy, ENTROPY_MODES)
    _choice("entropy granularity", a.granularity, GRANULARITIES)
    _choice("early-stop rule", a.early_stop, EARLY_STOP_RULES)
    if a.early_stop == "entropy" and a.entropy == "off":
        raise ConfigError("early stop 'entropy' needs the entropy measure: use --entropy pass or online")
    if not isinstance(a.patience, int) or a.patience < 1:
        raise ConfigError(f"patience {a.patience!r} must be a whole number >= 1")
    if not 0.0 < a.entropy_tolerance < 1.0:
        raise ConfigError(f"entropy tolerance {a.entropy_tolerance!r} is outside (0, 1)")
    if not isinstance(d.noise, (int, float)) or not 0.0 <= d.noise < 1.0:
        raise ConfigError(f"noise {d.noise!r} is outside [0, 1)")
    if d.noise_type == "asymmetric" and d.dataset == "cifar100":
        raise ConfigError("noise type 'asymmetric' is the CIFAR-10 class map; use symmetric or pairflip")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"val fraction {d.val_fraction!r} is outside (0, 1): the validation split selects w_best")
    if not 0.0 < p.prune_fraction < 1.0:
        raise ConfigError(f"prune fraction {p.prune_fraction!r} is outside (0, 1)")
    if p.target_sparsity is not None and not 0.0 < p.target_sparsity < 1.0:
        raise ConfigError(f"target sparsity {p.target_sparsity!r} is outside (0, 1)")
    if not isinstance(p.levels, int) or p.levels < 0:
        raise ConfigError(f"levels {p.levels!r} must be a whole number >= 0")
    if not isinstance(o.epochs, int) or o.epochs < 1:
        raise ConfigError(f"epochs {o.epochs!r} must be a whole number >= 1")
    if o.dense_epochs is not None and (not isinstance(o.dense_epochs, int) or o.dense_epochs < 1):
        raise ConfigError(f"dense epochs {o.dense_epochs!r} must be a whole number >= 1")
    if not isinstance(o.batch_size, int) or o.batch_size < 1:
        raise ConfigError(f"batch size {o.batch_size!r} must be a whole number >= 1")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise ConfigError(f"learning rate {o.lr!r} must be a finite number > 0")
    for name, value in (("momentum", o.momentum), ("weight decay", o.weight_decay), ("lr decay factor", o.gamma),
                        ("finetune lr scale", p.finetune_lr_scale)):
        if not (0.0 <= value < float("inf")) or (name == "momentum" and value >= 1.0):
            raise ConfigError(f"{name} {value!r} is outside its range ({'[0, 1)' if name == 'momentum' else '>= 0'})")
    dense = o.dense_epochs or o.epochs
    if not 0 <= p.rewind_iteration <= dense:
        raise ConfigError(f"rewind iteration {p.rewind_iteration!r} must be between 0 and the {dense} dense epochs")
    if m.name == "vgg" and not (1 <= m.depth <= 8 and 1 <= m.width <= 10):
        raise ConfigError(f"VGG-like depth {m.depth} / width {m.width} outside 1..8 / 1..10")
    if m.name == "mlp" and (not m.hidden or any(int(h) < 1 for h in m.hidden)):
        raise ConfigError(f"MLP hidden widths {m.hidden!r} must be one or more positive numbers")
    check_device(cfg.device)
    k = cfg.distill
    for student in k.students:
        _choice("student", student, STUDENT_KINDS)
    if not 0.0 <= k.alpha <= 1.0:
        raise ConfigError(f"alpha {k.alpha!r} is outside [0, 1]")
    if k.temperature <= 0:
        raise ConfigError(f"temperature {k.temperature!r} must be > 0")
    _choice("student model", k.student_model, MODELS)
    level = str(k.teacher_level)
    if level not in ("best", "dense") and not (level.isdigit()):
        raise ConfigError(f"teacher level '{level}' is not known; allowed: best, dense or a level number")
    if level.isdigit() and int(level) > cfg.num_levels():
        raise ConfigError(f"teacher level {level} is beyond the teacher's {cfg.num_levels()} pruning levels")
    if k.students and k.student_model in CONV_MODELS and d.dataset == "digits":
        raise ConfigError(f"student model '{k.student_model}' needs 32x32 images; dataset 'digits' is 8x8: use mlp")
    if m.name in CONV_MODELS and d.dataset == "digits":
        raise ConfigError(f"model '{m.name}' needs 32x32 images; dataset 'digits' is 8x8: use mlp")
