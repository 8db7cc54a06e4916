"""MaskedAdam takes the masks in MaskedSGD's forms: a dict by parameter or position, or a list parallel to the
parameters."""

import pytest
import torch

from dsd2.training import MaskedAdam


def steps(masks_of, n=5):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    masks = {model[0].weight: torch.rand(8, 6) < 0.5, model[2].weight: torch.rand(3, 8) < 0.5}
    with torch.no_grad():
        for p, m in masks.items():
            p.mul_(m)
    opt = MaskedAdam(model.parameters(), masks_of(model, masks), lr=1e-2)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(n):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], masks


def test_list_and_position_forms_take_the_same_steps_as_the_dict():
    by_dict, masks = steps(lambda model, masks: masks)
    by_list, _ = steps(lambda model, masks: [masks.get(p) for p in model.parameters()])
    by_pos, _ = steps(lambda model, masks: {0: masks[model[0].weight], 2: masks[model[2].weight]})
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(by_dict, by_list, by_pos))
    assert bool((by_dict[0][~next(iter(masks.values()))] == 0).all())


def test_a_wrong_length_list_is_refused():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="got 2 masks for 1 parameters"):
        MaskedAdam([p], [torch.ones(3, dtype=torch.bool), None])
