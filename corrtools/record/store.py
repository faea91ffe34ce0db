"""The run store, format 1: the only module that knows the Zarr layout.

A run store is a Zarr v3 group (see DESIGN.md, "The run store, format 1")::

    attrs   corrtools_format = 1, status = "recording" | "complete", every, sample, seed, created,
            model, optimizer, torch_version, total_steps (once complete), ...
    step    (step,)          int64    optimizer step after which the row was taken (fill -1)
    values  (step, weight)   float32  the sampled weights' values, chunked (chunk_steps, chunk_weights)
    param   (weight,)        str      parameter name of each column
    index   (weight,)        int64    flat index inside that parameter
    initial (weight,)        float32  value before the first step
    final   (weight,)        float32  value when the run closed (NaN while recording)
    optional arrays with a leading `step` dimension, e.g. loss (step,), lr (step,), mask (step, weight),
            z (step,) float32: the RESET interval (optimizer steps) in effect after the row's step, NaN
            where none (see `z_for_rows`)
    subgroups for results, e.g. `delta/` (see `write_group`)

Durability. Rows are committed one block at a time, and the length of `step` is the commit record:
a block's chunks (of `values`, the optional arrays, then `step`) are written first, without touching
any metadata, then the metadata of the other arrays grows, and the metadata of `step` grows last.
In a local store all of this is written by `_direct` as files (zarr's own path cost several times
the CPU): every file holding a committed row, and every ``zarr.json``, is written to a temporary
name and renamed, as zarr's local store does; a `values` chunk that starts a block holds no
committed row and is written in place. So a process killed at any moment (SIGKILL) leaves every
array readable and `step` never claims a row whose chunks are not on disk. Other arrays may be
longer than `step` after such a kill; readers (`open_run`) take the first ``len(step)`` rows and
`RunWriter.resume` trims them. Durability against power loss (fsync) is not attempted.

A lock file ``step/writer.lock`` inside the store (where Zarr never lists), held while a `RunWriter`
is open, refuses a second writer; the kernel releases it when the writing process dies, so a killed
run can be resumed without manual cleanup. Readers never take it (see `_lock`).

Creation. A new store is built in a hidden sibling folder (``.NAME.<random>.new``) and renamed into
place only once it is complete and locked, so a failed creation leaves nothing behind, two writers
racing for one new path end with one store and a lock message for the other, and ``overwrite=True``
replaces an existing run store only after the new one exists (the old one is renamed aside, the new
one renamed in, then the old one deleted).

Object stores. A path may be an fsspec URL (``s3://bucket/run.zarr``, ``memory://run.zarr``; see
`_location`). There nothing can be renamed, so a store is built in place after its lock object is
taken, ``overwrite=True`` deletes the old store first, and zarr writes each chunk as one atomic
object (the direct chunk writer is local only). The commit order above is kept, so a writer killed
mid-write leaves whole rows there too.

Integrity. Every array carries a ``crc32c`` checksum after its codecs (Zarr v3's checksum codec), so
a corrupted or truncated chunk fails to decode instead of giving other numbers, and `open_run`
checks that every chunk of the committed rows exists (a missing chunk would read as fill values).
Both raise a one-line `CorrtoolsError` naming the chunk. Stores written before the checksum was
added are still read (without that protection).
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import shutil
import uuid
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr
from xarray.backends import BackendArray
from xarray.core import indexing

from corrtools.errors import CorrtoolsError, close_matches
from corrtools.record._direct import RowChunks, ShapeFile, ValuesChunks
from corrtools.record._location import Location, ObjectLock, store_path
from corrtools.record._lock import WriterLock

__all__ = [
    "FORMAT",
    "RunWriter",
    "check_chunking",
    "check_compressor",
    "check_new_store",
    "create_sharded",
    "default_chunks",
    "finish_sharded",
    "open_run",
    "read_group",
    "run_attrs",
    "run_info",
    "shard_path",
    "truncate_run",
    "write_group",
    "Z",
    "z_for_rows",
]

FORMAT = 1
Z = "z"  # the optional (step,) array of the RESET interval in effect; see `z_for_rows`
STEP, WEIGHT = "step", "weight"
_CORE = ("step", "values", "param", "index", "initial", "final")
_LOCK_PATH = ("step", "writer.lock")  # inside an array's folder, where Zarr readers never list
_TARGET_CHUNK_BYTES = 4 << 20  # ~4 MiB of float32 per `values` chunk before compression
_MAX_CHUNK_WEIGHTS = 16384
_FILL = {"f": np.nan, "b": False, "i": -1, "u": 0}
_COMPRESSORS = ("lz4", "zstd", "none")
_WRITE_ALL = {"write_empty_chunks": True}  # a written row always has its chunk on disk (see _missing_chunks)
_SHARDS = "shards"  # the subgroup holding the parts of a sharded store, one per rank

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------------------- chunking
def default_chunks(n_weights: int, itemsize: int = 4) -> tuple[int, int]:
    """(chunk_steps, chunk_weights) for `values`: ~4 MiB per chunk, the weights split evenly into
    chunks of at most 16384 (no mostly-empty edge chunk), between 16 and 1024 steps tall."""
    n_weights = max(1, int(n_weights))
    n_chunks = -(-n_weights // _MAX_CHUNK_WEIGHTS)
    chunk_weights = -(-n_weights // n_chunks)
    chunk_steps = _TARGET_CHUNK_BYTES // (itemsize * chunk_weights)
    return int(min(max(chunk_steps, 16), 1024)), chunk_weights


def check_chunking(chunk_steps: Any, chunk_weights: Any = None) -> None:
    """CorrtoolsError unless each of chunk_steps / chunk_weights is None or a positive int."""
    for name, v in (("chunk_steps", chunk_steps), ("chunk_weights", chunk_weights)):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise CorrtoolsError(f"{name}={v!r} must be a positive int (rows or columns per chunk) or None for the default")


def check_compressor(name: Any) -> None:
    """CorrtoolsError unless ``name`` is a known `values` codec name."""
    if name not in _COMPRESSORS:
        raise CorrtoolsError(f"compressor {name!r} is unknown; use 'lz4', 'zstd' or 'none'")


def _codecs(name: str, checksum: bool = True) -> list[Any]:
    """The bytes-to-bytes codecs of `values`: the compressor (if any), then the crc32c checksum."""
    comp = _compressor(name)
    return [*([comp] if comp is not None else []), *([zarr.codecs.Crc32cCodec()] if checksum else [])]


def _compressor(name: str) -> Any:
    """The `values` codec. Measured on 41 x 100k float32 weights of the CharLM workload (see
    docs/recorder.md): blosc lz4 + bitshuffle stores 0.85 of the raw size (lz4 + byte shuffle
    0.89, zstd-1 ~0.9, none 1.0) at the lowest CPU cost per block, since on this machine writing
    the bytes costs the kernel about as much CPU as compressing them."""
    if name == "lz4":
        return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=4)
    if name == "zstd":
        return zarr.codecs.ZstdCodec(level=1)
    check_compressor(name)
    return None


# -------------------------------------------------------------------------------------- opening
def _not_a_store(path: Location) -> CorrtoolsError:
    if not path.exists():
        return CorrtoolsError(
            f"no run store at {str(path)!r}; pass the path of a store written by corrtools.Recorder "
            "(or make one with `corrtools demo`)"
        )
    return CorrtoolsError(
        f"{str(path)!r} is not a corrtools run store (no Zarr v3 group with a 'corrtools_format' "
        "attribute); pass the path of a store written by corrtools.Recorder"
    )


def _open_group(path: PathLike, mode: str = "r") -> zarr.Group:
    p = Location(path)
    if not p.is_file("zarr.json"):
        raise _not_a_store(p)
    try:
        group = zarr.open_group(p.url, mode=mode, zarr_format=3)
        fmt = group.attrs.get("corrtools_format")
    except Exception as err:  # malformed metadata, a Zarr v2 store, ...
        raise _not_a_store(p) from err
    if fmt is None:
        raise _not_a_store(p)
    if isinstance(fmt, bool) or fmt != FORMAT or not isinstance(fmt, int):
        raise CorrtoolsError(
            f"{str(p)!r} has corrtools_format {fmt!r} ({type(fmt).__name__}) but this corrtools reads "
            f"format {FORMAT} (the integer); the store is damaged or from another version of corrtools, "
            "record it again or upgrade corrtools"
        )
    return group


def _where(group: zarr.Group) -> str:
    return repr(str(getattr(group.store, "root", group.store_path)))


def _damaged_metadata(group: zarr.Group, name: str, err: BaseException) -> CorrtoolsError:
    return CorrtoolsError(
        f"the metadata of {name!r} (file {name}/zarr.json) in run store {_where(group)} cannot be read "
        f"({_reason(err)}); the store is damaged: restore that file from a backup or record the run again"
    )


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "checksum" in text.lower():
        return "checksum mismatch"
    return text if len(text) <= 100 else text[:97] + "..."


def _node(group: zarr.Group, name: str) -> zarr.Array | zarr.Group | None:
    """The member `name` of the group, None if absent; damaged metadata is a CorrtoolsError."""
    try:
        return group[name]
    except KeyError:
        return None
    except Exception as err:  # garbage zarr.json
        raise _damaged_metadata(group, name, err) from err


def _member_names(group: zarr.Group) -> list[str]:
    from zarr.core.sync import sync

    async def collect() -> list[str]:
        return [k async for k in group.store_path.store.list_dir(group.store_path.path)]

    return sorted(k.rstrip("/") for k in sync(collect()) if k != "zarr.json")


def _members(group: zarr.Group) -> dict[str, zarr.Array | zarr.Group]:
    """Every array and subgroup of the group, by name (one by one, so damage names its member)."""
    out = {}
    for name in _member_names(group):
        node = _node(group, name)
        if node is not None:
            out[name] = node
    return out


def _array(group: zarr.Group, name: str) -> zarr.Array:
    node = _node(group, name)
    if not isinstance(node, zarr.Array):
        raise CorrtoolsError(
            f"run store {_where(group)} has no array {name!r}; it is damaged or not a "
            "corrtools run store, record it again"
        )
    return node


def _step_arrays(group: zarr.Group) -> dict[str, zarr.Array]:
    """Every array whose first dimension is `step`, except `step` itself, by name."""
    out = {}
    for name, node in _members(group).items():
        if not isinstance(node, zarr.Array):
            continue
        dims = node.metadata.dimension_names or ()
        if name != STEP and dims and dims[0] == STEP:
            out[name] = node
    return out


def _groups(group: zarr.Group) -> list[str]:
    """The result groups (the parts of a sharded store are not results)."""
    return sorted(n for n, node in _members(group).items() if isinstance(node, zarr.Group) and n != _SHARDS)


# ------------------------------------------------------------------------------------ integrity
def _has_checksum(array: zarr.Array) -> bool:
    return any(c.to_dict().get("name") == "crc32c" for c in array.metadata.codecs)


def _chunk_keys(array: zarr.Array, rows: int) -> list[str]:
    """Keys of the chunks that hold the first `rows` rows (every chunk along the other dims)."""
    import itertools

    counts = [-(-rows // int(array.chunks[0]))]
    counts += [-(-int(s) // int(c)) for s, c in zip(array.shape[1:], array.chunks[1:])]
    return [array.metadata.encode_chunk_key(idx) for idx in itertools.product(*map(range, counts))]


def _stored_keys(array: zarr.Array) -> set[str]:
    from zarr.core.sync import sync

    prefix = array.store_path.path.rstrip("/") + "/"

    async def collect() -> list[str]:
        return [k async for k in array.store_path.store.list_prefix(prefix)]

    return {k[len(prefix):] for k in sync(collect())}


def _check_chunks(group: zarr.Group, n: int, arrays: Mapping[str, zarr.Array]) -> None:
    """CorrtoolsError naming every chunk of the committed rows that is missing from the store.

    Checked: `step`, `values`, `param`, `index`, and every other array written with a checksum (those
    are written with all their chunks, fill-valued ones included); `final` and the optional arrays
    only once complete (while recording, an optional array that first appears mid-run has its
    metadata on disk a moment before the fill chunks of its earlier rows)."""
    complete = group.attrs.get("status") == "complete"
    missing: list[str] = []
    for name, arr in arrays.items():
        if name not in (STEP, "values", "param", "index") and not _has_checksum(arr):
            continue  # an older store: zarr skipped chunks holding only fill values
        if name not in _CORE and not complete or name == "final" and not complete:
            continue
        dims = arr.metadata.dimension_names or ()
        rows = n if dims and dims[0] == STEP else int(arr.shape[0])
        stored = _stored_keys(arr)
        missing += [f"{name}/{k}" for k in _chunk_keys(arr, rows) if k not in stored]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CorrtoolsError(
            f"run store {_where(group)} is missing {len(missing)} chunk file(s) of its {n} recorded "
            f"rows ({shown}); the store is damaged: restore them from a backup or record the run again"
        )


def _check_steps(group: zarr.Group, steps: np.ndarray) -> None:
    if steps.size and (steps[0] < 0 or np.any(np.diff(steps) <= 0)):
        raise CorrtoolsError(
            f"the `step` array of run store {_where(group)} does not increase (it holds "
            f"{steps[:3].tolist()}...); the store is damaged: record the run again"
        )


def _damaged_chunk(array: zarr.Array, key: Any, err: BaseException) -> CorrtoolsError:
    """The error for a failed read of `array[key]`: finds and names the chunk that fails to decode."""
    import itertools

    bad = None
    ranges = []
    for k, size, chunk in zip(key if isinstance(key, tuple) else (key,), array.shape, array.chunks):
        if isinstance(k, slice):
            lo, hi, _ = k.indices(size)
        elif isinstance(k, (int, np.integer)):
            lo, hi = int(k), int(k) + 1
        else:
            idx = np.asarray(k).reshape(-1)
            lo, hi = (int(idx.min()), int(idx.max()) + 1) if idx.size else (0, 0)
        ranges.append(range(lo // chunk, -(-hi // chunk)))
    for idx in itertools.product(*ranges):
        try:
            array.blocks[idx]
        except Exception:
            bad = array.metadata.encode_chunk_key(idx)
            break
    name = array.path
    what = f"chunk {name}/{bad}" if bad else f"a chunk of {name!r}"
    return CorrtoolsError(
        f"{what} of run store {str(getattr(array.store, 'root', array.store_path))!r} cannot be decoded "
        f"({_reason(err)}); the file is damaged: restore it from a backup or record the run again"
    )


def _read(array: zarr.Array, key: Any, outer: bool = False) -> np.ndarray:
    """``array[key]`` (or ``array.oindex[key]``) as numpy; a chunk that fails to decode is a
    CorrtoolsError naming it."""
    try:
        return np.asarray(array.oindex[key] if outer else array[key])
    except CorrtoolsError:
        raise
    except Exception as err:
        raise _damaged_chunk(array, key, err) from err


class _Checked:
    """An array-like over a zarr array whose reads go through `_read` (for dask.array.from_array)."""

    def __init__(self, array: zarr.Array):
        self._array = array
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.chunks = array.chunks

    def __getitem__(self, key: Any) -> np.ndarray:
        return _read(self._array, key)


class _LazyRows(BackendArray):
    """The first `n` rows of a zarr array, lazily indexed by xarray (outer indexing, numpy-backed)."""

    def __init__(self, array: zarr.Array, n: int):
        self._array = array
        self.shape = (n, *array.shape[1:])
        self.dtype = array.dtype

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.OUTER, self._raw_getitem
        )

    def _raw_getitem(self, key: tuple) -> np.ndarray:
        # slices are bounded by our shape, not by the (possibly longer) zarr array
        key = tuple(slice(*k.indices(s)) if isinstance(k, slice) else k for k, s in zip(key, self.shape))
        return _read(self._array, key, outer=True)


def _dask_rows(array: zarr.Array, n: int, dims: Sequence[str], chunks: Any) -> Any:
    import dask.array as da

    native = tuple(array.chunks)
    shape = (n, *array.shape[1:])
    norm = _chunk_spec(chunks, dims, native, shape, array.dtype)
    checked = _Checked(array)
    if n == array.shape[0]:
        return da.from_array(checked, chunks=norm, lock=False, asarray=True, meta=np.empty((0,) * array.ndim, array.dtype))
    full = da.from_array(checked, chunks=native, lock=False, asarray=True, meta=np.empty((0,) * array.ndim, array.dtype))
    return full[:n].rechunk(norm)


def _chunk_spec(chunks: Any, dims: Sequence[str], native: tuple[int, ...], shape: tuple[int, ...], dtype: Any) -> Any:
    """`open_run`'s ``chunks`` argument as dask chunks for an array of `shape` stored in `native` chunks."""
    import dask.array as da

    if chunks == "auto":
        spec: Any = "auto"
    elif isinstance(chunks, Mapping):
        unknown = set(chunks) - set(dims)
        if unknown:
            raise CorrtoolsError(
                f"chunks names unknown dimension(s) {sorted(unknown)}; use 'step' and 'weight'"
            )
        spec = tuple(chunks.get(d, c) for d, c in zip(dims, native))
    else:
        raise CorrtoolsError(f"chunks={chunks!r} is not understood; use None, 'auto' or a dict like {{'weight': 4096}}")
    return da.core.normalize_chunks(spec, shape=shape, dtype=dtype, previous_chunks=native)


