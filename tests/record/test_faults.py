"""Fault injection on real run stores: damaged chunks and metadata, bad arguments, killed writers,
racing creators and readers. Each case asserts the documented outcome: a one-line error naming the
problem (exit status 2 from the CLI), or a correct answer; never a traceback, never a silently
wrong number."""
from __future__ import annotations

import json
import os
import shutil
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

from corrtools import Recorder
from corrtools.cli import main
from corrtools.errors import CorrtoolsError
from corrtools.record.store import RunWriter, open_run, run_info

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
T, CS = 48, 16  # rows, rows per chunk: three step-chunks
NAMES = ["a.weight"] * 24 + ["b.weight"] * 16


def _x(T: int = T) -> np.ndarray:
    """(T, 40) float32 random walks: Δ well inside the window, a distinct value in every cell."""
    rng = np.random.default_rng(0)
    return np.cumsum(rng.normal(size=(T, len(NAMES))), axis=0).astype(np.float32)


def _store(path: Path, compressor: str = "none", x: np.ndarray | None = None, **kw) -> Path:
    x = _x() if x is None else x
    w = RunWriter.create(path, param=NAMES, index=np.arange(len(NAMES)), initial=x[0],
                         attrs={"every": 1}, chunk_steps=CS, chunk_weights=24, compressor=compressor, **kw)
    w.write_block(np.arange(1, 33), x[:32], optional={"loss": np.arange(32.0)})
    w.write_block(np.arange(33, T + 1), x[32:], optional={"loss": np.arange(32.0, T)})
    w.close(x[-1], T)
    return path


def _cli(args: list[str], capsys) -> tuple[int, str]:
    rc = main([*args, "--no-progress"] if args[0] in ("delta", "rho") else args)
    err = capsys.readouterr().err
    return rc, err


def _one_line_error(rc: int, err: str, command: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"corrtools {command}: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pristine")
    return {c: _store(root / f"{c}.zarr", c) for c in ("none", "lz4")}


def _copy(pristine: dict[str, Path], tmp_path: Path, codec: str = "none") -> Path:
    dst = tmp_path / "run.zarr"
    shutil.copytree(pristine[codec], dst)
    return dst


# ------------------------------------------------------------------ damaged chunks and metadata
def test_pristine_store_reads_back_exactly(pristine):
    for codec in ("none", "lz4"):
        ds = open_run(pristine[codec])
        np.testing.assert_array_equal(ds["values"].values, _x())
        np.testing.assert_array_equal(ds["step"].values, np.arange(1, T + 1))


@pytest.mark.parametrize("chunk", ["values/c/1/0", "values/c/2/1", "step/c/1", "loss/c/0", "index/c/0"])
def test_deleted_chunk_is_named_not_read_as_fill(pristine, tmp_path, capsys, chunk):
    p = _copy(pristine, tmp_path)
    (p / chunk).unlink()
    with pytest.raises(CorrtoolsError, match=f"missing 1 chunk file.*{chunk}"):
        open_run(p)
    rc, err = _cli(["delta", str(p), "-o", str(tmp_path / "d.png")], capsys)
    _one_line_error(rc, err, "delta", chunk, "restore")
    assert not (tmp_path / "d.png").exists()
    rc, err = _cli(["info", str(p)], capsys)
    _one_line_error(rc, err, "info", chunk)


@pytest.mark.parametrize("codec", ["none", "lz4"])
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_values_chunk_is_named(pristine, tmp_path, capsys, codec, damage):
    p = _copy(pristine, tmp_path, codec)
    f = p / "values/c/2/0"
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        f.write_bytes(bytes(data[:100]))
    else:  # one flipped bit in the middle: a different number, unless the checksum catches it
        data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))
    ds = open_run(p)  # metadata is fine; the damage shows when the chunk is read
    with pytest.raises(CorrtoolsError, match="chunk values/c/2/0 .* cannot be decoded"):
        ds["values"].values
    for command in ("delta", "rho"):
        rc, err = _cli([command, str(p), "-o", str(tmp_path / "o.png")], capsys)
        _one_line_error(rc, err, command, "values/c/2/0", "damaged")
    with pytest.raises(CorrtoolsError, match="values/c/2/0"):  # the dask path too
        open_run(p, chunks={})["values"].data.compute()


