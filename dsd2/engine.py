"""The level loop: dense -> [prune -> perturb -> retrain -> measure] x L, resumable at every epoch.

State lives here and in the run directory; the science (noise, masks, scores, schedules) lives in
small pure functions elsewhere. A killed run restarts from `checkpoints/last.safetensors` and, since
all randomness is derived from (seed, level, epoch), reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dsd2.config import Config, ConfigError
from dsd2.data import Splits, build_splits
from dsd2.data.batching import epoch_generator, train_batches
from dsd2.models import CONV_MODELS, build_model
from dsd2.pruning import (
    CRITERIA,
    Masks,
    count_sparsity,
    full_masks,
    global_prune,
    perturb,
    remaining_after,
)
from dsd2.runs import RunDir, RunError, load_checkpoint, save_checkpoint, write_json, write_jsonl
from dsd2.training import (
    Objective,
    build_optimizer,
    cross_entropy,
    evaluate,
    predict,
    prepare_inputs,
    schedule_lr,
    train_epoch,
)

LevelMeasure = Callable[["Engine", int], dict[str, Any]]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for but CUDA is not available here; use --device cpu")
    return torch.device(name)


def best_level(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """w_best: the level with the highest validation accuracy; ties go to the sparser level."""
    if not rows:
        return None
    return max(rows, key=lambda r: (r["val_acc"], r["sparsity"]))


class Engine:
    def __init__(self, cfg: Config, run_dir: RunDir, *, progress: bool = True,
                 log: Callable[[str], None] = print, objective: Objective = cross_entropy,
                 splits: Splits | None = None):
        self.cfg = cfg
        self.run = run_dir
        self.progress = progress
        self.log = log
        self.objective = objective
        self.device = resolve_device(cfg.device)
        self.run_hash = cfg.run_hash()
        self.level_measures: list[LevelMeasure] = []
        self.splits = splits
        self.model: nn.Module | None = None
        self.masks: Masks = {}

    # ---- set-up --------------------------------------------------------------------------------

    def epochs_for(self, level: int) -> int:
        o = self.cfg.optim
        return (o.dense_epochs or o.epochs) if level == 0 else o.epochs

    def lr_for(self, level: int, epoch: int) -> float:
        o, p = self.cfg.optim, self.cfg.prune
        epochs = self.epochs_for(level)
        if level == 0 or p.retrain == "restart":
            return schedule_lr(o, epoch, epochs)
        if p.retrain == "finetune":
            return o.lr * p.finetune_lr_scale
        dense = self.epochs_for(0)  # lr-rewind: replay the last `epochs` epochs of the dense schedule
        return schedule_lr(o, max(dense - epochs, 0) + epoch, dense)

    def _channels_last(self) -> bool:
        return self.cfg.channels_last and self.cfg.model.name in CONV_MODELS

    def eval_kwargs(self) -> dict[str, Any]:
        return dict(batch_size=max(self.cfg.optim.batch_size, 512), mean=self.splits.mean,
                    std=self.splits.std, precision=self.cfg.precision, channels_last=self._channels_last())

    def prepare(self) -> None:
        """Everything that can fail on bad input, before anything is written."""
        torch.set_flush_denormal(True)  # denormal weights after pruning slow CPU retraining ~20x
        if self.splits is None:
            self.splits = build_splits(self.cfg.data, self.cfg.seed, self.device)
        torch.manual_seed(self.cfg.seed)
        model = build_model(self.cfg.model, self.splits.input_shape, self.splits.num_classes)
        model = model.to(self.device)
        if self._channels_last():
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.masks = full_masks(model)
        total = sum(m.numel() for m in self.masks.values())
        levels = self.cfg.num_levels()
        counts = remaining_after(total, self.cfg.prune.prune_fraction, levels)
        prev = total
        for i, kept in enumerate(counts, 1):
            if kept == prev or kept == 0:
                raise ConfigError(
                    f"{levels} levels cannot be reached with prune fraction {self.cfg.prune.prune_fraction}: "
                    f"level {i} would leave {kept} of {total} weights; use at most {i - 1} levels"
                )
            prev = kept
        self.num_levels = levels

    # ---- checkpoints ---------------------------------------------------------------------------

    def _state_tensors(self, optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"mask.{k}": v for k, v in self.masks.items()})
        optim_meta: dict[str, Any] = {}
        if optimizer is not None:
            sd = optimizer.state_dict()
            for idx, state in sd["state"].items():
                for key, value in state.items():
                    if torch.is_tensor(value):
                        tensors[f"optim.{idx}.{key}"] = value
                    else:
                        optim_meta[f"{idx}.{key}"] = value
        return tensors, optim_meta

    def save_state(self, path, optimizer, level: int, epoch: int, level_done: bool) -> None:
        tensors, optim_meta = self._state_tensors(optimizer)
        meta = {"run_hash": self.run_hash, "level": level, "epoch": epoch, "level_done": level_done,
                "optim_scalars": optim_meta}
        save_checkpoint(path, tensors, meta)

    def load_state(self, path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors, meta = load_checkpoint(path, self.run_hash)
        model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            self.model.load_state_dict(model_sd)
        except RuntimeError:
            raise RunError(f"checkpoint '{path}' does not match the configured model") from None
        self.masks = {k[5:]: v.to(self.device, torch.bool) for k, v in tensors.items() if k.startswith("mask.")}
        return meta, tensors

    def restore_optimizer(self, optimizer: torch.optim.Optimizer, meta: dict, tensors: dict) -> None:
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value.to(self.device)
        for key, value in meta.get("optim_scalars", {}).items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value
        sd = optimizer.state_dict()
        sd["state"] = state
        optimizer.load_state_dict(sd)

    # ---- the loop ------------------------------------------------------------------------------

    def prune_level(self, level: int) -> None:
        """Prune the final weights of the previous level, then perturb them."""
        p = self.cfg.prune
        kwargs: dict[str, Any] = {"generator": torch.Generator().manual_seed(self.cfg.seed * 31 + level)}
        if p.criterion == "gradient":
            kwargs["loss_batches"] = self._gradient_batches(level)
        scores = CRITERIA[p.criterion](self.model, **kwargs)
        self.masks = global_prune(scores, self.masks, p.prune_fraction)
        init_state = None
        if p.perturb == "rewind":
            init_state = self._rewind_state()
        perturb(self.model, p.perturb, self.masks, init_state, reinit_seed=self.cfg.seed * 7 + level)

    def _gradient_batches(self, level: int):
        s = self.splits
        gen = epoch_generator(self.cfg.seed, level, -1)
        batches = train_batches(s.train, self.cfg.optim.batch_size, gen, augment=False)
        self.model.train()
        for i, (images, labels, _) in enumerate(batches):
            if i >= self.cfg.prune.gradient_batches:
                break
            x = prepare_inputs(images, s.mean, s.std, self._channels_last())
            yield lambda x=x, labels=labels: self.objective(self.model(x), labels, x)

    def _rewind_state(self) -> dict[str, torch.Tensor]:
        path = self.run.ckpt_dir / "rewind.safetensors"
        if not path.exists():
            path = self.run.init_path
        tensors, _ = load_checkpoint(path, self.run_hash)
        return {k[6:]: v.to(self.device) for k, v in tensors.items() if k.startswith("model.")}

    def measure_level(self, level: int, epochs: int, wall: float) -> dict[str, Any]:
        s = self.splits
        kw = self.eval_kwargs()
        logits = predict(self.model, s.train, **kw)
        pred = logits.argmax(1)
        noisy = s.noisy_mask
        n_noisy = int(noisy.sum())
        zeros, total = count_sparsity(self.model)
        val, test = evaluate(self.model, s.val, **kw), evaluate(self.model, s.test, **kw)
        row = {
            "level": level,
            "sparsity": zeros / total,
            "remaining_weights": total - zeros,
            "train_acc": float((pred == s.train.labels).float().mean()),
            "train_clean_acc": float((pred == s.train_clean_labels).float().mean()),
            "memorized_noisy": float((pred[noisy] == s.train.labels[noisy]).float().mean()) if n_noisy else None,
            "train_loss": float(torch.nn.functional.cross_entropy(logits, s.train.labels)),
            "val_acc": val["acc"], "val_loss": val["loss"],
            "test_acc": test["acc"], "test_loss": test["loss"],
            "epochs": epochs,
            "wall_time_s": wall,
        }
        for measure in self.level_measures:
            row.update(measure(self, level))
        return row

    def run_loop(self) -> dict[str, Any]:
        self.prepare()
        resumed = self.run.claim(self.cfg.to_dict(), self.run_hash)
        s = self.splits
        if not resumed or not self.run.noise_path.exists():
            save_checkpoint(self.run.noise_path, {"indices": s.noise_indices, "original_labels": s.noise_original},
                            {"run_hash": self.run_hash, "noise": self.cfg.data.noise,
                             "noise_type": self.cfg.data.noise_type})
        if not self.run.init_path.exists():
            self.save_state(self.run.init_path, None, 0, 0, False)

        level, epoch, level_done = 0, 0, False
        optimizer = None
        epoch_rows = []
        metric_rows = []
        if self.run.last_path.exists():
            meta, tensors = self.load_state(self.run.last_path)
            level, epoch, level_done = meta["level"], meta["epoch"], meta["level_done"]
            epoch_rows = [r for r in self.run_rows("epochs") if (r["level"], r["epoch"]) < (level, epoch)]
            metric_rows = [r for r in self.run.levels() if r["level"] < level or (level_done and r["level"] == level)]
            if not level_done:
                optimizer = build_optimizer(self.model, self.masks, self.cfg.optim)
                self.restore_optimizer(optimizer, meta, tensors)
            self.log(f"resuming {self.run.root} at level {level}, epoch {epoch}"
                     + (" (level complete)" if level_done else ""))
        if level_done:
            level, epoch = level + 1, 0

        while level <= self.num_levels:
            started = time.perf_counter()
            if epoch == 0 and optimizer is None:
                if level > 0:
                    self.prune_level(level)
                optimizer = build_optimizer(self.model, self.masks, self.cfg.optim)
            epochs = self.epochs_for(level)
            bar = self._bar(level, epochs, epoch)
            while epoch < epochs:
                lr = self.lr_for(level, epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                t0 = time.perf_counter()
                stats = train_epoch(
                    self.model, optimizer, s.train, batch_size=self.cfg.optim.batch_size,
                    generator=epoch_generator(self.cfg.seed, level, epoch), augment=self.cfg.data.augment,
                    mean=s.mean, std=s.std, objective=self.objective, precision=self.cfg.precision,
                    channels_last=self._channels_last(),
                )
                train_time = time.perf_counter() - t0
                kw = self.eval_kwargs()
                val, test = evaluate(self.model, s.val, **kw), evaluate(self.model, s.test, **kw)
                epoch += 1
                epoch_rows.append({"level": level, "epoch": epoch - 1, "lr": lr, **stats,
                                   "val_acc": val["acc"], "val_loss": val["loss"], "test_acc": test["acc"],
                                   "test_loss": test["loss"], "train_time_s": train_time,
                                   "images_per_s": len(s.train) / max(train_time, 1e-9)})
                if (self.cfg.prune.perturb == "rewind" and level == 0 and self.cfg.prune.rewind_iteration > 0
                        and epoch == self.cfg.prune.rewind_iteration):
                    self.save_state(self.run.ckpt_dir / "rewind.safetensors", None, 0, epoch, False)
                write_jsonl(self.run.epochs_path, epoch_rows)
                self.save_state(self.run.last_path, optimizer, level, epoch, False)
                if bar is not None:
                    bar.set_postfix(loss=f"{stats['train_loss']:.3f}", train=f"{stats['train_acc']:.3f}",
                                    val=f"{val['acc']:.3f}")
                    bar.update(1)
            if bar is not None:
                bar.close()
            row = self.measure_level(level, epochs, time.perf_counter() - started)
            metric_rows.append(row)
            self.save_state(self.run.level_path(level), optimizer, level, epoch, True)
            write_jsonl(self.run.metrics_path, metric_rows)
            self.save_state(self.run.last_path, None, level, epoch, True)
            self.log(f"level {level:2d}/{self.num_levels}  sparsity {row['sparsity']:.4f}  "
                     f"train {row['train_acc']:.3f}  val {row['val_acc']:.3f}  test {row['test_acc']:.3f}  "
                     f"({row['wall_time_s']:.1f}s)")
            level, epoch, optimizer = level + 1, 0, None

        return self.write_summary(metric_rows)

    def run_rows(self, kind: str) -> list[dict[str, Any]]:
        from dsd2.runs import read_jsonl

        return read_jsonl(self.run.epochs_path if kind == "epochs" else self.run.metrics_path)

    def write_summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        best = best_level(rows)
        summary = {
            "run_hash": self.run_hash,
            "finished": True,
            "levels": len(rows),
            "best_level": best["level"],
            "best_sparsity": best["sparsity"],
            "best_val_acc": best["val_acc"],
            "best_test_acc": best["test_acc"],
            "dense_test_acc": rows[0]["test_acc"],
            "final_sparsity": rows[-1]["sparsity"],
            "final_test_acc": rows[-1]["test_acc"],
            "total_wall_time_s": sum(r["wall_time_s"] for r in rows),
        }
        write_json(self.run.summary_path, summary)
        return summary

    def _bar(self, level: int, epochs: int, done: int):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=epochs, initial=done, desc=f"level {level:2d}", unit="ep", leave=False)


def run_training(cfg: Config, run_dir: RunDir, **kwargs) -> dict[str, Any]:
    return Engine(cfg, run_dir, **kwargs).run_loop()
