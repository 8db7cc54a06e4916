"""The level loop: dense -> [prune -> perturb -> retrain -> measure] x L, resumable at every epoch.

State lives here and in the run directory; the science (noise, masks, scores, schedules) lives in
small pure functions elsewhere. A killed run restarts from `checkpoints/last.safetensors` and, since
all randomness is derived from (seed, level, epoch), reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsd2.analysis.early_stop import StopDecision, decide
from dsd2.analysis.entropy import summarize
from dsd2.analysis.flops import ForwardFlops, densities_of, measure_forward_flops, training_flops
from dsd2.analysis.phases import detect_phases
from dsd2.config import Config, ConfigError
from dsd2.data import Splits, build_splits
from dsd2.data.batching import epoch_generator, train_batches
from dsd2.models import CONV_MODELS, build_model
from dsd2.ops import CountingReLU, swap_in_counting_relus
from dsd2.pruning import (
    CRITERIA,
    Masks,
    count_sparsity,
    full_masks,
    global_prune,
    perturb,
    prunable_weights,
    remaining_after,
)
from dsd2.runs import RunDir, RunError, load_checkpoint, save_checkpoint, write_json, write_jsonl
from dsd2.training import (
    DistillationObjective,
    Objective,
    build_optimizer,
    cross_entropy,
    predict,
    prepare_inputs,
    schedule_lr,
    train_epoch,
)
from dsd2.training.distributed import context as dist_context
from dsd2.training.precision import precision_note, resolve_precision

LevelMeasure = Callable[["Engine", int], dict[str, Any]]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for but CUDA is not available here; use --device cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} CUDA "
                          "devices")
    ctx = dist_context()
    if ctx.enabled and name.startswith("cuda"):
        return torch.device("cuda", ctx.local_rank)  # one GPU per process under torchrun
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        # Triton launches, graph captures and replays use the current device's streams: make it this one
        torch.cuda.set_device(device)
    return device


NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}


def parse_teacher_spec(spec: str) -> tuple[RunDir, str]:
    """'RUN_DIR[:LEVEL]' -> (run directory, level: best | dense | a number)."""
    path, sep, level = spec.rpartition(":")
    if not sep or not path or "/" in level:
        path, level = spec, "best"
    return RunDir(path), level or "best"


def resolve_teacher_level(run: RunDir, level: str) -> int:
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
        done = sorted(int(p.stem.split("_")[1]) for p in run.ckpt_dir.glob("level_*.safetensors"))
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
    classes = NUM_CLASSES[tcfg.data.dataset]
    if classes != num_classes:
        raise RunError(f"teacher run '{run.root}' has {classes} classes ({tcfg.data.dataset}); the student's data "
                       f"has {num_classes}")
    with torch.random.fork_rng(devices=[]):  # building the teacher must not shift the student's random stream
        teacher = build_model(tcfg.model, input_shape, classes)
    tensors, meta = load_checkpoint(run.level_path(chosen), stored["run_hash"])
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
    """Float64 sum and sum of squares of every teacher tensor: any update changes them."""
    vals = [t.detach().double() for t in teacher.state_dict().values() if t.is_floating_point()]
    return torch.stack([sum(v.sum() for v in vals), sum((v * v).sum() for v in vals)])


def best_level(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """w_best: the level with the highest validation accuracy; ties go to the sparser level."""
    if not rows:
        return None
    return max(rows, key=lambda r: (r["val_acc"], r["sparsity"]))


class Engine:
    def __init__(self, cfg: Config, run_dir: RunDir, *, progress: bool = True,
                 log: Callable[[str], None] = print, objective: Objective = cross_entropy,
                 splits: Splits | None = None, run_hash: str | None = None, graphs=None):
        self.cfg = cfg
        self.run = run_dir
        self.ctx = dist_context()
        self.progress = progress and self.ctx.is_main
        self.log = log if self.ctx.is_main else (lambda message: None)
        self.objective = objective
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device, cfg.model.name in CONV_MODELS)
        self.run_hash = run_hash or cfg.run_hash()
        self.level_measures: list[LevelMeasure] = []
        self.splits = splits
        self.model: nn.Module | None = None
        self.masks: Masks = {}
        self.relus: dict[str, CountingReLU] = {}
        self.flops: ForwardFlops | None = None
        self.level_start: dict[str, torch.Tensor] = {}
        self._init_weights: dict[str, torch.Tensor] | None = None
        self.stop: StopDecision | None = None
        self.teacher: nn.Module | None = None
        self.teacher_info: dict[str, Any] = {}
        self.teacher_flops = 0.0
        self.teacher_cached = False
        self._epoch_rows: list[dict[str, Any]] = []
        # graph maker for the captured train step, evaluation and counting pass (dsd2.training.graphs); None:
        # CUDA graphs on a CUDA device
        self.graphs = graphs
        self._graph_steps: dict[bool, Any] = {}
        self._graph_optimizer: torch.optim.Optimizer | None = None
        self._predictor = None

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
                    std=self.splits.std, precision=self.precision, channels_last=self._channels_last())

    def prepare(self, force_counting: bool = False) -> None:
        """Everything that can fail on bad input, before anything is written."""
        if self.model is not None:
            return
        torch.set_flush_denormal(True)  # denormal weights after pruning slow CPU retraining ~20x
        if self.cfg.cuda_graphs and self.device.type != "cuda" and self.graphs is None:
            raise ConfigError(f"cuda_graphs is on but the device is {self.device.type}; CUDA graphs need a CUDA "
                              "device (--device cuda), or leave --cuda-graphs off")
        if self.splits is None:
            self.splits = build_splits(self.cfg.data, self.cfg.seed, self.device)
        if self.ctx.enabled:
            for name in ("train", "val", "test"):
                n = len(getattr(self.splits, name))
                if 0 < n < self.ctx.world:
                    raise ConfigError(f"the {name} split has {n} samples, fewer than the {self.ctx.world} processes "
                                      "that would share it; use fewer processes")
        torch.manual_seed(self.cfg.seed)
        model = build_model(self.cfg.model, self.splits.input_shape, self.splits.num_classes)
        model = model.to(self.device)
        if self._channels_last():
            model = model.to(memory_format=torch.channels_last)
        a = self.cfg.analysis
        if a.entropy != "off" or force_counting:
            # drop-in swap: ReLUs hold no state, so state dicts and checkpoints are unchanged
            self.relus = swap_in_counting_relus(model, granularity=a.granularity, inclusive=a.inclusive)
        self.model = model
        self.train_model = model
        if self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(model, device_ids=ids)
        self.masks = full_masks(model)
        self.flops = measure_forward_flops(model, self.splits.input_shape)
        if self.cfg.distill.teacher:
            self.setup_teacher()
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

    def setup_teacher(self) -> None:
        k, s = self.cfg.distill, self.splits
        self.teacher, self.teacher_info = load_teacher(k.teacher, s.input_shape, s.num_classes, self.device)
        if self._channels_last():
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
        teacher_precision = "bf16" if self.device.type == "cuda" else self.precision
        cached = None
        if not self.cfg.data.augment:
            # no augmentation: the teacher sees the same inputs every epoch, so compute its logits once
            kw = dict(self.eval_kwargs(), precision=teacher_precision)
            cached = predict(self.teacher, s.train, **kw)  # row i = training sample i
        self.objective = DistillationObjective(self.teacher, k.alpha, k.temperature, cached, teacher_precision)
        self.teacher_flops = measure_forward_flops(self.teacher, s.input_shape).effective(
            densities_of({n: w.detach() for n, w in prunable_weights(self.teacher).items()}))
        self.teacher_cached = cached is not None
        self._teacher_sum = teacher_checksum(self.teacher)

    def check_teacher_unchanged(self) -> None:
        if not torch.equal(teacher_checksum(self.teacher), self._teacher_sum):
            raise RuntimeError("the teacher's weights changed during student training")

    # ---- CUDA graphs ---------------------------------------------------------------------------

    def use_graphs(self) -> bool:
        from dsd2.training.graphs import WARMUP_STEPS

        wanted = self.cfg.cuda_graphs is not False
        enough = len(self.splits.train) // self.cfg.optim.batch_size > WARMUP_STEPS
        capturable = self.device.type == "cuda" or self.graphs is not None
        return wanted and enough and capturable and not self.ctx.enabled

    def _graph_maker(self):
        from dsd2.training.graphs import CudaGraphs

        return self.graphs if self.graphs is not None else CudaGraphs(self.device)

    def graphed_train_epoch(self, optimizer, level: int, epoch: int, lr: float, counting: bool) -> dict[str, Any]:
        """The epoch as graph replays. A level's first graphed epoch captures (its optimizer is new); the online
        counting epoch has a graph of its own, captured with the ReLUs counting."""
        from dsd2.training.graphs import GraphedTrainStep, graphed_epoch

        s, batch = self.splits, self.cfg.optim.batch_size
        if self._graph_optimizer is not optimizer:
            self._graph_steps, self._graph_optimizer = {}, optimizer

        def make_step(warmup, first_lr):
            return GraphedTrainStep(self.model, optimizer, self.objective, s.train, batch, s.mean, s.std,
                                    augment=self.cfg.data.augment, precision=self.precision,
                                    channels_last=self._channels_last(), warmup_indices=warmup, lr=first_lr,
                                    graphs=self._graph_maker(), relus=self.relus)

        perm = torch.randperm(len(s.train), generator=epoch_generator(self.cfg.seed, level, epoch))
        captured = self._graph_steps.get(counting)
        step, loss_sum, correct = graphed_epoch(captured, make_step, perm.to(self.device), batch, lr)
        self._graph_steps[counting] = step
        n = len(s.train)
        stats: dict[str, Any] = {"train_loss": float(loss_sum) / n, "train_acc": float(correct) / n}
        if captured is None:
            stats["graph_capture_s"] = step.capture_s
        return stats

    def predictor(self):
        """Evaluation and the counting pass as graph replays (kept across levels: the model changes in place)."""
        from dsd2.training.graphs import GraphedPredictor

        if self._predictor is None:
            k = self.eval_kwargs()
            self._predictor = GraphedPredictor(self.model, k["batch_size"], k["mean"], k["std"],
                                               precision=k["precision"], channels_last=k["channels_last"],
                                               relus=self.relus, graphs=self._graph_maker())
        return self._predictor

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
        if not self.ctx.is_main:
            return
        tensors, optim_meta = self._state_tensors(optimizer)
        if optimizer is not None:
            tensors.update({f"start.{k}": v for k, v in self.level_start.items()})
        # all of the loop's randomness comes from generators seeded by (seed, level, epoch); the global
        # states are kept too, for code that draws from them (user objectives, layers with dropout)
        # online entropy counts of the last epoch exist until the level is measured: keep them across a kill
        observations = {}
        for name, r in self.relus.items():
            if r.counts is not None:
                tensors[f"relu.{name}"] = r.counts
                observations[name] = r.observations
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {"run_hash": self.run_hash, "level": level, "epoch": epoch, "level_done": level_done,
                "optim_scalars": optim_meta, "relu_observations": observations}
        save_checkpoint(path, tensors, meta)

    def load_state(self, path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors, meta = load_checkpoint(path, self.run_hash)
        model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            self.model.load_state_dict(model_sd)
        except RuntimeError:
            raise RunError(f"checkpoint '{path}' does not match the configured model") from None
        self.masks = {k[5:]: v.to(self.device, torch.bool) for k, v in tensors.items() if k.startswith("mask.")}
        self.level_start = {k[6:]: v.to(self.device) for k, v in tensors.items() if k.startswith("start.")}
        for name, obs in meta.get("relu_observations", {}).items():
            if name in self.relus and f"relu.{name}" in tensors:
                self.relus[name].counts = tensors[f"relu.{name}"].to(self.device)
                self.relus[name].observations = obs
        if "rng.cpu" in tensors:
            torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
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
        for i, (images, labels, idx) in enumerate(batches):
            if i >= self.cfg.prune.gradient_batches:
                break
            x = prepare_inputs(images, s.mean, s.std, self._channels_last())
            yield lambda x=x, labels=labels, idx=idx: self.objective(self.model(x), labels, x, idx)

    def _rewind_state(self) -> dict[str, torch.Tensor]:
        path = self.run.ckpt_dir / "rewind.safetensors"
        if not path.exists():
            path = self.run.init_path
        tensors, _ = load_checkpoint(path, self.run_hash)
        return {k[6:]: v.to(self.device) for k, v in tensors.items() if k.startswith("model.")}

    def init_weights(self) -> dict[str, torch.Tensor]:
        if self._init_weights is None:
            tensors, _ = load_checkpoint(self.run.init_path, self.run_hash)
            names = set(prunable_weights(self.model))
            self._init_weights = {k[6:]: v.to(self.device) for k, v in tensors.items()
                                  if k.startswith("model.") and k[6:] in names}
        return self._init_weights

    def predict_all(self, data, model: nn.Module | None = None) -> torch.Tensor:
        """Logits of a whole split; under data parallelism each rank predicts its shard and all gather."""
        model = model or self.model
        if not self.ctx.enabled:
            if model is self.model and self.use_graphs():
                return self.predictor().predict(data)
            return predict(model, data, **self.eval_kwargs())
        from dsd2.data import DeviceDataset

        part = self.ctx.shard(len(data))
        local = predict(model, DeviceDataset(data.images[part], data.labels[part]), **self.eval_kwargs())
        if local.numel() == 0:  # fewer samples than ranks: this rank's shard is empty
            local = torch.zeros(0, self.splits.num_classes, device=self.device)
        return self.ctx.gather_rows(local, len(data))

    def evaluate_all(self, data) -> dict[str, float]:
        if len(data) == 0:
            return {"loss": float("nan"), "acc": float("nan")}
        logits = self.predict_all(data)
        return {"loss": float(torch.nn.functional.cross_entropy(logits, data.labels)),
                "acc": float((logits.argmax(1) == data.labels).float().mean())}

    def reduce_counts(self) -> None:
        """Sum every rank's ReLU-state counts (each counted its own shard)."""
        if not self.ctx.enabled:
            return
        for r in self.relus.values():
            if r.counts is None:
                r.counts = torch.zeros(0, dtype=torch.int64, device=self.device)
            obs = torch.tensor([r.observations], dtype=torch.int64, device=self.device)
            self.ctx.all_reduce_sum(r.counts)
            self.ctx.all_reduce_sum(obs)
            r.observations = int(obs)

    def reduce_kd_parts(self) -> None:
        obj = self.objective
        if not self.ctx.enabled or obj.ce_sum is None:
            return
        samples = torch.tensor([obj.samples], dtype=torch.int64, device=self.device)
        for t in (obj.ce_sum, obj.kl_sum, samples):
            self.ctx.all_reduce_sum(t)
        obj.samples = int(samples)

    def set_counting(self, on: bool, reset: bool = False) -> None:
        for r in self.relus.values():
            if reset:
                r.reset_counts()
            r.counting = on

    def entropy_metrics(self) -> dict[str, Any]:
        layers = {n: (r.counts, r.observations) for n, r in self.relus.items() if r.counts is not None}
        if not layers:
            return {}
        e = summarize(layers)
        return {"entropy_mean": e.mean_over_layers, "entropy_weighted": e.neuron_weighted,
                "entropy_layers": [round(v, 6) for v in e.per_layer.values()]}

    def learning_distances(self) -> dict[str, float]:
        """He et al.'s learning distance: l2 distance of the retained weights from the level's start and from init."""
        out = {}
        weights = prunable_weights(self.model)
        for key, ref in (("dist_from_level_start", self.level_start), ("dist_from_init", self.init_weights())):
            if not ref:
                continue
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            for name, w in weights.items():
                diff = (w.detach().double() - ref[name].double()) * self.masks[name]
                total += (diff * diff).sum()
            out[key] = float(total.sqrt())
        return out

    def flop_metrics(self, level: int, epochs: int, train_time: float) -> dict[str, float]:
        dens = densities_of({n: w.detach() for n, w in prunable_weights(self.model).items()})
        f = self.flops
        eff, eff2 = f.effective(dens, "fvcore"), f.effective(dens, "2mac")
        images = epochs * len(self.splits.train)
        train_eff, train_dense = training_flops(images, eff), training_flops(images, f.dense("fvcore"))
        return {"forward_flops_dense": f.dense("fvcore"), "forward_flops_effective": eff,
                "forward_flops_effective_2mac": eff2, "train_flops_effective": train_eff,
                "train_flops_dense": train_dense, "train_time_s": train_time,
                "images_per_s": images / max(train_time, 1e-9),
                "achieved_flop_per_s": train_dense / max(train_time, 1e-9)}

    def measure_level(self, level: int, epochs: int, wall: float, train_time: float = 0.0) -> dict[str, Any]:
        s = self.splits
        counted_online = any(r.counts is not None for r in self.relus.values())
        pass_count = self.relus and (self.cfg.analysis.entropy == "pass" or not counted_online)
        if pass_count:
            self.set_counting(True, reset=True)  # the train-accuracy pass doubles as the counting pass
        logits = self.predict_all(s.train)
        self.set_counting(False)
        if self.relus:
            self.reduce_counts()  # whichever way they were counted (pass or online), every rank holds a shard
        pred = logits.argmax(1)
        noisy = s.noisy_mask
        n_noisy = int(noisy.sum())
        zeros, total = count_sparsity(self.model)
        val, test = self.evaluate_all(s.val), self.evaluate_all(s.test)
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
        row.update(self.entropy_metrics())
        row.update(self.learning_distances())
        row.update(self.flop_metrics(level, epochs, train_time))
        if self.teacher is not None:
            self.check_teacher_unchanged()
            images = len(s.train) if self.teacher_cached else epochs * len(s.train)
            row["teacher_flops"] = images * self.teacher_flops if (level == 0 or not self.teacher_cached) else 0.0
            last = [r for r in self._epoch_rows if r["level"] == level]
            if last and "kd_ce" in last[-1]:
                row["kd_ce"], row["kd_kl"] = last[-1]["kd_ce"], last[-1]["kd_kl"]
        self.set_counting(False, reset=True)
        for measure in self.level_measures:
            row.update(measure(self, level))
        return row

    def run_loop(self) -> dict[str, Any]:
        self.prepare()
        line, warning = precision_note(self.precision, self.device)
        self.log(line)
        if warning:
            self.log(f"warning: {warning}")
        if self.device.type == "cuda" or self.graphs is not None:
            self.log("graphs: " + ("training step, evaluation and counting pass captured" if self.use_graphs() else
                                   "off (turned off, data parallel, or fewer than 4 batches per epoch)"))
        main = self.ctx.is_main
        # every rank checks the folder (read-only) before rank 0 writes, so a refusal stops all of them
        resumed = self.run.claim(self.cfg.to_dict(), self.run_hash, write=False)
        self.ctx.barrier()
        if main and not resumed:
            self.run.claim(self.cfg.to_dict(), self.run_hash)
        s = self.splits
        if main and (not resumed or not self.run.noise_path.exists()):
            save_checkpoint(self.run.noise_path, {"indices": s.noise_indices, "original_labels": s.noise_original},
                            {"run_hash": self.run_hash, "noise": self.cfg.data.noise,
                             "noise_type": self.cfg.data.noise_type})
        if not self.run.init_path.exists():
            self.save_state(self.run.init_path, None, 0, 0, False)
        self.ctx.barrier()  # the other ranks read what rank 0 has just written

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
        if metric_rows and self.check_stop(metric_rows):
            level = self.num_levels + 1  # the run had already stopped early

        while level <= self.num_levels:
            started = time.perf_counter()
            if epoch == 0 and optimizer is None:
                if level > 0:
                    self.prune_level(level)
                self.level_start = {n: w.detach().clone() for n, w in prunable_weights(self.model).items()}
                optimizer = build_optimizer(self.model, self.masks, self.cfg.optim)
            epochs = self.epochs_for(level)
            bar = self._bar(level, epochs, epoch)
            while epoch < epochs:
                lr = self.lr_for(level, epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if isinstance(self.objective, DistillationObjective):
                    self.objective.reset()
                online = self.cfg.analysis.entropy == "online" and epoch == epochs - 1
                if online:
                    self.set_counting(True, reset=True)
                t0 = time.perf_counter()
                if self.use_graphs():
                    stats = self.graphed_train_epoch(optimizer, level, epoch, lr, online)
                else:
                    stats = train_epoch(
                        self.train_model, optimizer, s.train, batch_size=self.cfg.optim.batch_size,
                        generator=epoch_generator(self.cfg.seed, level, epoch), augment=self.cfg.data.augment,
                        mean=s.mean, std=s.std, objective=self.objective, precision=self.precision,
                        channels_last=self._channels_last(), dist_ctx=self.ctx,
                    )
                train_time = time.perf_counter() - t0
                if online:
                    self.set_counting(False)
                val, test = self.evaluate_all(s.val), self.evaluate_all(s.test)
                epoch += 1
                if isinstance(self.objective, DistillationObjective):
                    self.reduce_kd_parts()
                    stats.update(self.objective.parts())
                epoch_rows.append({"level": level, "epoch": epoch - 1, "lr": lr, **stats,
                                   "val_acc": val["acc"], "val_loss": val["loss"], "test_acc": test["acc"],
                                   "test_loss": test["loss"], "train_time_s": train_time,
                                   "images_per_s": len(s.train) / max(train_time, 1e-9)})
                if (self.cfg.prune.perturb == "rewind" and level == 0 and self.cfg.prune.rewind_iteration > 0
                        and epoch == self.cfg.prune.rewind_iteration):
                    self.save_state(self.run.ckpt_dir / "rewind.safetensors", None, 0, epoch, False)
                if main:
                    write_jsonl(self.run.epochs_path, epoch_rows)
                self.save_state(self.run.last_path, optimizer, level, epoch, False)
                if bar is not None:
                    bar.set_postfix(loss=f"{stats['train_loss']:.3f}", train=f"{stats['train_acc']:.3f}",
                                    val=f"{val['acc']:.3f}")
                    bar.update(1)
            if bar is not None:
                bar.close()
            train_time = sum(r["train_time_s"] for r in epoch_rows if r["level"] == level)
            self._epoch_rows = epoch_rows
            row = self.measure_level(level, epochs, time.perf_counter() - started, train_time)
            metric_rows.append(row)
            self.save_state(self.run.level_path(level), optimizer, level, epoch, True)
            if main:
                write_jsonl(self.run.metrics_path, metric_rows)
            self.save_state(self.run.last_path, None, level, epoch, True)
            entropy = f"  H {row['entropy_mean']:.3f}" if "entropy_mean" in row else ""
            self.log(f"level {level:2d}/{self.num_levels}  sparsity {row['sparsity']:.4f}  "
                     f"train {row['train_acc']:.3f}  val {row['val_acc']:.3f}  test {row['test_acc']:.3f}"
                     f"{entropy}  ({row['wall_time_s']:.1f}s)")
            level, epoch, optimizer = level + 1, 0, None
            if self.check_stop(metric_rows):
                self.log(f"early stop after level {self.stop.level}: {self.stop.reason}")
                break

        return self.write_summary(metric_rows)

    def run_rows(self, kind: str) -> list[dict[str, Any]]:
        from dsd2.runs import read_jsonl

        return read_jsonl(self.run.epochs_path if kind == "epochs" else self.run.metrics_path)

    def check_stop(self, rows: list[dict[str, Any]]) -> bool:
        a = self.cfg.analysis
        if a.early_stop == "none":
            return False
        entropies = [r.get("entropy_mean", float("nan")) for r in rows]
        self.stop = decide(a.early_stop, [r["val_acc"] for r in rows], entropies, patience=a.patience,
                           tolerance=a.entropy_tolerance)
        return self.stop.stop

    def early_stop_summary(self, rows: list[dict[str, Any]], best: dict[str, Any]) -> dict[str, Any]:
        a = self.cfg.analysis
        per_level_dense = [r["train_flops_dense"] for r in rows]
        planned = self.num_levels + 1
        # training cost of the levels not run, in the dense convention (exact: it does not depend on the masks)
        remaining = max(planned - len(rows), 0)
        level_cost = training_flops(self.cfg.optim.epochs * len(self.splits.train), self.flops.dense("fvcore"))
        return {
            "rule": a.early_stop, "patience": a.patience, "stopped": bool(self.stop and self.stop.stop),
            "stop_level": rows[-1]["level"], "stop_test_acc": rows[-1]["test_acc"],
            "entropy_drop_level": self.stop.entropy_drop_level if self.stop else None,
            "reason": self.stop.reason if self.stop else "",
            "returned_level": best["level"], "returned_test_acc": best["test_acc"],
            "returned_sparsity": best["sparsity"], "levels_run": len(rows), "levels_planned": planned,
            "train_pflops_run_dense": sum(per_level_dense) / 1e15,
            "train_pflops_saved_dense": remaining * level_cost / 1e15,
        }

    def write_summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        best = best_level(rows)
        for r in rows:
            r["best"] = r["level"] == best["level"]  # w_best, marked in metrics.jsonl
        if self.ctx.is_main:
            write_jsonl(self.run.metrics_path, rows)
        phases = detect_phases([r["test_acc"] for r in rows])
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
            "train_pflops_dense": sum(r.get("train_flops_dense", 0.0) for r in rows) / 1e15,
            "train_pflops_effective": sum(r.get("train_flops_effective", 0.0) for r in rows) / 1e15,
            "flop_convention": "fvcore: 1 FLOP per multiply-add; training = 3 x forward per image",
            "phases": {"labels": phases.labels, "has_critical": phases.has_critical, "dip": phases.dip,
                       "rise": phases.rise, "threshold": phases.threshold, "describe": phases.describe()},
            "relu_layers": list(self.relus),
        }
        if self.teacher is not None:
            summary["teacher"] = self.teacher_info
            summary["teacher_pflops"] = sum(r.get("teacher_flops", 0.0) for r in rows) / 1e15
        if self.cfg.analysis.early_stop != "none":
            summary["early_stop"] = self.early_stop_summary(rows, best)
        if self.ctx.is_main:
            write_json(self.run.summary_path, summary)
        self.ctx.barrier()
        return summary

    def _bar(self, level: int, epochs: int, done: int):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=epochs, initial=done, desc=f"level {level:2d}", unit="ep", leave=False)


