"""The level loop: dense -> [prune -> perturb -> retrain -> measure] x L, resumable at any checkpointed epoch.

`LevelLoop.run` reads on one screen: resume, then per level prune → train epochs → measure → save → stop?
State lives here and in the run directory; the science (noise, masks, scores, schedules, measures) lives in
small pure functions elsewhere. A killed run restarts from `checkpoints/last.safetensors` (written at every level's
end and every `checkpoint_every` seconds within one) and, since every random stream is derived from (seed,
level, epoch), reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dsd2 import rng
from dsd2.analysis.early_stop import StopDecision, decide
from dsd2.analysis.flops import measure_forward_flops, training_flops
from dsd2.config import Config, ConfigError
from dsd2.data import Splits, build_splits
from dsd2.data.batching import train_batches
from dsd2.models import Conv2d, build_model
from dsd2.ops import (
    SUPPORTED_ACTIVATIONS,
    ReLUSiteError,
    count_relu_call_sites,
    fuse_relu_batch_norms,
    set_layer_masks,
    set_sparse_kernels,
    sparse_paths,
    swap_in_batch_norms,
    swap_in_masked_layers,
    swap_in_max_pools,
)
from dsd2.pruning import (
    CRITERIA,
    count_sparsity,
    full_masks,
    global_prune,
    perturb,
    prunable_weights,
    remaining_after,
    select_prunable,
)
from dsd2.run import measure
from dsd2.run.cores import computing_threads
from dsd2.run.identity import upgrade_runs
from dsd2.run.state import Checkpointer, restore_optimizer
from dsd2.run.summary import best_level, early_stop_summary, run_summary
from dsd2.run.teacher import Teacher
from dsd2.runs import RunDir, read_jsonl, save_checkpoint, write_json, write_jsonl
from dsd2.training import (
    DistillationObjective,
    InputFormat,
    Objective,
    TrainFeed,
    as_objective,
    build_optimizer,
    cross_entropy,
    epochs_for,
    forward_loss,
    level_lr,
    make_executor,
    predict,
)
from dsd2.training.distributed import context as dist_context
from dsd2.training.precision import (
    concrete_precision,
    decide_precision,
    is_conv_net,
    precision_note,
    teacher_precision,
)


def resolve_device(name: str) -> torch.device:
    """The device `name` (cpu, cuda, cuda:N, auto) names, made current; one GPU per process under torchrun."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for but CUDA is not available here; use --device cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} CUDA "
                          "devices")
    ctx = dist_context()
    if ctx.enabled and name.startswith("cuda"):
        return torch.device("cuda", ctx.local_rank)
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        # Triton launches, graph captures and replays use the current device's streams: make it this one
        torch.cuda.set_device(device)
    return device


def input_format(cfg: Config, splits: Splits, device: torch.device, model: nn.Module) -> InputFormat:
    """How the run's model takes its input: the training split's statistics, the precision it trains in on
    `device`, channels_last for conv nets."""
    return InputFormat(splits.mean, splits.std, decide_precision(cfg.precision, device, model),
                       cfg.channels_last and is_conv_net(model))


