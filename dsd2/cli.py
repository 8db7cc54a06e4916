"""`dsd2-engine`: train (the pruning loop), entropy, report (figures, tables) and info (versions, backends).

Every command that takes a run folder also takes the main job's experiment root (`runs/digits-mlp-<hash>`),
resolved by `dsd2.runs.resolve_runs`: `distill --teacher ROOT` takes its teacher run, `entropy ROOT` measures
the teacher and every student, `report ROOT` reports the experiment, `train --resume ROOT` continues it."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsd2.config import (
    DEVICE_HELP,
    GRANULARITIES,
    LAUNCHERS,
    PRESETS,
    Config,
    ConfigError,
    ConfigOption,
    build_config,
    check_device,
    config_options,
    from_dict,
)

if TYPE_CHECKING:
    from dsd2.runs import RunDir

EXIT_USER_ERROR = 2

# --help groups of the config flags, by config section (None: the top-level fields)
GROUP_TITLES: dict[str | None, str] = {
    "data": "data", "model": "model", "optim": "optimisation", "prune": "pruning",
    "analysis": "entropy and early stop", "distill": "distillation (DSD²)", None: "run",
}
_SCALARS: dict[str, type | None] = {"int": int, "float": float, "str": None}  # str: argparse keeps the text
_LIST_NOUNS = {"int": "whole numbers", "float": "numbers", "str": "names"}


# flag dest -> (section, key) in the config; None section means top level. Generated from the config fields.
FLAG_MAP: dict[str, tuple[str | None, str]] = {
    opt.dest: (opt.section, opt.name) for opt in config_options() if opt.dest is not None
}


def list_of(kind: str, none_is_empty: bool = False) -> Callable[[str], tuple[Any, ...]]:
    """Parser of comma-separated items of `kind` (int, float, str); with `none_is_empty`, `none` is the empty list."""
    item = _SCALARS[kind] or str

    def parse(text: str) -> tuple[Any, ...]:
        if none_is_empty and text.strip().lower() in ("", "none"):
            return ()
        try:
            return tuple(item(v.strip()) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of {_LIST_NOUNS[kind]}") from None

    return parse


def list_parser(opt: ConfigOption) -> Callable[[str], tuple[Any, ...]]:
    """Comma-separated items of a tuple field (`--hidden 256,256`); a list of names may be `none` (empty)."""
    return list_of(opt.kind, none_is_empty=opt.kind == "str")


def flag_arguments(opt: ConfigOption) -> dict[str, Any]:
    """`add_argument` keywords of a config field's flag. Every default is None (not given): the preset and
    the config file decide the value unless the flag is on the command line."""
    kwargs: dict[str, Any] = {"dest": opt.dest, "default": None, "help": opt.help.replace("%", "%%"),
                              "metavar": opt.metavar}
    if opt.kind == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction  # --flag / --no-flag
    elif opt.is_list:
        kwargs["type"] = list_parser(opt)
    else:
        kwargs["type"] = _SCALARS[opt.kind]
        kwargs["choices"] = opt.choices
    return kwargs


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field that has one, in argument groups by section."""
    groups: dict[str | None, Any] = {}
    for opt in config_options():
        if opt.flag is None:
            continue
        if opt.section not in groups:
            groups[opt.section] = p.add_argument_group(GROUP_TITLES.get(opt.section, str(opt.section)))
        groups[opt.section].add_argument(f"--{opt.flag}", **flag_arguments(opt))


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (flags override it)")
    p.add_argument("--preset", choices=list(PRESETS), help="start from a preset (default: digits-mlp)")
    p.add_argument("--out", help="run directory (default: runs/<name>-<config hash>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run or experiment in RUN_DIR with its stored "
                   "config")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(p)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dest, (section, key) in FLAG_MAP.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if section is None:
            out[key] = value
        else:
            out.setdefault(section, {})[key] = value
    return out


