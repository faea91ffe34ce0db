"""Following a run store while it is recorded: re-read it as it grows, reading only the new rows.

``LiveRun(path).refresh()`` reopens the store through ``open_run`` (which shows only the rows whose
commit is complete, see ``corrtools.record.store``) and returns an ``xarray.Dataset`` of the
selected parameters that the analysis functions accept. The rows already read are kept in memory, so
each refresh reads only the rows recorded since the last one, as long as the selected columns fit in
``max_bytes`` (default 512 MiB, the analysis' block budget); beyond that the Dataset returned reads
from the store, and each analysis reads every row again. Δ itself is recomputed from all rows of the
window each time: ρ at every lag depends on every row, and the window moves as the run grows.

Nothing here writes to the store or takes its writer lock: a follower never disturbs the Recorder.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import xarray as xr

__all__ = ["LiveRun"]

_MAX_BYTES = 512 << 20


class LiveRun:
    """A run store that may still be growing, re-read with ``refresh``; ``rows_read`` counts the rows
    of ``values`` read so far (each row of the selected columns once while they fit in memory)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        params: Sequence[str] | str | None = None,
        max_bytes: int = _MAX_BYTES,
    ) -> None:
        self.path = path
        self.params = params
        self.max_bytes = int(max_bytes)
        self.rows_read = 0
        self._cols: np.ndarray | None = None
        self._buf: np.ndarray | None = None  # (capacity, k) float32; rows [0, self._n) are valid
        self._n = 0

    def refresh(self) -> xr.Dataset:
        """The run as it is now: a Dataset with dims (step, weight) of the selected parameters."""
        from corrtools.analysis.delta import _select_columns
        from corrtools.record.store import open_run

        ds = open_run(self.path)
        if self._cols is None:
            self._cols = _select_columns(ds, self.params)  # unknown names fail here, once
        cols = self._cols
        n = ds.sizes["step"]
        if n * cols.size * 4 > self.max_bytes:  # too large to keep: the analysis reads the store
            self._buf, self._n = None, 0
            self.rows_read += n
            return ds.isel(weight=cols)
        if n < self._n:  # the store was replaced or trimmed: start over
            self._buf, self._n = None, 0
        if n > self._n:
            new = np.asarray(ds["values"].isel(step=slice(self._n, n), weight=cols).values, dtype=np.float32)
            self._append(new)
            self.rows_read += new.shape[0]
        values = self._buf[:n] if self._buf is not None else np.empty((0, cols.size), np.float32)
        sub = ds.isel(weight=cols)
        coords = {k: sub[k] for k in ("step", "param", "index", "initial", "final")}
        out = xr.Dataset({"values": (("step", "weight"), values)}, coords=coords, attrs=dict(ds.attrs))
        for name, var in sub.data_vars.items():  # loss, lr, ...: small, (step,)
            if name != "values" and var.dims == ("step",):
                out[name] = var
        return out

    def _append(self, rows: np.ndarray) -> None:
        """Add rows (m, k) after the valid ones, growing the buffer geometrically (amortised O(1))."""
        need = self._n + rows.shape[0]
        if self._buf is None or self._buf.shape[0] < need:
            cap = max(need, 2 * (self._buf.shape[0] if self._buf is not None else 0), 64)
            cap = min(cap, max(need, self.max_bytes // max(1, 4 * rows.shape[1])))
            grown = np.empty((cap, rows.shape[1]), dtype=np.float32)
            if self._n:
                grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : need] = rows
        self._n = need
