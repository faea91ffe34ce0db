"""Runs still recording or interrupted: binned by the last recorded row, equal to a completed copy
analysed with magnitude_at at that step; `--follow`; `corrtools info` progress."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import corrtools.record.store as store_mod
from corrtools.analysis.delta import delta_by_magnitude, delta_per_weight, load_delta, rho_by_magnitude
from corrtools.analysis.follow import LiveRun
from corrtools.analysis.magnitude_at import magnitudes_at
from corrtools.analysis.plot import format_table, plot_delta
from corrtools.commands import info as info_cmd
from corrtools.errors import CorrtoolsError
from corrtools.record.store import RunWriter, open_run, run_info

from .conftest import ar1_columns
from .test_plot_cli import _main

ROOT = Path(__file__).resolve().parents[2]

# A training run in its own process: a Recorder writing blocks of 16 rows; it can SIGKILL itself.
WRITER = r"""
import os, signal, sys, time
import torch
from corrtools import Recorder

path, steps, kill_at, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
torch.manual_seed(0)
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
x, y = torch.randn(64, 16), torch.randn(64, 4)
with Recorder(model, path, sample=64, chunk_steps=16, overwrite=True).attach(opt) as rec:
    for step in range(1, steps + 1):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        rec.log(loss=loss.item())
        if step == kill_at:
            time.sleep(0.5)  # the writer thread commits the whole blocks, then the process dies
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(pause)
"""


def _writer(path: Path, steps: int, kill_at: int = -1, pause: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(steps), str(kill_at), str(pause)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _completed_copy(src: xr.Dataset, path: Path) -> Path:
    """The same rows as ``src`` in a new store that is complete, with final values unlike any row."""
    names = [str(v) for v in src["param"].values]
    w = RunWriter.create(path, param=names, index=src["index"].values, initial=src["initial"].values,
                         attrs={"every": int(src.attrs.get("every", 1))}, chunk_steps=16)
    w.write_block(src["step"].values, src["values"].values)
    w.close(np.full(len(names), 123.0, dtype=np.float32), int(src["step"].values[-1]))
    return path


def _assert_same_bins(a: xr.Dataset, b: xr.Dataset) -> None:
    for name in ("edge_low", "edge_high", "magnitude", "n_weights", "median_delta", "ci_low", "ci_high",
                 "censored_fraction", "magnitude_quantile"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    for key in ("T", "step_first", "step_last", "magnitude_at", "magnitude_step"):
        assert a.attrs[key] == b.attrs[key], key


def test_magnitudes_at_each_choice(tmp_path) -> None:
    x, _ = ar1_columns(48, 6, seed=1)
    final = np.linspace(-3, 3, 6).astype(np.float32)
    w = RunWriter.create(tmp_path / "r.zarr", param=["p"] * 6, index=np.arange(6), initial=x[0],
                         attrs={"every": 2})
    w.write_block(np.arange(1, 49) * 2, x)
    live = open_run(tmp_path / "r.zarr")
    mag, src = magnitudes_at(live)  # no final values yet: the last row
    np.testing.assert_array_equal(mag, np.abs(x[-1].astype(np.float64)))
    assert (src.kind, src.step) == ("step", 96) and "no final values" in src.describe()
    with pytest.raises(CorrtoolsError, match="no final values"):
        magnitudes_at(live, magnitude_at="final")
    w.close(final, 96)
    done = open_run(tmp_path / "r.zarr")
    mag, src = magnitudes_at(done, [1, 4])
    np.testing.assert_array_equal(mag, np.abs(final[[1, 4]]))
    assert src.attrs() == {"magnitude_at": "final", "magnitude_step": 96, "magnitude_label": "final |w|"}
    mag, src = magnitudes_at(done, None, "last")
    np.testing.assert_array_equal(mag, np.abs(x[-1]))
    assert src.describe() == "|w| at step 96"
    mag, src = magnitudes_at(done, [0, 5], 20)  # row 9 holds step 20
    np.testing.assert_array_equal(mag, np.abs(x[9, [0, 5]]))
    with pytest.raises(CorrtoolsError, match="not a recorded step.*e.g. 20 or 22"):
        magnitudes_at(done, None, 21)


def test_live_store_equals_completed_copy_at_that_step(tmp_path, monkeypatch) -> None:
    """Analysed while a Recorder in another process writes it; then followed until it completes."""
    path = tmp_path / "live.zarr"
    proc = _writer(path, steps=700, pause=0.01)
    try:
        deadline = time.monotonic() + 90
        n = 0
        while n < 48 and time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                n = open_run(path).sizes["step"]
            except CorrtoolsError:  # not created yet
                pass
        assert n >= 48, proc.communicate()[1] if proc.poll() is not None else "no rows in 90 s"
        ds = open_run(path)
        res = delta_by_magnitude(ds, bins=4, progress=False)
        curves = rho_by_magnitude(ds, bins=2, n_lags=8, progress=False)
        info = run_info(path)
        assert proc.poll() is None, "the run finished before it was analysed live"
        assert ds.attrs["status"] == "recording" and res.attrs["magnitude_at"] == "step"
        n, last = ds.sizes["step"], int(ds["step"].values[-1])
        assert res.attrs["magnitude_step"] == last and res.attrs["step_last"] == last
        assert f"Δ by |w| at step {last} (last recorded row" in format_table(res).splitlines()[0]
        assert info["progress"]["steps_per_second"] > 0 and info["progress"]["seconds_since_write"] < 60
        text = info_cmd.format_info(info)
        assert "progress" in text and "rows" in text and "steps/s" in text and "last write" in text
        fig = plot_delta(res, None)
        assert f"binned by |w| at step {last}" in fig._suptitle.get_text()
        assert fig.axes[0].get_xlabel() == f"|w| at step {last}"

        # follow it to the end: tables while recording, the last one by final |w|; no lock is touched
        from corrtools.record._lock import WriterLock

        def no_lock(*a, **k):
            raise AssertionError("--follow touched the writer lock")

        for name in ("acquire", "holder", "release"):
            monkeypatch.setattr(WriterLock, name, no_lock)
        out = tmp_path / "follow.png"
        rc = _main_capture(["delta", str(path), "-o", str(out), "--bins", "4", "--follow", "0.3"])
    finally:
        proc.wait(timeout=120)
        monkeypatch.undo()
    assert proc.returncode == 0, proc.stderr.read()
    code, stdout, stderr = rc
    assert code == 0 and out.exists()
    heads = [line for line in stdout.splitlines() if line.startswith("# Δ by")]
    assert len(heads) >= 2 and "|w| at step" in heads[0] and heads[-1].startswith("# Δ by final |w|")
    assert stderr.count("rows recorded") >= len(heads) and "status complete" in stderr

    # the live numbers are those of the same rows, complete, binned at the same step
    done = open_run(path)
    assert done.attrs["status"] == "complete" and done.sizes["step"] > n
    same_rows = done.isel(step=slice(0, n))
    _assert_same_bins(res, delta_by_magnitude(same_rows, bins=4, progress=False, magnitude_at=last))
    again = rho_by_magnitude(same_rows, bins=2, n_lags=8, progress=False, magnitude_at=last)
    np.testing.assert_array_equal(curves["rho_median"].values, again["rho_median"].values)
    np.testing.assert_array_equal(curves["edge_low"].values, again["edge_low"].values)


def _main_capture(argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI in this process, capturing its stdout and stderr."""
    import contextlib
    import io

    import corrtools.cli as cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_killed_store_equals_completed_copy_at_that_step(tmp_path, monkeypatch, capsys) -> None:
    path = tmp_path / "killed.zarr"
    proc = _writer(path, steps=10_000, kill_at=150)
    proc.wait(timeout=120)
    assert proc.returncode == -9, proc.stderr.read()
    ds = open_run(path)
    assert ds.attrs["status"] == "recording" and not np.isfinite(ds["final"].values).any()
    n, last = ds.sizes["step"], int(ds["step"].values[-1])
    assert 16 <= n <= 150 and n % 16 == 0  # whole blocks only
    res = delta_by_magnitude(path, bins=4, progress=False)
    assert res.attrs["magnitude_at"] == "step" and res.attrs["magnitude_step"] == last
    copy = _completed_copy(ds, tmp_path / "copy.zarr")
    _assert_same_bins(res, delta_by_magnitude(copy, bins=4, progress=False, magnitude_at=last))
    assert not np.array_equal(  # the copy's final values differ: binning by them would not agree
        delta_by_magnitude(copy, bins=4, progress=False)["edge_low"].values, res["edge_low"].values
    )
    pw = delta_per_weight(path, progress=False)
    np.testing.assert_array_equal(pw["magnitude"].values, np.abs(ds["values"].values[-1]))

    # the CLI: JSON attrs and --save name the step
    rc = _main(monkeypatch, ["delta", str(path), "-o", str(tmp_path / "k.png"), "--json", "--save",
                             "--no-progress"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["attrs"]["magnitude_step"] == last and data["attrs"]["magnitude_at"] == "step"
    assert "last recorded row" in data["attrs"]["magnitude_label"]
    assert load_delta(path).attrs["magnitude_step"] == last
    rc = _main(monkeypatch, ["rho", str(path), "-o", str(tmp_path / "r.png"), "--bins", "2", "--lags", "6",
                             "--magnitude-at", str(int(ds["step"].values[3])), "--no-progress"])
    assert rc == 0 and f"|w| at step {int(ds['step'].values[3])}" in capsys.readouterr().out.splitlines()[0]
    rc = _main(monkeypatch, ["delta", str(path), "--magnitude-at", "final", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--magnitude-at last" in err[0]


def test_live_run_reads_only_new_rows(tmp_path, monkeypatch) -> None:
    x, _ = ar1_columns(96, 40, seed=3)
    names = ["a.weight"] * 25 + ["b.weight"] * 15
    path = tmp_path / "grow.zarr"
    w = RunWriter.create(path, param=names, index=np.arange(40), initial=x[0], chunk_steps=16)
    w.write_block(np.arange(1, 33), x[:32])
    live = LiveRun(path, params="b.weight")
    first = live.refresh()
    assert first.sizes == {"step": 32, "weight": 15} and live.rows_read == 32
    rows_asked: list[slice] = []
    real = store_mod._LazyRows._raw_getitem

    def spy(self, key):
        rows_asked.append(key[0])
        return real(self, key)

    monkeypatch.setattr(store_mod._LazyRows, "_raw_getitem", spy)
    w.write_block(np.arange(33, 81), x[32:80])
    grown = live.refresh()
    assert rows_asked and all(isinstance(r, slice) and r.start >= 32 for r in rows_asked), rows_asked
    np.testing.assert_array_equal(grown["values"].values, x[:80, 25:])
    assert live.rows_read == 80 and grown.attrs["status"] == "recording"
    monkeypatch.undo()
    direct = delta_by_magnitude(path, params="b.weight", bins=3, progress=False)
    _assert_same_bins(delta_by_magnitude(grown, bins=3, progress=False), direct)
    small = LiveRun(path, max_bytes=1000)  # does not fit: read from the store every time
    assert small.refresh().sizes["step"] == 80 and small.refresh().sizes["step"] == 80
    assert small.rows_read == 160
    with pytest.raises(CorrtoolsError, match="did you mean 'b.weight'"):
        LiveRun(path, params="b.weigth").refresh()
    w.abandon()


def test_follow_waits_for_rows_and_stops_on_ctrl_c(tmp_path, monkeypatch) -> None:
    """A store with too few rows is waited for, not an error; Ctrl-C ends following with status 0."""
    import corrtools.commands.delta as delta_cmd

    x, _ = ar1_columns(64, 8, seed=4)
    path = tmp_path / "slow.zarr"
    w = RunWriter.create(path, param=["p.weight"] * 8, index=np.arange(8), initial=x[0], chunk_steps=2)
    w.write_block(np.arange(1, 3), x[:2])  # 2 rows: too few for Δ
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 1:
            w.write_block(np.arange(3, 65), x[2:64])  # the run goes on while we wait
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr(delta_cmd.time, "sleep", sleep)
    code, out, err = _main_capture(["delta", str(path), "-o", str(tmp_path / "f.png"), "--bins", "2",
                                    "--follow", "5"])
    w.abandon()
    assert code == 0 and sleeps == [5.0, 5.0]
    assert "waiting for more rows" in err and "at least 3" in err and "stopped following" in err
    heads = [line for line in out.splitlines() if line.startswith("# Δ by")]
    assert len(heads) == 1 and "|w| at step 64 (last recorded row" in heads[0]
    monkeypatch.chdir(tmp_path)
    code, _, err = _main_capture(["delta", str(path), "--follow", "0"])
    assert code == 2 and "--follow 0 must be a positive number of seconds" in err