def entropy_of_run(run_dir: RunDir, *, data_root: str | None = None, granularity: str | None = None,
                   inclusive: bool | None = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Entropy of ReLU states of every saved level of an existing run (also runs made without the measure).

    Writes `entropy.jsonl` into the run directory and returns its rows.
    """
    from dsd2.config import from_dict
    from dsd2.runs import write_jsonl

    stored = run_dir.stored_config()
    if stored is None:
        raise RunError(f"'{run_dir.root}' holds no dsd2 run (no config.yaml)")
    cfg = from_dict(stored["config"])
    if data_root:
        cfg.data.data_root = data_root
    if granularity:
        cfg.analysis.granularity = granularity
    if inclusive is not None:
        cfg.analysis.inclusive = inclusive
    levels = sorted(run_dir.ckpt_dir.glob("level_*.safetensors"))
    if not levels:
        raise RunError(f"'{run_dir.root}' has no level checkpoints yet")
    engine = Engine(cfg, run_dir, progress=False, log=log, run_hash=stored["run_hash"])
    engine.prepare(force_counting=True)
    rows = []
    for path in levels:
        meta, _ = engine.load_state(path)
        engine.set_counting(True, reset=True)
        predict(engine.model, engine.splits.train, **engine.eval_kwargs())
        engine.set_counting(False)
        zeros, total = count_sparsity(engine.model)
        row = {"level": meta["level"], "sparsity": zeros / total, "granularity": cfg.analysis.granularity,
               "inclusive": cfg.analysis.inclusive, **engine.entropy_metrics()}
        rows.append(row)
        log(f"level {row['level']:2d}  sparsity {row['sparsity']:.4f}  entropy {row['entropy_mean']:.4f} bits "
            f"(neuron-weighted {row['entropy_weighted']:.4f})")
    write_jsonl(run_dir.root / "entropy.jsonl", rows)
    return rows


def student_config(cfg: Config, kind: str, teacher_dir: Path, teacher_hash: str, level: int) -> Config:
    """The config of one student run of the DSD² experiment."""
    from dataclasses import replace

    from dsd2.config import ModelConfig, validate

    k = cfg.distill
    model = ModelConfig(name=k.student_model, hidden=tuple(k.student_hidden), depth=k.student_depth,
                        width=k.student_width)
    teacher = None if kind == "vanilla" else f"{teacher_dir}:{0 if kind == 'kd-dense' else level}"
    teacher_id = None if teacher is None else f"{teacher_hash}:{0 if kind == 'kd-dense' else level}"
    out = replace(cfg, model=model, distill=replace(k, students=(), teacher=teacher, teacher_id=teacher_id))
    validate(out)
    return out


def teacher_config(cfg: Config) -> Config:
    """The teacher's own run: independent of student-only settings, so a sweep over alpha reuses it."""
    from dataclasses import replace

    from dsd2.config import DistillConfig

    return replace(cfg, distill=DistillConfig(students=(), teacher=None, teacher_id=None))


def run_experiment(cfg: Config, root: RunDir, *, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """The DSD² experiment in one directory: the teacher's IMP curve (teacher/), the selection of the teacher
    level, then each student pruned by the same loop (students/<kind>/): vanilla, distilled from the dense
    teacher, distilled from the selected sparse teacher. Every part is a resumable run of its own."""
    if not cfg.distill.students:
        return Engine(cfg, root, progress=progress, log=log).run_loop()
    tcfg = teacher_config(cfg)
    teacher_run = RunDir(root.root / "teacher")
    engine = Engine(tcfg, teacher_run, progress=progress, log=log)
    engine.prepare()  # bad input fails here, before the experiment directory is claimed
    # and so does the student's (model size, level count), before the teacher trains
    probe = student_config(cfg, "vanilla", teacher_run.root, "", 0)
    Engine(probe, RunDir(root.root / "students" / "vanilla"), progress=False, log=log, splits=engine.splits).prepare()
    ctx = dist_context()
    resumed = root.claim(cfg.to_dict(), cfg.run_hash(), write=False)  # every rank checks, rank 0 writes
    ctx.barrier()
    if ctx.is_main and not resumed:
        root.claim(cfg.to_dict(), cfg.run_hash())
    ctx.barrier()
    done = teacher_run.summary()
    if done is None or done.get("run_hash") != tcfg.run_hash():
        log("== teacher: the vanilla IMP curve")
        done = engine.run_loop()
    level = resolve_teacher_level(teacher_run, str(cfg.distill.teacher_level))
    log(f"== teacher level {level} selected ({cfg.distill.teacher_level})")
    students: dict[str, Any] = {}
    for kind in cfg.distill.students:
        scfg = student_config(cfg, kind, teacher_run.root.resolve(), done["run_hash"], level)
        srun = RunDir(root.root / "students" / kind)
        summary = srun.summary()
        if summary is None or summary.get("run_hash") != scfg.run_hash():
            log(f"== student {kind}")
            summary = Engine(scfg, srun, progress=progress, log=log).run_loop()
        rows = srun.levels()
        phases = detect_phases([r["test_acc"] for r in rows])
        students[kind] = {
            "run": str(srun.root), "best_level": summary["best_level"], "best_test_acc": summary["best_test_acc"],
            "best_sparsity": summary["best_sparsity"], "dense_test_acc": summary["dense_test_acc"],
            "final_test_acc": summary["final_test_acc"], "critical_dip": phases.has_critical,
            "dip_points": phases.dip * 100, "rise_points": phases.rise * 100, "phases": phases.describe(),
            "train_pflops_dense": summary["train_pflops_dense"], "teacher_pflops": summary.get("teacher_pflops", 0.0),
        }
    summary = {"run_hash": cfg.run_hash(), "finished": True, "experiment": "dsd2",
               "teacher": {"run": str(teacher_run.root), "selected_level": level,
                           "rule": str(cfg.distill.teacher_level), "best_test_acc": done["best_test_acc"],
                           "dense_test_acc": done["dense_test_acc"], "train_pflops_dense": done["train_pflops_dense"]},
               "students": students,
               # keys shared with a single run's summary, so `train` prints one line either way
               "best_level": done["best_level"], "best_sparsity": done["best_sparsity"],
               "best_val_acc": done["best_val_acc"], "best_test_acc": done["best_test_acc"],
               "dense_test_acc": done["dense_test_acc"]}
    if ctx.is_main:
        write_json(root.summary_path, summary)
    ctx.barrier()
    return summary


def run_training(cfg: Config, run_dir: RunDir, **kwargs) -> dict[str, Any]:
    return Engine(cfg, run_dir, **kwargs).run_loop()