def test_damaged_step_chunk_and_shape(pristine, tmp_path, capsys):
    p = _copy(pristine, tmp_path)
    f = p / "step/c/2"
    f.write_bytes(f.read_bytes()[:-9] + b"\x00" * 9)  # the last step changed, the checksum not
    with pytest.raises(CorrtoolsError, match="step/c/2 .* cannot be decoded"):
        open_run(p)
    rc, err = _cli(["info", str(p)], capsys)
    _one_line_error(rc, err, "info", "step/c/2")
    p2 = tmp_path / "shape.zarr"
    shutil.copytree(pristine["none"], p2)
    meta = json.loads((p2 / "step/zarr.json").read_text())
    meta["shape"] = [T + CS]  # claims a chunk of rows that was never written
    (p2 / "step/zarr.json").write_text(json.dumps(meta))
    rc, err = _cli(["info", str(p2)], capsys)
    _one_line_error(rc, err, "info", "'values' has 48 rows but `step` has 64")
    assert "..-1" not in err


@pytest.mark.parametrize("what", ["garbage values meta", "garbage root meta", "no values folder",
                                  "format string", "values rows short"])
def test_damaged_metadata_is_a_one_line_error(pristine, tmp_path, capsys, what):
    p = _copy(pristine, tmp_path)
    expect = {
        "garbage values meta": "metadata of 'values'",
        "garbage root meta": "not a corrtools run store",
        "no values folder": "no array 'values'",
        "format string": "corrtools_format '1' (str)",
        "values rows short": "'values' has 32 rows but `step` has 48",
    }[what]
    if what == "garbage values meta":
        (p / "values/zarr.json").write_text("{not json")
    elif what == "garbage root meta":
        (p / "zarr.json").write_bytes(b"\x00\xff garbage")
    elif what == "no values folder":
        shutil.rmtree(p / "values")
    elif what == "format string":
        meta = json.loads((p / "zarr.json").read_text())
        meta["attributes"]["corrtools_format"] = "1"
        (p / "zarr.json").write_text(json.dumps(meta))
    else:
        meta = json.loads((p / "values/zarr.json").read_text())
        meta["shape"][0] = 32
        (p / "values/zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CorrtoolsError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        open_run(p)
    for command in ("info", "delta", "rho"):
        args = [command, str(p)] + ([] if command == "info" else ["-o", str(tmp_path / "o.png")])
        rc, err = _cli(args, capsys)
        _one_line_error(rc, err, command, expect)


# ------------------------------------------------------------------------ arguments and overwrite
def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(8, 6)


@pytest.mark.parametrize("bad", [{"compressor": "gzip"}, {"chunk_steps": 0}, {"chunk_steps": -4},
                                 {"every": 0}, {"queue_blocks": 0}, {"flush_every": 0},
                                 {"sample": 0}, {"params": ["nope"]}, {"start_step": 3}])
def test_bad_argument_with_overwrite_leaves_the_store_untouched(tmp_path, bad):
    p = tmp_path / "precious.zarr"
    with Recorder(_model(), p, sample=10) as rec:
        for _ in range(5):
            rec.record()
    before = sorted((f.relative_to(p), f.read_bytes()) for f in p.rglob("*") if f.is_file())
    with pytest.raises(CorrtoolsError) as info:
        Recorder(_model(), p, **{"sample": 10, "overwrite": True, **bad})
    assert "\n" not in str(info.value)
    after = sorted((f.relative_to(p), f.read_bytes()) for f in p.rglob("*") if f.is_file())
    assert after == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["precious.zarr"]  # nothing left beside it
    with Recorder(_model(), p, sample=10, overwrite=True) as rec:  # a retry just works
        rec.record()
    assert open_run(p).sizes["step"] == 1


def test_meta_device_model_is_a_one_line_error(tmp_path):
    with torch.device("meta"):
        model = nn.Linear(8, 6)
    with pytest.raises(CorrtoolsError, match="meta device.*to_empty"):
        Recorder(model, tmp_path / "m.zarr")
    assert not (tmp_path / "m.zarr").exists()


def test_overwrite_replaces_only_run_stores(tmp_path):
    foreign = tmp_path / "foreign.zarr"
    zarr.create_array(str(foreign), shape=(3,), dtype="int8")[:] = 1
    plain = tmp_path / "notes.txt"
    plain.write_text("keep me")
    for target in (foreign, plain):
        with pytest.raises(CorrtoolsError, match="not a corrtools run store; refusing"):
            Recorder(_model(), target, sample=4, overwrite=True)
    assert plain.read_text() == "keep me" and zarr.open_array(str(foreign))[:].tolist() == [1, 1, 1]
    p = _store(tmp_path / "old.zarr")
    with Recorder(_model(), p, sample=4, overwrite=True, layout="uniform") as rec:  # a run store is replaced
        rec.record()
    assert open_run(p).sizes == {"step": 1, "weight": 4}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["foreign.zarr", "notes.txt", "old.zarr"]


def test_demo_refuses_an_existing_path_before_training(tmp_path, capsys, monkeypatch):
    import corrtools.workloads

    def no_training(*a, **k):
        raise AssertionError("the demo trained before checking its output")

    monkeypatch.setattr(corrtools.workloads, "CharLMWorkload", no_training)
    store = _store(tmp_path / "mine.zarr")
    plain = tmp_path / "file.zarr"
    plain.write_text("not a store")
    foreign = tmp_path / "foreign.zarr"
    zarr.create_array(str(foreign), shape=(3,), dtype="int8")
    cases = [([str(store)], "already exists"), ([str(plain)], "already exists"),
             ([str(plain), "--overwrite"], "not a corrtools run store"),
             ([str(foreign), "--overwrite"], "not a corrtools run store")]
    for args, needle in cases:
        rc, err = _cli(["demo", "--no-progress", "-o", *args], capsys)
        _one_line_error(rc, err, "demo", needle)
    assert open_run(store).sizes["step"] == T and plain.read_text() == "not a store"
    assert (foreign / "zarr.json").exists()


# --------------------------------------------------------------------------- CLI arguments
@pytest.mark.parametrize("args,needle", [
    (["delta", "--bins", "-3"], "--bins -3"),
    (["rho", "--bins", "0"], "--bins 0"),
    (["rho", "--lags", "0"], "--lags 0"),
    (["delta", "--max-lag", "0"], "--max-lag 0"),
    (["delta", "-o", "{tmp}"], "is a folder"),
    (["delta", "-o", "{tmp}/no/such/d.png"], "does not exist"),
    (["delta", "-o", "/proc/corrtools-d.png"], "cannot write"),
    (["delta", "--csv", "{tmp}"], "is a folder"),
    (["delta", "--csv", "/proc/corrtools.csv"], "cannot write"),
    (["rho", "-o", "{tmp}/x.bmp"], "image format"),
])
def test_bad_cli_arguments_fail_before_the_work(pristine, tmp_path, capsys, monkeypatch, args, needle):
    import corrtools.analysis.delta as delta_mod

    def no_work(*a, **k):
        raise AssertionError("the analysis ran before the arguments were checked")

    monkeypatch.setattr(delta_mod, "delta_by_magnitude", no_work)
    monkeypatch.setattr(delta_mod, "rho_by_magnitude", no_work)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "o.png")]
    rc, err = _cli([args[0], str(pristine["none"]), *args[1:]], capsys)
    _one_line_error(rc, err, args[0], needle)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; /proc cases above cover it")
