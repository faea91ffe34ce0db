"""Δ on a dask.distributed LocalCluster: the same numbers as in process, one task per block of store
chunks within the block budget, and the CLI's --scheduler."""
from __future__ import annotations

import json

import numpy as np
import pytest

from corrtools.analysis.cluster import chunk_for_cluster
from corrtools.analysis.delta import delta_by_magnitude, delta_per_weight
from corrtools.cli import main
from corrtools.errors import CorrtoolsError
from corrtools.record.store import open_run

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster, distributed.Client(cluster) as client:
        yield cluster, client


def test_cluster_gives_the_in_process_numbers_one_task_per_block(run_store, cluster):
    path, x, names = run_store
    local, client = cluster
    here = delta_by_magnitude(path, bins=4, n_boot=100, progress=False)
    with distributed.get_task_stream(client) as stream:
        there = delta_by_magnitude(path, bins=4, n_boot=100, progress=False, scheduler=local.scheduler_address,
                                   max_block_bytes=40_000)
    for name in here.data_vars:
        np.testing.assert_array_equal(there[name].values, here[name].values, err_msg=name)
    assert there.attrs == here.attrs
    kernel = [t for t in stream.data if t["key"][0].startswith("delta_rows-")]  # the kernel's own tasks
    # 90 columns in store chunks of 16, T = 240 float32 rows: 2 chunks (30 720 B) fit 40 000 B
    assert len(kernel) == 3 and {t["worker"] for t in kernel} == set(local.scheduler_info["workers"])


@pytest.mark.parametrize("budget, width", [(40_000, 32), (200_000, 208), (8_000, 8)])
def test_tasks_read_whole_store_chunks_within_the_budget(run_store, budget, width):
    path, x, names = run_store
    values = open_run(path)["values"]
    T = values.shape[0]
    cols = np.arange(values.shape[1])
    chunked = chunk_for_cluster(values, cols, 16, budget).data
    widths = chunked.chunks[1]
    assert chunked.chunks[0] == (T,)  # all steps of a column in one task
    assert widths[0] == min(width, values.shape[1]) and all(w <= widths[0] for w in widths)
    assert max(widths) * T * 4 <= budget
    if width >= 16:
        assert all(b % 16 == 0 for b in np.cumsum(widths)[:-1])  # task edges on store chunk edges


def test_selection_window_and_small_blocks_on_the_cluster(run_store, cluster):
    path, x, names = run_store
    local, _ = cluster
    kw = dict(params=["layer.b.weight", "head.weight"], window=(0.25, 1.0), detrend="linear", max_lag=40,
              progress=False, max_block_bytes=3_000)
    here = delta_per_weight(path, **kw)
    there = delta_per_weight(path, scheduler=local.scheduler_address, **kw)
    for name in ("delta", "censored", "param", "index"):
        np.testing.assert_array_equal(there[name].values, here[name].values, err_msg=name)


def test_cli_scheduler(run_store, cluster, tmp_path, capsys):
    path, _, _ = run_store
    local, _ = cluster
    args = ["delta", str(path), "--json", "--no-progress", "--bins", "3"]
    assert main([*args, "-o", str(tmp_path / "a.png")]) == 0
    here = json.loads(capsys.readouterr().out)
    assert main([*args, "-o", str(tmp_path / "b.png"), "--scheduler", local.scheduler_address]) == 0
    there = json.loads(capsys.readouterr().out)
    assert there == here


def test_a_scheduler_that_is_not_there(run_store):
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), \
            pytest.raises(CorrtoolsError, match="no dask scheduler answers at 'tcp://127.0.0.1:1'"):
        delta_per_weight(run_store[0], progress=False, scheduler="tcp://127.0.0.1:1")
    with pytest.raises(CorrtoolsError, match="scheduler=3 is not understood"):
        delta_per_weight(run_store[0], progress=False, scheduler=3)
