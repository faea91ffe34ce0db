"""Bins of |w| and medians of Δ per bin, with bootstrap intervals. Pure functions on arrays.

Censoring. A series that never crosses zero up to max_lag carries Δ = max_lag, a lower bound. It
enters the median at that value: the median is then exact as long as fewer than half of the bin's
series are censored (the median is determined by order alone and every censored value lies above
every uncensored one that is below max_lag), and a lower bound otherwise, flagged ``median_censored``.
The censored fraction is reported beside it. Series whose Δ is undefined (NaN: a constant window,
e.g. a weight that never moved) are left out of the median and counted as ``undefined``.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from corrtools.analysis.threads import resolve_threads
from corrtools.errors import CorrtoolsError

__all__ = ["BINNINGS", "Binning", "BinStats", "bin_edges", "assign_bins", "binned_median", "censored_quantile",
           "check_bins"]

Binning = Literal["quantile", "log", "linear"]
BINNINGS: tuple[str, ...] = ("quantile", "log", "linear")

# bootstrap resamples are drawn this many values at a time, all threads together, to bound memory
# (int32 indices, and as much again for their partition: 8 bytes each)
_BOOT_BATCH_VALUES = 1 << 23


def check_bins(bins: int, binning: str = "quantile") -> None:
    """CorrtoolsError unless ``bins`` is a positive integer and ``binning`` a known rule."""
    if binning not in BINNINGS:
        raise CorrtoolsError(f"binning={binning!r} is unknown; use one of {', '.join(map(repr, BINNINGS))}.")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise CorrtoolsError(f"bins={bins!r} must be a positive integer, e.g. 10.")


def bin_edges(magnitude: ArrayLike, bins: int = 10, binning: Binning = "quantile") -> NDArray[np.float64]:
    """Edges (bins + 1,) over the magnitudes (N,) ≥ 0, ascending, covering min..max.

    ``"quantile"``: equal counts per bin; ``"log"``: equal ratios between the smallest positive and the
    largest magnitude (exact zeros fall in the first bin); ``"linear"``: equal widths.
    """
    check_bins(bins, binning)
    m = np.asarray(magnitude, dtype=np.float64).reshape(-1)
    m = m[np.isfinite(m)]
    if m.size == 0:
        raise CorrtoolsError(
            "no finite magnitudes to bin: |w| is NaN for every weight; bin by another recorded step "
            "(magnitude_at=STEP, --magnitude-at STEP)."
        )
    lo, hi = float(m.min()), float(m.max())
    if binning == "quantile":
        edges = np.quantile(m, np.linspace(0.0, 1.0, bins + 1))
    elif binning == "log":
        pos = m[m > 0]
        lo_pos = float(pos.min()) if pos.size else 1.0
        edges = np.geomspace(lo_pos, max(hi, lo_pos), bins + 1)
        edges[0] = min(edges[0], lo)
    else:
        edges = np.linspace(lo, hi, bins + 1)
    edges[0], edges[-1] = lo, hi
    return np.maximum.accumulate(edges)


def assign_bins(magnitude: ArrayLike, edges: ArrayLike) -> NDArray[np.int64]:
    """Bin index (N,) in 0..len(edges)-2 of each magnitude; bins are [lo, hi), the last [lo, hi].

    Values outside the edges or NaN get -1.
    """
    m = np.asarray(magnitude, dtype=np.float64).reshape(-1)
    e = np.asarray(edges, dtype=np.float64)
    idx = np.searchsorted(e, m, side="right") - 1
    idx = np.where(m == e[-1], len(e) - 2, idx)
    bad = ~np.isfinite(m) | (m < e[0]) | (m > e[-1])
    return np.where(bad, -1, idx).astype(np.int64)


@dataclass(frozen=True)
class BinStats:
    """Per-bin statistics, every array (B,): counts and medians of Δ (in Δ's units) with intervals."""

    count: NDArray[np.int64]  # series in the bin, undefined ones included
    undefined: NDArray[np.int64]  # series with Δ = NaN, left out of the median
    censored_fraction: NDArray[np.float64]  # of the defined series
    median: NDArray[np.float64]
    ci_low: NDArray[np.float64]
    ci_high: NDArray[np.float64]
    median_censored: NDArray[np.bool_]  # ≥ half censored: the median is a lower bound


def censored_quantile(
    delta: ArrayLike, censored: ArrayLike, q: float = 0.5
) -> tuple[float, float, bool, int]:
    """The q-quantile of Δ (N,) whose censored entries sit at max_lag; NaN (undefined) left out.

    Returns (value, censored fraction of the defined series, lower_bound, defined count). The quantile
    (``np.quantile``'s linear interpolation) is exact when every order statistic it reads is
    uncensored, i.e. when ``ceil(q·(n-1)) < n_uncensored``; otherwise it is a lower bound (for the
    median: when at least half are censored). No defined series: (NaN, NaN, False, 0).

    >>> censored_quantile([1.0, 2.0, 3.0, 8.0, np.nan], [0, 0, 0, 1, 0])
    (2.5, 0.25, False, 4)
    >>> censored_quantile([4.0, 8.0, 8.0], [0, 1, 1])
    (8.0, 0.6666666666666666, True, 3)
    """
    if not 0.0 <= float(q) <= 1.0:
        raise CorrtoolsError(f"q={q} must be a quantile in [0, 1], e.g. 0.5 for the median.")
    d = np.asarray(delta, dtype=np.float64).reshape(-1)
    c = np.asarray(censored, dtype=bool).reshape(-1)
    defined = np.isfinite(d)
    d, c = d[defined], c[defined]
    n = d.size
    if n == 0:
        return math.nan, math.nan, False, 0
    n_cens = int(c.sum())
    hi = math.ceil(float(q) * (n - 1))  # the highest order statistic np.quantile reads
    return float(np.quantile(d, float(q))), n_cens / n, hi >= n - n_cens, n


def _bootstrap_median(
    values: np.ndarray, n_boot: int, rng: np.random.Generator, batch_values: int = _BOOT_BATCH_VALUES
) -> np.ndarray:
    """(n_boot,) medians of resamples (with replacement) of values (n,), in batches of about
    ``batch_values`` drawn indices."""
    n = values.size
    srt = np.sort(values)
    out = np.empty(n_boot)
    batch = max(1, batch_values // n)
    for start in range(0, n_boot, batch):
        k = min(batch, n_boot - start)
        # the median of a resample of sorted values is the value at the median resampled index
        mid = [(n - 1) // 2, n // 2]
        idx = np.partition(rng.integers(0, n, size=(k, n), dtype=np.int32), mid, axis=1)
        lo, hi = idx[:, mid[0]], idx[:, mid[1]]
        out[start : start + k] = 0.5 * (srt[lo] + srt[hi])
    return out


def binned_median(
    delta: ArrayLike,
    censored: ArrayLike,
    bin_index: ArrayLike,
    n_bins: int,
    *,
    ci: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    threads: int | None = None,
) -> BinStats:
    """Median Δ per bin with a percentile-bootstrap interval at level ``ci``; see the module docstring.

    delta (N,) with censored entries at max_lag, censored (N,) bool, bin_index (N,) from
    ``assign_bins`` (-1 is ignored). Empty bins give NaN. Seeded, with one random stream per bin
    (``SeedSequence(seed).spawn``): the same inputs give the same CI, whatever ``threads`` (bins
    are bootstrapped in parallel, default all cores; the batch memory is split among them).

    >>> import numpy as np
    >>> s = binned_median([1.0, 2.0, 3.0, 10.0, 10.0, 10.0], [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], 2)
    >>> s.median, s.censored_fraction, s.median_censored
    (array([ 2., 10.]), array([0., 1.]), array([False,  True]))
    """
    if not 0.0 < ci < 1.0:
        raise CorrtoolsError(f"ci={ci} must lie strictly between 0 and 1, e.g. 0.95.")
    if int(n_boot) < 1:
        raise CorrtoolsError(f"n_boot={n_boot} must be a positive integer.")
    n_threads = resolve_threads(threads)
    d = np.asarray(delta, dtype=np.float64).reshape(-1)
    c = np.asarray(censored, dtype=bool).reshape(-1)
    b = np.asarray(bin_index, dtype=np.int64).reshape(-1)
    streams = np.random.SeedSequence(seed).spawn(n_bins)  # one per bin: same CI however it is run
    q = np.array([(1.0 - ci) / 2.0, (1.0 + ci) / 2.0])
    count = np.zeros(n_bins, dtype=np.int64)
    undefined = np.zeros(n_bins, dtype=np.int64)
    cfrac, med, lo, hi = (np.full(n_bins, np.nan) for _ in range(4))
    med_cens = np.zeros(n_bins, dtype=bool)
    jobs: list[tuple[int, np.ndarray]] = []
    for k in range(n_bins):
        sel = b == k
        count[k] = int(sel.sum())
        vals = d[sel]
        defined = np.isfinite(vals)
        undefined[k] = int((~defined).sum())
        vals = vals[defined]
        if vals.size == 0:
            continue
        med[k], cfrac[k], med_cens[k], _ = censored_quantile(vals, c[sel][defined], 0.5)
        jobs.append((k, vals))

    def interval(job: tuple[int, np.ndarray]) -> None:
        k, vals = job
        rng = np.random.default_rng(streams[k])
        boot = _bootstrap_median(vals, int(n_boot), rng, _BOOT_BATCH_VALUES // n_threads)
        lo[k], hi[k] = np.quantile(boot, q)

    if n_threads > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:  # numpy releases the GIL in the heavy parts
            list(pool.map(interval, jobs))
    else:
        for job in jobs:
            interval(job)
    return BinStats(count, undefined, cfrac, med, lo, hi, med_cens)