def test_save_into_a_read_only_store_fails_before_the_work(pristine, tmp_path, capsys):
    p = _copy(pristine, tmp_path)
    p.chmod(0o555)
    try:
        rc, err = _cli(["delta", str(p), "-o", str(tmp_path / "o.png"), "--save"], capsys)
    finally:
        p.chmod(0o755)
    _one_line_error(rc, err, "delta", "--save", "cannot write")


def test_constant_and_nan_layers(tmp_path, capsys):
    """A constant layer gives NaN ρ (undefined), a NaN layer is named and skipped, and the other
    layer's numbers are those of a store without them; no RuntimeWarning reaches stderr."""
    x = _x()
    x[:, :8] = 0.5       # a.weight columns 0..7: constant
    x[:, 24:] = np.nan   # b.weight: all NaN
    x[5:, 9] = np.nan    # one weight goes NaN mid-run
    p = _store(tmp_path / "n.zarr", x=x)
    for command in ("delta", "rho"):
        for detrend in ("none", "linear", "diff"):
            rc, err = _cli([command, str(p), "-o", str(tmp_path / f"{command}.png"), "--detrend", detrend], capsys)
            assert rc == 0, err
            assert "RuntimeWarning" not in err and "Traceback" not in err
            assert "b.weight has no finite final values" in err
    from corrtools.analysis import delta_by_magnitude, delta_per_weight

    res = delta_by_magnitude(p, bins=3, progress=False)
    assert res.attrs["unanalysed"] == ["b.weight"]
    assert np.isnan(res["median_delta"].sel(param="b.weight").values).all()
    per = delta_per_weight(p, "a.weight", progress=False)
    assert np.isnan(per["delta"].values[:8]).all() and np.isnan(per["delta"].values[9])
    clean = _store(tmp_path / "clean.zarr", x=np.where(np.isnan(x), 0, x))
    ref = delta_per_weight(clean, "a.weight", progress=False)
    keep = np.r_[8, 10:24]
    np.testing.assert_array_equal(per["delta"].values[keep], ref["delta"].values[keep])