def _check_shapes(group: zarr.Group, n: int, core: Mapping[str, zarr.Array], arrays: Mapping[str, zarr.Array]) -> None:
    """CorrtoolsError when the arrays' shapes do not fit together (damaged metadata)."""
    n_weights = int(core["values"].shape[1]) if core["values"].ndim == 2 else -1
    problems = [f"{name!r} has shape {tuple(a.shape)}" for name, a in core.items()
                if name != "values" and tuple(a.shape) != (n_weights,)]
    problems += [f"{name!r} has {a.shape[0]} rows but `step` has {n}" for name, a in arrays.items() if a.shape[0] < n]
    if core["values"].ndim != 2 or "values" not in arrays:
        problems.insert(0, f"'values' has dimensions {core['values'].metadata.dimension_names}")
    if problems:
        raise CorrtoolsError(
            f"run store {_where(group)} is damaged: {'; '.join(problems)} (expected {n} rows of "
            f"{n_weights} weights); record the run again"
        )


def _strings(values: Any) -> np.ndarray:
    return np.asarray([str(v) for v in np.asarray(values).tolist()], dtype=str)


def run_attrs(path: PathLike) -> dict[str, Any]:
    """The top-level attrs of the run store at ``path`` (metadata only: no array is opened or
    checked); CorrtoolsError if it is not one."""
    return dict(_open_group(path).attrs)


