"""End-to-end runs of the level loop on the embedded default, shrunk to seconds."""

import json
import signal
import subprocess
import time

import pytest
import torch
from conftest import ENGINE, engine_env

from dsd2.pruning import prunable_weights
from dsd2.run import LevelLoop
from dsd2.runs import RunDir, read_jsonl

VOLATILE = {"wall_time_s", "train_time_s", "images_per_s", "achieved_flop_per_s"}


def stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


@pytest.mark.slow
def test_loop_writes_levels_and_keeps_pruned_weights_zero(tmp_path, tiny_config):
    cfg = tiny_config()
    engine = LevelLoop(cfg, RunDir(tmp_path / "run"), progress=False, log=lambda s: None)
    summary = engine.run()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["level"] for r in rows] == [0, 1, 2, 3]
    for r, expect in zip(rows, [0.0, 0.2, 0.36, 0.488]):
        assert abs(r["sparsity"] - expect) < 1e-3
    assert summary["best_level"] == max(rows, key=lambda r: (r["val_acc"], r["sparsity"]))["level"]
    # the counted zeros equal the masks: every pruned weight is exactly 0.0 after training
    for name, w in prunable_weights(engine.model).items():
        assert bool((w[~engine.masks[name]] == 0).all())
    epochs = read_jsonl(tmp_path / "run" / "epochs.jsonl")
    assert len(epochs) == 3 + 2 * 3
    run = tmp_path / "run"
    assert (run / "summary.json").exists() and (run / "checkpoints" / "level_03.safetensors").exists()


@pytest.mark.slow
def test_same_seed_same_metrics(tmp_path, tiny_config):
    a = LevelLoop(tiny_config(), RunDir(tmp_path / "a"), progress=False, log=lambda s: None).run()
    b = LevelLoop(tiny_config(), RunDir(tmp_path / "b"), progress=False, log=lambda s: None).run()
    assert stable(read_jsonl(tmp_path / "a" / "metrics.jsonl")) == stable(read_jsonl(tmp_path / "b" / "metrics.jsonl"))
    assert a["best_test_acc"] == b["best_test_acc"]


@pytest.mark.slow
def test_epoch_eval_level_skips_the_per_epoch_pass_and_changes_no_result(tmp_path, tiny_config):
    every = LevelLoop(tiny_config(), RunDir(tmp_path / "every"), progress=False, log=lambda s: None)
    every.run()
    level = LevelLoop(tiny_config(epoch_eval="level"), RunDir(tmp_path / "level"), progress=False, log=lambda s: None)
    level.run()
    assert level.run_hash == every.run_hash
    assert stable(read_jsonl(tmp_path / "level" / "metrics.jsonl")) == stable(read_jsonl(tmp_path / "every" /
                                                                                        "metrics.jsonl"))
    measured = ("val_acc", "val_loss", "test_acc", "test_loss")
    rows_every, rows_level = read_jsonl(tmp_path / "every" / "epochs.jsonl"), read_jsonl(tmp_path / "level" /
                                                                                         "epochs.jsonl")
    assert all(k in r for r in rows_every for k in measured) and not any(k in r for r in rows_level for k in measured)
    assert [{k: v for k, v in r.items() if k not in measured} for r in stable(rows_every)] == stable(rows_level)


