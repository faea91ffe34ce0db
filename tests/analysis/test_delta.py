"""From a store to Δ: per weight against the kernel, binned results against numpy, dask, write-back."""
from __future__ import annotations

import tracemalloc

import dask
import numpy as np
import pytest

from corrtools.analysis.correlation import decorrelation_time
from corrtools.analysis.delta import (
    delta_by_magnitude,
    delta_per_weight,
    load_delta,
    rho_by_magnitude,
    save_delta,
)
from corrtools.analysis.correlation import lagged_pearson
from corrtools.errors import CorrtoolsError
from corrtools.record.store import RunWriter, open_run

from .conftest import EVERY, T_STEPS, ar1_columns, write_store


def test_per_weight_equals_kernel(run_store) -> None:
    path, x, names = run_store
    pw = delta_per_weight(path, progress=False)
    ref, cens = decorrelation_time(x)
    np.testing.assert_allclose(pw["delta"].values, ref * EVERY)  # rows × every = optimizer steps
    np.testing.assert_array_equal(pw["censored"].values, cens)
    np.testing.assert_allclose(pw["delta_over_T"].values, ref / T_STEPS)
    assert list(pw["param"].values) == names
    assert pw.attrs["T"] == T_STEPS and pw.attrs["max_lag"] == T_STEPS // 2
    np.testing.assert_array_equal(pw["final"].values, x[-1])


def test_blocks_smaller_than_a_chunk_give_the_same_numbers(run_store) -> None:
    path, x, _ = run_store
    whole = delta_per_weight(path, progress=False)
    tiny = delta_per_weight(path, progress=False, max_block_bytes=T_STEPS * 4 * 5)  # 5 columns a block
    np.testing.assert_array_equal(tiny["delta"].values, whole["delta"].values)


