"""Writes of a local run store that bypass zarr's async machinery (used by `store.RunWriter` only).

On the recorder's hot path zarr's own writes cost several times the CPU of the bytes they move: a
block of 41 rows spent ~5 ms in zarr for the three small step-indexed arrays and four metadata
resizes, holding the GIL the training thread needs. Here each is one atomic file write of the
bytes zarr itself would write (tested byte for byte against zarr):

- `ValuesChunks`: whole chunks of `values` (float32; bytes, optionally blosc, optionally crc32c),
  whole pages with O_DIRECT where the file system allows it;
- `RowChunks`: a 1-D step-indexed array (`step`, `lr`, `loss`, `z`; bytes, optionally crc32c),
  keeping the chunk being filled in memory, so appending never reads;
- `ShapeFile`: an array's ``zarr.json`` with a new number of rows.

Every file is written under a temporary name and renamed into place, as zarr's local store does,
so a killed process leaves the old file or the new one, never a torn one. Each class declines
(``for_array`` returns None) for any codec it does not reproduce; zarr is used for those.
"""
from __future__ import annotations

import errno
import functools
import json
import mmap
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr

__all__ = ["RowChunks", "ShapeFile", "ValuesChunks", "crc32c_bytes", "write_file"]

_PAGE = mmap.PAGESIZE
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere every write goes through the page cache
_BYTES_LE = {"name": "bytes", "configuration": {"endian": "little"}}


@functools.cache
def _crc32c_without_gil() -> Callable[[int, int], int] | None:
    """``crc32c_value(address, size)`` of the crc32c library that google_crc32c's wheel ships,
    called through ctypes, which releases the GIL for the call; None where it is not found.

    google_crc32c's own ``value`` keeps the GIL for anything but `bytes` of 1 MB and more, so a
    2.3 MB chunk (10^5 weights) would hold the training thread off the GIL for the whole checksum
    (96 µs measured through ctypes; 2.3 MB at the 13.8 GB/s measured for google_crc32c is ~0.17 ms)."""
    import ctypes

    import google_crc32c  # a dependency of zarr's crc32c codec

    folder = Path(google_crc32c.__file__).parent
    for lib in sorted((folder.parent / f"{folder.name}.libs").glob("libcrc32c*.so*")):
        try:
            fn = ctypes.CDLL(str(lib)).crc32c_value
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_uint32
        return fn
    return None


def crc32c_bytes(buf: Any) -> bytes:
    """zarr's crc32c codec trailer of the bytes-like `buf`: 4 bytes, little-endian."""
    data = np.frombuffer(buf, dtype=np.uint8)
    fn = _crc32c_without_gil()
    if fn is not None and data.size:
        return int(fn(data.ctypes.data, data.size)).to_bytes(4, "little")
    import google_crc32c

    data.flags.writeable = False  # google_crc32c takes read-only buffers only
    return int(google_crc32c.value(data)).to_bytes(4, "little")


def _write_all(fd: int, data: Any) -> None:
    """os.write until all of the bytes-like `data` is written."""
    view = memoryview(data).cast("B")
    while len(view):
        view = view[os.write(fd, view):]


def _temporary(target: Path) -> Path:
    return target.with_name(f"{target.name}.{uuid.uuid4().hex}.partial")


