"""The Python API: prune (and distil into) any `nn.Module` on any image data, with the loop the CLI runs.

    import dsd2
    summary = dsd2.prune(model, train=(images, labels), test=test_set, out="runs/mine",
                         config={"optim": {"epochs": 10}, "prune": {"levels": 8}},
                         exclude=("conv1.weight", "fc.weight"))

The run directory is the CLI's: config.yaml, metrics.jsonl, epochs.jsonl, checkpoints, summary.json; rerunning
the same call resumes it (from its checkpoints: the weights the model holds then do not matter), and
`dsd2-engine report OUT` draws it. The model, the data and a teacher are named in the run's config by fingerprints
(the model's class and parameter names and shapes; the data's shapes and a hash of its tensors; the teacher's
weights too), so a call with another architecture, other data or another teacher is another run, and is refused
in a folder that holds this one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsd2.config import CUSTOM, Config, ConfigError, build_config, validate
from dsd2.data import DataError, build_splits
from dsd2.data.sources import RawDataset
from dsd2.models import module_fingerprint
from dsd2.run.loop import LevelLoop, resolve_device
from dsd2.runs import RunDir
from dsd2.training.precision import concrete_precision

Data = Any  # (images, labels) tensors, a TensorDataset, or a map-style dataset of (image, label)


def as_tensors(data: Data, role: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, C, H, W] (uint8 or float; [N, H, W] gets one channel) and int64 labels [N] of a split."""
    if isinstance(data, torch.utils.data.TensorDataset):
        data = data.tensors[:2]
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        images, labels = data
    else:
        try:
            items = [data[i] for i in range(len(data))]
        except TypeError:
            raise DataError(f"the {role} data is neither (images, labels) tensors nor a map-style dataset of "
                            "(image, label) pairs") from None
        images = torch.stack([image_tensor(x) for x, _ in items]) if items else torch.empty(0)
        labels = torch.tensor([int(y) for _, y in items], dtype=torch.long)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or labels.dim() != 1 or len(images) != len(labels):
        raise DataError(f"the {role} data must be images [N, C, H, W] with N labels; got images "
                        f"{tuple(images.shape)} and labels {tuple(labels.shape)}")
    return images.contiguous(), labels.long()


def image_tensor(x: Any) -> torch.Tensor:
    if torch.is_tensor(x):
        return x
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(x)  # PIL image -> uint8 [C, H, W]


def raw_dataset(train: Data, test: Data, val: Data | None, num_classes: int | None) -> RawDataset:
    """The data as one training pool (validation last, when given) and a test split."""
    x, y = as_tensors(train, "training")
    tx, ty = as_tensors(test, "test")
    fixed_val = 0
    if val is not None:
        vx, vy = as_tensors(val, "validation")
        x, y, fixed_val = torch.cat([x, vx.to(x.dtype)]), torch.cat([y, vy]), len(vy)
    if x.shape[1:] != tx.shape[1:]:
        raise DataError(f"training images are {tuple(x.shape[1:])} but test images {tuple(tx.shape[1:])}")
    classes = num_classes or int(torch.cat([y, ty]).max()) + 1
    if int(y.min()) < 0 or int(torch.cat([y, ty]).max()) >= classes:
        raise DataError(f"labels must lie in 0..{classes - 1} (num_classes={classes})")
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    return RawDataset(x, y, tx.to(x.dtype), ty, classes, scale, CUSTOM, fixed_val=fixed_val)


def data_fingerprint(raw: RawDataset) -> str:
    h = hashlib.sha256(f"{raw.num_classes}:{raw.fixed_val}".encode())
    for t in (raw.train_images, raw.train_labels, raw.test_images, raw.test_labels):
        h.update(f"{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def api_config(config: Config | dict | None, model: nn.Module, raw: RawDataset, teacher: nn.Module | None,
               include: Sequence[str], exclude: Sequence[str]) -> Config:
    """The run's config: the loop's defaults (with no label noise), the user's settings, and the fingerprints."""
    if isinstance(config, Config):
        config = config.to_dict()
    overrides: dict[str, Any] = {"data": {"noise": 0.0}, "distill": {"students": ()}}
    for section, values in (config or {}).items():
        overrides[section] = {**overrides.get(section, {}), **values} if isinstance(values, dict) else values
    cfg = build_config(None, None, overrides)
    cfg.model.name, cfg.model.module = CUSTOM, module_fingerprint(model)
    cfg.data.dataset, cfg.data.fingerprint = CUSTOM, data_fingerprint(raw)
    cfg.prune.include, cfg.prune.exclude = tuple(include), tuple(exclude)
    if teacher is not None:
        cfg.distill.teacher_id = f"{CUSTOM}:{module_fingerprint(teacher, weights=True)}"
    validate(cfg)
    return concrete_precision(cfg, model)  # from the user's own module: a conv net gets bf16 where it is native


def prune(model: nn.Module, train: Data, test: Data, *, out: str | Path, val: Data | None = None,
          teacher: nn.Module | None = None, config: Config | dict | None = None, include: Sequence[str] = ("*",),
          exclude: Sequence[str] = (), num_classes: int | None = None, objective: Callable | None = None,
          progress: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Prune `model` by the level loop (dense, then prune → perturb → retrain → measure, per level) into the run
    directory `out`, and return the run's summary (as in summary.json).

    - `model`: any nn.Module taking images [B, C, H, W] and returning logits [B, classes]; trained in place.
    - `train`, `test`, `val`: (images, labels) tensors, a TensorDataset, or a map-style dataset of (image, label)
      (tensors or PIL images). Images are uint8 or float, [N, C, H, W]; the loop standardises each channel with
      the training split's statistics. Without `val`, `config`'s val_fraction of `train` is held out (it picks
      the returned level, w_best).
    - `teacher`: a frozen module to distil from (its logits, alpha and temperature from `config["distill"]`).
    - `config`: settings as the CLI's config file holds them (sections data, optim, prune, analysis, distill, and
      seed, device, precision), or a `dsd2.config.Config`; label noise is off unless set here.
    - `include`, `exclude`: name patterns (fnmatch) choosing which Conv/Linear weights are pruned.
    - `objective`: a loss `(logits, labels, inputs, sample_indices) -> loss` in place of cross-entropy.
    """
    raw = raw_dataset(train, test, val, num_classes)
    cfg = api_config(config, model, raw, teacher, include, exclude)
    device = resolve_device(cfg.device)
    splits = build_splits(cfg.data, cfg.seed, device, raw)
    kwargs = {} if objective is None else {"objective": objective}
    loop = LevelLoop(cfg, RunDir(out), model=model, teacher=teacher, splits=splits, progress=progress, log=log,
                     **kwargs)
    return loop.run()


__all__ = ["ConfigError", "DataError", "prune"]
