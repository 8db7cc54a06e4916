"""Each loop variant has the effect it names, seen from the run directory (black-box, through the CLI).

Checkpoint keys used: `model.<param>` (weights at the end of the level), `mask.<weight>` (True = kept) and
`start.<weight>` (the weights at the start of the level, after prune + perturb); `checkpoints/init.safetensors`
holds the weights before any training.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dsd2.cli import main
from dsd2.pruning import CRITERIA, full_masks, global_prune
from dsd2.runs import read_jsonl

# a small MLP 64-32-32-10 (3,392 prunable weights), 4 dense epochs, 2 epochs per level, 2 levels
BASE = ["--dense-epochs", "4", "--epochs", "2", "--levels", "2", "--hidden", "32,32", "--entropy", "off",
        "--students", "none", "--quiet"]
VARIANTS = {
    "none": [],  # keep the trained weights, restart the cosine schedule, magnitude criterion
    "rewind": ["--perturb", "rewind"],
    "rewind_k": ["--perturb", "rewind", "--rewind-iteration", "2", "--lr-schedule", "constant"],
    # the weights after 2 epochs of the run above, under the same constant schedule
    "dense_2": ["--dense-epochs", "2", "--levels", "0", "--lr-schedule", "constant"],
    "reinit": ["--perturb", "reinit"],
    "finetune": ["--retrain", "finetune"],
    "lr_rewind": ["--retrain", "lr-rewind", "--lr-schedule", "multistep"],
    "random": ["--criterion", "random"],
    "gradient": ["--criterion", "gradient"],
}
LEVELS = (1, 2)


@pytest.fixture
def one_thread():
    # tiny matrices: OpenMP threads only contend with each other (and with other jobs on a shared machine)
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each variant run once, on first use, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("variants")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            out = root / name
            assert main(["train", *BASE, *VARIANTS[name], "--out", str(out)]) == 0
            done[name] = out
        return done[name]

    return get


def ckpt(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"{name}.safetensors"))


def level(run: Path, i: int) -> dict[str, torch.Tensor]:
    return ckpt(run, f"level_{i:02d}")


def split(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def masks_of(state):
    return {k: v.bool() for k, v in split(state, "mask.").items()}


def check_start(run: Path, lvl: int, expected_kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The start weights of `lvl` are `expected_kept` on kept entries and exactly 0 on pruned ones."""
    state = level(run, lvl)
    start, masks = split(state, "start."), masks_of(state)
    assert set(start) == set(masks) and len(masks) == 3
    assert sum(int((~m).sum()) for m in masks.values()) > 0
    for name, mask in masks.items():
        assert bool((start[name][~mask] == 0).all()), name
        assert torch.equal(start[name][mask], expected_kept[name][mask]), name
    return start


# ---- 1-3: perturbation after the prune -------------------------------------------------------------------

@pytest.mark.slow
def test_perturb_none_keeps_the_trained_weights(runs, one_thread):
    run = runs("none")
    init = split(ckpt(run, "init"), "model.")
    for lvl in LEVELS:
        trained = split(level(run, lvl - 1), "model.")
        start = check_start(run, lvl, trained)
        # the check discriminates: the trained weights are not the initial ones
        name = next(iter(start))
        assert not torch.equal(trained[name], init[name])


@pytest.mark.slow
def test_perturb_rewind_restores_the_initial_weights(runs, one_thread):
    run = runs("rewind")
    init = split(ckpt(run, "init"), "model.")
    for lvl in LEVELS:
        start = check_start(run, lvl, init)
        trained = split(level(run, lvl - 1), "model.")
        mask = masks_of(level(run, lvl))
        for name in start:  # ... which are not the trained ones
            assert (trained[name] != init[name])[mask[name]].float().mean() > 0.9  # inputs always 0 leave some


