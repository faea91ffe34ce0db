"""Δ on a ``dask.distributed`` cluster: the same kernel, one task per block of store chunks.

``delta_per_weight(..., scheduler=...)`` and ``corrtools delta --scheduler ADDRESS`` come here. The
selected columns are cut into the blocks the in-process path reads (whole store chunks along
``weight``, all steps of the window, at most ``max_block_bytes`` per block), each block becomes one
task, and every task runs the kernel of the in-process path on its block, so the numbers are the
same. A worker holds at most one block per thread at a time: peak memory per worker is about
``threads_per_worker x (max_block_bytes + kernel buffers of ~100 MB)``.

Workers open the store themselves: it must be reachable from them under the same path or URL (a
shared file system, or an object store such as ``s3://bucket/run.zarr``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import xarray as xr

from corrtools.errors import CorrtoolsError

__all__ = ["client_for", "chunk_for_cluster"]


@contextlib.contextmanager
def client_for(scheduler: Any) -> Iterator[Any]:
    """A ``distributed.Client`` for ``scheduler``: an address such as ``"tcp://10.0.0.5:8786"``
    (connected here, closed afterwards), a ``Client`` (used as is) or a ``LocalCluster``."""
    try:
        from distributed import Client
    except ImportError as err:
        raise CorrtoolsError(
            "scheduler=... needs dask.distributed, which is not installed; pip install corrtools[distributed]"
        ) from err
    if isinstance(scheduler, Client):
        yield scheduler
        return
    if not isinstance(scheduler, str) and not hasattr(scheduler, "scheduler_address"):
        raise CorrtoolsError(
            f"scheduler={scheduler!r} is not understood; pass an address like 'tcp://host:8786', a "
            "distributed.Client or a LocalCluster"
        )
    try:
        client = Client(scheduler, set_as_default=False)  # waits distributed.comm.timeouts.connect
    except OSError as err:
        raise CorrtoolsError(
            f"no dask scheduler answers at {scheduler!r} ({err}); start one with `dask scheduler` and "
            "pass the address it prints"
        ) from None
    try:
        yield client
    finally:
        client.close()


def chunk_for_cluster(values: xr.DataArray, cols: np.ndarray, store_chunk: int, max_block_bytes: int) -> xr.DataArray:
    """``values`` (step, weight) of the window, all columns, as a dask array whose tasks each read
    whole store chunks along ``weight`` and all steps, at most ``max_block_bytes`` per task; then
    the selected columns ``cols`` (sorted)."""
    T, N = values.shape
    per_chunk = T * store_chunk * 4
    if per_chunk <= max_block_bytes:  # whole chunks per task
        width = store_chunk * max(1, max_block_bytes // per_chunk)
    else:  # one chunk's steps exceed the budget: parts of a chunk
        width = max(1, max_block_bytes // (T * 4))
    if values.chunks is None:
        values = values.chunk({"step": -1, "weight": min(width, N)})
    else:
        values = values.chunk({"step": -1})
    if cols.size == N:
        return values
    if cols.size and cols[-1] - cols[0] + 1 == cols.size:
        return values.isel(weight=slice(int(cols[0]), int(cols[-1]) + 1))
    return values.isel(weight=cols)