def test_params_window_detrend_max_lag(run_store) -> None:
    path, x, names = run_store
    cols = [j for j, n in enumerate(names) if n in ("head.weight", "layer.a.weight")]
    pw = delta_per_weight(
        path, ["head.weight", "layer.a.weight"], window=(0.5, 1.0), detrend="linear", max_lag=40, progress=False
    )
    ref, cens = decorrelation_time(x[T_STEPS // 2 :, cols], max_lag=40, detrend="linear")
    np.testing.assert_allclose(pw["delta"].values, ref * EVERY)
    np.testing.assert_array_equal(pw["censored"].values, cens)
    assert pw.attrs["step_first"] == (T_STEPS // 2) * EVERY


def test_dask_path_gives_the_same_numbers(run_store) -> None:
    path, _, _ = run_store
    numpy_res = delta_per_weight(path, progress=False)
    with dask.config.set(scheduler="synchronous"):
        lazy = open_run(path, chunks={"weight": 7})
        assert lazy["values"].chunks is not None
        dask_res = delta_per_weight(lazy, progress=False)
    np.testing.assert_array_equal(dask_res["delta"].values, numpy_res["delta"].values)
    np.testing.assert_array_equal(dask_res["censored"].values, numpy_res["censored"].values)


def test_binned_results_match_numpy(run_store) -> None:
    path, x, names = run_store
    res = delta_by_magnitude(path, bins=4, ci=0.9, progress=False)
    assert dict(res.sizes) == {"param": 3, "bin": 4, "quantile": 201}
    pw = delta_per_weight(path, progress=False)
    for p in res["param"].values:
        sel = pw["param"].values == p
        r = res.sel(param=p)
        assert int(r["n_weights"].sum()) == sel.sum()
        mags = np.abs(pw["final"].values[sel])
        d = pw["delta"].values[sel]
        for b in range(4):
            lo, hi = float(r["edge_low"][b]), float(r["edge_high"][b])
            in_bin = (mags >= lo) & ((mags < hi) if b < 3 else (mags <= hi))
            assert r["median_delta"].values[b] == pytest.approx(np.median(d[in_bin]))
            assert r["ci_low"].values[b] <= r["median_delta"].values[b] <= r["ci_high"].values[b]
        np.testing.assert_allclose(r["median_over_T"].values, r["median_delta"].values / (T_STEPS * EVERY))


def test_write_back_as_delta_group(run_store, tmp_path) -> None:
    path, x, names = run_store
    p = write_store(tmp_path / "copy.zarr", x, names)
    res = delta_by_magnitude(p, bins=3, progress=False)
    save_delta(p, res)
    back = load_delta(p)
    np.testing.assert_allclose(back["median_delta"].values, res["median_delta"].values)
    assert list(back["param"].values) == list(res["param"].values)
    assert "delta" not in open_run(p).data_vars  # the run itself is untouched


def test_peak_memory_is_set_by_the_block_not_the_store(tmp_path) -> None:
    T, N = 256, 3000
    x, _ = ar1_columns(T, N, seed=2)
    p = write_store(tmp_path / "wide.zarr", x, ["w"] * N, chunk_steps=64, chunk_weights=100)
    store_bytes = x.nbytes  # 3 MB of float32
    del x
    tracemalloc.start()
    delta_per_weight(p, progress=False, max_block_bytes=T * 4 * 100)  # one chunk of columns at a time
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.5 * store_bytes, peak


def test_user_errors(run_store, tmp_path) -> None:
    path, x, names = run_store
    with pytest.raises(CorrtoolsError, match="did you mean 'head.weight'"):
        delta_per_weight(path, "head.weigth", progress=False)
    with pytest.raises(CorrtoolsError, match="selects 2 of"):
        delta_per_weight(path, window=(0.0, 0.01), progress=False)
    with pytest.raises(CorrtoolsError, match="start < end"):
        delta_per_weight(path, window=(0.6, 0.5), progress=False)
    with pytest.raises(CorrtoolsError, match="no run store"):
        delta_per_weight(tmp_path / "missing.zarr", progress=False)
    short = write_store(tmp_path / "short.zarr", x[:2], names)
    with pytest.raises(CorrtoolsError, match="at least 3"):
        delta_by_magnitude(short, progress=False)
    rec = tmp_path / "recording.zarr"  # never closed: final values are NaN
    w = RunWriter.create(rec, param=names, index=np.arange(len(names)), initial=x[0])
    w.write_block(np.arange(10), x[:10])
    w.abandon()
    with pytest.raises(CorrtoolsError, match="no final values.*magnitude_at='last'"):
        delta_by_magnitude(rec, progress=False, magnitude_at="final")
    with pytest.raises(CorrtoolsError, match=r"magnitude_at=11 is not a recorded step \(the run has steps 0..9\).*e.g. 9"):
        delta_by_magnitude(rec, progress=False, magnitude_at=11)
    with pytest.raises(CorrtoolsError, match="'final', 'last', 'auto' or a step"):
        delta_by_magnitude(rec, progress=False, magnitude_at="first")


def test_rho_by_magnitude_matches_kernel(run_store) -> None:
    path, x, names = run_store
    res = rho_by_magnitude(path, "layer.b.weight", bins=2, n_lags=10, progress=False)
    cols = [j for j, n in enumerate(names) if n == "layer.b.weight"]
    lags = res["lag"].values
    rho = lagged_pearson(x[:, cols].astype(np.float64), lags)  # (L, n)
    mags = np.abs(x[-1, cols])
    first = mags < float(res["edge_high"].values[0, 0])
    np.testing.assert_allclose(res["rho_median"].values[0, 0], np.median(rho[:, first], axis=1), atol=1e-5)
    assert res["lag_steps"].values[0] == lags[0] * EVERY


def test_constant_weights_are_undefined_not_warnings(tmp_path) -> None:
    import warnings

    x, _ = ar1_columns(120, 12, seed=4)
    x[:, 3] = 0.25  # a weight that never moved
    x[60:, 5] = x[59, 5]  # frozen halfway: its second window turns constant at lag 60
    p = write_store(tmp_path / "frozen.zarr", x, ["w"] * 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pw = delta_per_weight(p, progress=False)
        res = delta_by_magnitude(p, bins=2, progress=False)
    assert np.isnan(pw["delta"].values[3]) and not pw["censored"].values[3]
    ref, _ = decorrelation_time(x)
    np.testing.assert_allclose(pw["delta"].values, ref * EVERY)  # NaN in the same places
    assert int(res["undefined"].sum()) == int(np.isnan(ref).sum()) >= 1
    assert int(res["n_weights"].sum()) == 12


@pytest.mark.parametrize("budget_cols", [1, 5, 16, 40, 1000])
def test_blocks_cover_the_selection_within_budget(budget_cols) -> None:
    from corrtools.analysis.delta import _blocks

    cols = np.r_[0:10, 30:35, 100:140, 500]
    chunk, T = 16, 10
    blocks = list(_blocks(cols, chunk, T, max_block_bytes=budget_cols * T * 4))
    np.testing.assert_array_equal(np.concatenate(blocks), cols)
    for b in blocks:
        if budget_cols >= chunk:  # whole chunks, as many as fit in the budget
            n_chunks = b[-1] // chunk - b[0] // chunk + 1
            assert n_chunks <= budget_cols // chunk
        else:  # parts of a chunk, each read within the budget
            assert b[-1] - b[0] + 1 <= budget_cols


def test_sparse_selection_with_small_blocks(run_store) -> None:
    path, x, names = run_store
    sel = ["layer.a.weight", "head.weight"]  # far apart in the store
    whole = delta_per_weight(path, sel, progress=False)
    small = delta_per_weight(path, sel, progress=False, max_block_bytes=T_STEPS * 4 * 16)
    np.testing.assert_array_equal(small["delta"].values, whole["delta"].values)
    cols = [j for j, n in enumerate(names) if n in sel]
    ref, _ = decorrelation_time(x[:, cols])
    np.testing.assert_allclose(whole["delta"].values, ref * EVERY)
