"""The teacher of a distilled run: named by 'RUN_DIR[:LEVEL]' (RUN_DIR may be an experiment root), loaded frozen,
checked against the student."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dsd2.analysis.flops import densities_of, measure_forward_flops
from dsd2.data import num_classes as dataset_classes
from dsd2.models import build_model, module_fingerprint
from dsd2.pruning import count_sparsity, prunable_weights, select_prunable
from dsd2.run.state import saved_levels
from dsd2.run.summary import best_level
from dsd2.runs import RunDir, RunError, load_checkpoint, resolve_run


def parse_teacher_spec(spec: str) -> tuple[RunDir, str]:
    """'RUN_DIR[:LEVEL]' -> (the teacher run, level: best | dense | a number). RUN_DIR may be an experiment root
    (its teacher/ is taken) or a folder holding exactly one run; one holding several is refused, naming them."""
    path, sep, level = spec.rpartition(":")
    if not sep or not path or "/" in level:
        path, level = spec, "best"
    return resolve_run(path, "teacher"), level or "best"


def resolve_teacher_level(run: RunDir, level: str) -> int:
    """The level number that `level` (best, dense or a number) names in the teacher run, which must exist."""
    if not run.config_path.exists():
        raise RunError(f"teacher run '{run.root}' does not exist or holds no dsd2 run (no config.yaml)")
    rows = run.levels()
    if level == "dense":
        chosen = 0
    elif level == "best":
        if not rows:
            raise RunError(f"teacher run '{run.root}' has no completed level to select from")
        chosen = best_level(rows)["level"]
    elif str(level).isdigit():
        chosen = int(level)
    else:
        raise RunError(f"teacher level '{level}' is not known; allowed: best, dense or a level number")
    if not run.level_path(chosen).exists():
        done = sorted(saved_levels(run))
        raise RunError(f"teacher run '{run.root}' has no level {chosen}; saved levels: "
                       f"{', '.join(map(str, done)) or 'none'}")
    return chosen


def load_teacher(spec: str, input_shape: tuple[int, ...], num_classes: int,
                 device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen teacher named by 'RUN_DIR:LEVEL', checked against the student's data."""
    from dsd2.config import from_dict

    run, level = parse_teacher_spec(spec)
    chosen = resolve_teacher_level(run, level)
    stored = run.stored_config()
    tcfg = from_dict(stored["config"])
    if tcfg.model.name == "custom":
        raise RunError(f"teacher run '{run.root}' pruned a module given to the Python API, which a run directory "
                       "cannot rebuild; pass that module as dsd2.prune(..., teacher=module)")
    classes = dataset_classes(tcfg.data.dataset, tcfg.data.data_root)  # an image folder's: its class folders
    if classes != num_classes:
        raise RunError(f"teacher run '{run.root}' has {classes} classes ({tcfg.data.dataset}); the student's data "
                       f"has {num_classes}")
    with torch.random.fork_rng(devices=[]):  # building the teacher must not shift the student's random stream
        teacher = build_model(tcfg.model, input_shape, classes)
    select_prunable(teacher, tcfg.prune.include, tcfg.prune.exclude)
    tensors, _ = load_checkpoint(run.level_path(chosen), stored["run_hash"])
    try:
        teacher.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError:
        raise RunError(f"teacher checkpoint '{run.level_path(chosen)}' does not fit its run's model") from None
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    zeros, total = count_sparsity(teacher)
    return teacher, {"run": str(run.root), "level": chosen, "run_hash": stored["run_hash"],
                     "sparsity": zeros / total, "model": tcfg.model.name}


def teacher_checksum(teacher: nn.Module) -> torch.Tensor:
    """Float64 sum and sum of squares of every teacher tensor: any update changes them. Summed in one memory
    layout, so a change of layout (channels_last) is not taken for an update."""
    vals = [t.detach().double().contiguous() for t in teacher.state_dict().values() if t.is_floating_point()]
    return torch.stack([sum(v.sum() for v in vals), sum((v * v).sum() for v in vals)])


@dataclass
class Teacher:
    """A loaded teacher, what it costs per image, and whether its logits are computed once per run."""

    module: nn.Module
    info: dict[str, Any]
    flops_per_image: float
    cached: bool
    checksum: torch.Tensor = field(repr=False)

    @classmethod
    def load(cls, spec: str, input_shape: tuple[int, ...], num_classes: int, device: torch.device,
             cached: bool) -> Teacher:
        module, info = load_teacher(spec, input_shape, num_classes, device)
        return cls.of_module(module, input_shape, device, cached, info)

    @classmethod
    def of_module(cls, module: nn.Module, input_shape: tuple[int, ...], device: torch.device, cached: bool,
                  info: dict[str, Any] | None = None) -> Teacher:
        """A teacher from a module (frozen here: eval mode, no gradients)."""
        module = module.to(device).eval()
        for p in module.parameters():
            p.requires_grad_(False)
        if info is None:
            zeros, total = count_sparsity(module)
            info = {"module": type(module).__name__, "sparsity": zeros / total if total else 0.0,
                    "fingerprint": module_fingerprint(module, weights=True)}
        weights = {n: w.detach() for n, w in prunable_weights(module).items()}
        flops = measure_forward_flops(module, input_shape).effective(densities_of(weights))
        return cls(module, info, flops, cached, teacher_checksum(module))

    def check_unchanged(self) -> None:
        if not torch.equal(teacher_checksum(self.module), self.checksum):
            raise RuntimeError("the teacher's weights changed during student training")

    def flops_of_level(self, level: int, epochs: int, train_size: int) -> float:
        """FLOPs the teacher spent on a level: every training image of every epoch, or, with its logits
        computed once, the whole split once (counted at the dense level)."""
        if self.cached:
            return train_size * self.flops_per_image if level == 0 else 0.0
        return epochs * train_size * self.flops_per_image