# ------------------------------------------------------------------------- time-bounded flushes
class _Clock:
    """A monotonic clock the test advances by hand (patched into the recorder module)."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


@pytest.mark.parametrize("blocks", ["one chunk of 16 rows", "four chunks of 4 rows"])
def test_flush_every_writes_partial_chunks_and_keeps_every_value(tmp_path, monkeypatch, blocks):
    import corrtools.record.recorder as rec_mod

    clock = _Clock()
    monkeypatch.setattr(rec_mod, "time", clock)
    kw: dict = {"chunk_steps": 16}
    if blocks == "four chunks of 4 rows":  # flushed rows then end mid-chunk inside a block
        monkeypatch.setattr(rec_mod, "default_chunks", lambda n: (4, n))
        monkeypatch.setattr(rec_mod, "_MAX_BLOCK_ROWS", 16)
        kw = {}
    model = _model()
    p = tmp_path / "f.zarr"
    rec = Recorder(model, p, sample=20, flush_every=1.0, **kw)
    assert rec.block_steps == 16
    expect = []
    for step in range(1, 41):
        with torch.no_grad():
            model.weight.add_(0.25)
        rec.record(loss=float(step))
        expect.append(rec._gather_final())
        if step in (5, 11, 23, 30):
            clock.now += 1.5  # the next row flushes the rows taken so far
            if step == 23:
                rec.record(loss=24.0)  # step 24 flushes rows 17..23 and takes row 24
                expect.append(rec._gather_final())
                rec._queue.join()
                assert open_run(p)["step"].values.tolist() == list(range(1, 24))
                with pytest.raises(CorrtoolsError, match="too late"):
                    rec.log(1.0, step=20)  # its row is on disk
                rec.log(2.0)  # the latest row is still in memory
                break
    for step in range(25, 41):
        with torch.no_grad():
            model.weight.add_(0.25)
        rec.record(loss=float(step))
        expect.append(rec._gather_final())
    rec.close()
    ds = open_run(p)
    np.testing.assert_array_equal(ds["step"].values, np.arange(1, 41))
    np.testing.assert_array_equal(ds["values"].values, np.stack(expect))
    loss = np.arange(1.0, 41.0)
    loss[23] = (24.0 + 2.0) / 2  # two losses logged for step 24
    np.testing.assert_array_equal(ds["loss"].values, loss.astype(np.float32))


_KILLED = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    from corrtools import Recorder
    torch.manual_seed(0)
    model = nn.Linear(50, 40)
    base = model.weight.detach().clone()
    rec = Recorder(model, sys.argv[1], sample=500, chunk_steps=1024, flush_every=0.05)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            model.weight.copy_(base + step)  # a known value at every step
        rec.record()
        time.sleep(0.002)
        if step == 50:
            print("ready", flush=True)
    """
)