@pytest.mark.slow
def test_perturb_rewind_to_iteration_k_restores_the_weights_after_k_dense_epochs(runs, one_thread):
    run = runs("rewind_k")
    after_k = split(level(runs("dense_2"), 0), "model.")  # same seed and constant lr: epochs 0-1 are identical
    init = split(ckpt(run, "init"), "model.")
    after_dense = split(level(run, 0), "model.")
    for name in masks_of(level(run, 1)):  # the three points of the dense run are distinct
        assert not torch.equal(after_k[name], init[name]) and not torch.equal(after_k[name], after_dense[name])
    for lvl in LEVELS:
        check_start(run, lvl, after_k)


@pytest.mark.slow
def test_perturb_reinit_draws_new_weights(runs, one_thread):
    run = runs("reinit")
    init = split(ckpt(run, "init"), "model.")
    for lvl in LEVELS:
        state = level(run, lvl)
        start, masks = split(state, "start."), masks_of(state)
        trained = split(level(run, lvl - 1), "model.")
        for name, mask in masks.items():
            kept = start[name][mask]
            assert bool((start[name][~mask] == 0).all())
            assert (kept != trained[name][mask]).float().mean() > 0.99
            assert (kept != init[name][mask]).float().mean() > 0.99
            # a fresh draw of the layer's initialisation, not noise of another scale
            assert 0.8 < float(kept.std() / init[name].std()) < 1.25, name


# ---- 4: learning rates of the retraining rules -----------------------------------------------------------

C1 = 0.5 * (1 + math.cos(math.pi / 4))  # cosine over 4 epochs at epoch 1: 0.853553...
C3 = 0.5 * (1 - math.cos(math.pi / 4))  # ... at epoch 3: 0.146446...
COSINE_DENSE = [1e-3, 1e-3 * C1, 5e-4, 1e-3 * C3]
MULTISTEP_DENSE = [1e-3, 1e-3, 1e-4, 1e-5]  # x0.1 at round(0.5*4) = 2 and round(0.75*4) = 3


def lrs_by_level(run: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for row in read_jsonl(run / "epochs.jsonl"):
        out.setdefault(row["level"], []).append(row["lr"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name, dense, per_level", [
    ("none", COSINE_DENSE, [1e-3, 5e-4]),  # restart: cosine over the level's 2 epochs
    ("finetune", COSINE_DENSE, [1e-5, 1e-5]),  # fixed lr x finetune_lr_scale (0.01)
    ("lr_rewind", MULTISTEP_DENSE, [1e-4, 1e-5]),  # replay dense epochs 2 and 3
    ("rewind_k", [1e-3] * 4, [1e-3, 1e-3]),  # constant
])
def test_retrain_rule_sets_the_learning_rates(runs, one_thread, name, dense, per_level):
    got = lrs_by_level(runs(name))
    assert sorted(got) == [0, 1, 2]
    assert got[0] == pytest.approx(dense, rel=1e-9, abs=0)
    for lvl in LEVELS:
        assert got[lvl] == pytest.approx(per_level, rel=1e-9, abs=0)


@pytest.mark.slow
def test_a_level_retrains_its_own_number_of_epochs(runs, one_thread):
    rows = read_jsonl(runs("none") / "epochs.jsonl")
    assert [(r["level"], r["epoch"]) for r in rows] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (2, 0), (2, 1)]


# ---- 5: pruning criteria ---------------------------------------------------------------------------------

