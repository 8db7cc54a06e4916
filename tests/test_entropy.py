import math

import pytest
import torch

from dsd2.analysis.entropy import layer_entropy_bits, neuron_entropy_bits, summarize
from dsd2.ops import CountingReLU


def h(p):
    return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def test_neuron_entropy_hand_computed():
    got = neuron_entropy_bits(torch.tensor([0, 5, 10, 2]), 10)
    assert got.tolist() == pytest.approx([0.0, 1.0, 0.0, h(0.2)])
    assert layer_entropy_bits(torch.tensor([0, 5, 10, 2]), 10) == pytest.approx((1 + h(0.2)) / 4)


def test_summary_means():
    s = summarize({"a": (torch.tensor([5, 5]), 10), "b": (torch.tensor([0, 0, 0, 0, 0, 0]), 10)})
    assert s.per_layer == {"a": 1.0, "b": 0.0}
    assert s.mean_over_layers == 0.5 and s.neuron_weighted == pytest.approx(2 / 8) and s.neurons == 8


def test_element_vs_channel_granularity_on_a_constructed_case():
    # channel 0: position (0,0) always on, (0,1) never on -> per element H = 0, per channel p = 1/2 -> H = 1
    x = torch.zeros(4, 1, 1, 2)
    x[:, 0, 0, 0] = 1.0
    x[:, 0, 0, 1] = -1.0
    el, ch = CountingReLU(granularity="element"), CountingReLU(granularity="channel")
    for r in (el, ch):
        r.counting = True
        r(x)
    assert layer_entropy_bits(el.counts, el.observations) == 0.0
    assert layer_entropy_bits(ch.counts, ch.observations) == 1.0
