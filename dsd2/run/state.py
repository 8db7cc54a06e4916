"""A run's state in a checkpoint: the key schema, and saving, loading and restoring it.

One safetensors file per checkpoint (`checkpoints/init`, `level_XX`, `last`, `rewind`). Keys:
- `model.<name>`: the model's state dict, without the masked layers' `mask` buffers (the layout of a model of
  plain layers: a checkpoint written before the loop ran on masked layers loads, and a teacher of plain layers
  loads any);
- `mask.<name>`: one bool per prunable weight, which is also what a masked layer's `mask` is loaded from;
- `start.<name>`: the prunable weights at the start of the level, after prune and perturbation (the reference
  of the learning distance), only in checkpoints taken inside a level;
- `optim.<param index>.<state name>`: the optimizer's tensor state (its scalars are in the metadata);
- `relu.<layer>`: ReLU-state counts of an online-counted epoch not yet measured (observations in metadata);
- `rng.cpu`, `rng.cuda`: the global generators, for code that draws from them (user objectives, dropout).
Metadata: run hash, level, epoch, whether the level is done, optimizer scalars, ReLU observations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsd2.ops import masked_layers
from dsd2.pruning import Masks, prunable_weights
from dsd2.runs import RunDir, RunError, load_checkpoint, save_checkpoint


def saved_levels(run: RunDir) -> dict[int, Path]:
    """The level checkpoints a run has saved, by level."""
    return {int(p.stem.split("_")[1]): p for p in sorted(run.ckpt_dir.glob("level_*.safetensors"))}


def with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix.`, with the prefix taken off their names."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, scalars


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      scalars: dict[str, Any], device: torch.device) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in with_prefix(tensors, "optim").items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value.to(device)
    for key, value in scalars.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)


@dataclass
class Restored:
    """What a loaded checkpoint gives back besides the model's weights."""

    level: int
    epoch: int
    level_done: bool
    masks: Masks
    level_start: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor] = field(repr=False)  # everything the checkpoint holds (optimizer state: optim.*)
    optimizer_scalars: dict[str, Any]


class Checkpointer:
    """Saves and loads the state of one run's model, masks, optimizer, counters and generators."""

    def __init__(self, run_hash: str, model: nn.Module, relus: dict, device: torch.device):
        self.run_hash, self.model, self.relus, self.device = run_hash, model, relus, device
        # state-dict key of each masked layer's mask -> the name of its weight (the key of its `mask.` entry)
        self.layer_masks = {f"{weight[:-len('weight')]}mask": weight for weight in masked_layers(model)}

    def model_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's state dict from a checkpoint's tensors: `model.*`, and each masked layer's mask from the
        checkpoint's mask of its weight (all kept where the checkpoint has none)."""
        state = with_prefix(tensors, "model")
        for key, weight in self.layer_masks.items():
            if key not in state:
                saved = tensors.get(f"mask.{weight}")
                state[key] = saved.bool() if saved is not None else torch.ones_like(
                    self.model.get_parameter(weight), dtype=torch.bool)
        return state

    def save(self, path: Path, masks: Masks, optimizer: torch.optim.Optimizer | None,
             level_start: dict[str, torch.Tensor], level: int, epoch: int, level_done: bool) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items() if k not in self.layer_masks}
        tensors.update({f"mask.{k}": v for k, v in masks.items()})
        scalars: dict[str, Any] = {}
        if optimizer is not None:
            optim, scalars = optimizer_tensors(optimizer)
            tensors.update(optim)
            tensors.update({f"start.{k}": v for k, v in level_start.items()})
        observations = {}
        for name, r in self.relus.items():
            if r.counts is not None:
                tensors[f"relu.{name}"] = r.counts
                observations[name] = r.observations
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {"run_hash": self.run_hash, "level": level, "epoch": epoch, "level_done": level_done,
                "optim_scalars": scalars, "relu_observations": observations}
        save_checkpoint(path, tensors, meta)

    def load(self, path: Path) -> Restored:
        """Load the model's weights, counters and generators; return the rest."""
        tensors, meta = load_checkpoint(path, self.run_hash)
        try:
            self.model.load_state_dict(self.model_state(tensors))
        except RuntimeError:
            raise RunError(f"checkpoint '{path}' does not match the configured model") from None
        for name, obs in meta.get("relu_observations", {}).items():
            if name in self.relus and f"relu.{name}" in tensors:
                self.relus[name].counts = tensors[f"relu.{name}"].to(self.device)
                self.relus[name].observations = obs
        if "rng.cpu" in tensors:
            torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        masks = {k: v.to(self.device, torch.bool) for k, v in with_prefix(tensors, "mask").items()}
        start = {k: v.to(self.device) for k, v in with_prefix(tensors, "start").items()}
        return Restored(meta["level"], meta["epoch"], meta["level_done"], masks, start, tensors,
                        meta.get("optim_scalars", {}))

    def weights(self, path: Path, prunable_only: bool = False) -> dict[str, torch.Tensor]:
        """The model state saved in `path` (on this run's device, masked layers' masks included), or its prunable
        weights alone, without loading them."""
        tensors, _ = load_checkpoint(path, self.run_hash)
        weights = self.model_state(tensors)
        if prunable_only:
            names = set(prunable_weights(self.model))
            weights = {k: v for k, v in weights.items() if k in names}
        return {k: v.to(self.device) for k, v in weights.items()}
