"""Sampling: which parameters, which weights, reproducibility."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from torch import nn

from corrtools.errors import CorrtoolsError
from corrtools.record.sampling import plan_samples, run_stride, sample_indices, select_params


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
    a = sample_indices(1000, 100, seed=1, name="x", layout="uniform")
    assert len(a) == 100 and len(np.unique(a)) == 100 and np.all(np.diff(a) > 0)
    assert a.min() >= 0 and a.max() < 1000
    np.testing.assert_array_equal(a, sample_indices(1000, 100, seed=1, name="x", layout="uniform"))
    assert not np.array_equal(a, sample_indices(1000, 100, seed=2, name="x", layout="uniform"))
    assert not np.array_equal(a, sample_indices(1000, 100, seed=1, name="y", layout="uniform"))
    # the uniform layout draws exactly as before layouts existed (stores made then resume)
    rng = np.random.default_rng([1, zlib.crc32(b"x")])
    np.testing.assert_array_equal(a, np.sort(rng.choice(1000, size=100, replace=False)))
    assert len(sample_indices(1000, 0.25, 0, "x", layout="uniform")) == 250
    np.testing.assert_array_equal(sample_indices(7, 100, 0, "x", layout="uniform"), np.arange(7))
    np.testing.assert_array_equal(sample_indices(7, 1.0, 0, "x", layout="uniform"), np.arange(7))
    assert len(sample_indices(7, 0.01, 0, "x", layout="uniform")) == 1


def test_sample_is_uniform():
    """Each of 20 positions is picked with probability 5/20 over many seeds (chi-square-ish bound)."""
    counts = np.zeros(20)
    for seed in range(2000):
        counts[sample_indices(20, 5, seed, "w", layout="uniform")] += 1
    expected = 2000 * 5 / 20
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


def test_runs_are_aligned_whole_and_reproducible():
    a = sample_indices(1000, 100, seed=1, name="x", layout="runs")
    assert len(a) == 112  # 100 rounded up to 7 runs of 16
    starts = a[::16]
    assert not (starts % 16).any() and len(np.unique(starts)) == 7
    np.testing.assert_array_equal(a, (starts[:, None] + np.arange(16)).reshape(-1))
    assert not np.array_equal(a, sample_indices(1000, 100, seed=2, name="x", layout="runs"))
    assert len(sample_indices(1024, 0.24, 0, "x", layout="runs")) == 256  # 246 -> 16 runs
    assert len(sample_indices(1000, 0.25, 0, "x", layout="runs")) in (248, 256)  # the short last run or not
    for layout in ("runs", "strided"):
        np.testing.assert_array_equal(sample_indices(40, 33, 0, "x", layout=layout), np.arange(40))  # 3 runs = all
        assert len(sample_indices(7, 0.01, 0, "x", layout=layout)) == 7  # one (short) run is the whole parameter


def test_runs_give_every_weight_the_same_chance_also_in_the_short_last_run():
    """numel 56 = 3 runs of 16 and one of 8; 2 of the 4 runs drawn: every weight has probability 1/2."""
    counts = np.zeros(56)
    for seed in range(2000):
        counts[sample_indices(56, 32, seed, "w", layout="runs")] += 1
    expected = 2000 / 2
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected * 0.5))
    np.testing.assert_array_equal(counts.reshape(-1, 8)[:, 0], counts[::8])  # runs move together


def _strided_runs(numel: int, sample: int, seed: int, row: int | None) -> np.ndarray:
    index = sample_indices(numel, sample, seed, "w", row=row)  # the default layout: strided
    firsts = index[::16]
    np.testing.assert_array_equal(index, (firsts[:, None] + np.arange(16)).reshape(-1)[: len(index)])
    assert not (firsts % 16).any()
    return firsts // 16


@pytest.mark.parametrize(("numel", "row", "sample", "stride"), [
    (56, None, 16, 4),           # 4 runs (the last one 8 long), 1 wanted: every 4th run
    (200 * 48, 48, 300, 31),     # 600 runs, 19 wanted: plain 31, coprime to the period 3
    (1024 * 512, 512, 33334, 15),  # the MLP's first matrix at 10^5: plain 15, odd (period 32)
    (1024 * 1024, 1024, 33334, 31),  # plain 31
    (128 * 128, 128, 3334, 4),   # plain 4; the coprime 3 would record 33% more: plain kept
])
def test_strided_is_every_sth_run_from_a_uniform_start_so_every_weight_has_chance_1_over_s(numel, row, sample, stride):
    """Brute force over the start: run r is recorded iff r = start (mod s), so with the start uniform in
    [0, s) every run -- the short last one too -- has probability exactly 1/s; the starts drawn over
    seeds are checked to be uniform, and each sample to be that progression."""
    n_runs = -(-numel // 16)
    assert run_stride(n_runs, -(-sample // 16), row) == stride
    starts = np.zeros(stride)
    for seed in range(400):
        runs = _strided_runs(numel, sample, seed, row)
        assert runs[0] < stride
        np.testing.assert_array_equal(runs, np.arange(runs[0], n_runs, stride))
        assert len(runs) * 16 >= sample or runs[-1] == n_runs - 1
        starts[runs[0]] += 1
    inclusion = np.zeros(n_runs)
    for start in range(stride):  # every start, each with probability 1/s
        inclusion[np.arange(start, n_runs, stride)] += 1 / stride
    np.testing.assert_allclose(inclusion, 1 / stride)
    expected = 400 / stride
    assert np.all(np.abs(starts - expected) < 5 * np.sqrt(expected))


@pytest.mark.parametrize(("rows", "cols"), [(1024, 512), (384, 128), (128, 768), (96, 48)])
def test_strided_runs_cover_every_column_position_of_a_row(rows, cols):
    """The stride is coprime to the period of the runs' column positions: every position is sampled,
    not one residue class (a stride of 32 runs on rows of 512 would sample one column run only)."""
    for seed in range(5):
        runs = _strided_runs(rows * cols, rows * cols // 40, seed, cols)
        positions = np.unique(runs * 16 % cols)
        assert len(positions) == cols // np.gcd(cols, 16)


def test_bad_layout_is_an_error():
    with pytest.raises(CorrtoolsError, match="layout='lines' is unknown; use 'strided'"):
        plan_samples(_Net(), layout="lines")


@pytest.mark.parametrize("bad", [0, -3, 0.0, 1.5, True, "10", None])
def test_bad_sample_is_an_error(bad):
    with pytest.raises(CorrtoolsError, match="sample"):
        plan_samples(_Net(), sample=bad)


def test_plan_notes_whole_parameters_and_skips():
    plan = plan_samples(_Net(), sample=60, seed=0, layout="uniform")
    by_name = {s.name: s for s in plan.samples}
    assert by_name["conv.weight"].whole and len(by_name["conv.weight"].index) == 54
    assert not by_name["fc.weight"].whole and len(by_name["fc.weight"].index) == 60
    assert any("conv.weight" in n and "recorded all 54" in n for n in plan.notes)
    assert any("'count'" in n and "skipped" in n for n in plan.notes)
    names, index = plan.columns()
    assert plan.n_weights == len(names) == len(index) == 54 + 60 + 60
    assert names[:54] == ["conv.weight"] * 54  # grouped by parameter
    # adding a parameter does not change another's sample
    other = plan_samples(_Net(), sample=60, seed=0, params=["fc.weight"], layout="uniform")
    np.testing.assert_array_equal(other.samples[0].index, by_name["fc.weight"].index)
