"""The run store's optional `z (step,)`: the RESET interval in effect, written by Recorder.log_z."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from corrtools import Recorder, open_run
from corrtools.errors import CorrtoolsError
from corrtools.record.store import z_for_rows


def _steps(model, opt, n, rec=None, changes=()):
    """n optimizer steps; ``changes`` maps a step to the z logged right after it."""
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        model(torch.randn(2, 4, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if rec is not None and rec.step in dict(changes):
            rec.log_z(dict(changes)[rec.step])


def test_z_for_rows() -> None:
    out = z_for_rows(np.array([1, 2, 3, 4, 5]), [(2, 10.0), (4, math.nan), (5, 7.0)])
    np.testing.assert_array_equal(out, [np.nan, 10, 10, np.nan, 7])


@pytest.mark.parametrize("every, chunk_steps", [(1, 4), (3, 2)])
def test_logged_z_lands_on_the_rows_from_its_step(tmp_path, every, chunk_steps) -> None:
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.zarr"
    with Recorder(model, path, sample=3, every=every, chunk_steps=chunk_steps).attach(opt) as rec:
        rec.log_z(None, step=1)
        _steps(model, opt, 20, rec, changes={5: 16, 11: 32, 17: None})
    ds = open_run(path)
    steps = ds["step"].values
    expect = np.where(steps >= 17, np.nan, np.where(steps >= 11, 32, np.where(steps >= 5, 16, np.nan)))
    np.testing.assert_array_equal(ds["z"].values, expect.astype(np.float32))
    assert ds["z"].dims == ("step",)


def test_no_z_logged_no_z_array(tmp_path) -> None:
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(model, tmp_path / "run.zarr", sample=3).attach(opt):
        _steps(model, opt, 3)
    assert "z" not in open_run(tmp_path / "run.zarr")


def test_z_for_a_written_row_is_refused(tmp_path) -> None:
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(model, tmp_path / "run.zarr", sample=3, chunk_steps=2).attach(opt) as rec:
        _steps(model, opt, 5)  # rows 1-2 and 3-4 handed to the writer, row 5 in the open block
        rec.log_z(8, step=5)
        with pytest.raises(CorrtoolsError, match="z for step 4 comes too late"):
            rec.log_z(8, step=4)