def open_run(path: PathLike, chunks: None | str | Mapping[str, int] = None) -> xr.Dataset:
    """Open a run store as an `xarray.Dataset` with dims (step, weight).

    Data variable ``values`` (step, weight) float32; coords ``step`` (step,) int64, ``param``,
    ``index``, ``initial``, ``final`` (weight,); optional ``loss``/``lr``/... (step,); attrs from the
    store plus ``steps_written``. Only rows committed to disk are shown (see the module docstring).

    ``chunks=None`` gives lazily indexed numpy-backed arrays (no dask); ``"auto"``, ``{}`` (native
    chunks) or a dict such as ``{"weight": 4096}`` give dask arrays.
    """
    group = _open_group(path)
    if _SHARDS in group.attrs:
        return _open_sharded(path, group, chunks)
    step_arr = _array(group, STEP)  # first: the other arrays are at least as long (commit order)
    n = int(step_arr.shape[0])
    core = {name: _array(group, name) for name in ("values", "param", "index", "initial", "final")}
    arrays = _step_arrays(group)
    _check_shapes(group, n, core, arrays)
    _check_chunks(group, n, {STEP: step_arr, **core, **arrays})
    steps = _read(step_arr, slice(0, n)).astype(np.int64)
    _check_steps(group, steps)
    weight_coords = {
        "param": _strings(_read(core["param"], slice(None))),
        "index": _read(core["index"], slice(None)).astype(np.int64),
        "initial": _read(core["initial"], slice(None)).astype(np.float32),
        "final": _read(core["final"], slice(None)).astype(np.float32),
    }
    data_vars: dict[Hashable, xr.Variable] = {}
    for name in sorted(arrays, key=lambda k: (k != "values", k)):
        arr = arrays[name]
        dims = tuple(arr.metadata.dimension_names)
        if arr.ndim == 1:
            data = _read(arr, slice(0, n))
        elif chunks is None:
            data = indexing.LazilyIndexedArray(_LazyRows(arr, n))
        else:
            data = _dask_rows(arr, n, dims, chunks)
        var = xr.Variable(dims, data, attrs=dict(arr.attrs))
        var.encoding = {"chunks": tuple(arr.chunks), "preferred_chunks": dict(zip(dims, arr.chunks))}
        data_vars[name] = var
    coords = {STEP: (STEP, steps), **{k: (WEIGHT, v) for k, v in weight_coords.items()}}
    attrs = dict(group.attrs)
    attrs["steps_written"] = n
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def z_for_rows(steps: np.ndarray, changes: Sequence[tuple[int, float]]) -> np.ndarray:
    """The `z` column (k,) float32 for rows taken after `steps` (k,): the value of the last change
    ``(from_step, z)`` with from_step <= the row's step (changes in the order made; NaN before the first
    and for z = NaN, i.e. no reset)."""
    out = np.full(len(steps), np.nan, dtype=np.float32)
    for first, z in changes:  # later changes overwrite earlier ones from their step on
        out[np.asarray(steps) >= first] = z
    return out