@pytest.mark.slow
def test_resume_in_process_after_partial_level(tmp_path, tiny_config):
    full = tmp_path / "full"
    LevelLoop(tiny_config(), RunDir(full), progress=False, log=lambda s: None).run()
    part = tmp_path / "part"
    engine = LevelLoop(tiny_config(checkpoint_every=0), RunDir(part), progress=False, log=lambda s: None)
    calls = {"n": 0}
    original = engine.save_state

    def crash_after(path, *args, **kwargs):
        original(path, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 8:  # inside level 1
            raise KeyboardInterrupt

    engine.save_state = crash_after
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    LevelLoop(tiny_config(), RunDir(part), progress=False, log=lambda s: None).run()
    assert stable(read_jsonl(part / "metrics.jsonl")) == stable(read_jsonl(full / "metrics.jsonl"))
    assert stable(read_jsonl(part / "epochs.jsonl")) == stable(read_jsonl(full / "epochs.jsonl"))


@pytest.mark.slow
def test_a_run_killed_between_checkpoints_recomputes_the_lost_epochs(tmp_path, tiny_config):
    """With checkpoints minutes apart, a crash mid-level loses that level's epochs: the run resumes from the last
    level's end, recomputes them, and ends as the uninterrupted run."""
    full, part = tmp_path / "full", tmp_path / "part"
    LevelLoop(tiny_config(), RunDir(full), progress=False, log=lambda s: None).run()
    engine = LevelLoop(tiny_config(checkpoint_every=3600), RunDir(part), progress=False, log=lambda s: None)
    saves: list[tuple] = []
    original_save, original_epoch = engine.save_state, None

    def save(path, optimizer, level, epoch, done):
        saves.append((path.name, level, epoch, done))
        original_save(path, optimizer, level, epoch, done)

    def crash_in_level_1(optimizer, level, epoch, *args, **kwargs):
        if (level, epoch) == (1, 1):
            raise KeyboardInterrupt
        return original_epoch(optimizer, level, epoch, *args, **kwargs)

    engine.save_state = save
    engine.prepare()
    original_epoch = engine.executor.train_epoch
    engine.executor.train_epoch = crash_in_level_1
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    last = [s for s in saves if s[0] == "last.safetensors"]
    assert last == [("last.safetensors", 0, 3, False), ("last.safetensors", 0, 3, True)]  # the level's end only
    assert [r["level"] for r in read_jsonl(part / "epochs.jsonl")] == [0, 0, 0]
    logs: list[str] = []
    LevelLoop(tiny_config(), RunDir(part), progress=False, log=logs.append).run()
    assert any("resuming" in line and "level 0, epoch 3 (level complete)" in line for line in logs)
    assert stable(read_jsonl(part / "metrics.jsonl")) == stable(read_jsonl(full / "metrics.jsonl"))
    assert stable(read_jsonl(part / "epochs.jsonl")) == stable(read_jsonl(full / "epochs.jsonl"))


# every epoch checkpointed, so the kill lands mid-level after a saved epoch (the default saves every 10 s)
FLAGS = ["--epochs", "12", "--dense-epochs", "12", "--levels", "3", "--quiet", "--seed", "4", "--students", "none",
         "--checkpoint-every", "0"]


@pytest.mark.slow
def test_sigkill_mid_level_then_resume_equals_uninterrupted(tmp_path):
    env = engine_env()
    ref = tmp_path / "ref"
    subprocess.run([*ENGINE, "train", *FLAGS, "--out", str(ref)], check=True, env=env, cwd=tmp_path,
                   capture_output=True, timeout=300)
    run = tmp_path / "killed"
    proc = subprocess.Popen([*ENGINE, "train", *FLAGS, "--out", str(run)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        rows = read_jsonl(run / "epochs.jsonl") if (run / "epochs.jsonl").exists() else []
        if any(r["level"] == 2 and r["epoch"] >= 3 for r in rows):
            proc.send_signal(signal.SIGKILL)
            killed_at = rows[-1]
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert killed_at is not None, "the run finished before it could be killed"
    assert not (run / "summary.json").exists()
    out = subprocess.run([*ENGINE, "train", *FLAGS, "--out", str(run)], check=True, env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert "resuming" in out.stdout
    assert stable(read_jsonl(run / "metrics.jsonl")) == stable(read_jsonl(ref / "metrics.jsonl"))
    assert stable(read_jsonl(run / "epochs.jsonl")) == stable(read_jsonl(ref / "epochs.jsonl"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_test_acc"] == json.loads((ref / "summary.json").read_text())["best_test_acc"]


@pytest.mark.slow
def test_cifar_run_from_fake_folder(tmp_path, fake_cifar, tiny_config):
    cfg = tiny_config(data__dataset="cifar10", data__data_root=str(fake_cifar), data__noise=0.2,
                      data__augment=True, model__name="vgg", model__depth=2, model__width=2,
                      optim__optimizer="sgd", optim__lr=0.01, optim__lr_schedule="multistep",
                      optim__batch_size=16, prune__levels=1, precision="bf16")
    LevelLoop(cfg, RunDir(tmp_path / "run"), progress=False, log=lambda s: None).run()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2 and abs(rows[1]["sparsity"] - 0.2) < 1e-3
    assert torch.isfinite(torch.tensor(rows[1]["train_loss"]))
