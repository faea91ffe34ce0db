"""The writer thread's CPU class: SCHED_IDLE while it keeps up, a nice-10 writer once training
would wait for it (issue 9, tenth pass)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

import corrtools.record.recorder as recorder_mod
from corrtools import Recorder, open_run
from tests.record.test_recorder import _expected_row, _Net, _train

linux_idle = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")


@linux_idle
def test_writer_runs_idle_class_while_it_keeps_up(tmp_path):
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(model, tmp_path / "r.zarr", sample=8).attach(opt) as rec:
        _train(model, opt, 5, rec)
        rec.flush()  # the training thread waits: not a sign of a writer that falls behind
        assert rec._writer_idle
        assert os.sched_getscheduler(rec._thread.native_id) == os.SCHED_IDLE
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the training thread keeps its class
        assert not rec._writer_promoted.is_set()


class _StalledWriter(Recorder):
    """A writer that gets no CPU for its first block until ``gate`` opens (a starved idle thread)."""

    gate: threading.Event

    def _write_block(self, block, lo, hi, event):
        self.gate.wait(timeout=30)
        super()._write_block(block, lo, hi, event)


@linux_idle
@pytest.mark.parametrize("queue_blocks", [1, 3])
def test_a_writer_that_falls_behind_is_replaced_and_every_row_arrives_in_order(tmp_path, queue_blocks):
    model = _Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rec = _StalledWriter(model, tmp_path / "r.zarr", sample=20, chunk_steps=2, queue_blocks=queue_blocks)
    rec.gate = threading.Event()
    opener = threading.Timer(0.5, rec.gate.set)  # the ring runs full well before
    opener.start()
    rec.attach(opt)
    for _ in range(500):  # the writer thread sets its class as it starts
        if rec._writer_idle:
            break
        time.sleep(0.01)
    copies, _ = _train(model, opt, 40, rec)
    assert rec.gate.is_set()  # training had to wait for the stalled writer
    assert rec._writer_promoted.is_set()
    promoted = rec._thread
    assert promoted.is_alive()
    assert os.sched_getscheduler(promoted.native_id) == os.SCHED_OTHER
    assert os.getpriority(os.PRIO_PROCESS, promoted.native_id) >= 10
    rec.close()
    opener.join()
    assert not promoted.is_alive()
    ds = open_run(tmp_path / "r.zarr")
    np.testing.assert_array_equal(ds["step"].values, np.arange(1, 41))
    for r, s in enumerate(ds["step"].values):
        np.testing.assert_array_equal(ds["values"].values[r], _expected_row(ds, copies[s]))
    assert ds.attrs["status"] == "complete"


def test_nice_fallback_where_idle_is_refused(tmp_path, monkeypatch):
    """Without SCHED_IDLE (other systems, or refused) the writer runs at nice 10 and is never replaced."""

    def refuse(*args):
        raise PermissionError("sched_setscheduler refused")

    monkeypatch.setattr(recorder_mod.os, "sched_setscheduler", refuse, raising=False)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = _StalledWriter(model, tmp_path / "r.zarr", sample=8, chunk_steps=2, queue_blocks=1)
    rec.gate = threading.Event()
    opener = threading.Timer(0.3, rec.gate.set)
    opener.start()
    rec.attach(opt)
    first = rec._thread
    _train(model, opt, 20, rec)
    assert not rec._writer_idle and not rec._writer_promoted.is_set() and rec._thread is first
    if hasattr(os, "getpriority"):
        assert os.getpriority(os.PRIO_PROCESS, first.native_id) >= 10
    rec.close()
    opener.join()
    assert open_run(tmp_path / "r.zarr")["step"].size == 20
