"""The thread count: one place decides it, every pool follows it, results and memory do not depend on it."""
from __future__ import annotations

import doctest
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import corrtools.analysis.threads as threads_mod
from corrtools.analysis import delta as delta_mod
from corrtools.analysis import magnitude as mag_mod
from corrtools.analysis.correlation import decorrelation_time
from corrtools.analysis.delta import delta_by_magnitude, delta_per_weight, rho_by_magnitude
from corrtools.analysis.threads import available_cores, resolve_threads
from corrtools.errors import CorrtoolsError

from .test_plot_cli import _main


def test_default_is_the_affinity_mask(monkeypatch) -> None:
    if hasattr(os, "sched_getaffinity"):
        assert available_cores() == len(os.sched_getaffinity(0))
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
        assert available_cores() == 3 and resolve_threads() == 3
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # e.g. macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert available_cores() == 7 and resolve_threads(None) == 7
    assert resolve_threads(2) == 2 and resolve_threads(np.int64(5)) == 5
    assert doctest.testmod(threads_mod).failed == 0


@pytest.mark.parametrize("bad", [0, -2, 1.5, "4", True])
def test_bad_thread_counts_are_one_sentence(bad) -> None:
    with pytest.raises(CorrtoolsError, match="threads="):
        resolve_threads(bad)


def test_one_thread_inside_a_dask_distributed_worker(monkeypatch) -> None:
    class FakeDistributed:  # what distributed.get_worker does inside / outside a worker task
        inside = True

        def get_worker(self):
            if not self.inside:
                raise ValueError("No worker found")
            return object()

    fake = FakeDistributed()
    monkeypatch.setitem(__import__("sys").modules, "distributed", fake)
    monkeypatch.setattr(threads_mod, "available_cores", lambda: 16)
    assert resolve_threads() == 1 and resolve_threads(4) == 4
    fake.inside = False
    assert resolve_threads() == 16


def _spy_pools(monkeypatch) -> list[int]:
    """Record max_workers of every ThreadPoolExecutor the analysis makes."""
    sizes: list[int] = []

    class Spy(ThreadPoolExecutor):
        def __init__(self, max_workers=None, **kw):
            sizes.append(max_workers)
            super().__init__(max_workers=max_workers, **kw)

    monkeypatch.setattr(delta_mod, "ThreadPoolExecutor", Spy)
    monkeypatch.setattr(mag_mod, "ThreadPoolExecutor", Spy)
    return sizes


def test_pools_follow_threads_and_results_do_not_depend_on_it(run_store, monkeypatch) -> None:
    path, _, _ = run_store
    sizes = _spy_pools(monkeypatch)
    monkeypatch.setattr(delta_mod, "_KERNEL_BYTES", 40 * 240 * 16 * 4)  # four 16-column slices in flight
    one = delta_by_magnitude(path, bins=3, progress=False, threads=1)
    assert sizes == []  # one thread: no pool at all
    three = delta_by_magnitude(path, bins=3, progress=False, threads=3)
    assert sizes and max(sizes) == 3 and set(sizes) <= {1, 2, 3}
    for name in ("median_delta", "ci_low", "ci_high", "n_weights"):
        np.testing.assert_array_equal(three[name].values, one[name].values)
    r1 = rho_by_magnitude(path, bins=2, n_lags=6, progress=False, threads=1)
    r3 = rho_by_magnitude(path, bins=2, n_lags=6, progress=False, threads=3)
    np.testing.assert_array_equal(r3["rho_median"].values, r1["rho_median"].values)


def test_kernel_workers_follow_threads(monkeypatch) -> None:
    import scipy.fft as sfft

    seen: list[int] = []
    real = sfft.rfft

    def rfft(*a, workers=None, **kw):
        seen.append(workers)
        return real(*a, workers=workers, **kw)

    monkeypatch.setattr(sfft, "rfft", rfft)
    x = np.random.default_rng(0).standard_normal((64, 3))
    d1, _ = decorrelation_time(x, threads=1)
    d4, _ = decorrelation_time(x, threads=4)
    monkeypatch.setattr(threads_mod, "available_cores", lambda: 6)
    decorrelation_time(x)
    assert seen == [1, 4, 6]
    np.testing.assert_allclose(d4, d1)


def test_kernel_memory_is_split_among_threads(monkeypatch) -> None:
    budget = delta_mod._KERNEL_BYTES
    per_value = delta_mod._KERNEL_BYTES_PER_VALUE
    for T in (512, 8192, 65536):
        for t in (1, 2, 16, 64, 256):
            cols, run = delta_mod._slice_plan(T, t)
            assert 1 <= run <= t and cols >= delta_mod._MIN_SLICE_COLS
            assert run * cols * per_value * T <= budget or run == 1, (T, t, cols, run)
    # more threads give narrower slices, not more memory
    assert delta_mod._slice_plan(8192, 16)[0] < delta_mod._slice_plan(8192, 2)[0]
    assert delta_mod._slice_plan(65536, 64)[1] < 64  # long series on many cores: fewer threads


def test_dask_path_runs_the_kernel_on_one_thread(run_store, monkeypatch) -> None:
    import dask

    from corrtools.record.store import open_run

    path, _, _ = run_store
    sizes = _spy_pools(monkeypatch)
    calls: list[int] = []
    real = delta_mod._delta_slice

    def spy(x, max_lag, detrend, dtype, workers):
        calls.append(workers)
        return real(x, max_lag, detrend, dtype, workers)

    monkeypatch.setattr(delta_mod, "_delta_slice", spy)
    with dask.config.set(scheduler="threads", num_workers=2):
        delta_per_weight(open_run(path, chunks={"weight": 16}), progress=False, threads=8)
    assert calls and set(calls) == {1} and sizes == []  # no pool nested in dask's


def test_cli_threads_option(run_store, tmp_path, monkeypatch, capsys) -> None:
    seen: dict = {}
    real = delta_mod.delta_by_magnitude

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(delta_mod, "delta_by_magnitude", spy)
    rc = _main(monkeypatch, ["delta", str(run_store[0]), "-o", str(tmp_path / "d.png"), "--bins", "2",
                             "--threads", "2", "--no-progress"])
    assert rc == 0 and seen["threads"] == 2
    capsys.readouterr()
    rc = _main(monkeypatch, ["delta", str(run_store[0]), "-o", str(tmp_path / "d.png"), "--threads", "0",
                             "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "threads=0 must be at least 1" in err[0]