# ------------------------------------------------------------------------------------- writing
def _lock(store: Location | Path) -> WriterLock | ObjectLock:
    if not isinstance(store, Location):
        store = Location(store)
    return store.lock(*_LOCK_PATH, what=f"run store {str(store)!r}")


def _grown(array: zarr.Array, rows: int) -> zarr.Array:
    """A handle on the same array whose in-memory shape has `rows` rows; writing through it stores
    chunks without touching the array's metadata on disk."""
    meta = array.metadata.update_shape((rows, *array.shape[1:]))
    return zarr.Array(zarr.AsyncArray(meta, array.store_path, array.config))


def _fill_for(dtype: np.dtype) -> Any:
    return _FILL.get(np.dtype(dtype).kind, 0)


class RunWriter:
    """Appends rows to a run store in blocks; holds the store's lock while open.

    Create with `RunWriter.create` or `RunWriter.resume`; write with `write_block`; finish with
    `close` (status "complete") or `abandon` (leaves status "recording", e.g. after an error).
    Not thread-safe: use it from one thread at a time.
    """

    def __init__(self, path: Location, group: zarr.Group, lock: WriterLock | ObjectLock):
        self.path = store_path(path.url)
        self._group = group
        self._lock = lock
        self._step = _array(group, STEP).with_config(_WRITE_ALL)
        self._values = _array(group, "values").with_config(_WRITE_ALL)
        self._extra = {k: a.with_config(_WRITE_ALL) for k, a in _step_arrays(group).items()}
        self._extra.pop("values")
        self.n_weights = int(self._values.shape[1])
        self.n_steps = int(self._step.shape[0])
        self.last_step = int(self._step[self.n_steps - 1]) if self.n_steps else -1
        self.chunk_steps, self.chunk_weights = (int(c) for c in self._values.chunks)
        # local stores: chunks and metadata written as files (see `_direct`); object stores:
        # zarr's own writes (one PUT per chunk, atomic)
        self._local = path.local
        self._direct = ValuesChunks.for_array(self._values, path.local / "values") if path.local else None
        self._rows: dict[str, RowChunks | None] = {}   # per 1-D step array, made on first use
        self._shapes: dict[str, ShapeFile] = {}         # per step-indexed array, made on first use

    # -------------------------------------------------------------------------- construction
    @classmethod
    def create(
        cls,
        path: PathLike,
        param: Sequence[str],
        index: np.ndarray,
        initial: np.ndarray,
        attrs: Mapping[str, Any] | None = None,
        chunk_steps: int | None = None,
        chunk_weights: int | None = None,
        overwrite: bool = False,
        compressor: str = "lz4",
        checksum: bool = True,
    ) -> RunWriter:
        """Create a store with N weight columns: `param` (N,) names, `index` (N,) int64 flat
        indices, `initial` (N,) float32 values; status "recording". `attrs` must be JSON-able.

        Every argument is checked before anything is written. The store is built beside `path` and
        renamed into place (see the module docstring): ``overwrite=True`` replaces an existing
        corrtools run store only once the new one exists, and never replaces anything else.
        ``checksum=False`` leaves out the crc32c codec (for measuring what it costs)."""
        p = Location(path)
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        initial = np.asarray(initial, dtype=np.float32).reshape(-1)
        n = len(index)
        if len(param) != n or len(initial) != n or n == 0:
            raise CorrtoolsError(
                f"param, index and initial must have the same non-zero length, got {len(param)}, "
                f"{len(index)}, {len(initial)}; pass one entry per recorded weight"
            )
        check_chunking(chunk_steps, chunk_weights)
        cs_default, cw_default = default_chunks(n)
        cs = int(chunk_steps or cs_default)
        cw = int(min(chunk_weights or cw_default, n))
        codecs = _codecs(compressor, checksum)
        crc = [zarr.codecs.Crc32cCodec()] if checksum else []
        base = {
            "corrtools_format": FORMAT,
            "status": "recording",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        user = _jsonable(dict(attrs or {}))
        check_new_store(p.url, overwrite)

        def build(where: str) -> None:
            group = zarr.create_group(where, zarr_format=3, attributes={**user, **base})
            group.create_array(
                STEP, shape=(0,), chunks=(cs,), dtype="int64", fill_value=-1,
                dimension_names=(STEP,), compressors=crc, config=_WRITE_ALL,
            )
            group.create_array(
                "values", shape=(0, n), chunks=(cs, cw), dtype="float32", fill_value=np.nan,
                dimension_names=(STEP, WEIGHT), compressors=codecs, config=_WRITE_ALL,
                attributes={"coordinates": "param index initial final"},
            )
            _weight_arrays(group, param, index, initial, crc)

        if p.local is None:  # an object store: no rename, build in place under the lock object
            return cls._create_in_place(p, build, overwrite)
        p = p.local
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CorrtoolsError(
                f"cannot create the folder {str(p.parent)!r} for the run store ({err.strerror}); "
                "choose a path in a writable folder"
            ) from None
        tmp = p.parent / f".{p.name}.{uuid.uuid4().hex[:8]}.new"
        tmp.joinpath(*_LOCK_PATH[:-1]).mkdir(parents=True)
        lock = _lock(tmp)
        lock.acquire()
        try:
            build(str(tmp))
            _install(tmp, p, lock, overwrite)
        except BaseException:
            lock.release()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(Location(p), zarr.open_group(str(p), mode="r+", zarr_format=3), lock)

    @classmethod
    def _create_in_place(cls, p: Location, build: Any, overwrite: bool) -> RunWriter:
        if overwrite and p.exists():
            p.remove()  # check_new_store found no writer; an object store cannot swap atomically
        lock = _lock(p)
        lock.acquire()
        try:
            build(p.url)
        except BaseException:
            lock.release()
            raise
        return cls(p, zarr.open_group(p.url, mode="r+", zarr_format=3), lock)

    @classmethod
    def resume(cls, path: PathLike) -> RunWriter:
        """Reopen a store to append after its last committed step; status becomes "recording",
        `final` and `total_steps` are cleared, rows beyond the commit (from a killed run) dropped."""
        p = Location(path)
        group = _open_group(p.url, mode="r+")
        lock = _lock(p)
        lock.acquire()
        try:
            _shrink_rows(group, int(_array(group, STEP).shape[0]))
            for leftover in p.local.rglob("*.partial") if p.local else ():  # writes cut short by a kill
                leftover.unlink(missing_ok=True)
            _mark_recording(group)
        except BaseException:
            lock.release()
            raise
        return cls(p, group, lock)

    # ------------------------------------------------------------------------------- writing
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._group.attrs)

    def update_attrs(self, **attrs: Any) -> None:
        """Merge JSON-able `attrs` into the store's attrs (one metadata write)."""
        self._check_open()
        self._group.attrs.update(_jsonable(attrs))

    def write_block(
        self,
        steps: np.ndarray,
        values: np.ndarray,
        optional: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Append k rows: `steps` (k,) int64, strictly increasing and after `last_step`; `values`
        (k, N) float32; `optional` maps a name to (k,) or (k, N) data (e.g. ``{"loss": ...}``),
        creating the array on first use (earlier rows are NaN / False / -1). Optional arrays not
        given get fill values for these rows. Committed atomically (see the module docstring)."""
        self._check_open()
        steps = np.asarray(steps, dtype=np.int64).reshape(-1)
        k = len(steps)
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (k, self.n_weights):
            raise CorrtoolsError(
                f"values has shape {values.shape} but {k} steps of {self.n_weights} weights were "
                f"expected; pass a ({k}, {self.n_weights}) array"
            )
        if k == 0:
            return
        if steps[0] <= self.last_step or (k > 1 and np.any(np.diff(steps) <= 0)):
            raise CorrtoolsError(
                f"steps {steps[:3].tolist()}... do not strictly increase after the last recorded step "
                f"{self.last_step}; each step may be recorded once, in order"
            )
        optional = dict(optional or {})
        for name, data in list(optional.items()):
            optional[name] = self._check_optional(name, data, k)
        n0, n1 = self.n_steps, self.n_steps + k
        # 1. chunks of every step-indexed array, then `step`'s own chunks, metadata untouched
        # rows before the first chunk boundary (after a resume or a flush) through zarr, which
        # reads and rewrites their chunk; the rest, from a chunk boundary on, as whole chunks
        head = k if self._direct is None else min(k, -n0 % self.chunk_steps)
        if head:
            _grown(self._values, n0 + head)[n0 : n0 + head] = values[:head]
        if head < k:
            self._direct.write_rows(n0 + head, values[head:])
        for name, arr in self._extra.items():
            data = optional.get(name)
            if data is None:
                data = np.full((k, *arr.shape[1:]), _fill_for(arr.dtype), dtype=arr.dtype)
            self._append(name, arr, n0, data)
        self._append(STEP, self._step, n0, steps)
        # 2. grow metadata; `step` last: its length is the commit record
        for name, arr in [("values", self._values), *self._extra.items(), (STEP, self._step)]:
            self._set_rows(name, arr, n1)
        self.n_steps, self.last_step = n1, int(steps[-1])

    def _append(self, name: str, arr: zarr.Array, n0: int, data: np.ndarray) -> None:
        """Write `data` as rows [n0, n0 + k) of the step array `name`, metadata untouched."""
        if name not in self._rows:
            self._rows[name] = RowChunks.for_array(arr, self._local / name) if self._local else None
        rows = self._rows[name]
        if rows is None:
            _grown(arr, n0 + len(data))[n0:] = data
        else:
            rows.write(n0, data, lambda lo, hi: _grown(arr, n0)[lo:hi])

    def _set_rows(self, name: str, arr: zarr.Array, rows: int) -> None:
        """Grow the metadata of the step array `name` to `rows` rows."""
        if self._local is None:
            arr.resize((rows, *arr.shape[1:]))
            return
        if name not in self._shapes:
            self._shapes[name] = ShapeFile(self._local / name)
        self._shapes[name].set_rows(rows)

    def write_optional(self, name: str, data: np.ndarray) -> None:
        """Write a whole optional array over the rows written so far: (n_steps,) or (n_steps, N),
        e.g. a RESET interval `z` decided after the fact. Replaces an existing array of that name."""
        self._check_open()
        data = self._check_optional(name, data, self.n_steps)
        _grown(self._extra[name], self.n_steps)[:] = data
        if self._rows.get(name) is not None:
            self._rows[name].forget()

    def _check_optional(self, name: str, data: Any, k: int) -> np.ndarray:
        if name in _CORE:
            raise CorrtoolsError(f"optional array name {name!r} is reserved; choose another name")
        data = np.asarray(data)
        if data.dtype.kind == "f":
            data = data.astype(np.float64 if data.dtype == np.float64 else np.float32, copy=False)
        elif data.dtype.kind in "iu":
            data = data.astype(np.int64, copy=False)
        elif data.dtype.kind != "b":
            raise CorrtoolsError(f"optional array {name!r} has dtype {data.dtype}; use float, int or bool")
        if data.shape not in ((k,), (k, self.n_weights)):
            raise CorrtoolsError(
                f"optional array {name!r} has shape {data.shape}; pass ({k},) or ({k}, {self.n_weights})"
            )
        arr = self._extra.get(name)
        if arr is None:
            self._create_optional(name, data, rows=self.n_steps)
        elif arr.ndim != data.ndim:
            raise CorrtoolsError(
                f"optional array {name!r} was recorded with {arr.ndim} dimension(s) but got {data.ndim}; "
                "keep its shape the same for every block"
            )
        return data.astype(self._extra[name].dtype, copy=False)

    def _create_optional(self, name: str, data: np.ndarray, rows: int) -> zarr.Array:
        if data.ndim == 1:
            shape, chunks, dims = (rows,), (max(self.chunk_steps, 1024),), (STEP,)
        else:
            shape, chunks, dims = (rows, self.n_weights), (self.chunk_steps, self.chunk_weights), (STEP, WEIGHT)
        arr = self._group.create_array(
            name, shape=shape, chunks=chunks, dtype=data.dtype, fill_value=_fill_for(data.dtype),
            dimension_names=dims, overwrite=True, config=_WRITE_ALL,
            compressors=[zarr.codecs.Crc32cCodec()] if _has_checksum(self._values) else "auto",
        )
        if rows:  # the rows before its first use hold fill values, in chunks on disk like any other
            arr[:rows] = np.full((rows, *shape[1:]), _fill_for(data.dtype), dtype=data.dtype)
        self._extra[name] = arr
        self._rows.pop(name, None)
        self._shapes.pop(name, None)
        return arr

    # ------------------------------------------------------------------------------- closing
    def close(self, final: np.ndarray, total_steps: int) -> None:
        """Write `final` (N,) float32, set status "complete" and `total_steps` (optimizer steps the
        run took, recorded or not), release the lock."""
        self._check_open()
        final = np.asarray(final, dtype=np.float32).reshape(-1)
        if final.shape != (self.n_weights,):
            raise CorrtoolsError(f"final has {final.size} values; pass one per recorded weight ({self.n_weights})")
        try:
            _array(self._group, "final")[:] = final
            self._group.attrs.update({"status": "complete", "total_steps": int(total_steps)})
        finally:
            self._lock.release()

    def abandon(self) -> None:
        """Release the lock without completing: the store stays "recording" and can be resumed."""
        self._lock.release()

    @property
    def closed(self) -> bool:
        return not self._lock.held

    def _check_open(self) -> None:
        if not self._lock.held:
            raise CorrtoolsError(f"the writer of {str(self.path)!r} is closed; resume it to write more")

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abandon()


def _shrink_rows(group: zarr.Group, n: int) -> None:
    """Cut `values` and every optional step array to their first `n` rows (`step` is not touched)."""
    for arr in [_array(group, "values"), *_step_arrays(group).values()]:
        if arr.shape[0] > n:
            arr.resize((n, *arr.shape[1:]))


def _mark_recording(group: zarr.Group) -> None:
    """Status "recording" again: `final` NaN, no `total_steps`."""
    final = _array(group, "final").with_config(_WRITE_ALL)  # a NaN chunk, not a deleted one
    final[:] = np.full(final.shape, np.nan, dtype=np.float32)
    attrs = dict(group.attrs)
    attrs.pop("total_steps", None)
    attrs["status"] = "recording"
    group.attrs.put(attrs)


def truncate_run(path: PathLike, after_step: int) -> int:
    """Drop the rows taken after optimizer step ``after_step`` and return how many were dropped.

    For a run resumed from a checkpoint older than the store's last row: the rows after the
    checkpoint belong to the abandoned continuation and would be recorded again. `step` is shrunk
    first (it is the commit record), so a kill during truncation leaves a store that opens. When rows
    are dropped the store becomes "recording" again (``final`` NaN, no ``total_steps``).
    """
    p = Location(path)
    group = _open_group(p.url, mode="r+")
    lock = _lock(p)
    lock.acquire()
    try:
        step_arr = _array(group, STEP)
        steps = np.asarray(step_arr[:], dtype=np.int64)
        keep = int(np.searchsorted(steps, int(after_step), side="right"))
        dropped = len(steps) - keep
        if dropped:
            step_arr.resize((keep,))  # the commit record first
            _shrink_rows(group, keep)
            _mark_recording(group)
    finally:
        lock.release()
    return dropped


def _weight_arrays(
    group: zarr.Group, param: Sequence[str], index: np.ndarray, initial: np.ndarray | None, crc: list[Any]
) -> None:
    """The (weight,) arrays param, index, and (when `initial` is given) initial and final."""
    n = len(index)
    arrays = [("param", param, str, ""), ("index", index, "int64", -1)]
    if initial is not None:
        arrays += [("initial", initial, "float32", np.nan), ("final", None, "float32", np.nan)]
    for name, data, dtype, fill in arrays:
        arr = group.create_array(
            name, shape=(n,), chunks=(min(n, 1 << 20),), dtype=dtype, fill_value=fill,
            dimension_names=(WEIGHT,), compressors=[*([] if dtype is str else crc)], config=_WRITE_ALL,
        )
        if name == "param":
            arr[:] = np.asarray([str(s) for s in param], dtype=object)
        elif data is not None:
            arr[:] = data


def _is_run_store(p: Path | Location) -> bool:
    if isinstance(p, Location):
        try:
            _open_group(p.url)
            return True
        except CorrtoolsError:
            return False
    try:
        return "corrtools_format" in json.loads((p / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False


def check_new_store(path: PathLike, overwrite: bool = False) -> None:
    """CorrtoolsError unless a new run store may be created at ``path``: nothing is there, or with
    ``overwrite`` a corrtools run store that no writer holds (or an empty folder); of a sharded
    store, no rank's part may be held either. Writes nothing."""
    where = Location(path)
    p = where.local
    if p is None:  # an object store: a "folder" is a key prefix
        if not where.exists():
            return
        shown, folder = where.url, True
    else:
        if not (p.exists() or p.is_symlink()):
            return
        shown, folder = str(p), p.is_dir()
    for part in [where if p is None else p, *_part_locations(where)] if folder else []:
        holder = _lock(part).holder()
        if holder is not None:
            raise _lock(part).busy(holder)
    if not overwrite:
        raise CorrtoolsError(
            f"{shown!r} already exists; pass overwrite=True to replace it or resume=True to continue it"
        )
    if p is None:
        replaceable = _is_run_store(where)
    else:
        replaceable = p.is_dir() and not p.is_symlink() and (_is_run_store(p) or not any(p.iterdir()))
    if replaceable:
        return
    raise CorrtoolsError(
        f"{shown!r} exists and is not a corrtools run store; refusing to replace it with "
        "overwrite=True, delete it yourself or choose another path"
    )


def _install(tmp: Path, p: Path, lock: WriterLock, overwrite: bool) -> None:
    """Rename the finished store `tmp` (its lock held) to `p`; with `overwrite`, an existing run store
    at `p` is renamed aside first and deleted only after the new one is in place."""
    old = None
    old_lock = None
    if overwrite and p.is_dir() and _is_run_store(p):
        old_lock = _lock(p)
        try:
            old_lock.acquire()  # no writer may start on the old store while it is replaced
        except FileNotFoundError:  # a run store without a step/ folder: damaged, nobody writes it
            old_lock = None
        old = p.parent / f".{p.name}.{uuid.uuid4().hex[:8]}.old"
        os.rename(p, old)
    try:
        os.rename(tmp, p)  # replaces only an empty folder; fails if another store got there first
    except OSError as err:
        if old is not None:
            os.rename(old, p)
        if old_lock is not None:
            old_lock.release()
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
        holder = _lock(p).holder()
        if holder is not None:
            raise _lock(p).busy(holder) from None
        raise CorrtoolsError(
            f"{str(p)!r} was created by someone else while this store was being made; pass "
            "resume=True to continue it or choose another path"
        ) from None
    lock.moved_to(p.joinpath(*_LOCK_PATH))
    if old is not None:
        if old_lock is not None:
            old_lock.moved_to(old.joinpath(*_LOCK_PATH))
            old_lock.release()
        shutil.rmtree(old, ignore_errors=True)


def _jsonable(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Attrs as JSON values (numpy scalars converted); a clear error for anything else."""
    out = {}
    for key, val in attrs.items():
        if isinstance(val, np.generic):
            val = val.item()
        try:
            json.dumps(val, allow_nan=True)
        except TypeError:
            raise CorrtoolsError(
                f"attribute {key!r} = {val!r} is not JSON-serialisable; pass str, numbers, lists or dicts"
            ) from None
        out[str(key)] = val
    return out


# ------------------------------------------------------------------------------ result groups
def write_group(path: PathLike, name: str, ds: xr.Dataset, overwrite: bool = True) -> None:
    """Write a result `ds` (e.g. Δ per weight) as the subgroup `name` of the run store at `path`."""
    group = _open_group(path, mode="r+")
    if name in _CORE or name in _step_arrays(group) or not name or "/" in name:
        raise CorrtoolsError(f"result group name {name!r} is reserved or invalid; choose another name")
    if name in group and not overwrite:
        raise CorrtoolsError(f"{str(path)!r} already has a group {name!r}; pass overwrite=True to replace it")
    ds.to_zarr(str(path), group=name, mode="w", zarr_format=3, consolidated=False)


def read_group(path: PathLike, name: str) -> xr.Dataset:
    """Read the result subgroup `name` of the run store at `path`, loaded into memory."""
    group = _open_group(path)
    groups = _groups(group)
    if name not in groups:
        hint = close_matches(name, groups) or (f" (it has {groups})" if groups else " (it has none)")
        raise CorrtoolsError(f"run store {str(path)!r} has no result group {name!r}{hint}; compute it first")
    with xr.open_zarr(str(path), group=name, consolidated=False, zarr_format=3, chunks=None) as ds:
        return ds.load()


# ------------------------------------------------------------------------------------- info
def _du(p: Location) -> int:
    return p.size(skip=_LOCK_PATH[-1])


def _progress(p: Location, step_arr: zarr.Array, n: int, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """When rows were last committed and how fast, from file times alone (no lock, no writes).

    The metadata of `step` is rewritten last in every commit, so its mtime is the last write. Each
    chunk of `step` is written once, by the commit that fills it, so the mtimes of the last few
    chunks against the steps they end at give the recent recording rate (optimizer steps per second);
    with a single chunk, the rate since `created` is used instead."""
    last = p.mtime(STEP, "zarr.json")
    out: dict[str, Any] = {"last_write": None, "seconds_since_write": None, "steps_per_second": None}
    if last is None or n == 0:
        return out
    now = _dt.datetime.now(_dt.timezone.utc).timestamp()
    out["last_write"] = _dt.datetime.fromtimestamp(last, _dt.timezone.utc).isoformat(timespec="seconds")
    out["seconds_since_write"] = max(0.0, now - last)
    cs = int(step_arr.chunks[0])
    chunks = range(max(0, (n - 1) // cs - 8), (n - 1) // cs + 1)  # the last few chunks of `step`
    rows = [min((k + 1) * cs, n) - 1 for k in chunks]  # the last committed row of each
    steps = _read(step_arr, (rows,), outer=True).astype(np.int64)
    ends: list[tuple[float, int]] = []  # (mtime, step at the chunk's last committed row)
    for k, step in zip(chunks, steps.tolist()):
        when = p.mtime(STEP, *step_arr.metadata.encode_chunk_key((k,)).split("/"))
        if when is not None:
            ends.append((when, int(step)))
    if len(ends) >= 2 and ends[-1][0] > ends[0][0]:
        out["steps_per_second"] = (ends[-1][1] - ends[0][1]) / (ends[-1][0] - ends[0][0])
    else:
        try:
            start = _dt.datetime.fromisoformat(str(attrs.get("created"))).timestamp()
        except ValueError:
            return out
        if last > start:
            out["steps_per_second"] = float(steps[-1]) / (last - start)
    return out


def run_info(path: PathLike) -> dict[str, Any]:
    """A summary of a run store (what `corrtools info` prints): status, steps, parameters, chunking,
    size on disk (bytes), arrays, result groups, attrs, and progress: ``last_write`` (ISO time of the
    last committed row), ``seconds_since_write`` and ``steps_per_second`` (the recent recording rate)."""
    p = Location(path)
    group = _open_group(p.url)
    if _SHARDS in group.attrs:
        return _sharded_info(p, group)
    step_arr = _array(group, STEP)
    n = int(step_arr.shape[0])
    core = {name: _array(group, name) for name in ("values", "param", "index", "initial", "final")}
    arrays = _step_arrays(group)
    _check_shapes(group, n, core, arrays)
    _check_chunks(group, n, {STEP: step_arr, **core, **arrays})
    values = core["values"]
    ends = _read(step_arr, sorted({0, n - 1})).astype(np.int64) if n else None
    if ends is not None:
        _check_steps(group, ends)
    first = int(ends[0]) if n else None
    last = int(ends[-1]) if n else None
    names = _strings(_read(core["param"], slice(None)))
    params: dict[str, int] = {}
    for name in names.tolist():
        params[name] = params.get(name, 0) + 1
    attrs = dict(group.attrs)
    comp = values.metadata.codecs
    return {
        "path": str(p),
        "status": attrs.get("status"),
        "format": attrs.get("corrtools_format"),
        "steps_written": n,
        "step_first": first,
        "step_last": last,
        "total_steps": attrs.get("total_steps"),
        "n_weights": int(values.shape[1]),
        "params": params,
        "chunks": {"step": int(values.chunks[0]), "weight": int(values.chunks[1])},
        "codecs": [c.to_dict().get("name") for c in comp],
        "optional": sorted(arrays.keys() - {"values"}),
        "groups": _groups(group),
        "size_bytes": _du(p),
        "writer": _lock(p).holder(),
        "progress": _progress(p, step_arr, n, attrs),
        "attrs": attrs,
    }


# ---------------------------------------------------------------------------------- sharded stores
# A store recorded from sharded parameters (record/distributed.py) is one group whose attrs carry
# ``shards = {"world_size": W, "segments": [[rank, start, stop], ...]}``: the N columns in store
# order, each range [start, stop) owned by one rank. The top holds ``param`` and ``index`` (N,);
# every rank r writes its own columns, concatenated in store order, as a complete run store in the
# subgroup ``shards/r<r>`` (its own step, values, initial, final, lock and commit record), so ranks
# never write the same chunk. `open_run` shows the rows every part has committed, as one (step,
# weight) dataset equal to a single process's recording; `run_info` names the columns of parts that
# are behind (a rank that died).
def shard_path(path: PathLike, rank: int) -> Path | str:
    """Where rank `rank` writes its part of the sharded store at `path` (a `RunWriter.create` path)."""
    return store_path(Location(path).join(_SHARDS, f"r{int(rank)}").url)


def _part_locations(p: Location) -> list[Location]:
    if p.local is not None:
        return [Location(q) for q in sorted(p.local.joinpath(_SHARDS).glob("r*"))]
    return [p.join(_SHARDS, f"r{r}") for r in range(_world_size(p))]


def _world_size(p: Location) -> int:
    try:
        return int(zarr.open_group(p.url, mode="r").attrs.get(_SHARDS, {}).get("world_size", 0))
    except Exception:  # no store there, or not a sharded one
        return 0


def create_sharded(
    path: PathLike,
    param: Sequence[str],
    index: np.ndarray,
    segments: Sequence[tuple[int, int, int]],
    world_size: int,
    overwrite: bool = False,
) -> None:
    """Create the top of a sharded store (rank 0, before any rank creates its part): `param` (N,),
    `index` (N,) and the owner of each column range, `segments` [(rank, start, stop), ...]."""
    p = Location(path)
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    n = len(index)
    spans = [(int(r), int(a), int(b)) for r, a, b in segments]
    if len(param) != n or n == 0 or [a for _, a, _ in spans] != [0, *[b for _, _, b in spans[:-1]]] or spans[-1][2] != n:
        raise CorrtoolsError(  # pragma: no cover - built by record/distributed.py
            f"segments {spans[:4]}... do not cover the {n} columns in order; pass consecutive ranges"
        )
    check_new_store(p.url, overwrite)
    if overwrite and p.exists():  # no writer holds it (checked); a sharded store is not renamed in
        p.remove()
    attrs = {
        "corrtools_format": FORMAT,
        "status": "recording",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        _SHARDS: {"world_size": int(world_size), "segments": [list(s) for s in spans]},
    }
    group = zarr.create_group(p.url, zarr_format=3, attributes=attrs)
    _weight_arrays(group, param, index, None, [zarr.codecs.Crc32cCodec()])
    group.create_group(_SHARDS)


def finish_sharded(path: PathLike, total_steps: int) -> None:
    """Mark a sharded store "complete" (rank 0, after every rank closed its part)."""
    group = _open_group(path, mode="r+")
    group.attrs.update({"status": "complete", "total_steps": int(total_steps)})


class _Parts:
    """The parts of a sharded store: each rank's group (None if it never wrote one), the rows all
    of them committed, and for each column segment where its columns sit in the owner's part."""

    def __init__(self, path: PathLike, group: zarr.Group):
        spec = group.attrs[_SHARDS]
        self.world = int(spec["world_size"])
        self.groups: dict[int, zarr.Group | None] = {}
        for r in range(self.world):
            try:
                self.groups[r] = _open_group(shard_path(path, r))
            except CorrtoolsError:
                self.groups[r] = None
        self.rows = {r: (int(_array(g, STEP).shape[0]) if g is not None else 0) for r, g in self.groups.items()}
        self.n = min(self.rows.values())
        self.segments = []  # (rank, start, stop, local start)
        local = dict.fromkeys(range(self.world), 0)
        for r, a, b in spec["segments"]:
            self.segments.append((int(r), int(a), int(b), local[r]))
            local[r] += b - a
        self.n_weights = int(spec["segments"][-1][2])

    def weights(self, name: str) -> np.ndarray:
        """A (weight,) float32 array (initial, final) gathered from the parts; NaN for missing ones."""
        out = np.full(self.n_weights, np.nan, dtype=np.float32)
        for r, a, b, la in self.segments:
            g = self.groups[r]
            if g is not None:
                out[a:b] = _read(_array(g, name), slice(la, la + b - a))
        return out

    def columns(self, name: str) -> list[tuple[zarr.Array, int, int, int]]:
        """(owner's array `name`, start, stop, local start) per segment."""
        return [(_array(self.groups[r], name), a, b, la) for r, a, b, la in self.segments]


class _LazyColumns(BackendArray):
    """The first `n` rows of (step, weight) data spread over the parts' arrays, lazily indexed."""

    def __init__(self, columns: list[tuple[zarr.Array, int, int, int]], n: int, n_weights: int):
        self._columns = columns
        self.shape = (n, n_weights)
        self.dtype = columns[0][0].dtype

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.OUTER, self._raw_getitem
        )

    def _raw_getitem(self, key: tuple) -> np.ndarray:
        rows, cols = key
        if isinstance(rows, slice):
            rows = slice(*rows.indices(self.shape[0]))
        scalar = isinstance(cols, (int, np.integer))
        want = np.arange(self.shape[1])[cols].reshape(-1)
        n_rows = len(range(*rows.indices(self.shape[0]))) if isinstance(rows, slice) else np.size(rows)
        out = np.empty((n_rows, want.size), dtype=self.dtype)
        for arr, a, b, la in self._columns:
            hit = np.nonzero((want >= a) & (want < b))[0]
            if not hit.size:
                continue
            local = want[hit] - a + la
            contiguous = np.array_equal(local, np.arange(local[0], local[0] + local.size))
            sel = slice(int(local[0]), int(local[0]) + local.size) if contiguous else local
            block = _read(arr, (rows, sel), outer=True).reshape(n_rows, -1)
            if contiguous and np.array_equal(hit, np.arange(hit[0], hit[0] + hit.size)):
                out[:, hit[0] : hit[0] + hit.size] = block
            else:
                out[:, hit] = block
        if isinstance(rows, (int, np.integer)):
            out = out[0]
        return out[..., 0] if scalar else out


def _sharded_data(parts: _Parts, name: str, chunks: Any) -> Any:
    """(n, N) data of the 2-D step array `name` from the parts: lazy numpy, or dask (chunks)."""
    columns = parts.columns(name)
    if chunks is None:
        return indexing.LazilyIndexedArray(_LazyColumns(columns, parts.n, parts.n_weights))
    import dask.array as da

    pieces = [
        da.from_array(_Checked(arr), chunks=arr.chunks, lock=False, asarray=True,
                      meta=np.empty((0, 0), arr.dtype))[: parts.n, la : la + b - a]
        for arr, a, b, la in columns
    ]
    whole = da.concatenate(pieces, axis=1)
    native = tuple(int(c) for c in columns[0][0].chunks)
    return whole.rechunk(_chunk_spec(chunks, (STEP, WEIGHT), native, whole.shape, whole.dtype))


def _open_sharded(path: PathLike, group: zarr.Group, chunks: Any) -> xr.Dataset:
    parts = _Parts(path, group)
    n = parts.n
    first = parts.groups[0]
    steps = _read(_array(first, STEP), slice(0, n)).astype(np.int64) if first is not None else np.zeros(0, np.int64)
    for r, g in parts.groups.items():
        if g is not None:  # each part's committed rows have all their chunks
            _check_chunks(g, parts.rows[r], {STEP: _array(g, STEP), **_step_arrays(g)})
        if g is not None and not np.array_equal(_read(_array(g, STEP), slice(0, n)), steps):
            raise CorrtoolsError(
                f"the parts of {str(path)!r} recorded different steps (rank {r} differs from rank 0); "
                "the store is damaged, record it again"
            )
    coords = {
        STEP: (STEP, steps),
        "param": (WEIGHT, _strings(_read(_array(group, "param"), slice(None)))),
        "index": (WEIGHT, _read(_array(group, "index"), slice(None)).astype(np.int64)),
        "initial": (WEIGHT, parts.weights("initial")),
        "final": (WEIGHT, parts.weights("final")),
    }
    data_vars: dict[Hashable, xr.Variable] = {}
    if first is not None and n:
        for name, arr in sorted(_step_arrays(first).items(), key=lambda kv: (kv[0] != "values", kv[0])):
            dims = tuple(arr.metadata.dimension_names)
            if arr.ndim == 1:  # per-step data (loss, lr): rank 0's
                data: Any = _read(arr, slice(0, n))
            else:
                data = _sharded_data(parts, name, chunks)
            var = xr.Variable(dims, data, attrs=dict(arr.attrs))
            var.encoding = {"chunks": tuple(arr.chunks), "preferred_chunks": dict(zip(dims, arr.chunks))}
            data_vars[name] = var
    else:  # no row committed by every rank
        data_vars["values"] = xr.Variable((STEP, WEIGHT), np.zeros((0, parts.n_weights), np.float32))
    top = dict(group.attrs)
    attrs = {**(dict(first.attrs) if first is not None else {}), **top}
    attrs.pop("rank", None)
    attrs["steps_written"] = n
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _sharded_info(p: Location, group: zarr.Group) -> dict[str, Any]:
    parts = _Parts(p.url, group)
    ds = _open_sharded(p.url, group, None)
    names = np.asarray(ds["param"].values)
    params: dict[str, int] = {}
    for name in names.tolist():
        params[name] = params.get(name, 0) + 1
    most = max(parts.rows.values())
    ranks, missing = [], []
    for r, g in parts.groups.items():
        ranks.append({
            "rank": r, "steps_written": parts.rows[r],
            "status": g.attrs.get("status") if g is not None else "never created",
            "writer": _lock(Location(shard_path(p.url, r))).holder() if g is not None else None,
        })
        if parts.rows[r] < most:
            cols: dict[str, int] = {}
            for owner, a, b, _ in parts.segments:
                if owner == r:
                    for name in names[a:b].tolist():
                        cols[name] = cols.get(name, 0) + 1
            missing.append({"rank": r, "steps_written": parts.rows[r], "of": most, "params": cols})
    first = parts.groups[0]
    values = _array(first, "values") if first is not None else None
    attrs = dict(ds.attrs)
    attrs.pop("steps_written", None)
    n = parts.n
    writers = [f"rank {x['rank']}: {x['writer']}" for x in ranks if x["writer"]]
    return {
        "path": str(p),
        "status": attrs.get("status"),
        "format": attrs.get("corrtools_format"),
        "steps_written": n,
        "step_first": int(ds["step"].values[0]) if n else None,
        "step_last": int(ds["step"].values[-1]) if n else None,
        "total_steps": attrs.get("total_steps"),
        "n_weights": parts.n_weights,
        "params": params,
        "chunks": {"step": int(values.chunks[0]), "weight": int(values.chunks[1])} if values is not None else {},
        "codecs": [c.to_dict().get("name") for c in values.metadata.codecs] if values is not None else [],
        "optional": sorted(set(ds.data_vars) - {"values"}),
        "groups": _groups(group),
        "size_bytes": _du(p),
        "writer": "; ".join(writers) or None,
        "ranks": ranks,
        "missing": missing,
        "attrs": attrs,
    }