def test_killed_recorder_keeps_rows_older_than_flush_every(tmp_path):
    """Chunks of 1024 rows that never fill: before the time bound a kill kept 0 rows."""
    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    base = nn.Linear(50, 40).weight.detach().clone()
    for trial in range(2):
        p = tmp_path / f"k{trial}.zarr"
        proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(p)], env=ENV, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3 + rng.uniform(0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        ds = open_run(p)
        n = ds.sizes["step"]
        assert n >= 40, n  # rows of step 50 were taken > 0.3 s before the kill
        np.testing.assert_array_equal(ds["step"].values, np.arange(1, n + 1))
        cols = base.flatten()[torch.as_tensor(ds["index"].values)].numpy()
        np.testing.assert_array_equal(ds["values"].values, cols + np.arange(1, n + 1, dtype=np.float32)[:, None])
        model = nn.Linear(50, 40)
        with Recorder(model, p, sample=500, resume=True) as rec:  # resumes after a kill mid-chunk
            rec.record()
        assert open_run(p)["step"].values[-1] == n + 1


# -------------------------------------------------------------------------------------- races
_CREATOR = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from corrtools.errors import CorrtoolsError
    from corrtools.record.store import RunWriter
    root, t0, trials = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    for i in range(trials):
        while time.time() < t0 + 0.4 * i:
            pass
        try:
            w = RunWriter.create(f"{root}/r{i}.zarr", param=["p"] * 4, index=np.arange(4), initial=np.zeros(4))
        except CorrtoolsError as err:
            print(f"{i} refused {err}", flush=True)
            continue
        print(f"{i} created", flush=True)
        time.sleep(0.3)
        w.close(np.zeros(4), 0)
    """
)


def test_two_creators_of_one_new_path(tmp_path):
    trials = 6
    t0 = time.time() + 3.0  # both interpreters are up by then
    procs = [subprocess.Popen([sys.executable, "-c", _CREATOR, str(tmp_path), str(t0), str(trials)],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    lines = sorted(ln for out, _ in outs for ln in out.splitlines())
    for i in range(trials):
        mine = [ln for ln in lines if ln.split()[0] == str(i)]
        assert sorted(ln.split()[1] for ln in mine) == ["created", "refused"], mine
        refused = next(ln for ln in mine if "refused" in ln)
        assert "is being recorded by pid" in refused or "already exists" in refused, refused
        assert open_run(tmp_path / f"r{i}.zarr").attrs["status"] == "complete"
    busy = sum("being recorded by pid" in ln for ln in lines)
    assert busy >= trials // 2, lines  # racing at the same moment: the loser is told who writes
    assert sorted(x.name for x in tmp_path.iterdir()) == [f"r{i}.zarr" for i in range(trials)]


_INFO_LOOP = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from corrtools.record import store
    path = Path(sys.argv[1])
    end = time.time() + float(sys.argv[2])
    print("ready", flush=True)
    n = 0
    while time.time() < end:  # what `corrtools info` does, with its look at the lock in a tight loop
        if n % 50 == 0:
            store.run_info(path)
        store._lock(path).holder()
        n += 1
    print(n, flush=True)
    """
)


def test_info_never_refuses_a_starting_writer(tmp_path):
    from corrtools.record import store as store_mod

    p = _store(tmp_path / "live.zarr")
    proc = subprocess.Popen([sys.executable, "-c", _INFO_LOOP, str(p), "3"], env=ENV,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    refused = tries = 0
    deadline = time.time() + 2.0
    while time.time() < deadline:
        tries += 1
        try:
            if tries % 20 == 0:
                RunWriter.resume(p).abandon()  # the whole start of a resumed writer
            else:
                lock = store_mod._lock(p)  # the step that used to fail: taking the writer lock
                lock.acquire()
                lock.release()
        except CorrtoolsError:
            refused += 1
    readers = int(proc.stdout.readline())
    proc.wait()
    assert readers > 100 and tries > 100, (readers, tries)
    assert refused == 0, f"{refused} of {tries} writers refused while `info` looked {readers} times"
