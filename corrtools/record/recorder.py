"""The Recorder: streams sampled per-weight trajectories of a PyTorch run into a run store.

Per recorded step the sampled values of all parameters are gathered into one row of a preallocated
host block (on CUDA: into one float32 device buffer, then one non-blocking copy into pinned host
memory). Sampled runs of consecutive weights are gathered as rows of a (numel // 16, 16) view: one
64-byte copy per cache line touched; a parameter's runs at a fixed stride (the default "strided"
layout) are one slice of that view, copied with one ``copy_``, other runs and single weights with
``index_select``. Full blocks
of whole chunks (several chunks tall up to 16 MiB, see `_block_steps`; the first after a resume may
be shorter, to end on a chunk boundary) go through a bounded queue to one background thread that
writes them with `RunWriter.write_block`, whole chunks without zarr's machinery (see
``record/_direct.py``), so training waits on compression and disk only when the writer falls more
than the queue behind. The writer runs under ``SCHED_IDLE`` (Linux; else nice 10), on cores
training leaves idle; the first time training would wait for it, a nice-10 writer takes over
(``_promote_writer``). Memory is a fixed ring of blocks, independent of run length. Nothing is
written per step.

Loss window. A block reaches disk when it is full, and in any case once ``flush_every`` seconds
(default 30) have passed since the last write: the next row taken after that moment first hands
the rows collected so far to the writer. A run killed at any moment therefore keeps every row taken
more than ``flush_every`` seconds (plus the writer's queue) before the kill, as long as training was
taking rows; a partial write never breaks the commit order (``step`` grows last), and the rest of
that chunk is written through zarr when the block is full.

Steps. ``rec.step`` counts optimizer steps (1 after the first ``optimizer.step()``); a row is taken
after every step that is a multiple of ``every``. ``initial`` holds the values at construction
(step 0), ``final`` the values at ``close()``.

Loss. ``rec.log(loss=x)`` attaches ``x`` to the most recent optimizer step (call it after
``optimizer.step()``); ``rec.record(loss=x)`` counts a step and attaches ``x`` to it. The stored
``loss`` (step,) float32 of a row taken at step s is the mean of the values logged for the steps
(previous row's step, s], NaN when none were logged; with ``every=1`` it is simply the loss of step
s. ``lr`` (step,) float64 is ``param_groups[0]["lr"]`` of the attached optimizer when the row is
taken, i.e. the rate used by that step (schedulers usually step after the optimizer).

Distributed. Under ``torch.distributed`` (see ``record/distributed.py``): with replicated parameters
(DDP; a ``DistributedDataParallel`` wrapper is looked through) rank 0 records a normal store and the
other ranks get an idle Recorder that does nothing at all; with sharded parameters (FSDP2
``fully_shard``) every rank records the sampled columns of its shard into its own part of one store.
Every rank must then build the Recorder and close it at the same point of the program (both are
collective: rank 0 creates the store before the others write, and marks it complete after all
closed).
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import mmap
import os
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn

from corrtools.errors import CorrtoolsError
from corrtools.record._location import store_path
from corrtools.record.distributed import _is_dtensor, barrier, broadcast_error, is_idle, local_tensor, role, unwrap
from corrtools.record.sampling import DEFAULT_LAYOUT, RUN, ParamFilter, SampleSpec, plan_samples
from corrtools.record.store import (
    PathLike,
    RunWriter,
    check_chunking,
    check_compressor,
    create_sharded,
    default_chunks,
    finish_sharded,
    open_run,
    run_attrs,
    shard_path,
    Z,
    z_for_rows,
)

__all__ = ["Recorder"]

# cap on one chunk of host block (chunk_steps x weights x 4 bytes). 32 MiB lets 10^5 weights keep
# the store's natural 73-row chunks (16 MiB made them 41 rows): per row the writer then creates 44%
# fewer files, and its CPU per row under training fell 34% (MLP, 161 -> 106 us, paired in one
# process) for twice the ring's memory (4 x 29 MB)
_BLOCK_BYTES = 32 << 20
# a default block is as many whole chunks tall as fit in 16 MiB (at most 4096 rows, and rows x
# pieces within _MAX_ROW_VIEWS): the writer's fixed cost per block -- five small files (the `step`
# and `lr` chunks, three metadata resizes), ~1.3 ms of CPU under training -- is then shared by more
# rows (10^4 weights: 3 chunks of 128 rows; writer CPU per row under MLP training 25 -> 12.5 us,
# paired in one process, for a ring of 4 x 15 MB instead of 4 x 4 MB). An explicit chunk_steps
# keeps blocks one chunk tall
_BLOCK_TARGET = 16 << 20
_MAX_BLOCK_ROWS = 4096
_MAX_ROW_VIEWS = 4096  # per block: rows x pieces of one-row views kept ready for the hook (~0.6 KB each)
FLUSH_EVERY = 30.0  # seconds: the default bound on how long a taken row may stay in memory only


@dataclasses.dataclass(eq=False)
class _Block:
    """block_steps rows on the host (whole chunks), filled by the training thread, written by the
    writer thread."""

    values: np.ndarray          # (block_steps, N) float32, pinned on CUDA
    tensor: torch.Tensor        # the same memory as a tensor
    # per row, Python lists: a list item costs the hook far less than a NumPy scalar write right
    # after an optimizer step (cold caches)
    steps: list[int]            # (block_steps,) optimizer step of each row
    loss_sum: list[float]       # (block_steps,) sum of the losses logged for the row
    loss_n: list[int]           # (block_steps,) how many
    lr: list[float]             # (block_steps,) NaN where none
    k: int = 0                  # rows filled
    cap: int = 0                # rows this block takes before it is handed over (block_steps, or
                                # fewer once after a resume, to end on a chunk boundary)
    flushed: int = 0            # rows [0, flushed) already handed to the writer
    event: Any = None           # CUDA event after the last copy into this block
    z: np.ndarray | None = None # (block_steps,) RESET interval per row, once one was logged (log_z)
    dst: list[list[Any]] = dataclasses.field(default_factory=list)
    # per device group: for a CPU group, per row, per piece, the (k,) or (k // run, run) view of
    # the piece's columns in that row (dst[g][i][e]); for a staged group its one (block_steps,
    # stop - start) view of the group's columns. Built once per block (see Recorder._new_block)

    def reset(self) -> None:
        self.k, self.flushed, self.event = 0, 0, None
        if self.z is not None:
            self.z[:] = np.nan
        n = len(self.steps)
        self.loss_sum[:] = [0.0] * n
        self.loss_n[:] = [0] * n
        self.lr[:] = [math.nan] * n


class _Piece:
    """One gather of a parameter into the columns [start, stop): ``idx`` (k,) flat indices (``run=1``)
    or numbers of aligned runs of ``run`` weights, or a ``slice`` of run numbers (an arithmetic
    progression: the "strided" layout), gathered as one strided copy with no index. Keeps the
    parameter's detached (numel // run, run) source view -- sliced for a slice -- while the
    parameter's storage stays the same (checked by pointer at every row: a replaced ``p.data`` or an
    FSDP2 shard swap builds a new view). Caching it, and the destination views of :class:`_Block`,
    keeps the per-step Python work to one torch call per piece: the hook runs right after the
    optimizer step, when every extra call pays for cold caches."""

    __slots__ = ("param", "idx", "run", "start", "stop", "_ptr", "_dtype", "_src", "_f32", "_dtensor", "_strided")

    def __init__(self, param: nn.Parameter, idx: torch.Tensor | slice, run: int, start: int, stop: int) -> None:
        self.param, self.idx, self.run, self.start, self.stop = param, idx, run, start, stop
        self._ptr, self._dtype, self._src, self._f32 = -1, None, torch.empty(0), True
        self._dtensor = _is_dtensor(param)
        self._strided = isinstance(idx, slice)

    def source(self) -> torch.Tensor:
        """(numel // run, run) -- or (numel,) for run 1 -- detached view of the (local) parameter;
        for a slice, its (k // run, run) rows."""
        p = self.param.to_local() if self._dtensor else self.param
        if p.data_ptr() != self._ptr or p.dtype is not self._dtype:
            flat = p.detach().reshape(-1)  # a view when contiguous, else a copy (re-made every row)
            if self.run > 1:
                n = flat.numel() // self.run * self.run
                flat = flat[:n].view(-1, self.run)
            if isinstance(self.idx, slice):
                flat = flat[self.idx]
            self._src, self._dtype, self._f32 = flat, p.dtype, p.dtype == torch.float32
            self._ptr = p.data_ptr() if p.is_contiguous() else -1
        return self._src

    def columns(self, t: torch.Tensor, first: int = 0) -> torch.Tensor:
        """This piece's columns of ``t`` (last dimension = columns from ``first`` on), shaped
        (..., k // run, run) for runs: where `gather_into` writes them."""
        cols = t[..., self.start - first : self.stop - first]
        return cols.unflatten(-1, (-1, self.run)) if self.run > 1 else cols

    def gather_into(self, out: torch.Tensor) -> None:
        """out (k,) -- or (k, run) for runs -- float32 <- p.flatten()[i] for the sampled i, in column order."""
        p = self.param
        if self._dtensor or p.data_ptr() != self._ptr or p.dtype is not self._dtype:
            src = self.source()
        else:  # the hot path inlines source()'s check: right after an optimizer step each call is cold
            src = self._src
        if self._strided:
            out.copy_(src)  # a strided view: prefetchable, and copy_ is warm after a training step
        elif self._f32:
            torch.index_select(src, 0, self.idx, out=out)
        else:
            out.copy_(torch.index_select(src, 0, self.idx))


class _RowViews:
    """Row i of a block, per piece: ``[c.select(0, i) for c in cols]``, made when asked for (the
    fallback of `_Block.dst` when keeping every row's views would take much memory)."""

    __slots__ = ("cols",)

    def __init__(self, cols: list[torch.Tensor]) -> None:
        self.cols = cols

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return [c.select(0, i) for c in self.cols]


@dataclasses.dataclass
class _DeviceGroup:
    """The columns [start, stop) whose parameters live on one device."""

    device: torch.device
    start: int
    stop: int
    entries: list[_Piece]
    staging: torch.Tensor | None = None                                # (stop - start,) float32 on device
    staging_views: list[torch.Tensor] = dataclasses.field(default_factory=list)  # per piece, into staging


_MAX_STRIDED = 8  # strided gathers per parameter at most; more progressions: one gather by index


def _progressions(runs: np.ndarray, limit: int) -> list[slice] | None:
    """Sorted run numbers ``runs`` as at most `limit` arithmetic progressions (``slice``s, each of
    positive step), greedily from the front; None if they need more."""
    d = np.diff(runs)
    out: list[slice] = []
    i, n = 0, len(runs)
    while i < n:
        if len(out) == limit:
            return None
        if i == n - 1:
            out.append(slice(int(runs[i]), int(runs[i]) + 1, 1))
            break
        step = int(d[i])
        off = np.flatnonzero(d[i + 1 :] != step)
        j = i + 1 + int(off[0]) if len(off) else n - 1  # last element of the progression
        out.append(slice(int(runs[i]), int(runs[j]) + 1, step))
        i = j + 1
    return out


def _pieces(index: np.ndarray, numel: int) -> list[tuple[np.ndarray | slice, int, int, int]]:
    """Split one parameter's sorted flat ``index`` (k,) into gathers ``(idx, run, start, stop)`` for
    columns [start, stop): whole aligned runs of `RUN` -- as a few slices of run numbers when they
    form at most `_MAX_STRIDED` arithmetic progressions (the "strided" layout), else as run numbers
    (``run=RUN``) -- and the rest as flat indices (``run=1``)."""
    k = len(index)
    m = int(np.searchsorted(index, numel // RUN * RUN))  # columns inside whole runs
    firsts = index[:m:RUN]
    if m and m % RUN == 0 and not (firsts % RUN).any() and np.array_equal(
        index[:m], (firsts[:, None] + np.arange(RUN)).reshape(-1)
    ):
        runs = firsts // RUN
        slices = _progressions(runs, _MAX_STRIDED)
        if slices is None:
            whole: list[tuple[np.ndarray | slice, int, int, int]] = [(runs, RUN, 0, m)]
        else:
            bounds = np.cumsum([0] + [len(range(sl.start, sl.stop, sl.step)) * RUN for sl in slices])
            whole = [(sl, RUN, int(a), int(b)) for sl, a, b in zip(slices, bounds[:-1], bounds[1:])]
        return whole + ([(index[m:], 1, m, k)] if m < k else [])
    return [(index, 1, 0, k)]


def _page_rows(rows: int, n_weights: int) -> int:
    """`rows` moved to the nearest number of rows of `n_weights` float32 that fills whole pages, if
    that is at most 2x away: every chunk of a block one chunk wide then starts on a page and is
    written from the block's own memory (else each chunk after a block's first is staged)."""
    step = mmap.PAGESIZE // math.gcd(mmap.PAGESIZE, 4 * n_weights)
    aligned = max(step, round(rows / step) * step)
    return aligned if rows / 2 <= aligned <= 2 * rows else rows


def _lower_priority(idle: bool = True, nice: int = 10) -> bool:
    """Lower the calling thread's CPU priority so that compression and writing use the time training
    leaves idle: ``SCHED_IDLE`` where ``idle`` and the platform has it (the thread runs only on a
    core no other thread wants, and a waking training thread preempts it at once), else nice
    ``nice`` (Linux: nice is per thread). Both are one-way for an unprivileged thread. Returns
    whether the thread is now ``SCHED_IDLE``; a no-op returning False where neither exists."""
    if idle and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread
            return True
        except OSError:  # pragma: no cover - refused (e.g. by a seccomp profile)
            pass
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):  # pragma: no cover - not Linux, or not permitted
        pass
    return False


def _stored_layout(path: Path | str) -> str:
    """The sampling layout of the store at ``path`` (stores from before layouts existed are
    "uniform"; read from its attrs alone); the default layout where there is no readable store
    (resuming it then fails with its own error)."""
    try:
        return str(run_attrs(path).get("layout", "uniform"))
    except Exception:
        return DEFAULT_LAYOUT


def _describe_params(params: ParamFilter) -> Any:
    if params is None:
        return "floating parameters with >= 2 dims"
    if callable(params):
        return f"predicate {getattr(params, '__qualname__', repr(params))}"
    return list(params)


class Recorder:
    """Record sampled weights of ``model`` after optimizer steps into the run store at ``path``.

    ``sample``: weights per parameter (int) or fraction of each parameter (float in (0, 1]), without
    replacement, reproducible from ``seed``; ``layout``: "strided" (the default for a new store:
    aligned runs of 16 consecutive weights at a fixed stride from a random start, the count rounded
    up to whole runs and to the stride; the cheapest to read per step), "runs" (the same runs drawn
    at random) or "uniform" (single weights; ~3-5x costlier to read per step on CPU), see
    `corrtools.record.sampling`; with ``resume=True`` the default is the store's own layout. ``params``: None (floating parameters with >= 2
    dims), a list of names, or a predicate ``(name, param) -> bool``. ``every``: take a row every
    k-th step. ``resume=True`` continues an existing store after its last step (``start_step``
    overrides the step counter, e.g. when restarting from a later checkpoint); ``overwrite=True``
    replaces it. ``chunk_steps`` sets the rows per chunk and per written block (default: ~4 MiB
    chunks, one chunk at most 32 MiB, blocks of whole chunks up to 16 MiB; ``queue_blocks + 2``
    blocks are kept). ``compressor``: "auto" (lz4 when the recorded parameters are on an
    accelerator, none when on the CPU, where a codec would compete with training for cores),
    "lz4", "zstd" or "none"; a crc32c checksum is always added. ``flush_every``: seconds after
    which rows are written even if their block is not full (default 30; None: only full blocks),
    bounding what a killed run loses. Every argument is checked before anything is written. Use
    `attach` for loops with a torch optimizer, `record` otherwise.

    >>> import torch, tempfile, os
    >>> from corrtools import Recorder, open_run
    >>> model = torch.nn.Linear(8, 4)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> path = os.path.join(tempfile.mkdtemp(), "run.zarr")
    >>> with Recorder(model, path, sample=16).attach(opt) as rec:
    ...     for _ in range(5):
    ...         loss = model(torch.randn(2, 8)).square().mean()
    ...         loss.backward(); opt.step(); opt.zero_grad()
    ...         rec.log(loss=loss.item())
    >>> ds = open_run(path)
    >>> ds["values"].shape, ds["step"].values.tolist(), ds.attrs["status"]
    ((5, 16), [1, 2, 3, 4, 5], 'complete')
    """

    _stage_on_cpu = False  # tests set it to run the device-buffer path on CPU
    _checksum = True  # benchmarks/recorder_overhead.py --checksum-cost turns it off to measure it
    _idle_writer = True  # the writer starts under SCHED_IDLE (--writer-cost's nice_1e5: nice 10)

    def __new__(cls, model: nn.Module, *args: Any, **kwargs: Any) -> Recorder:
        # ranks other than 0 of a data-parallel run record nothing and pay nothing
        if cls is Recorder and is_idle(model):
            return super().__new__(_IdleRecorder)
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        path: PathLike,
        sample: SampleSpec = 4096,
        every: int = 1,
        params: ParamFilter = None,
        seed: int = 0,
        *,
        resume: bool = False,
        overwrite: bool = False,
        start_step: int | None = None,
        chunk_steps: int | None = None,
        queue_blocks: int = 2,
        compressor: str = "auto",
        flush_every: float | None = FLUSH_EVERY,
        layout: str | None = None,
    ) -> None:
        # every argument is checked here, before the store is touched
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise CorrtoolsError(f"every={every!r} must be a positive int (record every k-th step)")
        if resume and overwrite:
            raise CorrtoolsError("resume=True and overwrite=True exclude each other; pass one of them")
        if isinstance(queue_blocks, bool) or not isinstance(queue_blocks, int) or queue_blocks < 1:
            raise CorrtoolsError(f"queue_blocks={queue_blocks!r} must be an int of at least 1")
        check_chunking(chunk_steps)
        if compressor != "auto":
            check_compressor(compressor)
        if flush_every is not None and (isinstance(flush_every, bool) or not isinstance(flush_every, (int, float))
                                        or not flush_every > 0):
            raise CorrtoolsError(f"flush_every={flush_every!r} must be a positive number of seconds or None")
        if start_step is not None and (isinstance(start_step, bool) or not isinstance(start_step, (int, np.integer))
                                       or start_step < 0):
            raise CorrtoolsError(f"start_step={start_step!r} must be a non-negative int (an optimizer step count)")
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise CorrtoolsError(
                f"path={path!r} must be a file-system path such as 'runs/run.zarr' or an fsspec URL such "
                "as 's3://bucket/run.zarr'"
            )
        self.path = store_path(path)  # a Path, or an fsspec URL such as "s3://bucket/run.zarr"
        self.every = every
        self._queue_blocks = queue_blocks
        self._flush_every = None if flush_every is None else float(flush_every)
        self.model = model = unwrap(model)
        if layout is None:  # a resumed store keeps its own layout; a new one gets the default
            layout = _stored_layout(self.path) if resume else DEFAULT_LAYOUT
        self.plan = plan_samples(model, sample, params, seed, layout)
        self.layout = layout
        self._check_devices()
        self._role = role(model, self.plan)
        self._sharded = self._role is not None and self._role.sharded
        all_names, all_index = self.plan.columns()
        if self._sharded:
            self._check_shardable(resume)
            self.plan = self._role.local  # the columns in this rank's shard
        self._groups = self._device_groups()
        names, index = self.plan.columns()
        self.n_weights = len(index)
        self._one_chunk_blocks = chunk_steps is not None  # else blocks of several chunks (_block_steps)
        if resume:
            self.step = self._check_resumable(names, index, start_step)
            self._writer = RunWriter.resume(self.path)
        else:
            if start_step is not None:
                raise CorrtoolsError("start_step is only used with resume=True; leave it out")
            self.step = 0
            if chunk_steps is None:
                cs_default, cw_default = default_chunks(self.n_weights)
                chunk_steps = min(cs_default, max(8, _BLOCK_BYTES // (4 * self.n_weights)))
                if cw_default >= self.n_weights:
                    chunk_steps = _page_rows(chunk_steps, self.n_weights)
            attrs = {
                "every": every,
                "sample": sample.item() if isinstance(sample, np.generic) else sample,
                "seed": int(seed),
                "layout": layout,
                "run": 1 if layout == "uniform" else RUN,
                "params": _describe_params(params),
                "model": f"{type(model).__module__}.{type(model).__qualname__}",
                "optimizer": None,
                "torch_version": torch.__version__,
                "step_meaning": "optimizer steps taken before the row (1 = after the first step)",
                "loss_meaning": "mean of the losses logged for the steps since the previous row",
                "notes": list(self.plan.notes),
                "skipped_params": list(self.plan.skipped),
            }
            path = self.path
            if self._sharded:
                path = self._create_sharded(all_names, all_index, overwrite)
                attrs["rank"] = self._role.rank
            self._writer = RunWriter.create(
                path, param=names, index=index, initial=self._gather_final(), attrs=attrs,
                chunk_steps=chunk_steps, overwrite=overwrite, compressor=self._resolve_compressor(compressor),
                checksum=self._checksum,
            )
        try:
            if resume:
                self._writer.update_attrs(resumed=[*self._writer.attrs.get("resumed", []), self.step])
            self._start()
        except BaseException:
            self._writer.abandon()  # do not keep the store locked for a Recorder that never ran
            raise

    def _start(self) -> None:
        """Buffers, queue and writer thread, once the store is open."""
        queue_blocks = self._queue_blocks
        self.chunk_steps = self._writer.chunk_steps
        self.block_steps = self._block_steps()
        self._last_row_step = self._writer.last_step
        self._next_row = self._writer.n_steps  # store row of the next row taken
        self._pending_sum, self._pending_n = 0.0, 0
        self._optimizer: torch.optim.Optimizer | None = None
        self._hook: Any = None
        self._optimizer_attrs: dict[str, Any] | None = None
        self._closed = False
        self._error: BaseException | None = None
        self._reported = False
        self._loss_seen = False
        self._z_changes: list[tuple[int, float]] = []  # (from step, z) logged by log_z
        cuda = any(g.device.type == "cuda" for g in self._groups)
        self._free: queue.Queue[_Block] = queue.Queue()
        for _ in range(queue_blocks + 2):  # one filling, `queue_blocks` queued, one being written
            self._free.put(self._new_block(pin=cuda))
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue(maxsize=queue_blocks)
        self._current: _Block | None = None
        self._current_prev = self._last_row_step
        self._flush_due = self._deadline()
        self._writer_idle = False  # the writer thread runs under SCHED_IDLE (set by that thread)
        self._writer_promoted = threading.Event()  # an idle writer fell behind: a nice-10 one took over
        self._writer_stopped = False  # a writer consumed the stop sentinel
        name = str(self.path).rstrip("/").rsplit("/", 1)[-1]
        self._thread = threading.Thread(target=self._write_loop, name=f"corrtools-writer:{name}", daemon=True)
        self._thread.start()

    def _check_shardable(self, resume: bool) -> None:
        """Errors every rank raises alike (so that none waits in a collective for the others)."""
        if resume:
            raise CorrtoolsError(
                "resume=True is not supported for sharded parameters yet; record the resumed run into "
                "a new path"
            )
        idle = sorted(set(range(self._role.world_size)) - {r for r, _, _ in self._role.segments})
        if idle:
            raise CorrtoolsError(
                f"rank(s) {idle} hold none of the sampled weights of this sharded model; sample more "
                "weights per parameter (or record more parameters)"
            )

    def _create_sharded(self, names: Sequence[str], index: np.ndarray, overwrite: bool) -> Path | str:
        """Rank 0 creates the store's top, every rank then its part; returns this rank's part path."""
        error = None
        if self._role.rank == 0:
            try:
                create_sharded(self.path, names, index, self._role.segments, self._role.world_size, overwrite)
            except CorrtoolsError as err:
                error = str(err)
        broadcast_error(error)
        return shard_path(self.path, self._role.rank)

    def _resolve_compressor(self, compressor: str) -> str:
        """"auto": lz4 when every recorded parameter is on an accelerator (the CPU is idle there), else
        none: on CPU training the codec competes with training for cores (7.2% step overhead instead
        of 2.6% at 1e5 weights on 2 cores, benchmarks/recorder_overhead.py) to save ~11% of disk."""
        if compressor != "auto":
            return compressor
        return "lz4" if all(g.device.type != "cpu" for g in self._groups) else "none"

    # ------------------------------------------------------------------------- public API
    def attach(self, optimizer: torch.optim.Optimizer) -> Recorder:
        """Record after every ``optimizer.step()`` (via ``register_step_post_hook``); returns self."""
        self._raise_if_failed()
        self._check_open()
        if self._hook is not None:
            raise CorrtoolsError("this Recorder is already attached to an optimizer; call rec.detach() first")
        self._optimizer = optimizer
        self._hook = optimizer.register_step_post_hook(self._on_step)
        defaults = {k: v for k, v in optimizer.defaults.items() if isinstance(v, (int, float, str, bool))}
        attrs = {"optimizer": type(optimizer).__name__, "optimizer_defaults": defaults}
        if attrs != self._optimizer_attrs:  # re-attaching the same optimizer writes nothing
            self._optimizer_attrs = attrs
            self._send("attrs", attrs)
        return self

    def detach(self) -> None:
        """Stop recording from the optimizer; the store stays open for `record` or another `attach`."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._optimizer = None

    def record(self, step: int | None = None, loss: float | torch.Tensor | None = None) -> None:
        """Count one step (``step=None``: the next; or set the counter to ``step``) and take a row
        if it is a multiple of ``every``; ``loss`` is attached to that step. For loops without an
        attached optimizer."""
        self._raise_if_failed()
        self._check_open()
        if self._hook is not None:
            raise CorrtoolsError(
                "this Recorder records after every optimizer.step() already; use rec.log(loss=...) "
                "for the loss, or rec.detach() before recording by hand"
            )
        new = self.step + 1 if step is None else int(step)
        if new <= self.step:
            raise CorrtoolsError(
                f"step {new} is not after the last counted step {self.step}; each step is recorded once"
            )
        self.step = new
        if loss is not None:
            self._pending_add(loss)
        if new % self.every == 0:
            self._take_row(new, lr=math.nan)

    def log(self, loss: float | torch.Tensor, step: int | None = None) -> None:
        """Attach a training ``loss`` to optimizer step ``step`` (default: the most recent step).
        Call it after ``optimizer.step()``; see the module docstring for how rows combine losses."""
        self._raise_if_failed()
        self._check_open()
        s = self.step if step is None else int(step)
        cur = self._current
        if cur is not None and cur.k and s <= cur.steps[cur.k - 1]:
            first = bisect.bisect_left(cur.steps, s, 0, cur.k)  # the row covering step s
            if (first == 0 and s <= self._current_prev) or first < cur.flushed:
                raise self._too_late(s)
            cur.loss_sum[first] += float(loss)
            cur.loss_n[first] += 1
        elif s > self._last_row_step:
            self._pending_add(loss)
        else:
            raise self._too_late(s)

    def log_z(self, z: int | None, step: int | None = None) -> None:
        """The RESET interval ``z`` (optimizer steps; None: no reset) in effect from step ``step`` on
        (default: the most recent step), stored as the run's ``z`` (step,) array. A Sparsifier given
        ``recorder=`` calls it whenever its z is chosen."""
        self._raise_if_failed()
        self._check_open()
        s = self.step if step is None else int(step)
        cur = self._current
        if cur is None:
            written = self._last_row_step  # every row taken is with the writer
        elif cur.flushed:
            written = int(cur.steps[cur.flushed - 1])
        else:
            written = self._current_prev
        if s <= written:
            raise CorrtoolsError(
                f"z for step {s} comes too late: the row of step {written} is already written; log z "
                "from the next step on"
            )
        self._z_changes.append((s, math.nan if z is None else float(z)))

    @staticmethod
    def _too_late(step: int) -> CorrtoolsError:
        return CorrtoolsError(
            f"loss for step {step} comes too late: its row is already written; log it right after "
            "optimizer.step()"
        )

    def flush(self) -> None:
        """Write every row taken so far to the store and wait until it is on disk (e.g. when a
        checkpoint is saved, so that a run resumed from it finds every row up to it). Losses for
        steps already written can no longer be logged."""
        self._raise_if_failed()
        self._check_open()
        cur = self._current
        if cur is not None and cur.k > cur.flushed:
            self._flush(cur)
        self._wait_writer()

    def close(self) -> None:
        """Flush all rows, write ``final``, mark the store "complete" and release it. Idempotent."""
        self._shutdown(complete=True)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        # after an exception in the loop the rows so far are kept and the store stays "recording",
        # so the run can be resumed; a writer error is then not raised over the original one
        self._shutdown(complete=exc_type is None, raise_errors=exc_type is None)

    # --------------------------------------------------------------------- the hot path
    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # the hot path: it runs right after the optimizer step, when caches are cold and every
        # attribute, call and branch costs (~0.3-3 us each on a 2-core VM, issue 9's fourteenth pass)
        if self._error is not None:
            self._raise_if_failed()
        step = self.step = self.step + 1
        if step % self.every == 0:
            self._take_row(step, optimizer.param_groups[0].get("lr", math.nan))

    def _take_row(self, step: int, lr: float | torch.Tensor) -> None:
        cur = self._current
        if cur is None or cur.k == cur.cap or time.monotonic() >= self._flush_due:
            cur = self._block_for_row(cur)
        i = cur.k
        for g, dst in zip(self._groups, cur.dst):
            if g.staging is None:  # CPU: straight into the host row
                for piece, out in zip(g.entries, dst[i]):
                    piece.gather_into(out)
            else:
                for piece, view in zip(g.entries, g.staging_views):
                    piece.gather_into(view)
                dst[0].select(0, i).copy_(g.staging, non_blocking=True)
        cur.steps[i] = step
        cur.lr[i] = float(lr)
        if self._pending_n:
            cur.loss_sum[i] += self._pending_sum
            cur.loss_n[i] += self._pending_n
            self._pending_sum, self._pending_n = 0.0, 0
        cur.k = i + 1
        self._next_row += 1
        self._last_row_step = step

    def _block_for_row(self, cur: _Block | None) -> _Block:
        """The block the next row goes into: hands the rows taken so far to the writer when
        ``flush_every`` seconds have passed, a full block when the next row needs room, and starts
        a new block."""
        if cur is not None and cur.k > cur.flushed and time.monotonic() >= self._flush_due:
            self._flush(cur)  # the rows taken so far: every `log` for them has been made
        if cur is not None and cur.k == cur.cap:
            # a full block is handed over only when the next row needs room, so that `log` can
            # still reach the block's last row
            self._submit(cur)
            cur = None
        if cur is None:
            cur = self._current = self._get_free()
            self._current_prev = self._last_row_step  # step of the row before this block
            # blocks end on chunk boundaries (after a resume the first one may be shorter), so
            # that the writer writes whole chunks
            cur.cap = self.block_steps - self._next_row % self.chunk_steps
        return cur

    def _deadline(self) -> float:
        """`time.monotonic` time from which the rows taken are handed to the writer (``flush_every``
        seconds from now; inf without one)."""
        return math.inf if self._flush_every is None else time.monotonic() + self._flush_every

    def _pending_add(self, loss: float | torch.Tensor) -> None:
        self._pending_sum += float(loss)
        self._pending_n += 1

    # ------------------------------------------------------------------ block handling
    def _new_block(self, pin: bool) -> _Block:
        if pin:
            t = torch.empty((self.block_steps, self.n_weights), dtype=torch.float32, pin_memory=True)
        else:
            # page-aligned (anonymous mmap): a block one chunk wide (<= 16384 weights) is then
            # written from its own memory, with no staging copy (record/_direct.py)
            size = self.block_steps * self.n_weights
            memory = mmap.mmap(-1, max(4 * size, mmap.PAGESIZE))
            values = np.frombuffer(memory, dtype=np.float32, count=size)
            t = torch.from_numpy(values.reshape(self.block_steps, self.n_weights))
            # touch every page now: otherwise the hook pays the page faults of each block on its
            # first pass through the ring (~100 per row at 10^5 weights)
            t.zero_()
        cs = self.block_steps
        block = _Block(t.numpy(), t, [0] * cs, [0.0] * cs, [0] * cs, [math.nan] * cs)
        for g in self._groups:
            if g.staging is None:
                cols = [e.columns(t) for e in g.entries]  # (block_steps, ...) per piece
                rows = _RowViews(cols)
                # every row's views made now (~0.6 KB each), unless that would be many
                block.dst.append([rows[i] for i in range(cs)] if cs * len(cols) <= _MAX_ROW_VIEWS else rows)
            else:
                block.dst.append([t[:, g.start : g.stop]])
        block.reset()
        return block

    def _block_steps(self) -> int:
        """Rows of a host block: whole chunks, as many as fit in `_BLOCK_TARGET` bytes (at most
        `_MAX_BLOCK_ROWS` rows, and rows x pieces within `_MAX_ROW_VIEWS` where one chunk is, so
        that the hook keeps its ready-made row views), or one chunk when ``chunk_steps`` was given."""
        cs = self.chunk_steps
        if self._one_chunk_blocks:
            return cs
        fits = min(_BLOCK_TARGET // (4 * cs * max(self.n_weights, 1)), _MAX_BLOCK_ROWS // cs)
        views = cs * sum(len(g.entries) for g in self._groups if g.staging is None)  # per chunk of rows
        if 0 < views <= _MAX_ROW_VIEWS:  # (more: the views are made per row anyway)
            fits = min(fits, _MAX_ROW_VIEWS // views)
        return cs * max(1, fits)

    def _get_free(self) -> _Block:
        try:
            return self._free.get_nowait()
        except queue.Empty:  # every block is with the writer: training would wait for it
            self._promote_writer()
        while True:
            try:
                return self._free.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():  # pragma: no cover - the writer catches everything
                    raise RuntimeError(f"corrtools Recorder: the writer thread of {self.path} stopped") from self._error

    def _event(self) -> Any:
        """A CUDA event after the copies queued so far (None without CUDA parameters)."""
        if not any(g.device.type == "cuda" for g in self._groups):
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def _stamp_z(self, block: _Block) -> None:
        """Fill ``z`` of the rows about to be handed to the writer, [flushed, k): every change for
        them is known, since a change is logged before the next row is taken."""
        if self._z_changes:
            if block.z is None:
                block.z = np.full(len(block.steps), np.nan, dtype=np.float32)
            rows = slice(block.flushed, block.k)
            block.z[rows] = z_for_rows(np.asarray(block.steps[rows], dtype=np.int64), self._z_changes)

    def _submit(self, block: _Block) -> None:
        self._stamp_z(block)
        block.event = self._event()
        self._send("block", block)
        self._current = None
        self._flush_due = self._deadline()

    def _flush(self, block: _Block) -> None:
        """Hand rows [flushed, k) of the block being filled to the writer; the block stays current."""
        self._stamp_z(block)
        self._send("rows", (block, block.flushed, block.k, self._event()))
        block.flushed = block.k
        self._flush_due = self._deadline()

    def _send(self, kind: str, payload: Any) -> None:
        try:
            self._queue.put_nowait((kind, payload))
        except queue.Full:  # training would wait for the writer
            self._promote_writer()
            self._queue.put((kind, payload))

    def _promote_writer(self) -> None:
        """Training is about to wait for an idle-class writer (it got too little CPU, e.g. on a
        machine whose cores other processes keep busy): hand writing to a new writer thread at nice
        10 (an unprivileged thread cannot leave SCHED_IDLE; a new one inherits this thread's class).
        The idle writer finishes the item it holds, then stops; the new one takes over after it, so
        items stay in order. Once per Recorder."""
        if not self._writer_idle or self._writer_promoted.is_set():
            return
        self._writer_promoted.set()
        idle_writer = self._thread
        self._thread = threading.Thread(target=self._write_loop, kwargs={"after": idle_writer},
                                        name=idle_writer.name, daemon=True)
        self._thread.start()

    def _write_loop(self, after: threading.Thread | None = None) -> None:
        """Write queued items in order until the stop sentinel. The first writer runs idle-class and
        stops once promoted; a promoted one (``after``: the writer it replaces) runs at nice 10."""
        if after is not None:
            after.join()  # it finishes the item it holds: items stay in order
            if self._writer_stopped:
                return
            _lower_priority(idle=False)
        else:
            self._writer_idle = _lower_priority(idle=self._idle_writer)
        retire = after is None
        while True:
            if retire and self._writer_promoted.is_set():
                return
            item = self._queue.get()
            if item is None:
                self._writer_stopped = True
                self._queue.task_done()
                return
            kind, payload = item
            try:
                if self._error is not None:
                    continue  # after a failure, drain without writing
                if kind == "attrs":
                    self._writer.update_attrs(**payload)
                elif kind == "rows":
                    self._write_block(*payload)
                else:
                    self._write_block(payload, payload.flushed, payload.k, payload.event)
            except BaseException as err:  # surfaced by the training thread at its next call
                self._error = err
            finally:
                if kind == "block":
                    payload.reset()
                    self._free.put(payload)
                self._queue.task_done()

    def _wait_writer(self) -> None:
        """Block until every block handed to the writer is written (the block being filled stays in
        memory); used by benchmarks to charge writing to the steps that caused it."""
        self._queue.join()
        self._raise_if_failed()

    def _write_block(self, block: _Block, lo: int, hi: int, event: Any) -> None:
        """Write rows [lo, hi) of the block (the training thread no longer changes them)."""
        if event is not None:
            event.synchronize()
        if hi <= lo:
            return
        rows = slice(lo, hi)
        optional: dict[str, np.ndarray] = {}
        lr = np.asarray(block.lr[rows], dtype=np.float64)
        if not np.isnan(lr).all():
            optional["lr"] = lr
        n = np.asarray(block.loss_n[rows], dtype=np.int64)
        if self._loss_seen or n.any():
            self._loss_seen = True
            loss_sum = np.asarray(block.loss_sum[rows], dtype=np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                optional["loss"] = np.where(n > 0, loss_sum / np.maximum(n, 1), np.nan).astype(np.float32)
        if block.z is not None:
            optional[Z] = block.z[rows].copy()
        self._writer.write_block(np.asarray(block.steps[rows], dtype=np.int64), block.values[rows], optional)

    # ------------------------------------------------------------------------ lifecycle
    def _shutdown(self, complete: bool, raise_errors: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        self.detach()
        if self._current is not None and self._current.k:
            self._submit(self._current)
        self._queue.put(None)
        self._thread.join()
        if self._error is not None or not complete:
            self._writer.abandon()
            if self._error is not None and raise_errors and not self._reported:
                self._reported = True
                raise RuntimeError(f"corrtools Recorder: writing {self.path} failed: {self._error!r}") from self._error
            return
        self._writer.close(self._gather_final(), total_steps=self.step)
        if self._sharded:  # complete only once every rank's part is
            barrier()
            if self._role.rank == 0:
                finish_sharded(self.path, total_steps=self.step)

    def _raise_if_failed(self) -> None:
        err = self._error
        if err is not None and not self._reported:
            self._reported = True
            self.detach()
            raise RuntimeError(f"corrtools Recorder: writing {self.path} failed: {err!r}") from err

    def _check_open(self) -> None:
        if self._closed:
            raise CorrtoolsError(f"the Recorder of {str(self.path)!r} is closed; open a new one with resume=True")

    # ---------------------------------------------------------------------------- setup
    def _gather_final(self) -> np.ndarray:
        """(N,) float32 values of every sampled weight now, synchronously."""
        out = torch.empty(self.n_weights, dtype=torch.float32)
        with torch.no_grad():
            for g in self._groups:
                for e in g.entries:
                    piece = torch.empty(e.stop - e.start, dtype=torch.float32, device=local_tensor(e.param).device)
                    e.gather_into(e.columns(piece, first=e.start))
                    out[e.start : e.stop] = piece.cpu()
        return out.numpy()

    def _check_devices(self) -> None:
        by_name = dict(self.model.named_parameters())
        meta = [s.name for s in self.plan.samples if by_name[s.name].device.type == "meta"]
        if meta:
            raise CorrtoolsError(
                f"parameter {meta[0]!r} is on the meta device (it has no values yet); materialise the "
                "model (e.g. model.to_empty(device='cpu') and initialise it) before recording"
            )

    def _device_groups(self) -> list[_DeviceGroup]:
        by_name = dict(self.model.named_parameters())
        devices: list[torch.device] = []
        for s in self.plan.samples:
            d = by_name[s.name].device
            if d not in devices:
                devices.append(d)
        if len(devices) > 1:  # columns of one device must be contiguous: group them
            order = sorted(self.plan.samples, key=lambda s: devices.index(by_name[s.name].device))
            self.plan = dataclasses.replace(self.plan, samples=tuple(order))
        groups: list[_DeviceGroup] = []
        col = 0
        for d in devices:
            entries = []
            start = col
            for s in self.plan.samples:
                p = by_name[s.name]
                if p.device != d:
                    continue
                for idx, run, a, b in _pieces(s.index, s.numel):
                    sel = idx if isinstance(idx, slice) else torch.as_tensor(idx, dtype=torch.int64, device=d)
                    entries.append(_Piece(p, sel, run, col + a, col + b))
                col += len(s.index)
            stage = d.type != "cpu" or self._stage_on_cpu
            staging = torch.empty(col - start, dtype=torch.float32, device=d) if stage else None
            views = [] if staging is None else [e.columns(staging, first=start) for e in entries]
            groups.append(_DeviceGroup(d, start, col, entries, staging, views))
        return groups

    def _check_resumable(self, names: Sequence[str], index: np.ndarray, start_step: int | None) -> int:
        ds = open_run(self.path)
        same = list(ds["param"].values) == list(names) and np.array_equal(ds["index"].values, index)
        stored = ds.attrs.get("layout", "uniform")  # stores from before layouts were uniform
        if not same and stored != self.layout:
            raise CorrtoolsError(
                f"{str(self.path)!r} was recorded with layout={stored!r}; resume with layout={stored!r}"
            )
        if not same:
            raise CorrtoolsError(
                f"{str(self.path)!r} was recorded with other weights (different model, params, sample "
                "or seed); resume with the settings it was created with, or record into a new path"
            )
        if ds.attrs.get("every") != self.every:
            raise CorrtoolsError(
                f"{str(self.path)!r} was recorded with every={ds.attrs.get('every')}; resume with that value"
            )
        last = int(ds["step"].values[-1]) if ds.sizes["step"] else 0
        counted = max(last, int(ds.attrs.get("total_steps") or 0))
        if start_step is None:
            return counted
        if start_step < last:
            raise CorrtoolsError(
                f"start_step={start_step} is before the last recorded step {last}; steps would be "
                f"recorded twice, pass start_step >= {last}"
            )
        return int(start_step)


class _IdleRecorder(Recorder):
    """The Recorder of a rank other than 0 in a data-parallel run: no sampling, buffers, thread,
    optimizer hook or file; every call returns at once (``step`` still counts, for logging)."""

    def __init__(self, model: nn.Module, path: PathLike, *args: Any, **kwargs: Any) -> None:
        self.path = store_path(path)
        self.model = model
        self.step = 0
        self._closed = False

    def attach(self, optimizer: torch.optim.Optimizer) -> Recorder:
        return self

    def detach(self) -> None:
        pass

    def record(self, step: int | None = None, loss: float | torch.Tensor | None = None) -> None:
        self.step = self.step + 1 if step is None else int(step)

    def log(self, loss: float | torch.Tensor, step: int | None = None) -> None:
        pass

    def _shutdown(self, complete: bool, raise_errors: bool = True) -> None:
        self._closed = True

    def _wait_writer(self) -> None:
        pass