def build_run_model(cfg: Config, splits: Splits, device: torch.device, counting: bool,
                    model: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """The run's model on `device` (built from the config and seeded by the init stream, or `model`, a module
    given to the Python API; channels_last for conv nets), with the prunable weights the config's patterns
    choose, and, when `counting`, traced so that every ReLU call site counts its states (the traced module shares
    the model's parameters and state dict; its counters hold no state, so checkpoints are unchanged). Its prunable
    Linear and Conv2d layers are masked layers, swapped in once here: their weight gradient is masked where it is
    made; its BatchNorm2d and MaxPool2d layers train on dsd2's CPU kernels (`dsd2.ops.BatchNorm2d`, `MaxPool2d`), a
    ReLU right before a BatchNorm2d fused into it (`fuse_relu_batch_norms`). The swaps share every
    parameter and buffer and copy only the containers on the way, so a given module is trained in place but keeps
    its own layers."""
    torch.set_flush_denormal(True)  # denormal weights after pruning slow CPU retraining ~20x
    # the global generator is seeded too: code that draws from it (user objectives, dropout) is seeded by the run
    torch.manual_seed(rng.stream_seed("init", cfg.seed))
    if model is None:
        model = build_model(cfg.model, splits.input_shape, splits.num_classes)
    model = model.to(device)
    if cfg.channels_last and is_conv_net(model):
        model = model.to(memory_format=torch.channels_last)
    relus: dict = {}
    try:
        if counting:  # every ReLU call site its own layer (a module called twice is two): the traced model runs
            model, relus = count_relu_call_sites(model, granularity=cfg.analysis.granularity,
                                                 inclusive=cfg.analysis.inclusive)
        select_prunable(model, cfg.prune.include, cfg.prune.exclude)
    except (ReLUSiteError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    model, _ = swap_in_masked_layers(model, same_as=(Conv2d,))  # dsd2's Conv2d computes nn.Conv2d's function
    # the VGG-like's ReLU -> BatchNorm pairs: one op, after the tracing (whose counting ReLUs still count)
    return fuse_relu_batch_norms(swap_in_max_pools(swap_in_batch_norms(model))), relus


def check_levels(cfg: Config, model: nn.Module) -> None:
    """Refuse a level count whose schedule would prune nothing at some level, or everything."""
    total = sum(w.numel() for w in prunable_weights(model).values())
    fraction, levels = cfg.prune.prune_fraction, cfg.num_levels()
    prev = total
    for i, kept in enumerate(remaining_after(total, fraction, levels), 1):
        if kept == prev or kept == 0:
            raise ConfigError(f"{levels} levels cannot be reached with prune fraction {fraction}: level {i} would "
                              f"leave {kept} of {total} weights; use at most {i - 1} levels")
        prev = kept


@dataclass
class Position:
    """Where the loop stands: the level and epoch to run next, the level's optimizer (None: start the level),
    and the rows written so far."""

    level: int = 0
    epoch: int = 0
    optimizer: torch.optim.Optimizer | None = None
    epoch_rows: list[dict[str, Any]] = field(default_factory=list)
    metric_rows: list[dict[str, Any]] = field(default_factory=list)


class LevelLoop:
    """One run of the pruning loop into `run_dir`. `objective`: the training loss (distillation replaces it
    when there is a teacher); `splits`: data already built (else from the config); `model`: the network to prune
    (else built from the config); `teacher`: a frozen teacher module (else the teacher run the config names, if
    any); `graphs`: a graph maker for the captured step (default: CUDA graphs on a CUDA device)."""

    def __init__(self, cfg: Config, run_dir: RunDir, *, progress: bool = True, log: Callable[[str], None] = print,
                 objective: Objective | Callable = cross_entropy, splits: Splits | None = None,
                 model: nn.Module | None = None, teacher: nn.Module | None = None, graphs=None):
        cfg = concrete_precision(cfg, model)  # a Config built by hand may still say auto; the run hash names it
        self.cfg, self.run_dir, self.graphs = cfg, run_dir, graphs
        self.given_model, self.given_teacher = model, teacher
        self.ctx = dist_context()
        self.progress = progress and self.ctx.is_main
        self.log = log if self.ctx.is_main else (lambda message: None)
        self.objective = as_objective(objective)
        self.device = resolve_device(cfg.device)
        self.precision = cfg.precision
        self.run_hash = cfg.run_hash()
        self.splits = splits
        self.num_levels = cfg.num_levels()
        self.model = self.feed = self.executor = self.flops = self.checkpointer = self.teacher = None
        self.relus: dict = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.level_start: dict[str, torch.Tensor] = {}
        self.init_weights: dict[str, torch.Tensor] = {}
        self.stop: StopDecision | None = None
        self.saved_at = 0.0  # time.monotonic() of the last checkpoint
        self.train_paths: dict[str, str] = {}  # the masked layers' paths in the level's training (`_paths`)

    # ---- set-up: everything that can fail on bad input, before anything is written ----------------------

    def prepare(self) -> None:
        if self.model is not None:
            return
        cfg = self.cfg
        if cfg.cuda_graphs and self.device.type != "cuda" and self.graphs is None:
            raise ConfigError(f"cuda_graphs is on but the device is {self.device.type}; CUDA graphs need a CUDA "
                              "device (--device cuda), or leave --cuda-graphs off")
        if self.splits is None:
            self.splits = build_splits(cfg.data, cfg.seed, self.device)
        self._check_shards()
        self.model, self.relus = build_run_model(cfg, self.splits, self.device, cfg.analysis.entropy != "off",
                                                 self.given_model)
        if cfg.analysis.entropy != "off" and not self.relus:
            self.log(f"entropy and the entropy early stop are off: the model applies none of the activations "
                     f"whose states dsd2 counts ({SUPPORTED_ACTIVATIONS}), so there are no states to count")
        check_levels(cfg, self.model)
        self.masks = full_masks(self.model)
        self.flops = measure_forward_flops(self.model, self.splits.input_shape)
        s = self.splits
        fmt = input_format(cfg, s, self.device, self.model)
        self.feed = TrainFeed(s.train, cfg.optim.batch_size, fmt, cfg.data.augment)
        if cfg.distill.teacher or self.given_teacher is not None:
            self._setup_teacher()
        self.executor = make_executor(self.model, self.feed, self.objective, self.relus, cfg.seed, s.num_classes,
                                      dist_ctx=self.ctx, graphs=self.graphs, cuda_graphs=cfg.cuda_graphs,
                                      cpu_step=self._sparse_kernels())
        self.checkpointer = Checkpointer(self.run_hash, self.model, self.relus, self.device)

    def _sparse_kernels(self) -> str:
        """Set the masked layers' sparse kernels from the config; the CPU step that leaves them to compute (the
        fused epoch of a Linear/ReLU chain is dense: `on` trains such a chain in the eager step)."""
        mode, cpu_step = self.cfg.sparse_kernels, self.cfg.cpu_step
        if mode == "on":
            if self.device.type not in ("cpu", "cuda"):
                raise ConfigError(f"--sparse-kernels on runs on the CPU and on CUDA, but the device is "
                                  f"{self.device.type}; there the masked layers stay dense: use --sparse-kernels auto "
                                  "or off")
            if self.device.type == "cuda" and self.cfg.cuda_graphs is not False:
                raise ConfigError("--sparse-kernels on computes outside CUDA graphs (a captured step's masked layers "
                                  "stay dense); add --no-cuda-graphs, or use --sparse-kernels auto")
            if self.precision != "fp32":
                raise ConfigError(f"--sparse-kernels on computes in fp32, but this run's precision is "
                                  f"{self.precision}; add --precision fp32, or use --sparse-kernels auto")
            if cpu_step == "fused":
                raise ConfigError("--cpu-step fused runs a dense C++ epoch, which --sparse-kernels on would bypass; "
                                  "use --cpu-step auto or eager with it")
            cpu_step = "eager"
        set_sparse_kernels(self.model, mode)
        return cpu_step

    def _check_shards(self) -> None:
        if not self.ctx.enabled:
            return
        for name in ("train", "val", "test"):
            n = len(getattr(self.splits, name))
            if 0 < n < self.ctx.world:
                raise ConfigError(f"the {name} split has {n} samples, fewer than the {self.ctx.world} processes "
                                  "that would share it; use fewer processes")

    def _setup_teacher(self) -> None:
        k, s = self.cfg.distill, self.splits
        cached = not self.cfg.data.augment  # the teacher sees the same inputs every epoch: its logits once
        if self.given_teacher is not None:
            self.teacher = Teacher.of_module(self.given_teacher, s.input_shape, self.device, cached)
        else:
            self.teacher = Teacher.load(k.teacher, s.input_shape, s.num_classes, self.device, cached)
        module = self.teacher.module
        if self.feed.fmt.channels_last:
            module = self.teacher.module = module.to(memory_format=torch.channels_last)
        precision = teacher_precision(self.precision, self.device)
        fmt = InputFormat(s.mean, s.std, precision, self.feed.fmt.channels_last)
        logits = predict(module, s.train, max(self.feed.batch_size, 512), fmt) if cached else None
        self.objective = DistillationObjective(module, k.alpha, k.temperature, logits, precision)

    # ---- the loop ----------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        with computing_threads(self.cfg):
            return self._run()

    def _run(self) -> dict[str, Any]:
        self.prepare()
        self._announce()
        pos = self.resume()
        self.saved_at = time.monotonic()
        while pos.level <= self.num_levels and not (self.stop and self.stop.stop):
            started = time.perf_counter()
            if pos.optimizer is None:
                pos.optimizer = self.start_level(pos.level)
            self.train_level(pos)
            row = self.measure(pos.level, pos.epoch_rows, time.perf_counter() - started)
            pos.metric_rows.append(row)
            self.finish_level(pos, row)
            self.stop = self.decide_stop(pos.metric_rows)
            if self.stop and self.stop.stop:
                self.log(f"early stop after level {self.stop.level}: {self.stop.reason}")
            pos.level, pos.epoch, pos.optimizer = pos.level + 1, 0, None
        return self.write_summary(pos.metric_rows)

    def _announce(self) -> None:
        line, warning = precision_note(self.precision, self.device)
        self.log(line)
        if warning:
            self.log(f"warning: {warning}")
        if self.executor.mode == "fused-cpu":
            self.log("cpu step: fused (each epoch of the Linear/ReLU chain one C++ call, the eager step's ops bit "
                     "for bit; --cpu-step eager turns it off)")
        if self.device.type == "cuda" or self.graphs is not None:
            self.log("graphs: " + ("training step, evaluation and counting pass captured"
                                   if self.executor.mode == "graphed" else
                                   "off (turned off, data parallel, or fewer than 4 batches per epoch)"))

    def claim(self) -> bool:
        """Claim the run directory (every rank checks it, read-only, before rank 0 writes, so a refusal stops
        them all); write the noise record and the initial weights. Returns whether the run is resumed."""
        run, s = self.run_dir, self.splits
        if self.ctx.is_main:
            upgrade_runs(run.root, {self.cfg.legacy_run_hash(): self.run_hash})  # a run 0.1.0 wrote
        self.ctx.barrier()
        resumed = run.claim(self.cfg.to_dict(), self.run_hash, write=False)
        self.ctx.barrier()
        if self.ctx.is_main and not resumed:
            run.claim(self.cfg.to_dict(), self.run_hash)
        if self.ctx.is_main and (not resumed or not run.noise_path.exists()):
            save_checkpoint(run.noise_path, {"indices": s.noise_indices, "original_labels": s.noise_original},
                            {"run_hash": self.run_hash, "noise": self.cfg.data.noise,
                             "noise_type": self.cfg.data.noise_type})
        if not run.init_path.exists():
            self.save_state(run.init_path, None, 0, 0, False)
        self.ctx.barrier()  # the other ranks read what rank 0 has just written
        self.init_weights = self.checkpointer.weights(run.init_path, prunable_only=True)
        return resumed

    def resume(self) -> Position:
        """Claim the directory and continue from `checkpoints/last.safetensors` when there is one."""
        self.claim()
        run = self.run_dir
        if not run.last_path.exists():
            return Position()
        r = self.checkpointer.load(run.last_path)
        self.masks, self.level_start = r.masks, r.level_start
        pos = Position(r.level, r.epoch)
        pos.epoch_rows = [row for row in read_jsonl(run.epochs_path)
                          if (row["level"], row["epoch"]) < (r.level, r.epoch)]
        pos.metric_rows = [row for row in run.levels() if row["level"] < r.level or
                           (r.level_done and row["level"] == r.level)]
        if r.level_done:
            pos.level, pos.epoch = r.level + 1, 0
        else:
            pos.optimizer = build_optimizer(self.model, self.masks, self.cfg.optim)
            restore_optimizer(pos.optimizer, r.tensors, r.optimizer_scalars, self.device)
        self.log(f"resuming {run.root} at level {r.level}, epoch {r.epoch}" + (" (level complete)" if r.level_done
                                                                                else ""))
        self.stop = self.decide_stop(pos.metric_rows)  # the run may have stopped early already
        return pos

    def start_level(self, level: int) -> torch.optim.Optimizer:
        """Prune (after the dense level), perturb, and give the level a fresh optimizer."""
        if level > 0:
            self.prune(level)
        self.level_start = {n: w.detach().clone() for n, w in prunable_weights(self.model).items()}
        return build_optimizer(self.model, self.masks, self.cfg.optim)

    def prune(self, level: int) -> None:
        """Prune the final weights of the previous level, then perturb them."""
        p = self.cfg.prune
        kwargs: dict[str, Any] = {"generator": rng.generator("prune", self.cfg.seed, level)}
        if p.criterion == "gradient":
            kwargs["loss_batches"] = self._gradient_batches(level)
        scores = CRITERIA[p.criterion](self.model, **kwargs)
        self.masks = global_prune(scores, self.masks, p.prune_fraction)
        rewind = None
        if p.perturb == "rewind":
            saved = self.run_dir.ckpt_dir / "rewind.safetensors"
            rewind = self.checkpointer.weights(saved if saved.exists() else self.run_dir.init_path)
        perturb(self.model, p.perturb, self.masks, rewind, reinit_seed=rng.stream_seed("reinit", self.cfg.seed, level))
        set_layer_masks(self.model, self.masks)  # the masked layers compute with the new masks from here on

    def _gradient_batches(self, level: int):
        feed = self.feed
        fmt = dataclasses.replace(feed.fmt, precision="fp32")  # scores in fp32 whatever the training precision
        perm = torch.randperm(len(feed.data), generator=rng.generator("gradient", self.cfg.seed, level))
        batches = train_batches(feed.data, feed.batch_size, perm.to(self.device), None)
        self.model.train()
        for i, (images, labels, idx) in enumerate(batches):
            if i >= self.cfg.prune.gradient_batches:
                break
            yield lambda images=images, labels=labels, idx=idx: forward_loss(self.model, self.objective, images,
                                                                              labels, idx, fmt)[1]

    def train_level(self, pos: Position) -> None:
        """The level's remaining epochs, checkpointed (`last`, and their rows) at the level's last epoch and at the
        first epoch end `checkpoint_every` seconds after the previous checkpoint."""
        cfg, s, level = self.cfg, self.splits, pos.level
        epochs = epochs_for(cfg, level)
        bar = self._bar(level, epochs, pos.epoch)
        while pos.epoch < epochs:
            lr = level_lr(cfg, level, pos.epoch)
            online = cfg.analysis.entropy == "online" and pos.epoch == epochs - 1
            t0 = time.perf_counter()
            stats = self.executor.train_epoch(pos.optimizer, level, pos.epoch, lr, counting=online)
            train_time = time.perf_counter() - t0
            row = {"level": level, "epoch": pos.epoch, "lr": lr, **stats}
            if cfg.epoch_eval == "every":  # else the level's row alone measures them (`measure`)
                val = measure.split_metrics(self.executor.predict(s.val), s.val.labels)
                test = measure.split_metrics(self.executor.predict(s.test), s.test.labels)
                row.update({"val_acc": val["acc"], "val_loss": val["loss"], "test_acc": test["acc"],
                            "test_loss": test["loss"]})
            pos.epoch_rows.append({**row, "train_time_s": train_time,
                                   "images_per_s": len(s.train) / max(train_time, 1e-9)})
            pos.epoch += 1
            if cfg.prune.perturb == "rewind" and level == 0 and pos.epoch == cfg.prune.rewind_iteration:
                self.save_state(self.run_dir.ckpt_dir / "rewind.safetensors", None, 0, pos.epoch, False)
            if pos.epoch == epochs or time.monotonic() - self.saved_at >= cfg.checkpoint_every:
                # a fast epoch (milliseconds) is not slowed by two synced files; a killed run recomputes the epochs
                # after the last checkpoint, which give the same rows
                if self.ctx.is_main:
                    write_jsonl(self.run_dir.epochs_path, pos.epoch_rows)
                self.save_state(self.run_dir.last_path, pos.optimizer, level, pos.epoch, False)
                self.saved_at = time.monotonic()
            if bar is not None:
                shown = {"val": f"{row['val_acc']:.3f}"} if "val_acc" in row else {}
                bar.set_postfix(loss=f"{stats['train_loss']:.3f}", train=f"{stats['train_acc']:.3f}", **shown)
                bar.update(1)
        if bar is not None:
            bar.close()
        self.train_paths = self._paths()

    def _paths(self) -> dict[str, str]:
        """The path each masked layer's last call took: sparse, dense, or fused (the dense C++ epoch of a
        Linear/ReLU chain, which computes without the layers' own forward)."""
        if getattr(self.executor, "mode", None) == "fused-cpu":
            return {name: "fused" for name in sparse_paths(self.model)}
        return sparse_paths(self.model)

    def save_state(self, path, optimizer, level: int, epoch: int, level_done: bool) -> None:
        if self.ctx.is_main:
            self.checkpointer.save(path, self.masks, optimizer, self.level_start, level, epoch, level_done)

    # ---- measure, save, stop -------------------------------------------------------------------------------

    def measure(self, level: int, epoch_rows: list[dict[str, Any]], wall: float) -> dict[str, Any]:
        """The level's row of metrics.jsonl. The training split's pass doubles as the counting pass, unless the
        last epoch counted online."""
        s, ex = self.splits, self.executor
        counted_online = any(r.counts is not None for r in self.relus.values())
        counting = self.relus and (self.cfg.analysis.entropy == "pass" or not counted_online)
        logits = ex.count(s.train) if counting else ex.predict(s.train)
        zeros, total = count_sparsity(self.model)
        val = measure.split_metrics(ex.predict(s.val), s.val.labels)
        test_logits = ex.predict(s.test)
        test = measure.split_metrics(test_logits, s.test.labels)
        level_rows = [r for r in epoch_rows if r["level"] == level]
        epochs = epochs_for(self.cfg, level)
        weights = prunable_weights(self.model)
        row = {"level": level, "sparsity": zeros / total, "remaining_weights": total - zeros,
               **measure.train_metrics(logits, s),
               "val_acc": val["acc"], "val_loss": val["loss"], "test_acc": test["acc"], "test_loss": test["loss"],
               **measure.test_outcomes(test_logits, s.test.labels),
               "epochs": epochs, "wall_time_s": wall,
               **measure.entropy_metrics(self.relus),
               **measure.learning_distances(weights, self.masks, self.level_start, self.init_weights),
               **measure.flop_metrics(self.flops, weights, epochs * len(s.train),
                                      sum(r["train_time_s"] for r in level_rows)),
               "kernels": {"train": self.train_paths, "eval": self._paths()}}
        if self.teacher is not None:
            self.teacher.check_unchanged()
            row["teacher_flops"] = self.teacher.flops_of_level(level, epochs, len(s.train))
            if level_rows and "kd_ce" in level_rows[-1]:
                row["kd_ce"], row["kd_kl"] = level_rows[-1]["kd_ce"], level_rows[-1]["kd_kl"]
        for r in self.relus.values():
            r.reset_counts()
        return row

    def finish_level(self, pos: Position, row: dict[str, Any]) -> None:
        """Save the level's checkpoint and its row, then mark the level done in `last`."""
        self.save_state(self.run_dir.level_path(pos.level), pos.optimizer, pos.level, pos.epoch, True)
        if self.ctx.is_main:
            write_jsonl(self.run_dir.metrics_path, pos.metric_rows)
        self.save_state(self.run_dir.last_path, None, pos.level, pos.epoch, True)
        entropy = f"  H {row['entropy_mean']:.3f}" if "entropy_mean" in row else ""
        self.log(f"level {pos.level:2d}/{self.num_levels}  sparsity {row['sparsity']:.4f}  "
                 f"train {row['train_acc']:.3f}  val {row['val_acc']:.3f}  test {row['test_acc']:.3f}"
                 f"{entropy}  ({row['wall_time_s']:.1f}s)")

    def decide_stop(self, rows: list[dict[str, Any]]) -> StopDecision | None:
        """The early-stop rule's decision on the levels so far (None when no rule is set or no level ran)."""
        a = self.cfg.analysis
        if a.early_stop == "none" or not rows:
            return None
        entropies = [r.get("entropy_mean", float("nan")) for r in rows]
        return decide(a.early_stop, [r["val_acc"] for r in rows], entropies, patience=a.patience,
                      tolerance=a.entropy_tolerance)

    def write_summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        best = best_level(rows)
        for r in rows:
            r["best"] = r["level"] == best["level"]  # w_best, marked in metrics.jsonl
        summary = run_summary(rows, self.run_hash, list(self.relus), self.cfg.analysis.dodge_margin)
        if self.teacher is not None:
            summary["teacher"] = self.teacher.info
            summary["teacher_pflops"] = sum(r.get("teacher_flops", 0.0) for r in rows) / 1e15
        a = self.cfg.analysis
        if a.early_stop != "none":
            level_cost = training_flops(self.cfg.optim.epochs * len(self.splits.train), self.flops.dense("fvcore"))
            summary["early_stop"] = early_stop_summary(rows, self.stop, a.early_stop, a.patience,
                                                       self.num_levels + 1, level_cost)
        if self.ctx.is_main:
            write_jsonl(self.run_dir.metrics_path, rows)
            write_json(self.run_dir.summary_path, summary)
        self.ctx.barrier()
        return summary

    def _bar(self, level: int, epochs: int, done: int):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=epochs, initial=done, desc=f"level {level:2d}", unit="ep", leave=False)