def write_file(target: Path, *parts: Any) -> None:
    """Atomically replace `target` by the concatenated bytes-like `parts` (page cache)."""
    tmp = _temporary(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        for part in parts:
            _write_all(fd, part)
    finally:
        os.close(fd)
    os.replace(tmp, target)


def _whole_aligned(chunk: np.ndarray, shape: tuple[int, int]) -> bool:
    """Whether `chunk` is a whole chunk of `shape`, C-contiguous, starting on a page: then its
    memory is the chunk's raw bytes and can be written as it is, O_DIRECT included."""
    return (chunk.shape == shape and chunk.dtype == np.dtype("<f4") and chunk.flags.c_contiguous
            and chunk.ctypes.data % _PAGE == 0)


def _codec_names(array: zarr.Array) -> tuple[list[dict[str, Any]], bool] | None:
    """The codecs between ``bytes`` (little-endian) and an optional final ``crc32c``, and whether
    that checksum is there; None unless the array starts with little-endian ``bytes``."""
    codecs = [c.to_dict() for c in array.metadata.codecs]
    if array.metadata.storage_transformers or not codecs or codecs[0] != _BYTES_LE:
        return None
    checksum = codecs[-1].get("name") == "crc32c"
    return (codecs[1:-1] if checksum else codecs[1:]), checksum


class _MadeFolders:
    """Chunk folders known to exist: one mkdir per folder, not per chunk."""

    def __init__(self) -> None:
        self._made: set[Path] = set()

    def ensure(self, folder: Path) -> None:
        if folder not in self._made:
            folder.mkdir(parents=True, exist_ok=True)
            self._made.add(folder)


class ValuesChunks:
    """Writes whole `values` chunks (float32, C order: bytes, optionally blosc, optionally crc32c)
    with numcodecs and one atomic file write each. Used only for blocks that start on a chunk
    boundary."""

    def __init__(self, array: zarr.Array, folder: Path, codec: Any, checksum: bool):
        self._array = array
        self._folder = folder
        self._codec = codec
        self._checksum = checksum
        self._cs, self._cw = (int(c) for c in array.chunks)
        raw = self._cs * self._cw * 4
        # page-aligned staging for one encoded chunk (blosc can exceed the raw size by its header)
        self._buf = mmap.mmap(-1, -(-(raw + raw // 16 + 4096) // _PAGE) * _PAGE)
        self._staged = np.frombuffer(self._buf, dtype="<f4", count=self._cs * self._cw).reshape(self._cs, self._cw)
        self._folders = _MadeFolders()
        self._o_direct = _O_DIRECT  # cleared for good once the file system refuses it

    @classmethod
    def for_array(cls, array: zarr.Array, folder: Path) -> ValuesChunks | None:
        import numcodecs

        found = _codec_names(array)
        if array.dtype != np.float32 or found is None:
            return None
        middle, checksum = found
        if not middle:
            return cls(array, folder, None, checksum)
        if len(middle) != 1 or middle[0].get("name") != "blosc":
            return None
        cfg = middle[0]["configuration"]
        shuffle = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
                   "bitshuffle": numcodecs.Blosc.BITSHUFFLE}.get(cfg.get("shuffle"))
        if shuffle is None or cfg.get("typesize") != 4:
            return None
        codec = numcodecs.Blosc(cname=cfg["cname"], clevel=cfg["clevel"], shuffle=shuffle,
                                blocksize=cfg.get("blocksize", 0))
        return cls(array, folder, codec, checksum)

    def write_rows(self, row0: int, values: np.ndarray) -> None:
        """Write rows [row0, row0 + k) of (k, N) `values`; row0 is a multiple of chunk_steps. Chunks
        are padded with NaN (the fill value) past the last row and the last column.

        Each chunk file is written in place, not renamed in: every row of it is at or after `row0`,
        which no reader looks at until `step` grows, so a write cut short by a kill damages only
        rows that were never committed (and `RunWriter.resume` writes them again). That saves a
        rename per chunk, ~140 µs of wall each on this VM's ext4 (median of 200)."""
        cs, cw = self._cs, self._cw
        k, n = values.shape
        for r in range(0, k, cs):
            rows = values[r : r + cs]
            for c in range(0, n, cw):
                chunk = rows[:, c : c + cw]
                if self._codec is None and _whole_aligned(chunk, (cs, cw)):
                    # the chunk is already its own bytes in page-aligned memory (one chunk column,
                    # e.g. <= 16384 weights, and the Recorder's page-aligned blocks): no staging copy
                    self._write_chunk((row0 + r) // cs, c // cw, memoryview(chunk).cast("B"))
                    continue
                staged = self._staged  # the chunk, C order, in page-aligned memory
                if chunk.shape != (cs, cw):
                    staged.fill(np.nan)
                staged[: chunk.shape[0], : chunk.shape[1]] = chunk
                view = memoryview(self._buf)
                if self._codec is None:
                    size = staged.nbytes
                else:
                    encoded = self._codec.encode(staged)
                    size = len(encoded)
                    view[:size] = encoded
                self._write_chunk((row0 + r) // cs, c // cw, view[:size])

    def _write_chunk(self, i: int, j: int, data: memoryview) -> None:
        """Write chunk (i, j) of `values`: its encoded bytes `data` (page-aligned) and the checksum."""
        tail = crc32c_bytes(data) if self._checksum else b""
        target = self._folder / self._array.metadata.encode_chunk_key((i, j))
        self._folders.ensure(target.parent)
        self._write_direct(target, data, tail)

    def _write_direct(self, path: Path, data: memoryview, tail: bytes) -> None:
        """Make `path` hold `data` (page-aligned memory) then `tail`. The whole pages of `data`
        are written with O_DIRECT where the file system allows it: the disk takes them straight from
        our buffer, which here costs the writer thread 3-10x less CPU than going through the page
        cache (docs/recorder.md, "Performance"); the rest, and everything where O_DIRECT is refused
        (tmpfs, some network file systems), goes through the page cache."""
        head = len(data) // _PAGE * _PAGE if self._o_direct else 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            fd = os.open(path, flags | (self._o_direct if head else 0), 0o666)
        except OSError as err:
            if not head or err.errno != errno.EINVAL:
                raise
            self._o_direct, head = 0, 0
            fd = os.open(path, flags, 0o666)
        try:
            if head:
                try:
                    _write_all(fd, data[:head])
                except OSError as err:
                    if err.errno != errno.EINVAL:
                        raise
                    self._o_direct, head = 0, 0  # e.g. a block size above the page size
                    os.ftruncate(fd, 0)
                    os.lseek(fd, 0, os.SEEK_SET)
                import fcntl  # O_DIRECT exists only where fcntl does

                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
            _write_all(fd, data[head:])
            _write_all(fd, tail)
        finally:
            os.close(fd)


class RowChunks:
    """Appends to a 1-D step-indexed array (bytes codec, optionally crc32c; ints and floats of
    2 or more bytes), rewriting each chunk the rows land in. The chunk being filled stays in memory,
    so an append reads from disk only the first time it lands in a chunk that already holds rows."""

    def __init__(self, array: zarr.Array, folder: Path, checksum: bool):
        self._key = array.metadata.encode_chunk_key
        self._folder = folder
        self._checksum = checksum
        self._cs = int(array.chunks[0])
        self._dtype = np.dtype(array.dtype).newbyteorder("<")
        self._fill = np.asarray(array.fill_value, dtype=self._dtype)
        self._chunk = -1  # number of the chunk held in `_buf`
        self._buf = np.full(self._cs, self._fill, dtype=self._dtype)
        self._folders = _MadeFolders()

    @classmethod
    def for_array(cls, array: zarr.Array, folder: Path) -> RowChunks | None:
        found = _codec_names(array)
        dtype = np.dtype(array.dtype)
        if found is None or found[0] or array.ndim != 1 or dtype.kind not in "iuf" or dtype.itemsize < 2:
            return None
        return cls(array, folder, found[1])

    def write(self, row0: int, data: np.ndarray, read: Callable[[int, int], np.ndarray]) -> None:
        """Write (k,) `data` as rows [row0, row0 + k); ``read(lo, hi)`` gives rows already on disk
        (called only for the rows of a chunk before `row0` that this object has not seen)."""
        cs, k = self._cs, len(data)
        done = 0
        while done < k:
            pos = row0 + done
            c, off = divmod(pos, cs)
            take = min(cs - off, k - done)
            if c != self._chunk:
                self._buf.fill(self._fill)
                if off:
                    self._buf[:off] = read(c * cs, pos)
                self._chunk = c
            self._buf[off : off + take] = data[done : done + take]
            self._buf[off + take :] = self._fill  # rows past the end: fill, as zarr writes them (also
            # after an append that failed part-way and is written again shorter)
            target = self._folder / self._key((c,))
            self._folders.ensure(target.parent)
            raw = self._buf.tobytes()
            write_file(target, raw, crc32c_bytes(raw) if self._checksum else b"")
            done += take

    def forget(self) -> None:
        """The array was written by someone else (zarr): read the current chunk again."""
        self._chunk = -1


class ShapeFile:
    """An array's ``zarr.json``, rewritten with a new number of rows (everything else unchanged,
    laid out as zarr writes it: JSON indented by 2)."""

    _MARK = -7_318_205_553  # stands for the number of rows in the template

    def __init__(self, folder: Path):
        self._path = folder / "zarr.json"
        doc = json.loads(self._path.read_bytes())
        doc["shape"][0] = self._MARK
        # json.dumps with indent runs the pure-Python encoder (~0.8 ms per call under cProfile): once
        head, mark, tail = json.dumps(doc, indent=2).partition(str(self._MARK))
        if not mark or str(self._MARK) in tail:  # pragma: no cover - the mark is not a real number
            raise RuntimeError(f"cannot template {self._path}")
        self._head, self._tail = head.encode(), tail.encode()

    def set_rows(self, rows: int) -> None:
        write_file(self._path, self._head, str(int(rows)).encode(), self._tail)
