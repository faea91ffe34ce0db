"""The kernels against np.corrcoef and against series whose Δ is known in closed form."""
from __future__ import annotations

import doctest
import warnings

import numpy as np
import pytest
import scipy.fft
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import corrtools.analysis.correlation as corr
from corrtools.analysis.correlation import decorrelation_time, detrend, lagged_pearson
from corrtools.errors import CorrtoolsError


def _reference_rho(x: np.ndarray, lags) -> np.ndarray:
    """np.corrcoef per lag and column; NaN where a window is constant (np.ptp == 0)."""
    T, N = x.shape
    out = np.full((len(lags), N), np.nan)
    for k, tau in enumerate(lags):
        for j in range(N):
            a, b = x[: T - tau, j], x[tau:, j]
            if np.ptp(a) > 0 and np.ptp(b) > 0:
                out[k, j] = np.corrcoef(a, b)[0, 1]
    return out


@st.composite
def _series(draw) -> np.ndarray:
    """(T, N) float64: integer grid values (so constant windows occur) times a scale plus an offset."""
    T = draw(st.integers(3, 48))
    N = draw(st.integers(1, 3))
    levels = draw(st.integers(1, 1000))
    grid = draw(arrays(np.int64, (T, N), elements=st.integers(-levels, levels)))
    scale = draw(st.sampled_from([1e-3, 1.0, 7.5, 1e3]))
    offset = draw(st.sampled_from([0.0, 1.0, -3e2, 1e4, 1e6]))
    return offset + scale * grid.astype(np.float64) / levels


