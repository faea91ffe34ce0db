"""The Recorder: values against an independent copy of the weights, steps, loss/lr, reliability."""
from __future__ import annotations

import argparse
import doctest
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import corrtools.record.recorder as recorder_mod
from corrtools import Recorder, open_run
from corrtools.commands import info as info_cmd
from corrtools.errors import CorrtoolsError
from corrtools.record.store import RunWriter, run_info

REPO = Path(__file__).resolve().parents[2]


class _Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12).to(dtype)
        self.fc2 = nn.Linear(12, 3).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _train(model, opt, steps, rec=None, sched=None, seed=0):
    """Train and return {step: {name: tensor copy}} and the losses, both after each step."""
    gen = torch.Generator().manual_seed(seed)
    copies, losses = {0: _snapshot(model)}, {}
    for _ in range(steps):
        x = torch.randn(4, 6, generator=gen)
        loss = model(x.to(model.fc1.weight.dtype)).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        step = len(copies)
        if rec is not None:
            rec.log(loss=loss.item())
        if sched is not None:
            sched.step()
        copies[step] = _snapshot(model)
        losses[step] = loss.item()
    return copies, losses


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _expected_row(ds, copy) -> np.ndarray:
    return np.array([copy[n].flatten()[i].float().item() for n, i in zip(ds["param"].values, ds["index"].values)],
                    dtype=np.float32)


def _info_text(path) -> str:
    parser = argparse.ArgumentParser()
    info_cmd.add_parser(parser.add_subparsers())
    return info_cmd.format_info(run_info(parser.parse_args(["info", str(path)]).path))


def test_docstring_example_runs():
    result = doctest.testmod(recorder_mod, raise_on_error=True)
    assert result.attempted >= 6


