"""Pure kernels: the lagged Pearson coefficient ρ(τ) and the decorrelation time Δ.

Definitions (see DESIGN.md): for a trajectory x of T steps and a lag τ, ρ(τ) is the Pearson coefficient
between the windows a = x[0:T-τ] and b = x[τ:T], each with its own mean and standard deviation, i.e.
``np.corrcoef(a, b)[0, 1]``. Δ is the smallest lag τ ≥ 1 with ρ(τ) ≤ 0, linearly interpolated between
the bracketing lags τ-1 and τ (ρ(0) = 1).

How it is computed, per series, in O(T log T): the series is de-meaned globally (Pearson is shift
invariant; this keeps large offsets from cancelling), the lagged cross sums Σ_t a_t b_t for all lags
come from one real FFT of length ``next_fast_len(T + max_lag)`` (enough zero padding that no term wraps
around), and the windowed sums and sums of squares come from prefix sums. A window has zero variance
exactly when all its values are equal; those lags give NaN, found from the lengths of the constant runs
at both ends of the series, so no division by zero is ever attempted and no warnings are raised.

Arrays are (T, N) with time on ``axis=0`` by default; pass ``axis=-1`` for (..., T) (the layout
``xarray.apply_ufunc`` uses). No files, no printing, no global state.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.fft as sfft
from numpy.typing import ArrayLike, DTypeLike, NDArray

from corrtools.analysis.threads import resolve_threads
from corrtools.errors import CorrtoolsError

__all__ = ["DETRENDS", "Detrend", "detrend", "lagged_pearson", "decorrelation_time"]

Detrend = Literal["none", "linear", "diff"]
DETRENDS: tuple[str, ...] = ("none", "linear", "diff")

def detrend(x: ArrayLike, method: Detrend = "none", *, axis: int = 0) -> NDArray[np.float64]:
    """Return x (float64) with its trend removed along ``axis`` (time).

    ``"none"``: the series itself. A trajectory dominated by a steady drift stays positively
    correlated with its past at every lag, so Δ is then censored at max_lag; this measures memory of
    the drift as much as of the fluctuations.
    ``"linear"``: the least-squares line over the analysed steps is subtracted from each series. Δ then
    measures how long the fluctuations around a steady drift persist.
    ``"diff"``: the increments x[t+1] - x[t] (one step shorter). Δ then measures how long successive
    updates stay correlated (≈ 1 for independent updates, larger with momentum).
    """
    if method not in DETRENDS:
        raise CorrtoolsError(
            f"detrend={method!r} is not one of {', '.join(map(repr, DETRENDS))}; pick one of those."
        )
    arr = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    if method == "diff":
        arr = np.diff(arr, axis=-1)
    elif method == "linear":
        T = arr.shape[-1]
        t = np.arange(T, dtype=np.float64) - (T - 1) / 2.0  # centred time, (T,)
        tt = float(t @ t)
        mean = arr.mean(axis=-1, keepdims=True)
        slope = (arr @ t)[..., None] / tt if tt > 0 else np.zeros_like(mean)
        arr = arr - mean - slope * t
    return np.moveaxis(arr, -1, axis)


def _check_length(T: int) -> None:
    if T < 3:
        raise CorrtoolsError(
            f"a series of {T} step(s) is too short for a lagged correlation; record at least 3 steps."
        )


def _fft_dtype(x: np.ndarray, dtype: DTypeLike | None) -> np.dtype:
    """Precision of the FFT: float32 for float32/float16 input, float64 otherwise, unless given."""
    if dtype is not None:
        dt = np.dtype(dtype)
        if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise CorrtoolsError(f"dtype={dt} is not supported; use float32 or float64.")
        return dt
    if x.dtype in (np.dtype(np.float32), np.dtype(np.float16)):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _prepare(x: np.ndarray, method: Detrend, dtype: np.dtype = np.dtype(np.float64)) -> np.ndarray:
    """(…, T) raw → (…, T') C-contiguous in ``dtype``, detrended and de-meaned along the last axis.

    The mean is taken in float64 and subtracted before any cast, so large offsets do not cancel.
    """
    if method == "none":
        _check_length(x.shape[-1])
        mean = x.mean(axis=-1, keepdims=True, dtype=np.float64)
        if x.dtype == dtype:
            return np.subtract(x, mean.astype(dtype), dtype=dtype, order="C")
        c = np.subtract(x, mean, dtype=np.float64, order="C")
        return c.astype(dtype, copy=False)
    c = detrend(x, method, axis=-1)
    _check_length(c.shape[-1])
    if method != "linear":  # linear detrending already removes the mean
        c = c - c.mean(axis=-1, keepdims=True)
    return np.ascontiguousarray(c, dtype=dtype)


def _nan_from_lag(c: np.ndarray) -> np.ndarray:
    """(…, T) → (…,) int64: the smallest lag at which one of the two windows is constant.

    a = c[:T-τ] is constant iff T-τ ≤ (length of the constant run at the start); b = c[τ:] likewise
    with the run at the end. ρ(τ) is NaN exactly for τ ≥ the returned lag (0 for a constant series).
    """
    T = c.shape[-1]
    out = np.full(c.shape[:-1], T - 1, dtype=np.int64)  # runs of length 1 at both ends
    flat, out_flat = c.reshape(-1, T), out.reshape(-1)
    rows = np.nonzero((flat[:, 0] == flat[:, 1]) | (flat[:, -1] == flat[:, -2]))[0]
    if rows.size:  # only these rows have a longer constant run at one end
        sub = flat[rows]
        diff_start = sub != sub[:, :1]
        run_start = np.where(diff_start.any(axis=-1), diff_start.argmax(axis=-1), T)
        diff_end = (sub != sub[:, -1:])[:, ::-1]
        run_end = np.where(diff_end.any(axis=-1), diff_end.argmax(axis=-1), T)
        out_flat[rows] = T - np.maximum(run_start, run_end)
    return out


def _fft_len(T: int, max_lag: int) -> int:
    return sfft.next_fast_len(T + max_lag, real=True)


def _cross_fft(c: np.ndarray, max_lag: int, dtype: np.dtype, workers: int = 1) -> np.ndarray:
    """(…, T) → (…, max_lag + 1): Σ_t c[t] c[t+τ] for τ = 0..max_lag, by one real FFT round trip
    (``workers`` threads of scipy.fft, each taking some of the series).

    The FFT length n = next_fast_len(T + max_lag) leaves enough zeros that no product wraps around.
    """
    T = c.shape[-1]
    n = _fft_len(T, max_lag)
    buf = np.zeros(c.shape[:-1] + (n,), dtype=dtype)  # zero-padded copy, (…, n)
    buf[..., :T] = c
    spec = sfft.rfft(buf, axis=-1, workers=workers, overwrite_x=True)  # (…, n//2 + 1)
    del buf
    sq = spec.view(dtype)  # interleaved (re, im) pairs
    np.multiply(sq, sq, out=sq)
    power = sq[..., 0::2] + sq[..., 1::2]  # |F|², real, (…, n//2 + 1)
    del spec, sq
    r = sfft.irfft(power, n=n, axis=-1, workers=workers, overwrite_x=True)
    return r[..., : max_lag + 1]


def _cross_direct(c: np.ndarray, lags: np.ndarray) -> np.ndarray:
    """(…, T) → (…, len(lags)): the same cross sums, one dot product per lag."""
    T = c.shape[-1]
    out = np.empty(c.shape[:-1] + (len(lags),), dtype=np.float64)
    for k, tau in enumerate(lags):
        out[..., k] = np.einsum("...i,...i->...", c[..., : T - tau], c[..., tau:])
    return out


def _use_direct(T: int, lags: np.ndarray) -> bool:
    """Whether a few explicit dot products are cheaper than one FFT round trip (≈ 2 n log2 n work)."""
    n = _fft_len(T, int(lags.max()))
    return len(lags) * T <= 1.5 * n * np.log2(n)


def _prefix(c: np.ndarray, dtype: DTypeLike = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """(…, T) → two (…, T + 1) prefix sums of c and c² with a leading 0, accumulated in ``dtype``."""
    shape = c.shape[:-1] + (c.shape[-1] + 1,)
    p1 = np.empty(shape, dtype=dtype)
    p2 = np.empty(shape, dtype=dtype)
    p1[..., 0] = 0
    p2[..., 0] = 0
    np.cumsum(c, axis=-1, dtype=dtype, out=p1[..., 1:])
    np.cumsum(np.square(c), axis=-1, dtype=dtype, out=p2[..., 1:])
    return p1, p2


def _window_moments(
    p1: np.ndarray, p2: np.ndarray, lags: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Windowed sums for lags (L,): n (L,), sa, sb (…, L), and the centred sums of squares va, vb."""
    T = p1.shape[-1] - 1
    n = (T - lags).astype(np.float64)
    sa = p1[..., T - lags]
    sb = p1[..., T : T + 1] - p1[..., lags]
    va = p2[..., T - lags] - sa * sa / n
    vb = p2[..., T : T + 1] - p2[..., lags] - sb * sb / n
    return n, sa, sb, va, vb


def _rho_last(c: np.ndarray, lags: np.ndarray, dtype: np.dtype, workers: int = 1) -> np.ndarray:
    """(…, T) de-meaned → (…, L) ρ at the given lags."""
    T = c.shape[-1]
    if _use_direct(T, lags):
        cross = _cross_direct(c, lags)
    else:
        cross = _cross_fft(c, int(lags.max()), dtype, workers)[..., lags].astype(np.float64)
    p1, p2 = _prefix(c)
    n, sa, sb, va, vb = _window_moments(p1, p2, lags)
    nan_lag = _nan_from_lag(c)[..., None]
    undefined = lags >= nan_lag  # (…, L)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = (cross - sa * sb / n) / np.sqrt(np.maximum(va * vb, 0.0))
    np.clip(rho, -1.0, 1.0, out=rho)
    rho[undefined] = np.nan
    return rho


def _as_lags(lags: ArrayLike | None, T: int) -> np.ndarray:
    if lags is None:
        return np.arange(T - 1, dtype=np.int64)
    arr = np.atleast_1d(np.asarray(lags))
    if arr.size == 0:
        raise CorrtoolsError("lags is empty; pass at least one lag or lags=None for all of them.")
    if not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 1:
        raise CorrtoolsError("lags must be a 1-D sequence of integers (steps).")
    if arr.min() < 0 or arr.max() > T - 1:
        raise CorrtoolsError(f"lags must lie in 0..{T - 1} for a series of {T} steps.")
    return arr.astype(np.int64)


def lagged_pearson(
    x: ArrayLike,
    lags: ArrayLike | None = None,
    *,
    detrend: Detrend = "none",
    axis: int = 0,
    dtype: DTypeLike | None = None,
    threads: int | None = None,
) -> NDArray[np.float64]:
    """ρ(τ) of each series: (T, N) → (L, N) float64, time along ``axis``.

    Row k is lag ``lags[k]`` (steps); ``lags=None`` means every lag 0..T-2 (row k is lag k).
    Equal to ``np.corrcoef(x[:T-τ, j], x[τ:, j])[0, 1]``; NaN where either window is constant.
    A few lags are computed directly (one dot product each), many by one FFT. ``dtype`` is the FFT's
    precision (default: float32 for float32 input, float64 otherwise); a float32 FFT's error is
    relative to the whole series, so it is good to ~1e-5 up to τ = T/2 but not for the short windows
    near τ = T: pass ``dtype=np.float64`` for those. ``threads`` is scipy.fft's worker count
    (default: the cores this process may use, see ``corrtools.analysis.threads``). Raises
    CorrtoolsError if T < 3.

    >>> import numpy as np
    >>> x = np.sin(2 * np.pi * np.arange(4000) / 40)[:, None]   # period 40 steps, (T, N) = (4000, 1)
    >>> rho = lagged_pearson(x, lags=[0, 10, 20])                 # (3, 1)
    >>> bool(np.allclose(rho[:, 0], [1.0, 0.0, -1.0], atol=0.01))
    True
    """
    arr = np.asarray(x)
    ftype = _fft_dtype(arr, dtype)
    c = _prepare(np.moveaxis(arr, axis, -1), detrend)
    lag_arr = _as_lags(lags, c.shape[-1])
    rho = _rho_last(c, lag_arr, ftype, resolve_threads(threads))
    return np.moveaxis(rho, -1, axis)


def _check_max_lag(max_lag: int | None, T: int) -> int:
    if max_lag is None:
        return T // 2
    if not 1 <= int(max_lag) <= T - 2:
        raise CorrtoolsError(
            f"max_lag={max_lag} is outside 1..{T - 2} for a series of {T} steps; pick a lag in that range."
        )
    return int(max_lag)


def _head_sums(
    a: np.ndarray, rows: np.ndarray, points: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sums of a and a² (float64) over a[r, :p] for the given rows (k,) of a (m, T) and points
    (k, q) in 1..T-1, plus the row totals: two arrays (k, q + 1), the last column the total.

    One ``np.add.reduceat`` pass over the selected rows of a and one of a²: the sorted points and
    the row ends cut each row into segments (a repeated point gives an empty one), whose running
    sums are the heads.
    """
    m, T = a.shape
    k, q = points.shape
    order = np.argsort(points, axis=1)
    srt = np.take_along_axis(points, order, axis=1)  # (k, q) ascending
    cuts = np.concatenate(
        [np.zeros((k, 1), np.int64), srt, np.full((k, 1), T, np.int64)], axis=1
    )  # (k, q + 2): 0, points..., T
    idx = (cuts + (rows.astype(np.int64) * T)[:, None]).reshape(-1)
    dropped = idx[-1] == a.size  # the last row's end is the array's end: no cut there
    if dropped:
        idx = idx[:-1]
    empty = np.zeros(idx.shape, dtype=bool)
    empty[:-1] = idx[1:] == idx[:-1]
    out = []
    for arr in (a, np.square(a)):
        seg = np.add.reduceat(arr.reshape(-1), idx, dtype=np.float64)
        seg[empty] = 0.0
        if dropped:
            seg = np.append(seg, 0.0)
        run = np.cumsum(seg.reshape(k, q + 2)[:, : q + 1], axis=1)  # (k, q + 1) sums up to each cut
        heads = np.empty((k, q + 1))
        np.put_along_axis(heads, order, run[:, :q], axis=1)
        heads[:, q] = run[:, q]
        out.append(heads)
    return out[0], out[1]


def _rho_from_sums(
    cross: np.ndarray, tau: np.ndarray, h1: np.ndarray, h2: np.ndarray, T: int
) -> np.ndarray:
    """ρ (k,) at lags tau (k,) from the cross sums (k,) and float64 heads at [T-τ, τ, T] of c and c²."""
    n = (T - tau).astype(np.float64)
    sa, sb = h1[:, 0], h1[:, 2] - h1[:, 1]
    va = h2[:, 0] - sa * sa / n
    vb = h2[:, 2] - h2[:, 1] - sb * sb / n
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = (cross - sa * sb / n) / np.sqrt(np.maximum(va * vb, 0.0))
    return np.clip(rho, -1.0, 1.0)


# the first block of lags searched for a zero crossing; each next block is 4 times longer
_FIRST_LAGS = 64


def _delta_last(
    c: np.ndarray, max_lag: int, dtype: np.dtype, workers: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(…, T) de-meaned → Δ (…,) float64 and censored (…,) bool. See ``decorrelation_time``.

    The sign of ρ(τ) is the sign of the windowed covariance cov(τ) = cross(τ) - sa·sb/n, so the first
    lag with ρ ≤ 0 is searched on covariances at ``dtype`` (FFT and prefix sums), in blocks of lags
    that grow 4× each round, for the series that have not crossed yet: the work is O(m·Δ) rather than
    O(m·max_lag). ρ is then evaluated in float64 at the two lags bracketing each crossing.
    """
    T = c.shape[-1]
    lead = c.shape[:-1]
    flat = np.ascontiguousarray(c.reshape(-1, T), dtype=dtype)  # (m, T)
    m, L = flat.shape[0], max_lag
    cross = _cross_fft(flat, L, dtype, workers)  # (m, L + 1): lag 0..L
    total = flat.sum(axis=1, dtype=np.float64).astype(dtype)  # (m,) Σ c, ≈ 0 after de-meaning
    head = np.zeros(m, dtype=dtype)  # Σ_{t<lo} c of the rows still searching
    tail = np.zeros(m, dtype=dtype)  # Σ_{t≥T-lo} c
    inv_n = (1.0 / (T - np.arange(1, L + 1))).astype(dtype)  # (L,) for lags 1..L
    nan_lag = _nan_from_lag(flat)  # (m,)
    tau = np.zeros(m, dtype=np.int64)  # lag that stopped the search, 0 while searching
    active = np.arange(m)
    lo, width = 0, _FIRST_LAGS
    while lo < L and active.size:
        hi = min(L, lo + width)  # this round: lags lo+1..hi, only the ends of each row are read
        rows = slice(None) if active.size == m else active
        # running sums from both ends: H(τ) = Σ_{t<τ} c, S(τ) = Σ_{t≥T-τ} c, for τ = lo+1..hi
        h = np.cumsum(flat[rows, lo:hi], axis=1, dtype=dtype)
        h += head[:, None]
        t_ = np.cumsum(flat[rows, T - hi : T - lo][:, ::-1], axis=1, dtype=dtype)
        t_ += tail[:, None]
        tot = total[rows][:, None]
        head, tail = h[:, -1].copy(), t_[:, -1].copy()  # h, t_ are overwritten below
        # cov(τ) = cross(τ) - sa·sb/n with sa = Σ_{t<T-τ} c = tot - S, sb = Σ_{t≥τ} c = tot - H
        np.subtract(tot, h, out=h)
        np.subtract(tot, t_, out=t_)
        h *= t_
        h *= inv_n[lo:hi]
        cov = np.subtract(cross[rows, lo + 1 : hi + 1], h, out=h)
        hit = cov <= 0
        late = nan_lag[active] <= hi  # a window turns constant in this block: stop there too
        for j in np.nonzero(late)[0]:
            hit[j, max(nan_lag[active[j]] - 1 - lo, 0) :] = True
        stop = hit.any(axis=1)
        tau[active[stop]] = lo + 1 + hit[stop].argmax(axis=1)
        active, head, tail = active[~stop], head[~stop], tail[~stop]
        lo, width = hi, width * 4
    censored = tau == 0
    undefined = ~censored & (tau >= nan_lag)
    delta = np.full(m, float(L))
    rows = np.nonzero(~censored & ~undefined)[0]
    if rows.size:
        t1 = tau[rows]
        t0 = np.maximum(t1 - 1, 1)
        pts = np.stack([T - t1, t1, T - t0, t0], axis=1)  # (k, 4), all in 1..T-1
        h1, h2 = _head_sums(flat, rows, pts)  # (k, 5): heads at pts, then the total
        rho1 = _rho_from_sums(cross[rows, t1].astype(np.float64), t1, h1[:, [0, 1, 4]], h2[:, [0, 1, 4]], T)
        rho0 = _rho_from_sums(cross[rows, t0].astype(np.float64), t0, h1[:, [2, 3, 4]], h2[:, [2, 3, 4]], T)
        rho0 = np.where(t1 > 1, rho0, 1.0)
        rho1 = np.minimum(rho1, 0.0)
        rho0 = np.maximum(rho0, np.finfo(np.float64).tiny)  # > 0 by construction; guard rounding
        delta[rows] = (t1 - 1) + rho0 / (rho0 - rho1)
    delta[undefined] = np.nan
    return delta.reshape(lead), censored.reshape(lead)


def decorrelation_time(
    x: ArrayLike,
    max_lag: int | None = None,
    *,
    detrend: Detrend = "none",
    axis: int = 0,
    dtype: DTypeLike | None = None,
    threads: int | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Δ of each series: (T, N) → (delta (N,), censored (N,)), Δ in steps (float).

    Δ is the first lag τ ≥ 1 with ρ(τ) ≤ 0, linearly interpolated between τ-1 and τ (ρ(0) = 1).
    A series that stays positively correlated up to ``max_lag`` (default T//2 of the detrended series)
    is *censored*: its Δ is returned as ``max_lag`` (a lower bound) and ``censored`` is True.
    Δ is NaN when ρ becomes undefined (a constant window) before it crosses zero, e.g. a constant series.
    ``detrend`` is applied first (see ``detrend``); ``dtype`` is the FFT's precision (default float32
    for float32 input, float64 otherwise; the zero crossing is found at that precision and the
    interpolation done in float64). ``threads`` is scipy.fft's worker count (default: the cores this
    process may use). Raises CorrtoolsError if the series has fewer than 3 steps.

    >>> import numpy as np
    >>> t = np.arange(4000)
    >>> x = np.stack([np.sin(2 * np.pi * t / 40), np.sin(2 * np.pi * t / 100)], axis=1)
    >>> delta, censored = decorrelation_time(x)
    >>> np.round(delta), censored
    (array([10., 25.]), array([False, False]))
    """
    arr = np.asarray(x)
    ftype = _fft_dtype(arr, dtype)
    c = _prepare(np.moveaxis(arr, axis, -1), detrend, ftype)
    lag = _check_max_lag(max_lag, c.shape[-1])
    return _delta_last(c, lag, ftype, resolve_threads(threads))