@settings(max_examples=150, deadline=None)
@given(_series())
def test_all_lags_equal_corrcoef(x: np.ndarray) -> None:
    T = x.shape[0]
    lags = np.arange(T - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning storm, not even one
        rho = lagged_pearson(x)
    ref = _reference_rho(x, lags)
    assert rho.shape == (T - 1, x.shape[1])
    np.testing.assert_array_equal(np.isnan(rho), np.isnan(ref))
    np.testing.assert_allclose(rho, ref, rtol=0, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(_series(), st.data())
def test_lag_subset_equals_corrcoef(x: np.ndarray, data) -> None:
    T = x.shape[0]
    lags = data.draw(st.lists(st.integers(0, T - 1), min_size=1, max_size=2 * T))
    rho = lagged_pearson(x, lags=lags)
    ref = _reference_rho(x, lags)
    np.testing.assert_array_equal(np.isnan(rho), np.isnan(ref))
    np.testing.assert_allclose(rho, ref, rtol=0, atol=1e-6)


def test_big_offset_long_series() -> None:
    rng = np.random.default_rng(1)
    x = 1e8 + np.cumsum(rng.standard_normal((3000, 4)), axis=0)
    lags = [0, 1, 7, 500, 1499, 2990]
    np.testing.assert_allclose(lagged_pearson(x, lags=lags), _reference_rho(x, lags), atol=1e-6)
    full = lagged_pearson(x)  # the FFT path
    np.testing.assert_allclose(full[lags], _reference_rho(x, lags), atol=1e-6)


def test_axis_last_matches_axis_first() -> None:
    x = np.random.default_rng(2).standard_normal((64, 5))
    np.testing.assert_allclose(lagged_pearson(x.T, axis=-1), lagged_pearson(x).T)
    d0, c0 = decorrelation_time(x)
    d1, c1 = decorrelation_time(x.T, axis=-1)
    np.testing.assert_array_equal(d0, d1)
    np.testing.assert_array_equal(c0, c1)


def test_few_lags_are_computed_without_fft(monkeypatch) -> None:
    """A lags= subset costs what computing it directly costs: one dot product per lag, no FFT."""
    x = np.random.default_rng(3).standard_normal((4096, 3))

    def _no_fft(*args, **kwargs):
        raise AssertionError("FFT used for a handful of lags")

    monkeypatch.setattr(scipy.fft, "rfft", _no_fft)
    monkeypatch.setattr(corr.sfft, "rfft", _no_fft)
    rho = lagged_pearson(x, lags=[1, 2, 100])
    np.testing.assert_allclose(rho, _reference_rho(x, [1, 2, 100]), atol=1e-9)


def test_fft_length_covers_only_the_needed_lags(monkeypatch) -> None:
    seen: list[int] = []
    real = corr.sfft.rfft

    def _spy(a, *args, **kwargs):
        seen.append(a.shape[-1] if kwargs.get("n") is None else kwargs["n"])
        return real(a, *args, **kwargs)

    monkeypatch.setattr(corr.sfft, "rfft", _spy)
    T = 1000
    decorrelation_time(np.random.default_rng(4).standard_normal((T, 2)), max_lag=100)
    assert seen and seen[0] == scipy.fft.next_fast_len(T + 100, real=True) < 2 * T - 1


def test_zero_variance_windows_give_nan_quietly() -> None:
    x = np.zeros((20, 3))
    x[:, 1] = np.arange(20.0)
    x[:15, 2] = np.arange(15.0)  # constant tail of 5 steps
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rho = lagged_pearson(x)
        delta, censored = decorrelation_time(x)
    assert np.isnan(rho[:, 0]).all()
    assert not np.isnan(rho[:, 1]).any()
    # column 2: window b = x[τ:] is constant once it lies in the tail, i.e. T-τ ≤ 5
    assert not np.isnan(rho[:15, 2]).any() and np.isnan(rho[15:, 2]).all()
    assert np.isnan(delta[0]) and not censored[0]
    assert censored[1] and delta[1] == 10  # a pure trend never decorrelates: censored at T//2


def test_too_short_is_a_clear_error() -> None:
    with pytest.raises(CorrtoolsError, match="at least 3 steps"):
        lagged_pearson(np.ones((2, 4)))
    with pytest.raises(CorrtoolsError, match="at least 3 steps"):
        decorrelation_time(np.ones((3, 4)), detrend="diff")  # 2 increments
    with pytest.raises(CorrtoolsError, match="max_lag"):
        decorrelation_time(np.ones((10, 1)), max_lag=9)
    with pytest.raises(CorrtoolsError, match="lags"):
        lagged_pearson(np.ones((10, 1)), lags=[-1])
    with pytest.raises(CorrtoolsError, match="detrend"):
        decorrelation_time(np.ones((10, 1)), detrend="quadratic")  # type: ignore[arg-type]


# ---- known answers -------------------------------------------------------------------------------


def test_moving_average_has_delta_L() -> None:
    rng = np.random.default_rng(5)
    T = 20000
    for L in (5, 20, 50):
        noise = rng.standard_normal((T + L - 1, 8))
        kernel = np.ones(L) / L
        x = np.stack([np.convolve(noise[:, j], kernel, mode="valid") for j in range(8)], axis=1)
        delta, censored = decorrelation_time(x, max_lag=4 * L)
        # ρ(τ) = 1 - τ/L reaches 0 at L and is sampling noise beyond, so the crossing lands at L
        # when the noise at L is ≤ 0 (about half the time) and some lags later otherwise
        assert abs(np.median(delta) - L) <= 0.1 * L + 0.5, (L, delta)
        assert (delta >= 0.9 * L - 0.5).all()
        assert np.mean(np.abs(delta - L) <= 0.1 * L + 0.5) >= 0.5


def test_sinusoid_has_delta_quarter_period() -> None:
    t = np.arange(8000)
    periods = np.array([8.0, 40.0, 100.0, 333.0])
    x = np.sin(2 * np.pi * t[:, None] / periods + np.array([0.0, 1.0, 2.0, 3.0]))
    delta, censored = decorrelation_time(x)
    assert not censored.any()
    np.testing.assert_allclose(delta, periods / 4, rtol=0.01)


def test_white_noise_has_delta_one() -> None:
    x = np.random.default_rng(6).standard_normal((5000, 200))
    delta, censored = decorrelation_time(x)
    assert not censored.any()
    assert 0.9 <= np.median(delta) <= 1.2
    assert (delta >= 0.5).all() and np.quantile(delta, 0.9) < 5  # P(Δ > k) ≈ 2^-k


def test_detrend_options() -> None:
    rng = np.random.default_rng(7)
    T = 4000
    noise = rng.standard_normal((T, 4))
    trend = 0.05 * np.arange(T)[:, None]
    d_none, c_none = decorrelation_time(trend + noise)
    assert c_none.all()  # trend-dominated: censored at max_lag
    d_lin, c_lin = decorrelation_time(trend + noise, detrend="linear")
    assert not c_lin.any() and np.median(d_lin) < 2
    walk = np.cumsum(noise, axis=0)
    d_diff, c_diff = decorrelation_time(walk, detrend="diff")  # increments are white noise
    assert not c_diff.any() and np.median(d_diff) < 2
    np.testing.assert_allclose(detrend(walk, "diff"), noise[1:])
    lin = detrend(trend + 3.0, "linear")
    np.testing.assert_allclose(lin, 0.0, atol=1e-9)


def test_float32_path_agrees_with_float64() -> None:
    rng = np.random.default_rng(8)
    T = 4096
    phi = np.linspace(0.5, 0.999, 64)  # AR(1) with memories from ~1 to ~1000 steps
    x = np.zeros((T, 64))
    eps = rng.standard_normal((T, 64))
    for t in range(1, T):
        x[t] = phi * x[t - 1] + eps[t]
    x = (x + 3.0).astype(np.float32)
    d32, c32 = decorrelation_time(x)  # float32 FFT
    d64, c64 = decorrelation_time(x, dtype=np.float64)
    np.testing.assert_array_equal(c32, c64)
    np.testing.assert_allclose(d32, d64, rtol=1e-3, atol=1e-3)
    r32 = lagged_pearson(x)
    r64 = lagged_pearson(x.astype(np.float64))
    # float32 FFT error is relative to the whole series' power: fine up to T/2, not for tiny windows
    np.testing.assert_allclose(r32[: T // 2 + 1], r64[: T // 2 + 1], atol=1e-4)
    np.testing.assert_allclose(lagged_pearson(x, dtype=np.float64), r64, atol=1e-12)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(corr)
    assert result.attempted > 0 and result.failed == 0


def _reference_delta(x: np.ndarray, max_lag: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Δ by the definition, from np.corrcoef lag by lag; also the smallest |ρ| met before stopping."""
    rho = _reference_rho(x, range(max_lag + 1))
    N = x.shape[1]
    delta, cens, closest = np.full(N, float(max_lag)), np.ones(N, dtype=bool), np.full(N, np.inf)
    for j in range(N):
        for tau in range(1, max_lag + 1):
            r = rho[tau, j]
            if np.isnan(r):
                delta[j], cens[j] = np.nan, False
                break
            closest[j] = min(closest[j], abs(r))
            if r <= 0:
                prev = 1.0 if tau == 1 else rho[tau - 1, j]
                delta[j], cens[j] = tau - 1 + prev / (prev - r), False
                break
    return delta, cens, closest


@settings(max_examples=150, deadline=None)
@given(_series(), st.data())
def test_delta_follows_the_definition(x: np.ndarray, data) -> None:
    T = x.shape[0]
    max_lag = data.draw(st.integers(1, T - 2))
    ref, ref_cens, closest = _reference_delta(x, max_lag)
    delta, censored = decorrelation_time(x, max_lag=max_lag)
    clear = closest > 1e-9  # a ρ within rounding of 0 may fall either side: skip those series
    np.testing.assert_array_equal(censored[clear], ref_cens[clear])
    np.testing.assert_allclose(delta[clear], ref[clear], rtol=0, atol=1e-6)