@pytest.mark.parametrize("blocks", ["one chunk", "three chunks"])
@pytest.mark.parametrize("row_views", ["kept", "made per row"])
@pytest.mark.parametrize("layout", ["strided", "runs", "uniform"])
def test_values_equal_an_independent_copy_of_the_weights(tmp_path, monkeypatch, layout, row_views, blocks):
    if row_views == "made per row":  # the fallback for blocks with many rows x pieces
        monkeypatch.setattr(recorder_mod, "_MAX_ROW_VIEWS", 0)
    kw: dict = {"chunk_steps": 3}
    if blocks == "three chunks":  # the default chunking, made small: blocks of 3 chunks of 3 rows
        monkeypatch.setattr(recorder_mod, "default_chunks", lambda n: (3, n))
        monkeypatch.setattr(recorder_mod, "_MAX_BLOCK_ROWS", 9)
        kw = {}
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    with Recorder(model, tmp_path / "r.zarr", sample=20, every=2, layout=layout, **kw).attach(opt) as rec:
        assert (rec.chunk_steps, rec.block_steps) == ((3, 9) if blocks == "three chunks" else (3, 3))
        copies, losses = _train(model, opt, 17, rec, sched)
    ds = open_run(tmp_path / "r.zarr")
    np.testing.assert_array_equal(ds["step"].values, np.arange(2, 18, 2))
    # fc1 (72 weights): 20 single weights, or 2 runs of 16; fc2 (36): 20, or 2 runs (the last one 4 long);
    # strided: fc1 every 2nd of its 5 runs (16, 16, 16, 16, 8) from run 0 or 1, fc2 all 3 (stride 1)
    widths = {"uniform": (40,), "runs": (64, 52), "strided": (40 + 36, 32 + 36)}[layout]
    assert ds["values"].shape[0] == 8 and ds["values"].shape[1] in widths and ds["values"].dtype == np.float32
    assert ds.attrs["layout"] == layout and ds.attrs["run"] == (1 if layout == "uniform" else 16)
    for r, s in enumerate(ds["step"].values):
        np.testing.assert_array_equal(ds["values"].values[r], _expected_row(ds, copies[s]))
    np.testing.assert_array_equal(ds["initial"].values, _expected_row(ds, copies[0]))
    np.testing.assert_array_equal(ds["final"].values, _expected_row(ds, copies[17]))
    # loss of a row: mean of the losses of the steps since the previous row
    expect_loss = [np.float32((losses[s - 1] + losses[s]) / 2) for s in ds["step"].values]
    np.testing.assert_allclose(ds["loss"].values, expect_loss, rtol=1e-6)
    # lr: the rate used by that step (StepLR halves after every 4 steps)
    np.testing.assert_allclose(ds["lr"].values, [1e-2 * 0.5 ** ((s - 1) // 4) for s in ds["step"].values])
    assert ds.attrs["status"] == "complete" and ds.attrs["total_steps"] == 17
    assert ds.attrs["every"] == 2 and ds.attrs["sample"] == 20 and ds.attrs["optimizer"] == "AdamW"
    assert ds.attrs["torch_version"] == torch.__version__
    assert set(ds["param"].values) == {"fc1.weight", "fc2.weight"}


def test_with_the_builtin_workload(tmp_path):
    from corrtools.workloads import CharLMConfig, CharLMWorkload

    wl = CharLMWorkload(CharLMConfig(d_model=16, n_layer=1, n_head=2, seq_len=8, batch_size=2, steps=6,
                                     text_bytes=20_000))
    with Recorder(wl.model, tmp_path / "w.zarr", sample=100, seed=1).attach(wl.optimizer) as rec:
        for _ in range(6):
            rec.log(loss=wl.train_step())  # train_step returns after optimizer.step()
    ds = open_run(tmp_path / "w.zarr")
    assert ds.sizes["step"] == 6 and not np.isnan(ds["loss"].values).any()
    params = dict(wl.model.named_parameters())
    np.testing.assert_array_equal(
        ds["final"].values,
        [params[n].detach().flatten()[i].item() for n, i in zip(ds["param"].values, ds["index"].values)],
    )
    np.testing.assert_array_equal(ds["values"].values[-1], ds["final"].values)


def test_manual_record_and_loss_rules(tmp_path):
    model = _Net()
    rec = Recorder(model, tmp_path / "m.zarr", sample=5, every=2, chunk_steps=2)
    rec.record(loss=1.0)          # step 1: not a row; loss pending
    rec.record(loss=3.0)          # step 2: row, loss mean(1, 3)
    rec.log(loss=5.0)             # after step 2: joins row 2 -> mean(1, 3, 5)
    rec.record(step=6)            # steps 3..5 skipped: a visible gap
    rec.log(loss=7.0, step=5)     # before row 6: belongs to it
    with pytest.raises(CorrtoolsError, match="not after the last counted step 6"):
        rec.record(step=6)
    rec.record()                  # step 7
    rec.record(step=8)
    rec.record(step=10)           # rows 2 (block 1), 6, 8 (block 2 handed over), 10
    with pytest.raises(CorrtoolsError, match="too late"):
        rec.log(loss=1.0, step=4)
    with pytest.raises(CorrtoolsError, match="already"):
        rec.attach(torch.optim.SGD(model.parameters(), lr=0.1)).record()
    rec.detach()
    rec.close()
    rec.close()  # idempotent
    ds = open_run(tmp_path / "m.zarr")
    np.testing.assert_array_equal(ds["step"].values, [2, 6, 8, 10])
    np.testing.assert_array_equal(ds["loss"].values, [3.0, 7.0, np.nan, np.nan])
    assert "lr" not in ds or np.isnan(ds["lr"].values).all()
    assert ds.attrs["total_steps"] == 10
    with pytest.raises(CorrtoolsError, match="closed"):
        rec.record()


def test_nan_inf_half_precision_and_skipped_params(tmp_path):
    model = _Net(dtype=torch.bfloat16)
    model.fc1.weight.data[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    model.half_extra = nn.Parameter(torch.randn(3, 3, dtype=torch.float16))
    model.counts = nn.Parameter(torch.arange(9).reshape(3, 3), requires_grad=False)
    names = ["fc1.weight", "half_extra", "counts"]
    with Recorder(model, tmp_path / "h.zarr", sample=1000, params=names) as rec:
        for _ in range(3):
            with torch.no_grad():
                model.half_extra.add_(0.125)
            rec.record()
    ds = open_run(tmp_path / "h.zarr")
    assert ds["values"].dtype == np.float32
    assert set(ds["param"].values) == {"fc1.weight", "half_extra"}
    assert ds.attrs["skipped_params"] == ["counts"]
    assert any("counts" in n for n in ds.attrs["notes"])
    assert any("sample 1000 > numel 72 of 'fc1.weight'" in n for n in ds.attrs["notes"])
    row = ds["values"].values[-1]
    np.testing.assert_array_equal(row, _expected_row(ds, _snapshot(model)))  # bf16/fp16 widened exactly
    first = np.nonzero(ds["param"].values == "fc1.weight")[0][:3]
    assert np.isnan(row[first[0]]) and row[first[1]] == np.inf and row[first[2]] == -np.inf


def test_unknown_param_is_an_error_naming_close_matches(tmp_path):
    with pytest.raises(CorrtoolsError, match=r"'fc1.wieght'.*did you mean 'fc1.weight'"):
        Recorder(_Net(), tmp_path / "x.zarr", params=["fc1.wieght"])
    assert not (tmp_path / "x.zarr").exists()


def test_existing_store_needs_resume_or_overwrite(tmp_path):
    p = tmp_path / "r.zarr"
    Recorder(_Net(), p, sample=4).close()
    with pytest.raises(CorrtoolsError, match="already exists.*overwrite=True.*resume=True"):
        Recorder(_Net(), p, sample=4)
    Recorder(_Net(), p, sample=4, overwrite=True).close()
    with pytest.raises(CorrtoolsError, match="exclude"):
        Recorder(_Net(), p, resume=True, overwrite=True)


def test_second_recorder_is_refused_while_recording(tmp_path):
    p = tmp_path / "r.zarr"
    model = _Net()
    first = Recorder(model, p, sample=4)
    with pytest.raises(CorrtoolsError, match="being recorded by pid"):
        Recorder(model, p, sample=4, resume=True)
    with pytest.raises(CorrtoolsError, match="being recorded"):
        Recorder(model, p, sample=4, overwrite=True)
    assert "being written by pid" in _info_text(p)
    first.record()
    first.close()
    Recorder(model, p, sample=4, resume=True).close()


@pytest.mark.parametrize("layout", ["runs", "uniform"])
def test_resume_without_a_layout_keeps_the_stores_own(tmp_path, layout):
    """A store recorded with another layout than today's default resumes with its own when none is
    given, drawing the same weights (not an error, not the default's other weights)."""
    p = tmp_path / "l.zarr"
    model = _Net()
    with Recorder(model, p, sample=10, layout=layout) as rec:
        rec.record()
    index = open_run(p)["index"].values
    with Recorder(model, p, sample=10, resume=True) as rec:
        assert rec.layout == layout
        rec.record()
    ds = open_run(p)
    assert ds.attrs["layout"] == layout and ds.sizes["step"] == 2
    np.testing.assert_array_equal(ds["index"].values, index)


def test_resume_continues_without_duplicates(tmp_path, monkeypatch):
    p = tmp_path / "r.zarr"
    torch.manual_seed(0)
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Recorder(model, p, sample=10, chunk_steps=4).attach(opt) as rec:
        copies, _ = _train(model, opt, 6, rec)
    with pytest.raises(CorrtoolsError, match="other weights"):
        Recorder(model, p, sample=20, resume=True)
    with pytest.raises(CorrtoolsError, match="recorded with layout='strided'; resume with layout='strided'"):
        Recorder(model, p, sample=10, resume=True, layout="uniform")
    with pytest.raises(CorrtoolsError, match="every=1"):
        Recorder(model, p, sample=10, every=2, resume=True)
    with pytest.raises(CorrtoolsError, match="start_step=3 is before"):
        Recorder(model, p, sample=10, resume=True, start_step=3)
    starts = []  # store row of each block written after the resume
    real_write = RunWriter.write_block
    monkeypatch.setattr(RunWriter, "write_block", lambda w, *a, **k: starts.append(w.n_steps) or real_write(w, *a, **k))
    monkeypatch.setattr(recorder_mod, "_MAX_BLOCK_ROWS", 8)  # default blocks: 2 chunks of the store's 4 rows
    with Recorder(model, p, sample=10, resume=True).attach(opt) as rec:
        assert rec.step == 6 and (rec.chunk_steps, rec.block_steps) == (4, 8)
        more, _ = _train(model, opt, 11, rec, seed=1)
    monkeypatch.undo()
    # a short first block (rows 6-11: 2 through zarr, then one whole chunk), so that later ones
    # start on chunk boundaries
    assert starts == [6, 12]
    ds = open_run(p)
    np.testing.assert_array_equal(ds["step"].values, np.arange(1, 18))
    for r, s in enumerate(ds["step"].values):
        copy = copies[s] if s <= 6 else more[s - 6]
        np.testing.assert_array_equal(ds["values"].values[r], _expected_row(ds, copy))
    np.testing.assert_array_equal(ds["initial"].values, _expected_row(ds, copies[0]))
    np.testing.assert_array_equal(ds["final"].values, _expected_row(ds, more[11]))
    assert ds.attrs["resumed"] == [6] and ds.attrs["total_steps"] == 17


_KILLED = textwrap.dedent(
    """
    import sys, torch
    from corrtools import Recorder
    torch.manual_seed(0)
    model = torch.nn.Linear(50, 40)
    base = model.weight.detach().clone()
    rec = Recorder(model, sys.argv[1], sample=500, chunk_steps=4)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            model.weight.copy_(base + step)  # a known value at every step
        rec.record()
        if step == 9:
            print("ready", flush=True)
    """
)


def test_sigkill_mid_recording_leaves_an_openable_resumable_store(tmp_path):
    p = tmp_path / "k.zarr"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(p)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    ds = open_run(p)
    n = ds.sizes["step"]
    assert n >= 4 and n % 4 == 0  # whole blocks only
    np.testing.assert_array_equal(ds["step"].values, np.arange(1, n + 1))
    torch.manual_seed(0)
    model = nn.Linear(50, 40)
    base = model.weight.detach().clone()
    base_cols = base.flatten()[torch.as_tensor(ds["index"].values)].numpy()
    np.testing.assert_array_equal(ds["values"].values, base_cols + np.arange(1, n + 1, dtype=np.float32)[:, None])
    text = _info_text(p)
    assert "status      recording (no writer" in text and f"steps       {n} recorded, steps 1..{n}" in text
    # resume from a "checkpoint" later than the last written row: the gap stays visible
    rec = Recorder(model, p, sample=500, resume=True, start_step=n + 3)
    rec.record()
    rec.close()
    ds = open_run(p)
    assert ds["step"].values[-2:].tolist() == [n, n + 4]


def test_writer_errors_surface_at_the_next_call(tmp_path, monkeypatch):
    def broken(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(RunWriter, "write_block", broken)
    rec = Recorder(_Net(), tmp_path / "e.zarr", sample=4, chunk_steps=2)
    with pytest.raises(RuntimeError, match="disk full"):
        for _ in range(200):  # the first block goes to the writer at row 3
            rec.record()
            time.sleep(0.005)
    rec.close()  # already reported: releases the store without marking it complete
    monkeypatch.undo()
    assert run_info(tmp_path / "e.zarr")["status"] == "recording"
    rec2 = Recorder(_Net(), tmp_path / "e2.zarr", sample=4, chunk_steps=2)
    monkeypatch.setattr(RunWriter, "write_block", broken)
    rec2.record()
    with pytest.raises(RuntimeError, match="disk full"):
        rec2.close()  # the partial block fails on close: reported there


def test_exception_in_the_loop_keeps_rows_and_leaves_store_resumable(tmp_path):
    p = tmp_path / "x.zarr"
    with pytest.raises(ZeroDivisionError):
        with Recorder(_Net(), p, sample=4, chunk_steps=2) as rec:
            for _ in range(3):
                rec.record()
            1 / 0
    ds = open_run(p)
    assert ds.sizes["step"] == 3 and ds.attrs["status"] == "recording"
    Recorder(_Net(), p, sample=4, resume=True).close()
    assert open_run(p).attrs["status"] == "complete"


def test_memory_is_a_fixed_ring_of_blocks(tmp_path):
    rec = Recorder(_Net(), tmp_path / "m.zarr", sample=4, chunk_steps=2, queue_blocks=1)
    seen = set()
    for _ in range(40):
        rec.record()
        seen.add(id(rec._current))
    rec.close()
    assert len(seen) <= 3


@pytest.mark.parametrize("n_weights, rows, block_rows", [(1_000, 1024, 4096), (10_000, 128, 384),
                                                       (100_000, 73, 73), (1_000_000, 8, 8)])
def test_default_blocks_keep_the_natural_chunks_up_to_32_mib(tmp_path, n_weights, rows, block_rows):
    """Chunks keep the store's ~4 MiB height (1024 rows at 10^3 weights, 73 at 10^5) unless one
    chunk of host block would be over 32 MiB (10^6 weights: 65 natural rows, capped at the minimum
    of 8); one chunk wide, their height fills whole pages if that is within 2x (10^4 weights: 104
    -> 128 rows); a host block is as many whole chunks as fit in 16 MiB, at most 4096 rows (10^4
    weights: 3 chunks). Issue 9: a 16 MiB cap on chunks made 10^5 weights 41 rows and the writer
    create 78% more files per row; one-chunk blocks at 10^4 cost the writer 25 µs of CPU per row
    under training, four-chunk blocks 15."""
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(n_weights // 16, 16))
    rec = Recorder(model, tmp_path / "b.zarr", sample=n_weights, flush_every=None)
    try:
        assert (rec.chunk_steps, rec.block_steps) == (rows, block_rows)
        assert rec.chunk_steps * n_weights * 4 <= 32 << 20
    finally:
        rec.close()
    assert open_run(tmp_path / "b.zarr")["values"].encoding["chunks"][0] == rows


def test_every_chunk_of_a_default_block_one_chunk_wide_is_written_from_the_block(tmp_path):
    """10^4 weights: blocks of 3 chunks of 128 rows (whole pages each, so every chunk of a block
    starts on a page), all written without the staging copy; with the old 104-row chunks the 2nd
    and later chunks of a block started mid-page and were staged."""
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(625, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(model, tmp_path / "p.zarr", sample=10_000, flush_every=None).attach(opt)
    direct = rec._writer._direct
    direct._staged.fill(123.0)  # poisoned: untouched unless a chunk is staged
    expect = []
    for step in range(2 * rec.block_steps):
        model.w.grad = torch.full_like(model.w, 0.01 * (step % 7 + 1))
        opt.step()
        expect.append(model.w.detach().flatten().clone())
    rec._wait_writer()
    assert bool((direct._staged == 123.0).all())
    rec.close()
    ds = open_run(tmp_path / "p.zarr")
    assert ds["values"].encoding["chunks"][0] == 128 and rec.block_steps == 384
    np.testing.assert_array_equal(ds["values"].values, torch.stack(expect).numpy()[:, ds["index"].values])


def test_blocks_are_one_chunk_for_a_given_chunk_steps_or_many_pieces(tmp_path):
    """An explicit ``chunk_steps`` is the block height (as documented); with the default, a block
    stays one chunk when more chunks would need more than 4096 ready-made row views (rows x
    pieces): 40 parameters of 256 sampled weights each (chunks of 102 rows) keep blocks of 102 rows."""
    one = nn.Module()
    one.w = nn.Parameter(torch.zeros(625, 16))
    with Recorder(one, tmp_path / "a.zarr", sample=10_000, chunk_steps=104) as rec:
        assert (rec.chunk_steps, rec.block_steps) == (104, 104)
    many = nn.Module()
    for i in range(40):
        many.register_parameter(f"w{i}", nn.Parameter(torch.zeros(32, 16)))
    with Recorder(many, tmp_path / "b.zarr", sample=256) as rec:
        assert rec.n_weights == 10_240 and len(rec._groups[0].entries) == 40
        assert (rec.chunk_steps, rec.block_steps) == (102, 102)


def test_zarr_low_level_reads_the_recorded_store(tmp_path):
    model = _Net()
    with Recorder(model, tmp_path / "z.zarr", sample=7, layout="uniform") as rec:
        for _ in range(5):
            rec.record()
    values = zarr.open_array(str(tmp_path / "z.zarr" / "values"), mode="r")
    assert values.metadata.zarr_format == 3 and values.shape == (5, 14)
    assert tuple(values.metadata.dimension_names) == ("step", "weight")
    np.testing.assert_array_equal(values[:], open_run(tmp_path / "z.zarr")["values"].values)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "z.zarr" / "step"), mode="r")[:], np.arange(1, 6))


def test_bad_arguments(tmp_path):
    with pytest.raises(CorrtoolsError, match="every"):
        Recorder(_Net(), tmp_path / "a.zarr", every=0)
    with pytest.raises(CorrtoolsError, match="start_step"):
        Recorder(_Net(), tmp_path / "a.zarr", start_step=4)
    assert math.isnan(float("nan"))


def test_non_contiguous_parameters_use_logical_flat_order(tmp_path):
    model = nn.Module()
    model.w = nn.Parameter(torch.randn(6, 5).t())  # (5, 6), non-contiguous
    assert not model.w.is_contiguous()
    with Recorder(model, tmp_path / "t.zarr", sample=12) as rec:
        rec.record()
    ds = open_run(tmp_path / "t.zarr")
    np.testing.assert_array_equal(ds["values"].values[0], model.w.detach().flatten()[ds["index"].values].numpy())


def test_device_buffer_path_gives_the_same_values(tmp_path, monkeypatch):
    """The CUDA path (gather into one device buffer, one copy to the host row) run on CPU."""
    monkeypatch.setattr(Recorder, "_stage_on_cpu", True)
    torch.manual_seed(0)
    model = _Net(dtype=torch.float16)
    model.extra = nn.Parameter(torch.randn(4, 4))  # float32 next to float16 columns
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(model, tmp_path / "s.zarr", sample=9, chunk_steps=2).attach(opt) as rec:
        assert all(g.staging is not None for g in rec._groups)
        copies, _ = _train(model, opt, 5, rec)
    ds = open_run(tmp_path / "s.zarr")
    for r, s in enumerate(ds["step"].values):
        np.testing.assert_array_equal(ds["values"].values[r], _expected_row(ds, copies[s]))


def test_attach_after_close_is_an_error(tmp_path):
    model = _Net()
    rec = Recorder(model, tmp_path / "c.zarr", sample=3)
    rec.close()
    with pytest.raises(CorrtoolsError, match="closed"):
        rec.attach(torch.optim.SGD(model.parameters(), lr=0.1))


def test_info_command_json_and_errors(tmp_path, capsys):
    import json

    with Recorder(_Net(), tmp_path / "i.zarr", sample=16) as rec:
        rec.record()
    parser = argparse.ArgumentParser()
    info_cmd.add_parser(parser.add_subparsers())
    assert info_cmd.run(parser.parse_args(["info", str(tmp_path / "i.zarr"), "--json"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "complete" and out["params"] == {"fc1.weight": 16, "fc2.weight": 16}
    assert info_cmd.run(parser.parse_args(["info", str(tmp_path / "i.zarr")])) == 0
    text = capsys.readouterr().out
    assert "status      complete" in text and "steps       1 recorded, steps 1..1" in text
    with pytest.raises(CorrtoolsError, match="no run store"):
        info_cmd.run(parser.parse_args(["info", str(tmp_path / "nope.zarr")]))


def test_failed_start_releases_the_store(tmp_path, monkeypatch):
    def boom(self, pin):
        raise MemoryError("no room for blocks")

    monkeypatch.setattr(Recorder, "_new_block", boom)
    with pytest.raises(MemoryError):
        Recorder(_Net(), tmp_path / "f.zarr", sample=3)
    assert run_info(tmp_path / "f.zarr")["writer"] is None


def test_auto_compressor_is_none_for_cpu_parameters_and_explicit_choice_wins(tmp_path):
    import json

    model = torch.nn.Linear(16, 8)

    def codecs(path):
        meta = json.loads((path / "values" / "zarr.json").read_text())
        return [c["name"] for c in meta["codecs"]]

    Recorder(model, tmp_path / "auto.zarr", sample=8).close()
    Recorder(model, tmp_path / "lz4.zarr", sample=8, compressor="lz4").close()
    assert codecs(tmp_path / "auto.zarr") == ["bytes", "crc32c"]
    assert codecs(tmp_path / "lz4.zarr") == ["bytes", "blosc", "crc32c"]


def _flat(p: torch.Tensor, index: np.ndarray) -> np.ndarray:
    return p.detach().flatten()[torch.as_tensor(index)].float().numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("contiguous", [True, False])
def test_run_gather_equals_flat_indexing_also_with_a_short_last_run(tmp_path, dtype, contiguous):
    """Runs are gathered as rows of a (numel // 16, 16) view, a short last run by flat indices: both
    must give p.flatten()[index], in column order (checked against plain flat indexing)."""
    from corrtools.record.sampling import sample_indices

    numel = 40  # runs [0, 16), [16, 32) and the short [32, 40)
    seed = next(s for s in range(100) if 39 in sample_indices(numel, 32, s, "w", layout="runs"))
    model = nn.Module()
    model.w = nn.Parameter(torch.randn(8, 5, dtype=dtype) if contiguous else torch.randn(5, 8, dtype=dtype).t())
    model.v = nn.Parameter(torch.randn(48, 2, dtype=dtype))  # 96 weights = 6 whole runs
    snaps = []
    with Recorder(model, tmp_path / "g.zarr", sample=32, seed=seed, layout="runs") as rec:
        assert [(e.run, e.stop - e.start) for e in rec._groups[0].entries] == [(16, 16), (1, 8), (16, 32)]
        for _ in range(2):
            rec.record()
            snaps.append({n: p.detach().clone() for n, p in model.named_parameters()})
            with torch.no_grad():
                model.w.mul_(2.0)
                model.v.add_(1.0)
    ds = open_run(tmp_path / "g.zarr")
    index, names = ds["index"].values, ds["param"].values
    assert list(index[names == "w"][16:]) == list(range(32, 40))
    for r, snap in enumerate(snaps):
        want = np.concatenate([_flat(snap[n], index[names == n]) for n in ("w", "v")])
        np.testing.assert_array_equal(ds["values"].values[r], want)


class _CountGathers(torch.overrides.TorchFunctionMode):
    """Counts ``torch.index_select`` calls made while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.index_select
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("contiguous", [True, False])
def test_strided_gather_is_one_copy_per_parameter_and_equals_flat_indexing(tmp_path, dtype, contiguous):
    """The default layout: a parameter's whole runs form one progression, gathered as one strided copy
    with no index (index_select only for a short last run), equal to p.flatten()[index] in column
    order -- checked against plain flat indexing of copies, also for bf16 and a transposed weight."""
    torch.manual_seed(0)
    model = nn.Module()
    model.w = nn.Parameter(torch.randn(40, 52, dtype=dtype) if contiguous else torch.randn(52, 40, dtype=dtype).t())
    model.v = nn.Parameter(torch.randn(48, 2, dtype=dtype))  # 96 weights = 6 whole runs
    model.u = nn.Parameter(torch.randn(130, dtype=dtype))  # 8 runs + a short one of 2
    snaps, gathers = [], []
    with Recorder(model, tmp_path / "s.zarr", sample=0.3, params=["w", "v", "u"]) as rec:
        entries = rec._groups[0].entries
        assert all(isinstance(e.idx, slice) and e.run == 16 for e in entries if e.run > 1)
        assert [e.param for e in entries if e.run > 1] == [model.w, model.v, model.u]  # one progression each
        tails = sum(e.run == 1 for e in entries)
        for _ in range(3):
            with _CountGathers() as count:
                rec.record()
            gathers.append(count.calls)
            snaps.append({n: p.detach().clone() for n, p in model.named_parameters()})
            with torch.no_grad():
                model.w.mul_(-1.5)
                model.v.add_(1.0)
                model.u.sub_(0.25)
    assert gathers == [tails] * 3
    ds = open_run(tmp_path / "s.zarr")
    assert ds.attrs["layout"] == "strided"
    index, names = ds["index"].values, ds["param"].values
    for r, snap in enumerate(snaps):
        want = np.concatenate([_flat(snap[n], index[names == n]) for n in ("w", "v", "u")])
        np.testing.assert_array_equal(ds["values"].values[r], want)


def test_pieces_split_runs_into_few_progressions_or_keep_an_index():
    """`_pieces` covers the sampled columns exactly: arithmetic progressions of runs as slices (at
    most _MAX_STRIDED), random runs as run numbers, the rest as flat indices."""
    lattice = np.concatenate([np.arange(r * 16, r * 16 + 16) for r in [1, 4, 7, 10, 20, 21]])
    pieces = recorder_mod._pieces(lattice, 400)
    assert [(p[0], p[1], p[2], p[3]) for p in pieces] == [(slice(1, 11, 3), 16, 0, 64), (slice(20, 22, 1), 16, 64, 96)]
    rng = np.random.default_rng(0)
    runs = np.sort(rng.choice(1000, 60, replace=False))
    random_runs = (runs[:, None] * 16 + np.arange(16)).reshape(-1)
    (idx, run, a, b), = recorder_mod._pieces(random_runs, 16000)
    assert run == 16 and (a, b) == (0, 960) and np.array_equal(idx, runs)
    for index, numel in ((lattice, 400), (random_runs, 16000), (np.array([3, 40, 41, 99]), 100)):
        covered = []
        for idx, run, a, b in recorder_mod._pieces(index, numel):
            if isinstance(idx, slice):
                got = (np.arange(idx.start, idx.stop, idx.step)[:, None] * 16 + np.arange(16)).reshape(-1)
            else:
                got = (np.asarray(idx)[:, None] * run + np.arange(run)).reshape(-1)
            assert len(got) == b - a
            covered.append(got)
        np.testing.assert_array_equal(np.concatenate(covered), index)


@pytest.mark.parametrize("layout", ["strided", "runs", "uniform"])
def test_a_replaced_parameter_tensor_is_gathered_from_its_new_storage(tmp_path, layout):
    """The hook keeps each parameter's source view between rows; assigning ``p.data`` (a new
    storage, also of another dtype) must be seen at the next row, not the old storage's values."""
    model = nn.Module()
    model.w = nn.Parameter(torch.randn(64, 32))
    snaps = []
    with Recorder(model, tmp_path / "d.zarr", sample=128, layout=layout) as rec:
        for new in (None, torch.randn(64, 32), torch.randn(64, 32, dtype=torch.bfloat16), torch.randn(32, 64).t()):
            if new is not None:
                model.w.data = new
            rec.record()
            snaps.append(model.w.detach().clone())
    ds = open_run(tmp_path / "d.zarr")
    index = ds["index"].values
    for r, snap in enumerate(snaps):
        np.testing.assert_array_equal(ds["values"].values[r], _flat(snap, index))


def test_default_layout_reads_one_cache_line_per_16_weights(tmp_path):
    """The per-step cost is memory traffic: the default sample must touch ceil(k / 16) 64-byte lines
    of a float32 parameter, not ~k as uniform single weights do (issue 9)."""
    model = nn.Module()
    model.w = nn.Parameter(torch.randn(1024, 1024))  # 65536 lines of 16 weights
    lines, counts = {}, {}
    for layout in ("default", "runs", "uniform"):
        kw = {} if layout == "default" else {"layout": layout}
        Recorder(model, tmp_path / f"{layout}.zarr", sample=4096, **kw).close()
        index = open_run(tmp_path / f"{layout}.zarr")["index"].values
        lines[layout], counts[layout] = len(np.unique(index // 16)), len(index)
    # strided: stride 255 runs (coprime to the 64 runs of a row), 257 runs from a start in [0, 255)
    assert lines["default"] * 16 == counts["default"] and 4096 <= counts["default"] <= 4096 * 1.01
    assert lines["runs"] == 4096 // 16 and lines["uniform"] > 3800
