"""Recording under torch.distributed: 2-process gloo groups on CPU, spawned inside the tests."""
from __future__ import annotations

import multiprocessing
import socket

import numpy as np
import pytest

from corrtools.cli import main
from corrtools.record.sampling import sample_indices
from corrtools.record.store import open_run, run_info
from tests.record import _dist_workers as workers

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(target, tmp_path, timeout: float = 120) -> list[int]:
    """Run target(rank, 2, port, tmp) in 2 fresh processes; their exit codes."""
    ctx = multiprocessing.get_context("spawn")
    port = _port()
    procs = [ctx.Process(target=target, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail(f"{target.__name__}: a rank hung")
    return [p.exitcode for p in procs]


@pytest.fixture(scope="module")
def ddp_and_sharded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    assert _spawn(workers.ddp_then_sharded, tmp) == [0, 0]
    return tmp


def test_ddp_rank0_writes_the_store_and_other_ranks_nothing(ddp_and_sharded):
    tmp = ddp_and_sharded
    assert sorted(p.name for p in tmp.iterdir()) == ["ddp.zarr", "ddp_expected.npz", "ref.zarr", "sharded.zarr"]
    ds = open_run(tmp / "ddp.zarr")
    assert ds.attrs["status"] == "complete"
    assert ds["step"].values.tolist() == list(range(1, workers.STEPS + 1))
    # names as in the unwrapped model; columns and values checked against the sampling and weights
    names = ["0.weight", "2.weight"]
    assert list(dict.fromkeys(ds["param"].values.tolist())) == names
    expected = np.load(tmp / "ddp_expected.npz")
    cols = []
    for name in names:
        w = expected[f"1|{name}"]
        idx = sample_indices(w.size, workers.SAMPLE, 0, name)
        np.testing.assert_array_equal(ds["index"].values[ds["param"].values == name], idx)
        cols.append(np.stack([expected[f"{s}|{name}"].reshape(-1)[idx] for s in range(1, workers.STEPS + 1)]))
    np.testing.assert_array_equal(ds["values"].values, np.concatenate(cols, axis=1))
    assert np.isfinite(ds["loss"].values).all()


def test_sharded_store_equals_the_single_process_store(ddp_and_sharded):
    tmp = ddp_and_sharded
    sharded, ref = open_run(tmp / "sharded.zarr"), open_run(tmp / "ref.zarr")
    assert sharded.attrs["status"] == "complete" and sharded.attrs["total_steps"] == workers.STEPS
    assert sharded.attrs["shards"]["world_size"] == 2
    owners = {r for r, _, _ in sharded.attrs["shards"]["segments"]}
    assert owners == {0, 1}, "both ranks must own sampled columns for this test to mean something"
    for name in ("step", "param", "index", "initial", "final", "values", "loss"):
        np.testing.assert_array_equal(sharded[name].values, ref[name].values, err_msg=name)
    # each rank wrote only its own part: disjoint chunks
    for r in (0, 1):
        part = open_run(tmp / "sharded.zarr" / "shards" / f"r{r}")
        mine = [c for o, a, b in sharded.attrs["shards"]["segments"] if o == r for c in range(a, b)]
        np.testing.assert_array_equal(part["values"].values, ref["values"].values[:, mine])
    # the dask view agrees with the lazy numpy view, also for a strided column selection
    lazy = open_run(tmp / "sharded.zarr", chunks={"weight": 4})
    np.testing.assert_array_equal(lazy["values"].values, ref["values"].values)
    np.testing.assert_array_equal(sharded["values"][2:7, ::3].values, ref["values"].values[2:7, ::3])
    info = run_info(tmp / "sharded.zarr")
    assert info["missing"] == [] and info["steps_written"] == workers.STEPS


def test_a_dead_rank_leaves_a_store_that_opens_and_info_names_its_columns(tmp_path, capsys):
    assert _spawn(workers.dies_midway, tmp_path) == [0, 3]
    path = tmp_path / "dead.zarr"
    ds = open_run(path)
    assert ds.attrs["status"] == "recording"
    assert ds["step"].values.tolist() == [1, 2, 3, 4]  # the rows both ranks committed
    assert np.isfinite(ds["values"].values).all()
    info = run_info(path)
    segments = ds.attrs["shards"]["segments"]
    lost = {}
    for owner, a, b in segments:
        if owner == 1:
            for name in ds["param"].values[a:b].tolist():
                lost[name] = lost.get(name, 0) + 1
    assert info["missing"] == [{"rank": 1, "steps_written": 4, "of": 5, "params": lost}]
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("missing"))
    assert "rank 1 committed 4 of 5 steps" in line
    for name, count in lost.items():
        assert f"{name} ({count})" in line


@pytest.mark.parametrize("where", ["local", "memory"])
def test_sharded_layout_joins_parts_and_guards_them(where, tmp_path):
    """The store functions alone (no process group): two parts with interleaved segments."""
    from corrtools.errors import CorrtoolsError
    from corrtools.record.store import RunWriter, create_sharded, finish_sharded, shard_path

    path = str(tmp_path / "s.zarr") if where == "local" else f"memory://sharded-{tmp_path.name}.zarr"
    names = ["a"] * 5 + ["b"] * 4
    segments = [(0, 0, 3), (1, 3, 5), (0, 5, 6), (1, 6, 9)]
    full = np.arange(6 * 9, dtype=np.float32).reshape(6, 9)
    create_sharded(path, names, np.arange(9), segments, world_size=2)
    writers = {}
    for r in (0, 1):
        mine = [c for o, a, b in segments if o == r for c in range(a, b)]
        writers[r] = RunWriter.create(shard_path(path, r), [names[c] for c in mine], np.array(mine),
                                      initial=full[0, mine], chunk_steps=2)
        writers[r].write_block(np.arange(1, 5), full[1:5, mine])
    with pytest.raises(CorrtoolsError, match="being recorded by"):
        create_sharded(path, names, np.arange(9), segments, world_size=2, overwrite=True)
    writers[0].write_block([5], full[5:6, [0, 1, 2, 5]])  # rank 1 stays one row behind
    ds = open_run(path)
    np.testing.assert_array_equal(ds["values"].values, full[1:5])
    np.testing.assert_array_equal(ds["initial"].values, full[0])
    np.testing.assert_array_equal(open_run(path, chunks={})["values"].values, full[1:5])
    np.testing.assert_array_equal(ds["values"][[0, 3], [8, 1, 4]].values, full[1:5][[0, 3]][:, [8, 1, 4]])
    assert run_info(path)["missing"] == [{"rank": 1, "steps_written": 4, "of": 5, "params": {"a": 2, "b": 3}}]
    for r, w in writers.items():
        w.close(full[5, [c for o, a, b in segments if o == r for c in range(a, b)]], 5)
    finish_sharded(path, 5)
    assert open_run(path).attrs["status"] == "complete"
    create_sharded(path, names, np.arange(9), segments, world_size=2, overwrite=True)  # free now
    assert open_run(path).sizes["step"] == 0