def magnitude_mask(trained: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Global magnitude pruning of 20 % of the kept weights, by hand from the saved weights."""
    return global_prune({n: trained[n].abs().float() for n in masks}, masks, 0.2)


def level_masks(run: Path, lvl: int) -> dict[str, torch.Tensor]:
    return masks_of(level(run, lvl))


@pytest.mark.slow
def test_magnitude_criterion_removes_the_smallest_weights(runs, one_thread):
    run = runs("none")
    prev = {n: torch.ones_like(m) for n, m in level_masks(run, 1).items()}
    for lvl in LEVELS:
        trained = split(level(run, lvl - 1), "model.")
        expected = magnitude_mask(trained, prev)
        got = level_masks(run, lvl)
        assert all(torch.equal(got[n], expected[n]) for n in got)
        prev = got


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["random", "gradient"])
def test_other_criteria_choose_other_masks_than_magnitude(runs, one_thread, criterion):
    run = runs(criterion)
    got = level_masks(run, 1)
    trained = split(level(run, 0), "model.")
    by_magnitude = magnitude_mask(trained, {n: torch.ones_like(m) for n, m in got.items()})
    kept = sum(int(m.sum()) for m in got.values())
    assert kept == sum(int(m.sum()) for m in by_magnitude.values()) == 3392 - round(0.2 * 3392)
    differ = sum(int((got[n] != by_magnitude[n]).sum()) for n in got)
    assert differ > 0.01 * 3392
    # the level-0 weights are those of the magnitude run (same seed, same recipe): a fair comparison
    same = split(level(runs("none"), 0), "model.")
    assert all(torch.equal(trained[n], same[n]) for n in got)
    if criterion == "random":
        # random scores ignore the weights: about 20 % of every layer goes, and most pruned weights are ones the
        # magnitude criterion keeps
        for n, m in got.items():
            assert 0.12 < 1 - float(m.float().mean()) < 0.28, n
        pruned_by_random = sum(int((~got[n] & by_magnitude[n]).sum()) for n in got)
        assert pruned_by_random > 0.6 * (3392 - kept)


def two_layer_net() -> nn.Module:
    """y = v . (W x), no biases: hand-computable gradients dL/dW = v x^T, dL/dv = W x."""
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.2], [0.3, 0.05]]))
        net[1].weight.copy_(torch.tensor([[0.5, 4.0]]))
    return net


def test_gradient_scores_are_weight_times_gradient_and_rank_unlike_magnitude():
    net = two_layer_net()
    x = torch.tensor([[1.0, 3.0]])
    scores = CRITERIA["gradient"](net, loss_batches=[lambda: net(x).sum()], generator=torch.Generator())
    # W x = [1.6, 0.45]; dL/dv = W x; dL/dW = v x^T = [[0.5, 1.5], [4, 12]]
    assert scores["0.weight"] == pytest.approx(torch.tensor([[0.5, 0.3], [1.2, 0.6]]), abs=1e-6)
    assert scores["1.weight"] == pytest.approx(torch.tensor([[0.8, 1.8]]), abs=1e-6)
    # pruning half of the 6 weights globally: magnitude drops 0.05, 0.2, 0.3; the gradient criterion drops the
    # entries scored 0.3, 0.5, 0.6, i.e. it keeps W[1, 0] = 0.3 and removes W[0, 0] = 1.0, the largest weight of W
    by_gradient = global_prune(scores, full_masks(net), 0.5)
    by_magnitude = global_prune(CRITERIA["magnitude"](net), full_masks(net), 0.5)
    assert by_gradient["0.weight"].tolist() == [[False, False], [True, False]]
    assert by_magnitude["0.weight"].tolist() == [[True, False], [False, False]]
    assert by_gradient["1.weight"].tolist() == by_magnitude["1.weight"].tolist() == [[True, True]]
    assert all(p.grad is None for p in net.parameters())  # scoring leaves no gradients behind


def test_gradient_scores_accumulate_over_batches():
    net = two_layer_net()
    x1, x2 = torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, 0.0]])
    scores = CRITERIA["gradient"](net, loss_batches=[lambda: net(x1).sum(), lambda: net(x2).sum()])
    # second batch: dL/dv = [1.0, 0.3], dL/dW = [[0.5, 0], [4, 0]]; |w * (g1 + g2)|
    assert scores["0.weight"] == pytest.approx(torch.tensor([[1.0, 0.3], [2.4, 0.6]]), abs=1e-6)
    assert scores["1.weight"] == pytest.approx(torch.tensor([[1.3, 3.0]]), abs=1e-6)
