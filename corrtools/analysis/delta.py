"""From a run store to Δ: per weight, and as medians per bin of |w| (the paper's Figure 1).

The |w| binned by are the run's final values, or, for a run still recording or interrupted (no final
values yet), the last recorded row; ``magnitude_at`` chooses ("final", "last" or a step, see
``corrtools.analysis.magnitude_at``) and the results' attrs say which step they come from.

Reads the store through ``open_run`` only. Out of core: the selected columns are read in blocks of
whole store chunks along ``weight`` (all steps of those columns at once, so every compressed chunk is
decompressed once), and each block is handed to the kernel in slices of a few hundred columns; peak
memory is set by one block (``max_block_bytes``), not by the store. With a dask-backed dataset (e.g.
``open_run(path, chunks={"weight": 4096})``) the same kernel runs through
``xr.apply_ufunc(..., dask="parallelized")`` on whatever scheduler is active, and gives the same numbers.
``scheduler=`` (an address, ``distributed.Client`` or ``LocalCluster``) runs it on a dask.distributed
cluster, one task per block of store chunks (see ``analysis/cluster.py``).

Threads. The slices of a block run on ``threads`` threads (default: the cores this process may use;
see ``corrtools.analysis.threads``). Their working memory is split among them, so peak memory is
about one block plus ``_KERNEL_BYTES`` (192 MiB) however many threads run: each slice gets
``_KERNEL_BYTES / threads``, at least 16 columns, and fewer threads run if even 16-column slices
would not fit (long windows on many cores). On the dask path the kernel runs on one thread per task:
the scheduler's workers are the parallelism, and ``threads`` is not used.

Units. Δ is reported in optimizer steps: the lag in recorded rows times the store's ``every``
attribute (1 if absent). Δ/T is unitless, T being the number of recorded rows in the window.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import xarray as xr

from corrtools.analysis.correlation import (
    DETRENDS,
    Detrend,
    _check_max_lag,
    _delta_last,
    _fft_dtype,
    _prepare,
    lagged_pearson,
)
from corrtools.analysis.magnitude import Binning, assign_bins, bin_edges, binned_median, check_bins
from corrtools.analysis.magnitude_at import MagnitudeAt, magnitude_labels, magnitudes_at
from corrtools.analysis.threads import resolve_threads
from corrtools.errors import CorrtoolsError, close_matches

__all__ = [
    "delta_by_magnitude",
    "delta_per_weight",
    "load_delta",
    "rho_by_magnitude",
    "save_delta",
    "summarize_by_magnitude",
]

# working memory of the kernel slices in flight (FFT buffers, prefix sums, covariances), all threads
# together: each of t threads gets 1/t of it
_KERNEL_BYTES = 192 << 20
# a kernel slice needs about this many bytes per column and step
_KERNEL_BYTES_PER_VALUE = 40
# fewest columns in a slice (below this the per-call overhead dominates)
_MIN_SLICE_COLS = 16
# default cap on one block read from the store: all steps of some whole chunks of columns
_BLOCK_BYTES = 512 << 20
# quantiles of the binned |w| kept with the results (to shade "removable at density d" in plots)
_QUANTILES = np.linspace(0.0, 1.0, 201)


# NaN or inf in a weight's trajectory makes its Δ / ρ NaN (undefined), as documented: not a warning
def _nan_is_an_answer() -> Any:
    return np.errstate(invalid="ignore", over="ignore", divide="ignore")  # a new one per use: thread-safe


def _open(ds_or_path: xr.Dataset | str | os.PathLike[str]) -> xr.Dataset:
    if isinstance(ds_or_path, xr.Dataset):
        return ds_or_path
    from corrtools.record.store import open_run

    return open_run(ds_or_path)


def _select_columns(ds: xr.Dataset, params: Sequence[str] | str | None) -> np.ndarray:
    """Column indices (sorted) of the requested parameters; unknown names raise with close matches."""
    names = np.asarray(ds["param"].values).astype(str)
    if params is None:
        return np.arange(names.size)
    if isinstance(params, str):
        params = [params]
    known = list(dict.fromkeys(names.tolist()))
    for p in params:
        if p not in known:
            raise CorrtoolsError(
                f"parameter {p!r} was not recorded in this run{close_matches(p, known)}; "
                f"`corrtools info` lists the recorded ones."
            )
    return np.nonzero(np.isin(names, list(params)))[0]


def _window_rows(n_rows: int, window: tuple[float, float]) -> slice:
    """Rows [i0, i1) for a fraction window (a, b) of the recorded rows; at least 3 rows."""
    try:
        a, b = (float(v) for v in window)
    except (TypeError, ValueError):
        raise CorrtoolsError(f"window={window!r} must be two fractions (start, end), e.g. (0.5, 1.0).") from None
    if not 0.0 <= a < b <= 1.0:
        raise CorrtoolsError(f"window=({a}, {b}) must satisfy 0 ≤ start < end ≤ 1, e.g. (0.5, 1.0).")
    i0, i1 = int(round(a * n_rows)), int(round(b * n_rows))
    if i1 - i0 < 3:
        raise CorrtoolsError(
            f"window=({a}, {b}) selects {max(i1 - i0, 0)} of the run's {n_rows} recorded steps; "
            "Δ needs at least 3, so widen the window or record a longer run."
        )
    return slice(i0, i1)


def _analysis_selection(
    ds_or_path: xr.Dataset | str | os.PathLike[str],
    params: Sequence[str] | str | None,
    window: tuple[float, float],
    detrend: str,
    max_lag: int | None,
) -> tuple[xr.Dataset, np.ndarray, slice, int]:
    """Validate and resolve what an analysis reads: (dataset, weight columns, window rows, max lag in
    rows). The series analysed has one row fewer than the window with ``detrend="diff"``."""
    if detrend not in DETRENDS:
        raise CorrtoolsError(f"detrend={detrend!r} is not one of {', '.join(map(repr, DETRENDS))}; pick one of those.")
    ds = _open(ds_or_path)
    cols = _select_columns(ds, params)
    rows = _window_rows(ds.sizes["step"], window)
    T_rows = rows.stop - rows.start
    T_eff = T_rows - 1 if detrend == "diff" else T_rows
    if T_eff < 3:
        raise CorrtoolsError(
            f"the window has {T_rows} recorded steps, too few for detrend={detrend!r}; widen the window."
        )
    return ds, cols, rows, _check_max_lag(max_lag, T_eff)


def _every(ds: xr.Dataset) -> int:
    try:
        return max(1, int(ds.attrs.get("every", 1)))
    except (TypeError, ValueError):
        return 1


def _weight_chunk(ds: xr.Dataset) -> int:
    values = ds["values"]
    if values.chunks is not None:  # dask: its own chunking along weight
        return int(max(values.chunks[values.dims.index("weight")]))
    pref = values.encoding.get("preferred_chunks", {})
    return int(pref.get("weight", values.shape[1]))


def _blocks(cols: np.ndarray, chunk: int, n_steps: int, max_block_bytes: int) -> Iterator[np.ndarray]:
    """Groups of the selected columns (sorted) to read at once: each spans whole store chunks, at most
    ``max_block_bytes`` of them with all their steps (the read covers the span first..last). If one
    chunk alone exceeds the budget, a group is part of a chunk, whose compressed data is then read
    once per part."""
    span_chunks = max(1, max_block_bytes // max(1, n_steps * chunk * 4))  # chunks per read
    span_cols = max(1, max_block_bytes // max(1, n_steps * 4))
    span = span_chunks * chunk if span_chunks > 1 or span_cols >= chunk else span_cols
    i = 0
    while i < cols.size:
        if span >= chunk:  # whole chunks: from the first selected column's chunk
            end = (cols[i] // chunk) * chunk + span
        else:
            end = cols[i] + span
        j = int(np.searchsorted(cols, end, side="left"))
        yield cols[i:j]
        i = j


def _slice_plan(T: int, threads: int) -> tuple[int, int]:
    """(columns per kernel call, threads to run) for series of T steps: the slices in flight stay
    within ``_KERNEL_BYTES`` together (≈ 40 B per column and step each), so ``threads`` is lowered
    when even ``_MIN_SLICE_COLS``-column slices would not fit.

    Odd-ish multiples of 8: a power-of-two row stride makes the transposing copy thrash the cache.
    """
    per_col = _KERNEL_BYTES_PER_VALUE * T
    cols = int(max(_MIN_SLICE_COLS, min(4096, _KERNEL_BYTES // max(1, int(threads)) // per_col)))
    if cols % 16 == 0:
        cols = cols - 8 if cols > _MIN_SLICE_COLS else cols + 8
    return cols, max(1, min(int(threads), _KERNEL_BYTES // (cols * per_col)))


def _map_slices(fn: Any, n: int, k: int, threads: int) -> None:
    """Call ``fn(start)`` for start = 0, k, 2k, … < n, on ``threads`` threads (numpy and pocketfft
    release the GIL), each call writing its own part of preallocated outputs."""
    starts = range(0, n, k)
    if threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(max_workers=min(threads, len(starts))) as pool:
            list(pool.map(fn, starts))
    else:
        for s in starts:
            fn(s)


def _delta_slice(
    x: np.ndarray, max_lag: int, detrend: Detrend, dtype: Any, workers: int
) -> tuple[np.ndarray, np.ndarray]:
    """One kernel call on x (k, T), time last, any strides."""
    ftype = _fft_dtype(x, dtype)
    if not (x.flags.c_contiguous or x.flags.f_contiguous):
        x = np.ascontiguousarray(x.T).T  # a slice of a (T, N) block: copy its row segments first
    with _nan_is_an_answer():  # here, in the thread that computes: NaN weights give NaN, no warning
        c = _prepare(x, detrend, ftype)  # (k, T) C-contiguous, de-meaned
        d, cens = _delta_last(c, max_lag, ftype, workers)
    # a NaN or inf anywhere in a series makes its mean, hence every de-meaned value, non-finite:
    # its Δ is undefined (NaN), not a lag the search ran into by comparing NaNs
    bad = ~np.isfinite(c[:, 0]) if c.ndim == 2 and c.shape[1] else np.zeros(d.shape, bool)
    d[bad], cens[bad] = np.nan, False
    return d, cens


def _delta_time_last(
    x: np.ndarray, max_lag: int, detrend: Detrend, dtype: Any, threads: int
) -> tuple[np.ndarray, np.ndarray]:
    """Δ (rows) and censored for x (N, T), time last (a transposed view of a (T, N) block is fine),
    in slices of columns on ``threads`` threads (see ``_slice_plan``)."""
    N = x.shape[0]
    k, threads = _slice_plan(x.shape[1], threads)
    d = np.empty(N)
    c = np.empty(N, dtype=bool)

    def one(s: int) -> None:
        d[s : s + k], c[s : s + k] = _delta_slice(x[s : s + k], max_lag, detrend, dtype, 1)

    _map_slices(one, N, k, threads)
    return d, c


def _delta_rows(x: np.ndarray, max_lag: int, detrend: Detrend, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """The apply_ufunc kernel: (..., T) with time last → Δ (...,) in rows and censored (...,)."""
    flat = x.reshape(-1, x.shape[-1])
    d, c = _delta_time_last(flat, max_lag, detrend, dtype, threads=1)
    return d.reshape(x.shape[:-1]), c.reshape(x.shape[:-1])


def delta_per_weight(
    ds_or_path: xr.Dataset | str | os.PathLike[str],
    params: Sequence[str] | str | None = None,
    *,
    window: tuple[float, float] = (0.0, 1.0),
    max_lag: int | None = None,
    detrend: Detrend = "none",
    dtype: Any = None,
    progress: bool = True,
    max_block_bytes: int = _BLOCK_BYTES,
    threads: int | None = None,
    magnitude_at: MagnitudeAt = None,
    scheduler: Any = None,
) -> xr.Dataset:
    """Δ of every selected weight: a Dataset over ``weight`` with ``delta`` (optimizer steps, float64),
    ``delta_over_T``, ``censored`` (bool), the store's coords (param, index, initial, final) and
    ``magnitude``, the |w| later binned by (``magnitude_at``: "final", "last", a recorded step, or
    None for final values when the run has them and the last recorded row otherwise; attrs
    ``magnitude_at``, ``magnitude_step``, ``magnitude_label`` say which).

    ``window`` is a fraction of the recorded rows, e.g. (0.5, 1.0) for the second half; ``max_lag``
    is in recorded rows (default: half the window). Censored weights carry Δ = max_lag (a lower bound),
    NaN means undefined (a constant window); see ``decorrelation_time``. ``dtype`` is the FFT precision
    (default float32 for the float32 store). ``progress`` shows a tqdm bar on the numpy path.
    ``scheduler``: run on a dask.distributed cluster (an address such as ``"tcp://host:8786"``, a
    ``Client`` or a ``LocalCluster``), one task per block of at most ``max_block_bytes``.
    ``threads``: see the module docstring (default all cores this process may use; ignored on the
    dask path). Peak memory ≈ ``max_block_bytes`` + 192 MiB, whatever ``threads``.
    """
    n_threads = resolve_threads(threads)
    ds, cols, rows, lag = _analysis_selection(ds_or_path, params, window, detrend, max_lag)
    mag, source = magnitudes_at(ds, cols, magnitude_at)  # before the work: errors come first
    T_rows = rows.stop - rows.start
    values = ds["values"].isel(step=rows, weight=cols)
    if scheduler is not None:
        from corrtools.analysis.cluster import chunk_for_cluster, client_for

        values = chunk_for_cluster(ds["values"].isel(step=rows), cols, _weight_chunk(ds), max_block_bytes)
        with client_for(scheduler) as client:
            d_rows, cens = _delta_dask(values, lag, detrend, dtype, scheduler=client)
    elif values.chunks is not None:
        d_rows, cens = _delta_dask(values, lag, detrend, dtype)
    else:
        d_rows, cens = _delta_numpy(ds, cols, rows, lag, detrend, dtype, progress, max_block_bytes, n_threads)
    every = _every(ds)
    out = xr.Dataset(
        {
            "delta": ("weight", d_rows * every, {"units": "optimizer steps"}),
            "delta_over_T": ("weight", d_rows / T_rows),
            "censored": ("weight", cens),
        },
        coords={
            **{k: ("weight", np.asarray(ds[k].values)[cols]) for k in ("param", "index", "initial", "final")},
            "magnitude": ("weight", mag, {"long_name": source.label}),
        },
        attrs={
            "T": T_rows,
            "every": every,
            "max_lag": lag,
            "max_lag_steps": lag * every,
            "window": [float(window[0]), float(window[1])],
            "step_first": int(ds["step"].values[rows.start]),
            "step_last": int(ds["step"].values[rows.stop - 1]),
            "detrend": detrend,
            **source.attrs(),
        },
    )
    return out


def _iter_columns(
    ds: xr.Dataset, cols: np.ndarray, rows: slice, progress: bool, max_block_bytes: int, desc: str
) -> Iterator[tuple[int, np.ndarray]]:
    """(offset into cols, x (T, k) float32) for consecutive blocks of the selected columns."""
    from tqdm.auto import tqdm

    T = rows.stop - rows.start
    done = 0
    values = ds["values"]
    with tqdm(total=cols.size, unit="weight", disable=not progress, desc=desc) as bar:
        for block in _blocks(cols, _weight_chunk(ds), T, max_block_bytes):
            lo, hi = int(block[0]), int(block[-1]) + 1
            raw = values[rows, lo:hi].values  # (T, hi - lo) float32, one read of whole chunks
            yield done, (raw[:, block - lo] if block.size != hi - lo else raw)
            done += block.size
            bar.update(block.size)
            del raw


def _delta_numpy(
    ds: xr.Dataset, cols: np.ndarray, rows: slice, lag: int, detrend: Detrend, dtype: Any,
    progress: bool, max_block_bytes: int, threads: int,
) -> tuple[np.ndarray, np.ndarray]:
    d = np.empty(cols.size)
    c = np.empty(cols.size, dtype=bool)
    for off, x in _iter_columns(ds, cols, rows, progress, max_block_bytes, "delta"):
        d[off : off + x.shape[1]], c[off : off + x.shape[1]] = _delta_time_last(x.T, lag, detrend, dtype, threads)
        del x  # before the next block is read: one block in memory at a time
    return d, c


def _delta_dask(
    values: xr.DataArray, lag: int, detrend: Detrend, dtype: Any, scheduler: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """The dask path: Δ per weight through xr.apply_ufunc, step in one chunk, on ``scheduler``
    (default: the active one)."""
    values = values.chunk({"step": -1})
    d, c = xr.apply_ufunc(
        _delta_rows,
        values,
        input_core_dims=[["step"]],
        output_core_dims=[[], []],
        kwargs={"max_lag": lag, "detrend": detrend, "dtype": dtype},
        dask="parallelized",
        output_dtypes=[np.float64, np.bool_],
    )
    both = xr.Dataset({"d": d, "c": c}).compute(scheduler=scheduler)  # one graph: one kernel call per chunk
    return np.asarray(both["d"].values), np.asarray(both["c"].values)


def summarize_by_magnitude(
    per_weight: xr.Dataset,
    *,
    bins: int = 10,
    binning: Binning = "quantile",
    ci: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    threads: int | None = None,
) -> xr.Dataset:
    """Per-weight Δ (from ``delta_per_weight``) → medians per bin of |w| (its ``magnitude`` coord, or
    |final| for per-weight results saved before it existed), one set of bins per parameter: a
    Dataset with dims (param, bin); see ``delta_by_magnitude`` for its variables.
    ``threads`` run the bootstrap (default all cores)."""
    check_bins(bins, binning)
    names = np.asarray(per_weight["param"].values).astype(str)
    params = list(dict.fromkeys(names.tolist()))
    T = int(per_weight.attrs["T"])
    B = int(bins)
    shape = (len(params), B)
    res: dict[str, np.ndarray] = {
        "edge_low": np.full(shape, np.nan),
        "edge_high": np.full(shape, np.nan),
        "magnitude": np.full(shape, np.nan),
        "n_weights": np.zeros(shape, dtype=np.int64),
        "undefined": np.zeros(shape, dtype=np.int64),
        "median_delta": np.full(shape, np.nan),
        "ci_low": np.full(shape, np.nan),
        "ci_high": np.full(shape, np.nan),
        "censored_fraction": np.full(shape, np.nan),
        "median_censored": np.zeros(shape, dtype=bool),
        "magnitude_quantile": np.full((len(params), _QUANTILES.size), np.nan),
    }
    delta = np.asarray(per_weight["delta"].values)
    censored = np.asarray(per_weight["censored"].values)
    src = per_weight["magnitude"] if "magnitude" in per_weight.coords else per_weight["final"]
    mag = np.abs(np.asarray(src.values, dtype=np.float64))
    label, _ = magnitude_labels(per_weight.attrs)
    unanalysed = _unanalysed(names, mag, params, label)
    for i, p in enumerate(params):
        sel = names == p
        if p in unanalysed:  # no finite |w| to bin by: its bins stay empty (NaN), the rest go on
            continue
        edges = bin_edges(mag[sel], B, binning)
        idx = assign_bins(mag[sel], edges)
        stats = binned_median(delta[sel], censored[sel], idx, B, ci=ci, n_boot=n_boot, seed=seed + i,
                              threads=threads)
        res["edge_low"][i], res["edge_high"][i] = edges[:-1], edges[1:]
        finite = mag[sel][np.isfinite(mag[sel])]
        res["magnitude_quantile"][i] = np.quantile(finite, _QUANTILES)
        for k in range(B):
            in_bin = mag[sel][idx == k]
            if in_bin.size:
                res["magnitude"][i, k] = float(np.median(in_bin))
        res["n_weights"][i] = stats.count
        res["undefined"][i] = stats.undefined
        res["median_delta"][i] = stats.median
        res["ci_low"][i], res["ci_high"][i] = stats.ci_low, stats.ci_high
        res["censored_fraction"][i] = stats.censored_fraction
        res["median_censored"][i] = stats.median_censored
    units = {"units": "optimizer steps"}
    data = {
        "edge_low": (("param", "bin"), res["edge_low"], {"long_name": f"lower edge of {label}"}),
        "edge_high": (("param", "bin"), res["edge_high"], {"long_name": f"upper edge of {label}"}),
        "magnitude": (("param", "bin"), res["magnitude"], {"long_name": f"median {label} in the bin"}),
        "n_weights": (("param", "bin"), res["n_weights"]),
        "undefined": (("param", "bin"), res["undefined"]),
        "median_delta": (("param", "bin"), res["median_delta"], units),
        "ci_low": (("param", "bin"), res["ci_low"], units),
        "ci_high": (("param", "bin"), res["ci_high"], units),
        "censored_fraction": (("param", "bin"), res["censored_fraction"]),
        "median_censored": (("param", "bin"), res["median_censored"]),
        "magnitude_quantile": (
            ("param", "quantile"), res["magnitude_quantile"], {"long_name": f"quantiles of {label}"}
        ),
    }
    out = xr.Dataset(data, coords={"param": params, "bin": np.arange(B), "quantile": _QUANTILES})
    scale = 1.0 / (T * int(per_weight.attrs.get("every", 1)))
    for name in ("median_delta", "ci_low", "ci_high"):
        short = name.replace("median_delta", "median")
        out[f"{short}_over_T"] = out[name] * scale
    out.attrs = {**per_weight.attrs, "bins": B, "binning": binning, "ci": ci, "n_boot": n_boot, "seed": seed,
                 "unanalysed": unanalysed}
    return out


def _unanalysed(names: np.ndarray, mag: np.ndarray, params: list[str], label: str = "final |w|") -> list[str]:
    """The params none of whose weights has a finite magnitude ``mag`` (e.g. a layer that became NaN);
    a CorrtoolsError when that is all of them."""
    out = [p for p in params if not np.isfinite(mag[names == p]).any()]
    if out and len(out) == len(params):
        raise CorrtoolsError(
            f"no finite magnitudes to bin: {label} is NaN for every weight; bin by another recorded "
            "step with magnitude_at=STEP (--magnitude-at STEP)."
        )
    return out


def delta_by_magnitude(
    ds_or_path: xr.Dataset | str | os.PathLike[str],
    params: Sequence[str] | str | None = None,
    bins: int = 10,
    binning: Binning = "quantile",
    window: tuple[float, float] = (0.0, 1.0),
    max_lag: int | None = None,
    detrend: Detrend = "none",
    ci: float = 0.95,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    dtype: Any = None,
    progress: bool = True,
    max_block_bytes: int = _BLOCK_BYTES,
    threads: int | None = None,
    magnitude_at: MagnitudeAt = None,
    scheduler: Any = None,
) -> xr.Dataset:
    """Median Δ per bin of |w|, per parameter (the paper's Figure 1 as numbers).

    |w| is the final value, or for a run without final values (still recording, or interrupted) the
    last recorded row; ``magnitude_at`` ("final", "last" or a recorded optimizer step) chooses, and
    the attrs ``magnitude_at``/``magnitude_step``/``magnitude_label`` say which was used.
    Returns a Dataset with dims (param, bin): ``edge_low``/``edge_high`` (bin edges of |w|),
    ``magnitude`` (median |w| in the bin), ``n_weights`` (the count), ``undefined`` (Δ = NaN, left out),
    ``median_delta`` with its bootstrap interval ``ci_low``/``ci_high`` (optimizer steps), the same
    divided by T as ``median_over_T``/``ci_low_over_T``/``ci_high_over_T``, ``censored_fraction`` and
    ``median_censored`` (≥ half censored: the median is then max_lag, a lower bound), and
    ``magnitude_quantile`` (param, quantile): quantiles of |w| in steps of 0.5 %. Attrs record T,
    window, max_lag, detrend, binning. For per-weight Δ use ``delta_per_weight``; this function is
    ``summarize_by_magnitude(delta_per_weight(...))``. ``threads`` (default: the cores this process
    may use) run the kernel and the bootstrap; the results do not depend on it. ``scheduler`` runs
    the Δ on a dask.distributed cluster (see ``delta_per_weight``).
    """
    check_bins(bins, binning)  # before the work
    n_threads = resolve_threads(threads)
    per_weight = delta_per_weight(
        ds_or_path, params, window=window, max_lag=max_lag, detrend=detrend, dtype=dtype,
        progress=progress, max_block_bytes=max_block_bytes, threads=n_threads, scheduler=scheduler,
        magnitude_at=magnitude_at,
    )
    return summarize_by_magnitude(per_weight, bins=bins, binning=binning, ci=ci, n_boot=n_boot, seed=seed,
                                  threads=n_threads)


def rho_by_magnitude(
    ds_or_path: xr.Dataset | str | os.PathLike[str],
    params: Sequence[str] | str | None = None,
    *,
    bins: int = 5,
    binning: Binning = "quantile",
    window: tuple[float, float] = (0.0, 1.0),
    max_lag: int | None = None,
    n_lags: int = 48,
    detrend: Detrend = "none",
    progress: bool = True,
    max_block_bytes: int = _BLOCK_BYTES,
    threads: int | None = None,
    magnitude_at: MagnitudeAt = None,
) -> xr.Dataset:
    """ρ(τ) per bin of |w| (final, or as ``magnitude_at`` says; see ``delta_by_magnitude``): median
    and quartiles over the bin's weights at ~``n_lags`` log-spaced lags 1..max_lag (recorded rows;
    default half the window), on ``threads`` threads.

    Returns a Dataset with dims (param, bin, lag): ``rho_median``, ``rho_q25``, ``rho_q75`` (NaN-aware),
    ``n_weights`` (param, bin), ``edge_low``/``edge_high`` (param, bin), coords ``lag`` (rows) and ``lag_steps``.
    """
    check_bins(bins, binning)
    if isinstance(n_lags, bool) or not isinstance(n_lags, (int, np.integer)) or n_lags < 1:
        raise CorrtoolsError(f"n_lags={n_lags!r} must be a positive integer, e.g. 48.")
    n_threads = resolve_threads(threads)
    ds, cols, rows, lag = _analysis_selection(ds_or_path, params, window, detrend, max_lag)
    mag, source = magnitudes_at(ds, cols, magnitude_at)
    T_rows = rows.stop - rows.start
    lags = np.unique(np.round(np.geomspace(1, lag, max(2, int(n_lags)))).astype(np.int64))
    rho = np.empty((lags.size, cols.size), dtype=np.float32)
    k, n_threads = _slice_plan(T_rows, n_threads)
    for off, x in _iter_columns(ds, cols, rows, progress, max_block_bytes, "rho"):

        def one(s: int) -> None:  # x and off are this block's
            sub = np.ascontiguousarray(x[:, s : s + k])
            with _nan_is_an_answer():
                rho[:, off + s : off + s + sub.shape[1]] = lagged_pearson(sub, lags, detrend=detrend, threads=1)

        _map_slices(one, x.shape[1], k, n_threads)
        del x  # before the next block is read
    names = np.asarray(ds["param"].values).astype(str)[cols]
    pnames = list(dict.fromkeys(names.tolist()))
    B = int(bins)
    stats = np.full((3, len(pnames), B, lags.size), np.nan)
    count = np.zeros((len(pnames), B), dtype=np.int64)
    edges = np.full((len(pnames), B + 1), np.nan)
    unanalysed = _unanalysed(names, mag, pnames, source.label)
    for i, p in enumerate(pnames):
        sel = names == p
        if p in unanalysed:  # no finite |w|: its bins stay empty, the other params go on
            continue
        edges[i] = bin_edges(mag[sel], B, binning)
        idx = assign_bins(mag[sel], edges[i])
        r = rho[:, sel]
        for b in range(B):
            in_bin = r[:, idx == b]
            count[i, b] = in_bin.shape[1]
            if in_bin.shape[1] and np.isfinite(in_bin).any():
                with warnings.catch_warnings():  # an all-NaN lag in a bin: NaN is the answer
                    warnings.simplefilter("ignore", RuntimeWarning)
                    stats[:, i, b] = np.nanpercentile(in_bin, [50, 25, 75], axis=1)
    every = _every(ds)
    dims = ("param", "bin", "lag")
    return xr.Dataset(
        {
            "rho_median": (dims, stats[0]),
            "rho_q25": (dims, stats[1]),
            "rho_q75": (dims, stats[2]),
            "n_weights": (("param", "bin"), count),
            "edge_low": (("param", "bin"), edges[:, :-1]),
            "edge_high": (("param", "bin"), edges[:, 1:]),
        },
        coords={"param": pnames, "bin": np.arange(B), "lag": lags, "lag_steps": ("lag", lags * every)},
        attrs={"T": T_rows, "every": every, "max_lag": lag, "window": [float(window[0]), float(window[1])],
               "detrend": detrend, "binning": binning, "unanalysed": unanalysed, **source.attrs()},
    )


def save_delta(path: str | os.PathLike[str], res: xr.Dataset, name: str = "delta") -> None:
    """Write a result of ``delta_by_magnitude`` (or ``delta_per_weight``) into the run store as the
    group ``name`` (default ``delta``)."""
    from corrtools.record.store import write_group

    out = res.copy()
    for k, v in list(out.variables.items()):  # variable-length strings: Zarr v3 has a spec for those
        if v.dtype.kind == "U":
            out[k] = v.astype(object)
    out.attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in res.attrs.items()}
    write_group(path, name, out)


def load_delta(path: str | os.PathLike[str], name: str = "delta") -> xr.Dataset:
    """Read back a result written by ``save_delta``."""
    from corrtools.record.store import read_group

    return read_group(path, name)