def config_from_flags(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Config:
    """The preset, config file and flags, with `--precision auto` decided for the model the run trains (so the
    run's name says which precision it trains in)."""
    from dsd2.training.precision import concrete_precision

    flags = overrides_from_args(args) if overrides is None else overrides
    return concrete_precision(build_config(args.preset, args.config, flags))


def cmd_train(args: argparse.Namespace) -> int:
    from dsd2.run import run_experiment
    from dsd2.run.identity import find_run_folder, upgrade_runs
    from dsd2.runs import RunDir, resolve_run

    if args.resume:
        run = resolve_run(args.resume, "experiment")  # a run, or an experiment root as a whole
        upgrade_runs(run.root)
        cfg = from_dict(run.stored_config()["config"])
        if args.data_root:
            cfg.data.data_root = args.data_root
    else:
        cfg = config_from_flags(args)
        name = args.preset or (f"{cfg.data.dataset}-{cfg.model.name}")
        if args.out:
            run = RunDir(args.out)
            upgrade_runs(run.root, {cfg.legacy_run_hash(): cfg.run_hash()})
        else:
            run = RunDir(find_run_folder(cfg, Path("runs") / f"{name}-{cfg.run_hash()}"))
    summary = run_unless_finished(run, cfg, lambda progress: run_experiment(cfg, run, progress=progress),
                                  args.quiet)
    return finish(run, summary)


def run_unless_finished(run: RunDir, cfg: Config, start: Callable[[bool], dict[str, Any]],
                        quiet: bool) -> dict[str, Any]:
    """The summary of `run` if it already finished this config, else that of `start(progress)`."""
    summary = run.finished(cfg.run_hash())
    if summary is not None:
        print(f"run already complete: {run.root}")
        return summary
    return start(not quiet and sys.stderr.isatty())


def cost_note(summary: dict[str, Any]) -> str:
    """'; training 314 GFLOPs + teacher 779 kFLOPs' from a run's or a student's summary (PFLOPs), or ''."""
    from dsd2.report.units import format_pflops

    train = summary.get("train_pflops_dense")
    if train is None:
        return ""
    teacher = summary.get("teacher_pflops") or 0.0
    return f"; training {format_pflops(train)}" + (f" + teacher {format_pflops(teacher)}" if teacher else "")


def finish(run: RunDir, summary: dict[str, Any]) -> int:
    from dsd2.report import write_experiment_report, write_report
    from dsd2.training.distributed import context

    if not context().is_main:
        return 0

    if summary.get("experiment") == "seeds":
        return finish_seeds(run, summary)
    what = "teacher" if "students" in summary else "best"
    print(f"{what}: best level {summary['best_level']}: sparsity {summary['best_sparsity']:.4f}, "
          f"val {summary['best_val_acc']:.4f}, test {summary['best_test_acc']:.4f} "
          f"(dense test {summary['dense_test_acc']:.4f})"
          f"{cost_note(summary['teacher'] if 'students' in summary else summary)}")
    for kind, st in summary.get("students", {}).items():
        verdict = st.get("verdict") or {"describe": "no verdict (a run made before verdicts were recorded)"}
        print(f"student {kind}: best level {st['best_level']}: sparsity {st['best_sparsity']:.4f}, "
              f"test {st['best_test_acc']:.4f} (dense {st['dense_test_acc']:.4f}){cost_note(st)}; "
              f"{verdict['describe']}")
    if "students" in summary:
        written = write_experiment_report(run.root, run.root / "report")
    else:
        written = write_report([run.root], run.root / "report", title=run.root.name)
    print(f"results: {run.root}  (summary.json, metrics.jsonl per run, checkpoints/)")
    print(f"report: {', '.join(str(p) for p in written)}")
    return 0


def finish_seeds(run: RunDir, summary: dict[str, Any]) -> int:
    """The console lines and the report of a configuration run over seeds."""
    from dsd2.report import seeds_table, write_seeds_report

    print(seeds_table(summary))
    written = write_seeds_report(run.root, run.root / "report")
    print(f"results: {run.root}  (summary.json; seed-S/ per seed)")
    print(f"report: {', '.join(str(p) for p in written)}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from dsd2.config import legacy_run_hash
    from dsd2.run import LevelLoop, parse_teacher_spec, resolve_teacher_level
    from dsd2.run.identity import find_run_folder, upgrade_runs
    from dsd2.runs import RunDir

    overrides = overrides_from_args(args)
    overrides.setdefault("distill", {})["students"] = ()
    cfg = config_from_flags(args, overrides)
    teacher_run, level = parse_teacher_spec(args.teacher)
    upgrade_runs(teacher_run.root)
    chosen = resolve_teacher_level(teacher_run, level)
    stored = teacher_run.stored_config()
    cfg.distill.teacher = f"{teacher_run.root.resolve()}:{chosen}"
    cfg.distill.teacher_id = f"{stored['run_hash']}:{chosen}"
    # 0.1.0 named this student by its hash of the teacher's 0.1.0 hash
    old_teacher = stored.get("upgraded_from", stored["run_hash"])
    as_before = cfg.to_dict()
    as_before["distill"]["teacher_id"] = f"{old_teacher}:{chosen}"
    if args.out:
        run = RunDir(args.out)
        upgrade_runs(run.root)
    else:
        name = f"distill-{cfg.data.dataset}-{cfg.model.name}"
        run = RunDir(find_run_folder(cfg, Path("runs") / f"{name}-{cfg.run_hash()}", legacy_run_hash(as_before)))
    summary = run_unless_finished(run, cfg, lambda progress: LevelLoop(cfg, run, progress=progress).run(),
                                  args.quiet)
    print(f"teacher: {teacher_run.root} level {chosen}")
    return finish(run, summary)


def cmd_report(args: argparse.Namespace) -> int:
    """Experiment roots (and folders of them) report as experiments, seeds aggregated; anything else reports
    every run it holds (an experiment's teacher and students among them)."""
    from dsd2.report import write_experiment_report, write_report, write_seeds_report
    from dsd2.runs import resolve_runs

    out = Path(args.out) if args.out else Path(args.runs[0]) / "report"
    tops = [run for path in args.runs for run in resolve_runs(path, "experiment")]
    if len(tops) == 1 and tops[0].seed_runs():
        written = write_seeds_report(tops[0].root, out)
        print("\n".join(str(p) for p in written))
        return 0
    tops = [sub for run in tops for sub in run.seed_runs() or [run]]
    if all(run.is_experiment() for run in tops):
        written = write_experiment_report([run.root for run in tops], out)
    else:
        runs = [run.root for path in args.runs for run in resolve_runs(path, "levels")]
        written = write_report(runs, out, title=args.title or "")
    for path in written:
        print(path)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from dsd2.sweep import run_sweep

    cfg = build_config(args.preset, args.config_file or args.config, overrides_from_args(args))  # auto per run
    slurm = {k: v for k, v in {"slurm_partition": args.slurm_partition, "gpus_per_node": args.slurm_gpus,
                               "cpus_per_task": args.slurm_cpus, "timeout_min": args.slurm_timeout_min}.items()
             if v is not None}
    root = Path(args.out or "sweeps")
    summary = run_sweep(cfg, args.grid or [], root, args.launcher, slurm=slurm)
    print(f"sweep: {summary['finished']} of {summary['runs']} runs finished; table: {root / 'sweep.md'}; "
          f"summary: {root / 'sweep_summary.json'}")
    print(f"report: dsd2-engine report {root}/<run> ... (runs whose configs differ only by seed aggregate)")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from dsd2.study import DEFAULT_GRID, grid_hash, run_kd_study

    cfg = config_from_flags(args)
    if args.kind == "sdd":
        return study_sdd(args, cfg)
    unused = [flag for flag, value in (("--perturbations", args.perturbations), ("--noises", args.noises),
                                       ("--depths", args.depths)) if value is not None]
    if unused or args.full_grid or args.launcher != "local":
        raise ConfigError(f"{(unused or ['--full-grid' if args.full_grid else '--launcher'])[0]} belongs to study "
                          "sdd; study kd varies --alphas, --temperatures, --widths and --teachers")
    given = {"alpha": args.alphas, "temperature": args.temperatures, "width": args.widths, "teacher": args.teachers}
    grid = {**DEFAULT_GRID, **{k: tuple(v) for k, v in given.items() if v is not None}}
    if args.out:
        root = Path(args.out)
    else:
        from dsd2.run.identity import find_run_folder

        root = find_run_folder(cfg, Path("studies") / f"kd-{cfg.run_hash()}-{grid_hash(grid)}")
    started = time.perf_counter()
    summary = run_kd_study(cfg, root, grid, progress=not args.quiet and sys.stderr.isatty())
    print((root / "study.md").read_text())
    print(f"study: {len(summary['settings'])} settings x {len(summary['seeds'])} seeds in {root}; this call "
          f"{time.perf_counter() - started:.0f} s, the runs' own wall time {summary['wall_time_s']:.0f} s")
    print(f"table: {root / 'study.md'}; heatmap: {root / 'study_heatmap.png'}; summary: {root / 'study_summary.json'}")
    return 0


def study_sdd(args: argparse.Namespace, cfg: Config) -> int:
    from dsd2.run.identity import find_run_folder
    from dsd2.study_sdd import default_grid, grid_hash, run_sdd_study

    given = {"perturb": args.perturbations, "noise": args.noises, "width": args.widths, "depth": args.depths}
    unused = [flag for flag, value in (("--alphas", args.alphas), ("--temperatures", args.temperatures),
                                       ("--teachers", args.teachers)) if value is not None]
    if unused:
        raise ConfigError(f"{unused[0]} is an axis of study kd; study sdd varies --perturbations, --noises, "
                          "--widths and --depths")
    grid = {**default_grid(cfg), **{k: tuple(v) for k, v in given.items() if v is not None}}
    if args.out:
        root = Path(args.out)
    else:
        root = find_run_folder(cfg, Path("studies") / f"sdd-{cfg.run_hash()}-{grid_hash(grid, args.full_grid)}")
    started = time.perf_counter()
    summary = run_sdd_study(cfg, root, grid, full=args.full_grid, launcher=args.launcher)
    print((root / "study.md").read_text())
    print(f"study: {len(summary['settings'])} settings x {len(summary['seeds'])} seeds in {root}; this call "
          f"{time.perf_counter() - started:.0f} s, the runs' own wall time {summary['wall_time_s']:.0f} s")
    print(f"table: {root / 'study.md'}; heatmap: {root / 'study_heatmap.png'}; summary: {root / 'study_summary.json'}")
    return 0


def cmd_entropy(args: argparse.Namespace) -> int:
    """Entropy of every run the path holds (an experiment root: the teacher and each student); with several,
    a run without level checkpoints yet is skipped with a note."""
    from dsd2.run import entropy_of_run
    from dsd2.run.state import saved_levels
    from dsd2.runs import RunError, resolve_runs

    runs = resolve_runs(args.run, "levels")
    written = 0
    for run in runs:
        if len(runs) > 1:
            if not saved_levels(run):
                print(f"skipped {run.root}: no level checkpoints yet")
                continue
            print(f"== {run.root}")
        entropy_of_run(run, data_root=args.data_root, granularity=args.granularity, inclusive=args.inclusive)
        print(f"written: {run.root / 'entropy.jsonl'}")
        written += 1
    if not written:
        raise RunError(f"none of the runs in '{args.run}' has level checkpoints yet")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dsd2.export import export_level

    done = export_level(args.target, args.out, data_root=args.data_root)
    mib = 2**20
    print(f"exported level {done['level']} of {done['run']} ({done['sparsity']:.2%} sparse): {done['path']}")
    print(f"size: {done['bytes'] / mib:.3f} MiB; the dense model's weights: {done['dense_bytes'] / mib:.3f} MiB "
          f"({done['dense_bytes'] / done['bytes']:.1f}x smaller); the level's checkpoint (weights, masks, optimizer "
          f"state): {done['checkpoint_bytes'] / mib:.3f} MiB")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    from dsd2 import __version__
    from dsd2.ops import backends

    print(f"dsd2 {__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}")
    try:
        import torchvision

        print(f"torchvision {torchvision.__version__}")
    except ImportError:
        print("torchvision missing")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        pass
    cuda = torch.cuda.is_available()
    print(f"device: {'cuda (' + torch.cuda.get_device_name(0) + ')' if cuda else 'cpu'}; "
          f"cpu threads {torch.get_num_threads()}, capability {torch.backends.cpu.get_cpu_capability()}")
    for name, state in backends().items():
        print(f"backend {name}: {state}")
    from dsd2.training.precision import native_bf16

    device = "cuda" if cuda else "cpu"
    print(f"bf16: {'native' if native_bf16(device) else 'emulated (slow)'} on this {device}; "
          f"--precision auto trains conv nets in {'bf16' if native_bf16(device) else 'fp32'}")
    graphs = "in use for the training step, evaluation and the counting pass (single process; " \
        "--no-cuda-graphs turns them off)" if cuda else \
        "not in use (no CUDA device)"
    print(f"cuda graphs: {graphs}")
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from dsd2.run import resolve_device
    from dsd2.selftest import environment, exit_code, run_selftest, table, write_json

    check_device(args.device)
    if args.json is not None and (args.json.is_dir() or not args.json.resolve().parent.is_dir()):
        raise ConfigError(f"--json {args.json} must name a file in an existing folder")
    device = resolve_device(args.device)
    env = environment(device)
    print(f"dsd2 selftest on {env.get('gpu', env['cpu'])} ({device}); torch {env['torch']}; CPU levels "
          f"{', '.join(env['cpu_isa_levels'])}; {env['threads']} threads")
    checks = run_selftest(device, quick=args.quick)
    print(table(checks))
    if args.json is not None:
        write_json(args.json, device, checks)
        print(f"written to {args.json}")
    return exit_code(checks, strict=args.strict)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (the value and what is allowed) and exit code 2, like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"dsd2-engine: error: {message}\n")


def _add_study_parser(sub) -> None:
    study = sub.add_parser("study", help="kd: when does distillation dodge sparse double descent? a grid over "
                           "alpha, tau, student width and teacher; sdd: what causes sparse double descent? the "
                           "perturbation, width, depth and label noise of the IMP curve; both with seeds")
    study.add_argument("kind", choices=("kd", "sdd"))
    study.add_argument("--alphas", type=list_of("float"), metavar="A1,A2", help="kd: KD weights (default 0.8,1.0)")
    study.add_argument("--temperatures", type=list_of("float"), metavar="T1,T2",
                       help="kd: KD temperatures (default 2,10)")
    study.add_argument("--widths", type=list_of("int"), metavar="W1,W2", help="kd: student widths, sdd: the "
                       "network's widths: MLP hidden units per layer, or VGG-like gamma (kd default 64,128; sdd "
                       "default a quarter, once and twice the base MLP's, or gamma - 1, gamma, gamma + 1)")
    study.add_argument("--teachers", type=list_of("str"), metavar="T1,T2", help="kd: none (vanilla), dense, best "
                       "(default all three)")
    study.add_argument("--perturbations", type=list_of("str"), metavar="P1,P2", help="sdd: after each prune none, "
                       "rewind, reinit or lr-rewind (default all four)")
    study.add_argument("--noises", type=list_of("float"), metavar="E1,E2", help="sdd: label noise (default "
                       "0,0.1,0.2,0.5)")
    study.add_argument("--depths", type=list_of("int"), metavar="D1,D2", help="sdd: MLP hidden layers or VGG-like "
                       "blocks (default one fewer, the base's and one more)")
    study.add_argument("--full-grid", action="store_true", help="sdd: every combination of the axes (default: "
                       "each factor varied alone around the base configuration)")
    study.add_argument("--launcher", default="local", choices=LAUNCHERS, help="sdd: how the runs are launched, as "
                       "for sweep")
    _add_train_flags(study)
    study.set_defaults(func=cmd_study)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsd2-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="run the iterative pruning loop")
    _add_train_flags(train)
    train.set_defaults(func=cmd_train)
    distill = sub.add_parser("distill", help="prune a student distilled from an existing run's checkpoint")
    distill.add_argument("--teacher", required=True, metavar="RUN_DIR[:LEVEL]",
                         help="teacher run (an experiment root: its teacher/) and level: best (default), dense or "
                         "a number")
    _add_train_flags(distill)
    distill.set_defaults(func=cmd_distill)
    sweep = sub.add_parser("sweep", help="a grid of runs named by their config hash (finished runs skipped)")
    sweep.add_argument("config_file", nargs="?", metavar="CONFIG", help="base YAML config")
    sweep.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                       help="one axis: a flag's name (noise, seed, depth, lr, ...), delta/gamma for the "
                       "VGG-like depth/width, or a dotted config path")
    sweep.add_argument("--launcher", default="local", choices=LAUNCHERS)
    sweep.add_argument("--slurm-partition")
    sweep.add_argument("--slurm-gpus", type=int, help="GPUs per job")
    sweep.add_argument("--slurm-cpus", type=int, help="CPUs per job")
    sweep.add_argument("--slurm-timeout-min", type=int)
    _add_train_flags(sweep)
    sweep.set_defaults(func=cmd_sweep)
    _add_study_parser(sub)
    report = sub.add_parser("report", help="figures and tables from run directories (seeds aggregate)")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="runs, experiment roots, or folders of them")
    report.add_argument("--out", help="output folder (default: RUN_DIR/report of the first run)")
    report.add_argument("--title")
    report.set_defaults(func=cmd_report)
    ent = sub.add_parser("entropy", help="ReLU-state entropy of every saved level of an existing run")
    ent.add_argument("run", metavar="RUN_DIR", help="a run, or an experiment root or folder of runs: every run "
                     "in it (name one by its folder, e.g. ROOT/teacher or ROOT/students/kd-sparse)")
    ent.add_argument("--data-root", help="where the run's dataset lives, if not where it was")
    ent.add_argument("--granularity", choices=GRANULARITIES)
    ent.add_argument("--inclusive", action="store_true", default=None, help="on-state is x >= 0")
    ent.set_defaults(func=cmd_entropy)
    export = sub.add_parser("export", help="a pruned level as a compressed model file (kept weights and their "
                            "positions; load it with dsd2.load_compressed)")
    export.add_argument("target", metavar="RUN_DIR[:LEVEL]", help="a run (e.g. ROOT/teacher) and the level to "
                        "export (default: its last saved level)")
    export.add_argument("--out", required=True, metavar="FILE.safetensors", help="the file to write")
    export.add_argument("--data-root", help="where the run's dataset lives, if not where it was (the input "
                        "statistics are the training split's)")
    export.set_defaults(func=cmd_export)
    info = sub.add_parser("info", help="versions, device and op backends")
    info.set_defaults(func=cmd_info)
    selftest = sub.add_parser("selftest", help="check every op, CUDA graphs and a short run on this machine")
    selftest.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default)")
    selftest.add_argument("--quick", action="store_true", help="fewer shapes and shorter timings")
    selftest.add_argument("--json", type=Path, help="also write the results (and this machine's details) here")
    selftest.add_argument("--strict", action="store_true",
                          help="also exit 1 when a timing check is slow (its threshold is in its detail)")
    selftest.set_defaults(func=cmd_selftest)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dsd2.data import DataError
    from dsd2.export import ExportError
    from dsd2.runs import RunError

    args = build_parser().parse_args(argv)
    try:
        from dsd2.ops import cpu_isa

        cpu_isa()  # loads the C++ kernels at the DSD2_CPU_ISA level: refused in one line if this CPU lacks it
    except ValueError as exc:
        print(f"dsd2-engine: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    distributed = args.command in ("train", "distill") and int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        if distributed:
            from dsd2.training.distributed import init_from_env

            init_from_env()
        return args.func(args)
    except (ConfigError, DataError, RunError, ExportError) as exc:
        print(f"dsd2-engine: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("dsd2-engine: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        if distributed:
            from dsd2.training.distributed import shutdown

            shutdown()


if __name__ == "__main__":
    sys.exit(main())
