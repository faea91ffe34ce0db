"""Bins of final |w| and medians with bootstrap intervals, against direct numpy computations."""
from __future__ import annotations

import doctest

import numpy as np
import pytest

import corrtools.analysis.magnitude as mag
from corrtools.analysis.magnitude import _bootstrap_median, assign_bins, bin_edges, binned_median
from corrtools.errors import CorrtoolsError


def test_quantile_bins_have_equal_counts() -> None:
    m = np.abs(np.random.default_rng(0).standard_normal(1000))
    edges = bin_edges(m, 10, "quantile")
    idx = assign_bins(m, edges)
    assert edges[0] == m.min() and edges[-1] == m.max()
    np.testing.assert_array_equal(np.bincount(idx, minlength=10), np.full(10, 100))


def test_log_and_linear_bins() -> None:
    m = np.array([0.0, 1e-3, 1e-2, 1e-1, 1.0])
    e = bin_edges(m, 3, "log")
    np.testing.assert_allclose(e[1:-1], [1e-2, 1e-1])
    assert e[0] == 0.0  # exact zeros fall in the first bin
    np.testing.assert_array_equal(assign_bins(m, e), [0, 0, 1, 2, 2])
    e = bin_edges(m, 4, "linear")
    np.testing.assert_allclose(e, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(assign_bins([1.0, 0.5, np.nan, 2.0], e), [3, 2, -1, -1])


def test_bin_errors() -> None:
    with pytest.raises(CorrtoolsError, match="binning"):
        bin_edges([1.0], 3, "cubic")  # type: ignore[arg-type]
    with pytest.raises(CorrtoolsError, match="bins"):
        bin_edges([1.0], 0)
    with pytest.raises(CorrtoolsError, match="NaN"):
        bin_edges([np.nan, np.nan], 2)
    with pytest.raises(CorrtoolsError, match="ci"):
        binned_median([1.0], [False], [0], 1, ci=1.0)


def test_medians_match_numpy_and_intervals_cover_them() -> None:
    rng = np.random.default_rng(1)
    d = rng.exponential(10.0, 600)
    cens = rng.random(600) < 0.2
    d[cens] = 50.0  # censored values carry max_lag
    b = rng.integers(0, 3, 600)
    d[:5] = np.nan  # undefined: left out
    s = binned_median(d, cens, b, 4, ci=0.9, n_boot=400, seed=3)
    for k in range(3):
        vals = d[(b == k) & np.isfinite(d)]
        assert s.median[k] == np.median(vals)
        assert s.count[k] == (b == k).sum()
        assert s.undefined[k] == ((b == k) & np.isnan(d)).sum()
        assert s.censored_fraction[k] == pytest.approx(cens[(b == k) & np.isfinite(d)].mean())
        assert s.ci_low[k] <= s.median[k] <= s.ci_high[k]
    assert np.isnan(s.median[3]) and s.count[3] == 0  # an empty bin
    again = binned_median(d, cens, b, 4, ci=0.9, n_boot=400, seed=3)
    np.testing.assert_array_equal(again.ci_low, s.ci_low)  # seeded


def test_bootstrap_trick_equals_median_of_resamples() -> None:
    """Median of a resample = value at the median resampled index of the sorted sample."""
    for n in (1, 2, 7, 10):
        vals = np.random.default_rng(n).standard_normal(n)
        ours = _bootstrap_median(vals, 50, np.random.default_rng(9))
        idx = np.random.default_rng(9).integers(0, n, size=(50, n), dtype=np.int32)
        ref = np.median(np.sort(vals)[idx], axis=1)
        np.testing.assert_allclose(ours, ref)


def test_censored_majority_flags_a_lower_bound() -> None:
    s = binned_median([5.0, 100.0, 100.0], [False, True, True], [0, 0, 0], 1)
    assert s.median[0] == 100.0 and s.median_censored[0]


def test_docstring_examples_run() -> None:
    result = doctest.testmod(mag)
    assert result.attempted > 0 and result.failed == 0
