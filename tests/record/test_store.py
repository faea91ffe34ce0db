"""The run store: layout, round trip, commit order under kills, lock, result groups, errors."""
from __future__ import annotations

import json
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from corrtools.errors import CorrtoolsError
from corrtools.record import _direct as direct_mod
from corrtools.record import store as store_mod
from corrtools.record.store import RunWriter, open_run, read_group, run_info, write_group

N = 10
PARAM = ["a.weight"] * 6 + ["b.weight"] * 4
REPO = Path(__file__).resolve().parents[2]


def _row(step: int) -> np.ndarray:
    """A recognisable row for `step`: value = step + column / 100."""
    return (step + np.arange(N) / 100).astype(np.float32)


def _create(path, **kw) -> RunWriter:
    return RunWriter.create(
        path, param=PARAM, index=np.arange(N), initial=np.linspace(-1, 1, N),
        attrs={"every": 1, "seed": np.int64(3)}, chunk_steps=4, **kw,
    )


def _write_steps(w: RunWriter, steps) -> None:
    steps = np.asarray(steps)
    w.write_block(steps, np.stack([_row(s) for s in steps]))


def test_round_trip_with_unaligned_blocks(tmp_path):
    p = tmp_path / "r.zarr"
    w = _create(p)
    assert (w.chunk_steps, w.chunk_weights) == (4, N)
    _write_steps(w, [0, 1, 2])              # partial chunk
    _write_steps(w, [3, 5, 6, 7, 8, 9])     # spans chunks, with a gap in steps
    w.close(np.full(N, 7.0), total_steps=10)
    ds = open_run(p)
    steps = [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert ds["values"].dims == ("step", "weight")
    np.testing.assert_array_equal(ds["step"].values, steps)
    assert ds["step"].dtype == np.int64
    np.testing.assert_array_equal(ds["values"].values, np.stack([_row(s) for s in steps]))
    assert ds["values"].dtype == np.float32
    assert ds["param"].values.tolist() == PARAM
    np.testing.assert_array_equal(ds["index"].values, np.arange(N))
    np.testing.assert_allclose(ds["initial"].values, np.linspace(-1, 1, N).astype(np.float32))
    np.testing.assert_array_equal(ds["final"].values, np.full(N, 7.0, dtype=np.float32))
    assert ds.attrs["status"] == "complete" and ds.attrs["total_steps"] == 10
    assert ds.attrs["corrtools_format"] == 1 and ds.attrs["seed"] == 3
    assert ds.attrs["steps_written"] == 9


def test_chunks_none_is_lazy_numpy_and_dict_is_dask(tmp_path):
    import dask.array as da

    p = tmp_path / "r.zarr"
    w = _create(p)
    _write_steps(w, range(10))
    lazy = open_run(p)
    assert not isinstance(lazy["values"].variable._data, da.Array)
    assert not isinstance(lazy["values"].variable._data, np.ndarray)  # not loaded yet
    np.testing.assert_array_equal(lazy["values"].isel(weight=[1, 7], step=slice(2, 5)).values,
                                  np.stack([_row(s) for s in (2, 3, 4)])[:, [1, 7]])
    native = open_run(p, chunks={})
    assert isinstance(native["values"].data, da.Array)
    assert native["values"].data.chunks[0][0] == 4
    custom = open_run(p, chunks={"step": -1, "weight": 3})
    assert custom["values"].data.chunks == ((10,), (3, 3, 3, 1))
    np.testing.assert_array_equal(custom["values"].values, lazy["values"].values)
    assert open_run(p, chunks="auto")["values"].shape == (10, N)
    with pytest.raises(CorrtoolsError, match="time"):
        open_run(p, chunks={"time": 5})
    w.abandon()


def test_plain_xarray_opens_a_complete_store(tmp_path):
    p = tmp_path / "r.zarr"
    w = _create(p)
    _write_steps(w, range(6))
    w.close(np.zeros(N), 6)
    ds = xr.open_zarr(str(p), consolidated=False)
    np.testing.assert_array_equal(ds["step"].values, np.arange(6))  # step 0 not masked as fill
    np.testing.assert_array_equal(ds["values"].values, np.stack([_row(s) for s in range(6)]))
    assert set(ds.coords) >= {"step", "param", "index", "initial", "final"}


@pytest.mark.parametrize("compressor", ["lz4", "none"])
def test_independent_reader_decodes_raw_chunks(tmp_path, compressor):
    """Read `values` from the raw files: zarr.json metadata, a crc32c over the stored bytes (its 4
    last bytes, little-endian) checked with google_crc32c, then numcodecs Blosc (or raw
    little-endian bytes without a codec), no zarr-python."""
    import google_crc32c
    import numcodecs

    p = tmp_path / "r.zarr"
    w = _create(p, compressor=compressor)
    _write_steps(w, range(7))
    w.close(np.zeros(N), 7)
    meta = json.loads((p / "values" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["node_type"] == "array"
    assert meta["dimension_names"] == ["step", "weight"] and meta["data_type"] == "float32"
    names = [c["name"] for c in meta["codecs"]]
    assert names == (["bytes", "blosc", "crc32c"] if compressor == "lz4" else ["bytes", "crc32c"])
    assert meta["codecs"][0]["configuration"]["endian"] == "little"
    decode = numcodecs.Blosc().decode if compressor == "lz4" else bytes
    rows, cols = meta["shape"]
    cs, cw = meta["chunk_grid"]["configuration"]["chunk_shape"]
    sep = meta["chunk_key_encoding"]["configuration"]["separator"]
    out = np.empty((rows, cols), np.float32)
    for i in range(-(-rows // cs)):
        for j in range(-(-cols // cw)):
            stored = (p / "values" / sep.join(["c", str(i), str(j)])).read_bytes()
            raw, crc = stored[:-4], int.from_bytes(stored[-4:], "little")
            assert crc == google_crc32c.value(raw)
            chunk = np.frombuffer(decode(raw), "<f4").reshape(cs, cw)
            out[i * cs:(i + 1) * cs, j * cw:(j + 1) * cw] = chunk[: rows - i * cs, : cols - j * cw]
    np.testing.assert_array_equal(out, np.stack([_row(s) for s in range(7)]))
    step_meta = json.loads((p / "step" / "zarr.json").read_text())
    assert step_meta["shape"] == [7] and step_meta["data_type"] == "int64"


def test_optional_arrays(tmp_path):
    p = tmp_path / "r.zarr"
    w = _create(p)
    _write_steps(w, [0, 1])
    w.write_block([2, 3], np.stack([_row(2), _row(3)]), optional={"loss": [1.5, 2.5]})
    w.write_block([4], _row(4)[None], optional={"mask": np.ones((1, N), bool), "lr": [0.1]})
    w.write_block([5], _row(5)[None])
    w.write_optional("z", np.arange(6))
    ds = open_run(p)
    np.testing.assert_array_equal(ds["loss"].values, [np.nan, np.nan, 1.5, 2.5, np.nan, np.nan])
    np.testing.assert_array_equal(ds["lr"].values, [np.nan] * 4 + [0.1, np.nan])
    assert ds["mask"].dims == ("step", "weight") and ds["mask"].dtype == bool
    np.testing.assert_array_equal(ds["mask"].values.sum(axis=1), [0, 0, 0, 0, N, 0])
    np.testing.assert_array_equal(ds["z"].values, np.arange(6))
    with pytest.raises(CorrtoolsError, match="reserved"):
        w.write_block([6], _row(6)[None], optional={"values": [1.0]})
    with pytest.raises(CorrtoolsError, match="shape"):
        w.write_block([6], _row(6)[None], optional={"loss": [1.0, 2.0]})
    w.abandon()


def test_write_block_rejects_bad_steps_and_shapes(tmp_path):
    w = _create(tmp_path / "r.zarr")
    _write_steps(w, [3, 4])
    with pytest.raises(CorrtoolsError, match="strictly increase"):
        _write_steps(w, [4, 5])
    with pytest.raises(CorrtoolsError, match="strictly increase"):
        _write_steps(w, [7, 6])
    with pytest.raises(CorrtoolsError, match="shape"):
        w.write_block([9], np.zeros((1, N + 1)))
    assert w.n_steps == 2 and w.last_step == 4
    w.abandon()


def test_open_run_errors_name_the_path_and_fix(tmp_path):
    with pytest.raises(CorrtoolsError, match="no run store at .*missing.zarr.*Recorder"):
        open_run(tmp_path / "missing.zarr")
    plain = tmp_path / "plain.zarr"
    zarr.create_group(str(plain), zarr_format=3)
    with pytest.raises(CorrtoolsError, match="not a corrtools run store"):
        open_run(plain)
    (tmp_path / "dir").mkdir()
    with pytest.raises(CorrtoolsError, match="not a corrtools run store"):
        open_run(tmp_path / "dir")
    with pytest.raises(CorrtoolsError, match="not a corrtools run store"):
        run_info(tmp_path / "dir")


def test_create_refuses_existing_unless_overwrite(tmp_path):
    p = tmp_path / "r.zarr"
    w = _create(p)
    _write_steps(w, [0])
    w.close(np.zeros(N), 1)
    with pytest.raises(CorrtoolsError, match="already exists.*overwrite=True"):
        _create(p)
    w = _create(p, overwrite=True)
    assert w.n_steps == 0
    w.abandon()
    assert open_run(p).sizes["step"] == 0
    other = tmp_path / "notes"
    other.mkdir()
    (other / "x.txt").write_text("keep me")
    with pytest.raises(CorrtoolsError, match="not a corrtools run store; refusing"):
        _create(other, overwrite=True)
    assert (other / "x.txt").exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["notes", "r.zarr"]  # nothing left beside


def test_lock_refuses_a_second_writer(tmp_path):
    p = tmp_path / "r.zarr"
    w = _create(p)
    with pytest.raises(CorrtoolsError, match="being recorded by pid"):
        RunWriter.resume(p)
    with pytest.raises(CorrtoolsError, match="being recorded"):
        _create(p, overwrite=True)
    assert run_info(p)["writer"].startswith(f"pid {os.getpid()}")
    w.close(np.zeros(N), 0)
    assert run_info(p)["writer"] is None
    RunWriter.resume(p).abandon()


def test_resume_continues_and_clears_completion(tmp_path):
    p = tmp_path / "r.zarr"
    w = _create(p)
    _write_steps(w, range(5))
    w.close(np.ones(N), 5)
    w = RunWriter.resume(p)
    assert (w.n_steps, w.last_step) == (5, 4)
    ds = open_run(p)
    assert ds.attrs["status"] == "recording" and "total_steps" not in ds.attrs
    assert np.isnan(ds["final"].values).all()
    with pytest.raises(CorrtoolsError, match="strictly increase"):
        _write_steps(w, [4])
    _write_steps(w, range(5, 11))
    w.close(np.ones(N), 11)
    ds = open_run(p)
    np.testing.assert_array_equal(ds["step"].values, np.arange(11))
    np.testing.assert_array_equal(ds["values"].values, np.stack([_row(s) for s in range(11)]))


@pytest.mark.parametrize("fail_on", ["values", "step"])
def test_interrupted_commit_shows_only_committed_rows(tmp_path, monkeypatch, fail_on):
    """Die between writing a block's chunks and growing `step`: the block is not visible, resume
    drops its leftovers and writes it again."""
    p = tmp_path / "r.zarr"
    w = _create(p)
    _write_steps(w, range(6))
    real = direct_mod.ShapeFile.set_rows
    grown = []

    def dying_set_rows(self, rows):  # the local writer grows each array's metadata through this
        if self._path.parent.name == fail_on:
            raise KeyboardInterrupt
        grown.append(self._path.parent.name)
        return real(self, rows)

    monkeypatch.setattr(direct_mod.ShapeFile, "set_rows", dying_set_rows)
    with pytest.raises(KeyboardInterrupt):
        w.write_block([6, 7, 8], np.full((3, N), -5.0))
    monkeypatch.undo()
    assert "step" not in grown  # `step` grows last
    w.abandon()
    ds = open_run(p)
    np.testing.assert_array_equal(ds["step"].values, np.arange(6))
    assert ds["values"].shape == (6, N)
    w = RunWriter.resume(p)
    _write_steps(w, [6, 7])
    w.close(np.zeros(N), 8)
    ds = open_run(p)
    np.testing.assert_array_equal(ds["values"].values, np.stack([_row(s) for s in range(8)]))
    assert xr.open_zarr(str(p), consolidated=False).sizes["step"] == 8


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from corrtools.record.store import RunWriter
    N = 3000
    w = RunWriter.create(sys.argv[1], param=["p"] * N, index=np.arange(N), initial=np.zeros(N),
                         chunk_steps=8, chunk_weights=1000)
    base = np.arange(N, dtype=np.float32) / N
    s = 0
    print("ready", flush=True)
    while True:
        k = 3 + s % 7
        steps = np.arange(s, s + k)
        w.write_block(steps, steps[:, None].astype(np.float32) + base)
        s += k
    """
)


def test_sigkill_at_random_moments_leaves_consistent_store(tmp_path):
    rng = np.random.default_rng(0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = np.arange(3000, dtype=np.float32) / 3000
    for trial in range(3):
        p = tmp_path / f"k{trial}.zarr"
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(p)], env=env,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2 + rng.uniform(0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        ds = open_run(p)
        n = ds.sizes["step"]
        assert n > 0 and ds.attrs["status"] == "recording"
        np.testing.assert_array_equal(ds["step"].values, np.arange(n))
        expect = np.arange(n)[:, None].astype(np.float32) + base
        np.testing.assert_array_equal(ds["values"].values, expect)
        info = run_info(p)
        assert info["writer"] is None and info["steps_written"] == n
        w = RunWriter.resume(p)  # the dead writer's lock is gone
        w.write_block([n], (np.float32(n) + base)[None])
        w.close(base, n + 1)
        expect = np.arange(n + 1)[:, None].astype(np.float32) + base
        np.testing.assert_array_equal(open_run(p)["values"].values, expect)
        assert not list(p.rglob("*.partial"))


def test_result_groups(tmp_path):
    p = tmp_path / "r.zarr"
    w = _create(p)
    _write_steps(w, range(4))
    w.close(np.zeros(N), 4)
    res = xr.Dataset({"delta": ("weight", np.arange(N, dtype=float))}, attrs={"max_lag": 2})
    write_group(p, "delta", res)
    write_group(p, "delta", res * 2)  # overwrite
    got = read_group(p, "delta")
    np.testing.assert_array_equal(got["delta"].values, np.arange(N) * 2.0)
    with pytest.raises(CorrtoolsError, match="did you mean 'delta'"):
        read_group(p, "detla")
    with pytest.raises(CorrtoolsError, match="overwrite=True"):
        write_group(p, "delta", res, overwrite=False)
    with pytest.raises(CorrtoolsError, match="reserved"):
        write_group(p, "values", res)
    assert open_run(p).sizes == {"step": 4, "weight": N}  # the run is untouched
    assert run_info(p)["groups"] == ["delta"]


def test_run_info(tmp_path):
    p = tmp_path / "r.zarr"
    w = _create(p)
    _write_steps(w, [2, 4, 6])
    info = run_info(p)
    assert info["status"] == "recording" and info["steps_written"] == 3
    assert (info["step_first"], info["step_last"]) == (2, 6)
    assert info["params"] == {"a.weight": 6, "b.weight": 4}
    assert info["chunks"] == {"step": 4, "weight": N} and "blosc" in info["codecs"]
    assert info["size_bytes"] > 0 and info["n_weights"] == N
    w.close(np.zeros(N), 7)
    assert run_info(p)["total_steps"] == 7


def test_default_chunks_are_a_few_megabytes():
    for n in (1, 100, 10_000, 100_000, 10**6):
        cs, cw = store_mod.default_chunks(n)
        assert cw <= n and 16 <= cs <= 1024
        assert cs * cw * 4 <= 8 << 20
    assert store_mod.default_chunks(100_000) == (73, 14286)  # 7 even chunks of weights
    assert store_mod.default_chunks(32768) == (64, 16384)


def test_large_synthetic_store_writes_quickly(tmp_path):
    T, n = 1024, 32768
    w = RunWriter.create(tmp_path / "big.zarr", param=["x"] * n, index=np.arange(n), initial=np.zeros(n))
    block = np.random.default_rng(0).normal(size=(w.chunk_steps, n)).astype(np.float32)
    t = time.perf_counter()
    for s in range(0, T, w.chunk_steps):
        w.write_block(np.arange(s, s + w.chunk_steps), block)
    w.close(np.zeros(n), T)
    assert time.perf_counter() - t < 10  # 128 MB; ~0.2 s here, 8192 steps ~2 s
    assert open_run(tmp_path / "big.zarr").sizes == {"step": T, "weight": n}


@pytest.mark.parametrize("o_direct", [True, False])
@pytest.mark.parametrize("cw", [10, 1000])
@pytest.mark.parametrize("checksum", [True, False])
@pytest.mark.parametrize("compressor", ["lz4", "none", "zstd"])
def test_direct_chunk_writes_match_zarr_byte_for_byte(tmp_path, monkeypatch, compressor, checksum, cw, o_direct):
    """Whole chunks written without zarr's machinery are the bytes zarr writes itself: chunks below
    a page (written through the page cache) and above (whole pages with O_DIRECT where the file
    system allows it, and with O_DIRECT unavailable)."""
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, flags, *a, **k: opened.append((str(path), flags)) or real_open(path, flags, *a, **k))
    if not o_direct:
        monkeypatch.setattr(direct_mod, "_O_DIRECT", 0)
    rng = np.random.default_rng(1)
    n = int(2.3 * cw)
    data = rng.normal(size=(11, n)).astype(np.float32)
    data[2, 3] = np.nan
    data[4, 5] = np.inf
    w = RunWriter.create(tmp_path / "d.zarr", param=["p"] * n, index=np.arange(n), initial=np.zeros(n),
                         chunk_steps=4, chunk_weights=cw, compressor=compressor, checksum=checksum)
    assert (w._direct is None) == (compressor == "zstd")
    w.write_block(np.arange(8), data[:8])      # direct: two whole step-chunks, padded last column chunk
    w.write_block(np.arange(8, 10), data[8:10])  # direct: a partial step-chunk
    w.write_block([10], data[10:])              # not aligned: through zarr
    w.close(np.zeros(n), 11)
    np.testing.assert_array_equal(open_run(tmp_path / "d.zarr")["values"].values, data)
    ref = zarr.open_array(str(tmp_path / "d.zarr" / "values"), mode="r")
    twin = zarr.create_array(str(tmp_path / "twin"), shape=ref.shape, chunks=ref.chunks, dtype="float32",
                             fill_value=np.nan, compressors=store_mod._codecs(compressor, checksum))
    twin[:] = data
    for key in ("c/0/0", "c/0/2", "c/1/1", "c/2/2"):
        assert (tmp_path / "d.zarr" / "values" / key).read_bytes() == (tmp_path / "twin" / key).read_bytes(), key
    direct_opens = sum(bool(f & getattr(os, "O_DIRECT", 0)) for path, f in opened if "values" in path)
    if not (o_direct and cw == 1000 and compressor != "zstd" and hasattr(os, "O_DIRECT")):
        assert direct_opens == 0
    elif w._direct._o_direct:  # 0 only if this file system refused O_DIRECT
        # 9 chunk files written directly: 3 x 3 raw, of which lz4 may compress some below a page
        assert (direct_opens == 9) if compressor == "none" else (1 <= direct_opens <= 9), direct_opens


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("checksum", [True, False])
def test_a_whole_page_aligned_chunk_is_written_from_its_own_memory(tmp_path, aligned, checksum):
    """A block one chunk wide (the Recorder's blocks are page-aligned mmap memory) is written without
    the staging copy; the bytes are zarr's either way, and an unaligned block still goes through
    staging (issue 9: the copy was a 4 MB memcpy per block at 10^4 weights)."""
    import mmap

    n, cs = 3072, 8  # 96 KiB per chunk: whole pages, so the second chunk starts on a page too
    rng = np.random.default_rng(7)
    data = rng.normal(size=(2 * cs, n)).astype(np.float32)
    data[3, 4] = np.nan
    if aligned:
        memory = mmap.mmap(-1, data.nbytes)
        block = np.frombuffer(memory, dtype=np.float32).reshape(data.shape)
        block[:] = data
    else:
        block = np.empty(data.size + 1, dtype=np.float32)[1:].reshape(data.shape)  # 4 bytes off a page
        block[:] = data
    w = RunWriter.create(tmp_path / "a.zarr", param=["p"] * n, index=np.arange(n), initial=np.zeros(n),
                         chunk_steps=cs, compressor="none", checksum=checksum)
    assert w._direct is not None and w._direct._cw == n
    w._direct._staged.fill(123.0)  # the staging buffer, poisoned: untouched unless staging is used
    w.write_block(np.arange(2 * cs), block)
    assert bool((w._direct._staged == 123.0).all()) is aligned
    w.close(np.zeros(n), 2 * cs)
    np.testing.assert_array_equal(open_run(tmp_path / "a.zarr")["values"].values, data)
    twin = zarr.create_array(str(tmp_path / "twin"), shape=data.shape, chunks=(cs, n), dtype="float32",
                             fill_value=np.nan, compressors=store_mod._codecs("none", checksum))
    twin[:] = data
    for key in ("c/0/0", "c/1/0"):
        assert (tmp_path / "a.zarr" / "values" / key).read_bytes() == (tmp_path / "twin" / key).read_bytes(), key


@pytest.mark.parametrize("path", ["ctypes, without the GIL", "google_crc32c.value"])
def test_chunk_checksum_is_zarrs_crc32c(monkeypatch, path):
    """The trailer of a directly written chunk is zarr's crc32c codec's, whichever way it is computed."""
    import google_crc32c

    if path == "google_crc32c.value":
        monkeypatch.setattr(direct_mod, "_crc32c_without_gil", lambda: None)
    elif direct_mod._crc32c_without_gil() is None:
        pytest.skip("this google_crc32c wheel ships no libcrc32c")
    rng = np.random.default_rng(4)
    for size in (0, 1, 7, 4096, 100_003):
        data = rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()
        assert direct_mod.crc32c_bytes(data) == int(google_crc32c.value(data)).to_bytes(4, "little"), size
        assert direct_mod.crc32c_bytes(memoryview(bytearray(data))) == direct_mod.crc32c_bytes(data)


@pytest.mark.parametrize("checksum", [True, False])
def test_step_arrays_and_metadata_written_directly_match_zarr(tmp_path, checksum):
    """`step`, `lr`, `loss` and `z` chunks and every zarr.json written without zarr hold what zarr
    writes: appends of odd sizes across chunk edges, an array that starts mid-run, a resume whose
    first append lands inside a chunk, and a whole-array rewrite (`write_optional`) in between."""
    p = tmp_path / "r.zarr"
    w = _create(p, checksum=checksum)
    rng = np.random.default_rng(3)
    steps, lr, loss, z = np.arange(40), rng.random(40), rng.random(40).astype(np.float32), np.full(40, np.nan, np.float32)
    edges = [0, 3, 5, 6, 13, 17]
    for a, b in zip(edges[:-1], edges[1:]):
        opt = {"lr": lr[a:b], "loss": loss[a:b]} | ({"z": z[a:b]} if a >= 5 else {})
        w.write_block(steps[a:b], np.tile(steps[a:b, None], (1, N)).astype(np.float32), opt)
    z[5:17] = rng.random(12)
    w.write_optional("z", z[:17])
    w.abandon()
    w = RunWriter.resume(p)  # 17 rows: the next append lands inside the fifth `step` chunk
    for a, b in [(17, 23), (23, 40)]:
        w.write_block(steps[a:b], np.tile(steps[a:b, None], (1, N)).astype(np.float32),
                      {"lr": lr[a:b], "loss": loss[a:b], "z": z[a:b]})
    w.close(np.zeros(N), 40)
    ds = open_run(p)
    for name, want in [("step", steps), ("lr", lr), ("loss", loss)]:
        np.testing.assert_array_equal(ds[name].values, want)
    np.testing.assert_array_equal(ds["z"].values[:5], np.nan)
    np.testing.assert_array_equal(ds["z"].values[5:], z[5:])
    for name in ("step", "lr", "loss", "z", "values"):
        mine = zarr.open_array(str(p / name), mode="r")
        twin = zarr.create_array(str(tmp_path / "twin" / name), shape=mine.shape, chunks=mine.chunks,
                                 dtype=mine.dtype, fill_value=mine.fill_value,
                                 compressors=mine.compressors, dimension_names=mine.metadata.dimension_names,
                                 attributes=mine.attrs.asdict(), config={"write_empty_chunks": True})
        twin[:] = mine[:]
        keys = sorted(str(f.relative_to(p / name)) for f in (p / name / "c").rglob("*") if f.is_file())
        assert keys, name
        if name != "values":  # values: see test_direct_chunk_writes_match_zarr_byte_for_byte
            for key in keys:
                assert (p / name / key).read_bytes() == (tmp_path / "twin" / name / key).read_bytes(), (name, key)
        assert json.loads((p / name / "zarr.json").read_bytes()) == json.loads(
            (tmp_path / "twin" / name / "zarr.json").read_bytes()), name
    assert not list(p.rglob("*.partial"))


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux-only")
@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_chunks_are_written_when_the_file_system_refuses_o_direct(tmp_path, monkeypatch, refused_at):
    """tmpfs refuses O_DIRECT at open, some file systems only at the write: the writer falls back to
    the page cache for good and writes the same values."""
    real_open, real_write = os.open, os.write
    direct_fds: set[int] = set()

    def fake_open(path, flags, *a, **k):
        if flags & os.O_DIRECT and refused_at == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags, *a, **k)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def fake_write(fd, data):
        if fd in direct_fds:
            direct_fds.discard(fd)
            real_write(fd, bytes(memoryview(data)[:4096]))  # a page lands, then the refusal
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "write", fake_write)
    n = 3000
    data = np.random.default_rng(2).normal(size=(8, n)).astype(np.float32)
    w = RunWriter.create(tmp_path / "f.zarr", param=["p"] * n, index=np.arange(n), initial=np.zeros(n),
                         chunk_steps=4, chunk_weights=1000, compressor="none")
    w.write_block(np.arange(8), data)
    assert w._direct._o_direct == 0
    w.close(np.zeros(n), 8)
    np.testing.assert_array_equal(open_run(tmp_path / "f.zarr")["values"].values, data)
