"""Sampling: which parameters, which weights, reproducibility."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from corrtools.errors import CorrtoolsError
from corrtools.record.sampling import plan_samples, sample_indices, select_params


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(10, 20)
        self.head = nn.Linear(20, 5)
        self.count = nn.Parameter(torch.zeros(4, 4, dtype=torch.int64), requires_grad=False)


def test_default_selects_floating_matrices_and_conv_kernels():
    kept, skipped = select_params(_Net())
    assert [n for n, _ in kept] == ["conv.weight", "fc.weight", "head.weight"]
    assert skipped == ["count"]


def test_names_predicate_and_unknown_name():
    net = _Net()
    kept, _ = select_params(net, ["head.bias", "fc.weight"])
    assert [n for n, _ in kept] == ["fc.weight", "head.bias"]  # model order
    kept, _ = select_params(net, lambda n, p: n.startswith("head"))
    assert [n for n, _ in kept] == ["head.weight", "head.bias"]
    with pytest.raises(CorrtoolsError, match=r"no parameter 'fc.wieght'.*did you mean 'fc.weight'"):
        select_params(net, ["fc.wieght"])
    with pytest.raises(CorrtoolsError, match="list of names"):
        select_params(net, "fc.weight")
    with pytest.raises(CorrtoolsError, match="no floating-point parameter"):
        select_params(net, ["count"])


def test_sample_indices_uniform_sorted_reproducible():
    a = sample_indices(1000, 100, seed=1, name="x")
    assert len(a) == 100 and len(np.unique(a)) == 100 and np.all(np.diff(a) > 0)
    assert a.min() >= 0 and a.max() < 1000
    np.testing.assert_array_equal(a, sample_indices(1000, 100, seed=1, name="x"))
    assert not np.array_equal(a, sample_indices(1000, 100, seed=2, name="x"))
    assert not np.array_equal(a, sample_indices(1000, 100, seed=1, name="y"))
    assert len(sample_indices(1000, 0.25, 0, "x")) == 250
    np.testing.assert_array_equal(sample_indices(7, 100, 0, "x"), np.arange(7))
    np.testing.assert_array_equal(sample_indices(7, 1.0, 0, "x"), np.arange(7))
    assert len(sample_indices(7, 0.01, 0, "x")) == 1


def test_sample_is_uniform():
    """Each of 20 positions is picked with probability 5/20 over many seeds (chi-square-ish bound)."""
    counts = np.zeros(20)
    for seed in range(2000):
        counts[sample_indices(20, 5, seed, "w")] += 1
    expected = 2000 * 5 / 20
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


@pytest.mark.parametrize("bad", [0, -3, 0.0, 1.5, True, "10", None])
def test_bad_sample_is_an_error(bad):
    with pytest.raises(CorrtoolsError, match="sample"):
        plan_samples(_Net(), sample=bad)


def test_plan_notes_whole_parameters_and_skips():
    plan = plan_samples(_Net(), sample=60, seed=0)
    by_name = {s.name: s for s in plan.samples}
    assert by_name["conv.weight"].whole and len(by_name["conv.weight"].index) == 54
    assert not by_name["fc.weight"].whole and len(by_name["fc.weight"].index) == 60
    assert any("conv.weight" in n and "recorded all 54" in n for n in plan.notes)
    assert any("'count'" in n and "skipped" in n for n in plan.notes)
    names, index = plan.columns()
    assert plan.n_weights == len(names) == len(index) == 54 + 60 + 60
    assert names[:54] == ["conv.weight"] * 54  # grouped by parameter
    # adding a parameter does not change another's sample
    other = plan_samples(_Net(), sample=60, seed=0, params=["fc.weight"])
    np.testing.assert_array_equal(other.samples[0].index, by_name["fc.weight"].index)
