"""Recorder.flush and store.truncate_run: what the framework callbacks rely on for checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from corrtools import Recorder, open_run
from corrtools.errors import CorrtoolsError
from corrtools.record.store import truncate_run


def _run(path, steps, chunk_steps=8, rec=None):
    """Take `steps` rows of a model whose weights are set to the step number; returns the recorder."""
    if rec is None:
        rec = Recorder(torch.nn.Linear(4, 3), path, sample=12, chunk_steps=chunk_steps)
    model = rec.model
    for _ in range(steps):
        with torch.no_grad():
            model.weight.fill_(rec.step + 1)
        rec.record(loss=float(rec.step + 1))
    return rec


def test_flush_writes_the_rows_taken_so_far(tmp_path):
    path = tmp_path / "run.zarr"
    rec = _run(path, 3)
    assert open_run(path).sizes["step"] == 0  # rows wait for a whole block
    rec.flush()
    ds = open_run(path)
    np.testing.assert_array_equal(ds["step"].values, [1, 2, 3])
    np.testing.assert_array_equal(ds["loss"].values, [1, 2, 3])
    assert ds.attrs["status"] == "recording"
    with pytest.raises(CorrtoolsError, match="too late"):
        rec.log(loss=9.0, step=3)
    # 5 more rows fill the first chunk (8 rows): the block is handed over at the next row, and the
    # rows written through zarr complete the chunk the flush began
    _run(path, 6, rec=rec)
    rec._wait_writer()
    assert open_run(path).sizes["step"] == 8
    rec.close()
    ds = open_run(path)
    np.testing.assert_array_equal(ds["step"].values, np.arange(1, 10))
    weight_cols = ds["param"].values == "weight"
    np.testing.assert_array_equal(ds["values"].values[:, weight_cols], np.repeat(np.arange(1, 10.0), weight_cols.sum()).reshape(9, -1))


def test_truncate_run_drops_later_rows_and_a_resume_continues(tmp_path):
    path = tmp_path / "run.zarr"
    _run(path, 10, chunk_steps=4).close()
    assert truncate_run(path, 10) == 0 and open_run(path).attrs["status"] == "complete"
    assert truncate_run(path, 6) == 4
    ds = open_run(path)
    np.testing.assert_array_equal(ds["step"].values, np.arange(1, 7))
    np.testing.assert_array_equal(ds["loss"].values, np.arange(1, 7))
    assert ds.attrs["status"] == "recording" and "total_steps" not in ds.attrs
    assert np.isnan(ds["final"].values).all()
    model = torch.nn.Linear(4, 3)
    rec = Recorder(model, path, sample=12, resume=True, start_step=6)
    _run(path, 3, rec=rec).close()
    ds = open_run(path)
    np.testing.assert_array_equal(ds["step"].values, np.arange(1, 10))
    np.testing.assert_array_equal(ds["loss"].values, np.arange(1, 10))
    assert ds.attrs["status"] == "complete"
