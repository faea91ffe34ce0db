"""Recorder overhead on a CPU workload, measured side by side in one process.

Trains one workload in short blocks of steps, alternating between no recorder and the other modes. Workloads
(``--workload``): ``charlm``, the built-in CharLM (d_model=128, 2 layers, ~19 ms per step here), with
~10^4 / ~10^5 weights sampled as one fraction of every weight matrix; ``mlp``, an MLP 512→1024→1024→512
(ReLU, AdamW, batches of 64 of a random regression task, ~10 ms per step here) with 10^4 / 10^5 weights
split evenly over its three matrices (~3,300 / ~34,000 each). Modes:

    none          no recorder
    none_check    no recorder either, measured like the recorder modes: its "overhead" is the
                  benchmark's own error (it should read 0 within its interval)
    recorder_1e4  corrtools.Recorder with ~10^4 sampled weights per step
    recorder_1e5  corrtools.Recorder with ~10^5 sampled weights per step
    naive_1e5     per step: ``.detach().cpu().numpy()`` of the same ~10^5 sampled values and a
                  ``zarr`` append of that row (same chunks and codec as the run store)

Each recorder keeps one store open for the whole benchmark and is attached only during its own
blocks; at the end of a block the benchmark waits until the recorder's writer thread has written
every block handed to it, so background writing is charged to the mode that caused it: the block
is charged the writer thread's CPU time during that wait, not the wait's wall time. That wall time
is mostly the disk's latency (11-27 ms after a 10^5-weight block), which a continuous run never
waits for (the queue holds two blocks), while the writer's CPU would be taken from training. A
``writer wait`` line per recorder prints both, and the overhead with the wall time charged instead
(the estimator up to issue 9's fifth pass, which charged 0.85% of a step at 10^5 weights in one
run for waits a run does not make). Every measured block sits between two
no-recorder blocks; a round measures each mode once, in rotated order. A block's overhead is its
time over the mean of its two neighbours; a mode's overhead is the sum of its blocks' times over the
sum of those neighbour means, minus 1 (`ratio_of_sums`; up to issue 9's fifteenth pass the mean of
the per-block ratios, which reads high by about the neighbour mean's relative variance: +0.15
points on none_check over eleven MLP runs of 4-step blocks, the ratio of sums -0.06), printed with
a 95% bootstrap interval over blocks. Interpolating between neighbours cancels the
machine's drift, which on this 2-core VM moves the step time by 10-20% over a minute and makes
20-step blocks 0.7-correlated with the next (pairing within a round of four modes left a ±3%
interval on none_check; neighbours narrow it). Blocks are 4 steps long (issue 9's fifteenth pass;
before, 16 on CharLM and 20 on the MLP): on the AMD EPYC VM a step's time varies by 16% (SD) from
one step to the next, with an autocorrelation of 0.3 at lag 1 that falls only to 0.16 by lag 50,
so the neighbours cancel more of it the shorter the block. For the same 4,000 steps of the MLP
without a recorder, the standard error of the mean neighbour ratio was 0.34% with 1-step blocks,
0.40% with 4 and 0.57% with 20; the benchmark's none_check interval, at the same steps per mode,
went from +-1.15% (20-step blocks) to +-0.5% (4). Blocks of 4 keep what a block leaves to the next
one (the hook's last row; a writer wait) to one step in four. naive_1e5 runs after the rest, paired with its own
no-recorder blocks, and is charged the page cache's writeback (``os.sync``) of its appends. ``step_ms`` is the
median block time; ``cpu_ms`` the CPU time of the whole process per step (training, the writer
thread, zarr's threads); ``extra_us`` the overhead in microseconds of a no-recorder step;
``hook_us`` the median time of the Recorder's optimizer hook (its checks, the learning rate, the
gather into the host block, a block's hand-over; before issue 9's seventh pass: the gather only,
~9 µs less) and ``write_us`` the writer thread's CPU time per row (all of the
writing: the store's writes are made on that thread, none through zarr's event-loop thread).
An ``accounted`` line per recorder adds the hook's mean time and the writer's CPU per step: what the
timers attribute to the recorder, with far less noise than the step ratio (on a machine whose cores
are busy with training, the writer's CPU time is taken from training); the measured overhead
differing from it by more than the resolution points at costs the timers do not see.

A recorder block can also slow the no-recorder block after it (the spill): after a 10^5 block by
0.1-1.5% of a step on this VM (issue 9's twelfth pass). It shows whenever training pauses at the
end of a recorder block while the writer finishes, blocking (the default) or spinning
(``--spin-wait``; the spill stayed). On this VM any pause, even a 1 ms sleep, slows the next ~30
steps (the next 20-step block by 2.5-5%), and a 10^5 block's wait averages ~5 ms. A continuous
run never pauses for the writer, so the spill is most likely the benchmark's; training on through
the wait instead (tried in that pass) starved the ``SCHED_IDLE`` writer for ~0.7 s per block and
was inconclusive. The neighbour ratio neither charges the spill nor keeps it out of its
denominator, so it reads such a mode low by about 1.5 times the spill. The ``spill`` line fits, by
least squares over every block (`spill_fit`), each mode's own excess and its spill onto the next
block, and ``overhead with the spill charged`` prints their sum with a bootstrap interval, about
twice as wide as the neighbour ratio's. ``--settle MS`` ends every block, with or without a
recorder, with the same pause: on an AMD EPYC VM (issue 9's thirteenth pass) the spill stayed, so it
is more likely a real after-effect of writing than the benchmark's pause, and the charged figure the
safer one.

After set-up the benchmark freezes the garbage collector's heap (``gc.collect(); gc.freeze()``):
a full collection of the set-up objects paused this process for 100-160 ms, once or twice per
run, in whichever block it fell (a hook row of 160 ms at 10^4 made one run's mean hook 294 µs
against a median of 81). Objects made later, the recorder's included, are collected as usual; a
``gc`` line prints the collections during the measured blocks and their pauses per mode.
Goal: recorder_1e5 overhead <= 3% and recorder_1e4 <= 1% on both workloads, and >= 10x less overhead
than naive_1e5. ``--uniform`` adds the mode ``uniform_1e5``: recorder_1e5 with ``layout="uniform"``
(single weights) instead of the default strided runs of 16, and ``uniform_1e4``; ``--runs`` the modes
``runs_1e4`` and ``runs_1e5``, with ``layout="runs"`` (runs of 16 at random, the default before issue
9's seventh pass).

``--checksum-cost`` adds the mode ``nocrc_1e5``: recorder_1e5 without the crc32c checksum codec
that every store carries, and prints what the checksum costs per step. ``--writer-cost`` adds
``nowrite_1e5`` (recorder_1e5 whose writer drops its blocks: the training thread's side alone) and
``nice_1e5`` (its writer at nice 10, as before issue 9's tenth pass, instead of ``SCHED_IDLE``). ``steal_us`` is the
machine's steal time per step (``/proc/stat``, 10 ms ticks): time the hypervisor took from the VM.

    python benchmarks/recorder_overhead.py           # full: ~3.5 minutes on 2 cores (mlp ~4)
    python benchmarks/recorder_overhead.py --workload mlp
    python benchmarks/recorder_overhead.py --quick   # a tiny version in seconds (used by the tests)
    python benchmarks/recorder_overhead.py --checksum-cost   # also without the checksum
    python benchmarks/recorder_overhead.py --save blocks.npz  # also every block, for offline analysis
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from corrtools import Recorder
from corrtools.record.sampling import plan_samples
from corrtools.record.store import _compressor, default_chunks
from corrtools.workloads import CharLMConfig, CharLMWorkload


class MLPWorkload:
    """An MLP ``widths[0]→...→widths[-1]`` (ReLU between), AdamW, regression onto a fixed random
    teacher ``tanh(x @ W)`` with fresh Gaussian inputs of ``batch`` rows every step."""

    def __init__(self, widths: tuple[int, ...] = (512, 1024, 1024, 512), batch: int = 64, seed: int = 0) -> None:
        torch.manual_seed(seed)
        layers: list[torch.nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        self.model = torch.nn.Sequential(*layers[:-1])
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.widths, self.batch = widths, batch
        self._gen = torch.Generator().manual_seed(seed + 1)
        self._teacher = torch.randn(widths[0], widths[-1], generator=self._gen) / widths[0] ** 0.5

    def train_step(self, after_step: Callable[[], None] | None = None) -> float:
        x = torch.randn(self.batch, self.widths[0], generator=self._gen)  # (B, in)
        loss = torch.nn.functional.mse_loss(self.model(x), torch.tanh(x @ self._teacher))
        loss.backward()
        self.optimizer.step()
        if after_step is not None:
            after_step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


class _Timed(Recorder):
    """A Recorder that keeps the duration of its optimizer hook (wall) and of its writes (writer CPU)."""

    def _start(self) -> None:
        self.hook_s: list[float] = []
        self.write_cpu_s = 0.0
        self.rows_written = 0
        super()._start()

    def _on_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        t0 = time.perf_counter()
        super()._on_step(optimizer, args, kwargs)
        self.hook_s.append(time.perf_counter() - t0)

    def _write_block(self, block: Any, lo: int, hi: int, event: Any) -> None:
        c0 = time.thread_time()
        super()._write_block(block, lo, hi, event)
        self.write_cpu_s += time.thread_time() - c0
        self.rows_written += max(hi - lo, 0)


class _GcPauses:
    """From construction to `stop`: the set-up heap frozen (``gc.collect(); gc.freeze()``, see the
    module docstring) and the garbage collector's pauses logged per mode (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.mode = "none"
        self.pauses: list[tuple[str, int, float]] = []  # (mode, generation, seconds)
        self._t0 = 0.0
        gc.collect()
        gc.freeze()
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses.append((self.mode, int(info["generation"]), time.perf_counter() - self._t0))

    def stop(self) -> None:
        gc.callbacks.remove(self._callback)
        gc.unfreeze()  # main() may be called in a longer-lived process

    def summary(self) -> str:
        if not self.pauses:
            return "gc (set-up heap frozen): no collections during the measured blocks"
        mode, gen, longest = max(self.pauses, key=lambda p: p[2])
        total = {m: sum(p[2] for p in self.pauses if p[0] == m) for m in dict.fromkeys(p[0] for p in self.pauses)}
        return (f"gc (set-up heap frozen): {len(self.pauses)} collections during the measured blocks, "
                f"longest {longest * 1e3:.1f} ms (generation {gen}, {mode}); ms per mode: "
                + ", ".join(f"{m} {t * 1e3:.1f}" for m, t in total.items()))


class NaiveRecorder:
    """The straightforward recorder: per step, copy each sampled parameter to numpy and append a row."""

    def __init__(self, model: torch.nn.Module, path: Path, sample: int | float, seed: int = 0) -> None:
        plan = plan_samples(model, sample=sample, seed=seed)
        params = dict(model.named_parameters())
        self.entries = [(params[s.name], torch.as_tensor(s.index)) for s in plan.samples]
        n = plan.n_weights
        cs, cw = default_chunks(n)
        self.array = zarr.create_array(str(path), shape=(0, n), chunks=(cs, cw), dtype="float32",
                                       compressors=_compressor("lz4"), fill_value=np.nan)

    def step(self) -> None:
        row = np.concatenate([p.detach().flatten()[idx].cpu().numpy() for p, idx in self.entries])
        self.array.append(row[None, :])


class _NoChecksum(_Timed):
    _checksum = False


class _NoWrite(_Timed):
    """The hook and the hand-over as usual, but the writer thread drops each block unwritten: what
    the training thread's side costs alone (a diagnostic; its store stays empty)."""

    def _write_block(self, block: Any, lo: int, hi: int, event: Any) -> None:
        self.rows_written += max(hi - lo, 0)


class _NiceWriter(_Timed):
    """The writer thread at nice 10 from the start (the Recorder before issue 9's tenth pass)
    instead of ``SCHED_IDLE`` (a diagnostic)."""

    _idle_writer = False


def _crc_alone(n_weights: int, step_s: float, rows: int = 64) -> str:
    """CPU time of the checksum alone (google_crc32c, what zarr's crc32c codec calls) per recorded row."""
    import google_crc32c

    data = np.random.default_rng(0).normal(size=(rows, n_weights)).astype(np.float32).tobytes()
    reps = 20
    c0 = time.process_time()
    for _ in range(reps):
        google_crc32c.value(data)
    per_row = (time.process_time() - c0) / reps / rows
    return (f"crc32c alone: {per_row * 1e3:.3f} ms CPU per row of {n_weights} weights "
            f"({len(data) / rows / per_row / 1e9:.1f} GB/s), {per_row / step_s * 100:.2f}% of a no-recorder step")


def _steal_s() -> float:
    """The machine's steal time so far, in seconds summed over its CPUs (``/proc/stat``: time the
    hypervisor ran something else while a virtual CPU wanted to run); 0.0 where it is not known."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def ratio_of_sums(block_s: np.ndarray, reference_s: np.ndarray, level: float = 0.95, n: int = 4000,
                  ) -> tuple[float, float, float]:
    """A mode's overhead from its blocks' times `block_s` (k,) and their references `reference_s`
    (k,) (the mean of each block's two no-recorder neighbours): ``sum(block_s) / sum(reference_s) -
    1``, with a seeded percentile bootstrap interval over blocks; returns (overhead, low, high).

    The ratio of sums, not the mean of the per-block ratios (the estimator up to issue 9's fifteenth
    pass): a mean of ratios reads high by about the relative variance of the reference
    (E[x/y] > E[x]/E[y]), which 4-step blocks on a VM whose step time varies by 16% make
    ~0.15 points on the MLP (none_check averaged +0.15% over its eleven runs, +0.10% over seventeen
    on both workloads; the ratio of sums -0.06% and -0.04%)."""
    x, y = np.asarray(block_s, dtype=np.float64), np.asarray(reference_s, dtype=np.float64)
    idx = np.random.default_rng(0).integers(0, len(x), size=(n, len(x)))
    boot = x[idx].sum(axis=1) / y[idx].sum(axis=1) - 1
    return (float(x.sum() / y.sum() - 1), float(np.quantile(boot, (1 - level) / 2)),
            float(np.quantile(boot, (1 + level) / 2)))


def spill_fit(mode: list[str], step_s: np.ndarray, measured: list[str], group: int, n_boot: int = 1000,
              ) -> tuple[dict[str, tuple[float, float, float]], dict[str, tuple[float, float]],
                         dict[str, tuple[float, float]]]:
    """Each measured mode's own excess and its spill onto the no-recorder block after it, from every
    block in the order measured (issue 9's twelfth pass: a no-recorder block right after a 10^5
    block ran slower than the others, and the neighbour ratio both misses that time and divides by it).

    Model, in y = log(s per step): a block of mode M is ``drift + own[M]``; a no-recorder block right
    after one of mode M is ``drift + spill[M]``; ``spill["none_check"] = 0`` (it does nothing, and
    every no-recorder block follows some measured block, so one reference is needed). With the drift
    linear over three blocks, ``z_i = y_i - (y_{i-1} + y_{i+1}) / 2`` of every interior block is linear
    in own and spill: solved by least squares. ``own["none_check"]`` is then the method's own check
    (it should read 0). Returns, as fractions of a step, ``(own, spill, own + spill)`` per mode and
    the 95% intervals of own + spill and of spill, from a bootstrap over runs of `group` consecutive
    equations (one round): ``estimates, interval_total, interval_spill``."""
    k = len(measured)
    col = {m: j for j, m in enumerate(measured)}
    y = np.log(np.asarray(step_s, dtype=np.float64))
    rows, z = [], []
    for i in range(1, len(mode) - 1):
        x = np.zeros(2 * k)
        for j, w in ((i, 1.0), (i - 1, -0.5), (i + 1, -0.5)):
            if mode[j] != "none":
                x[col[mode[j]]] += w
            elif j > 0 and mode[j - 1] != "none":
                x[k + col[mode[j - 1]]] += w
        rows.append(x)
        z.append(y[i] - (y[i - 1] + y[i + 1]) / 2)
    keep = [j for j in range(2 * k) if j != k + col["none_check"]]  # spill of none_check := 0
    a, b = np.array(rows)[:, keep], np.array(z)

    def solve(idx: np.ndarray) -> np.ndarray:
        c = np.zeros(2 * k)
        c[keep] = np.linalg.lstsq(a[idx], b[idx], rcond=None)[0]
        return c

    c = solve(np.arange(len(b)))
    groups = np.arange(len(b)) // group
    members = [np.flatnonzero(groups == g) for g in range(groups.max() + 1)]
    rng = np.random.default_rng(0)
    boot = np.array([solve(np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))]))
                     for _ in range(n_boot)])
    ci = lambda v: (float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975)))  # noqa: E731
    estimates = {m: (float(c[j]), float(c[k + j]), float(c[j] + c[k + j])) for m, j in col.items()}
    interval_total = {m: ci(boot[:, j] + boot[:, k + j]) for m, j in col.items()}
    interval_spill = {m: ci(boot[:, k + j]) for m, j in col.items()}
    return estimates, interval_total, interval_spill


def _matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() >= 2 and p.is_floating_point()]


def _sample(model: torch.nn.Module, target: int, per_matrix: bool) -> int | float:
    """The Recorder's ``sample`` for ~target weights: an even count per matrix, or one fraction."""
    mats = _matrices(model)
    if per_matrix:
        return -(-target // len(mats))
    return min(1.0, target / sum(p.numel() for p in mats))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and blocks: seconds, for tests")
    ap.add_argument("--workload", default="charlm", choices=("charlm", "mlp"),
                    help="charlm (default): the built-in CharLM; mlp: MLP 512-1024-1024-512, AdamW, batch 64")
    ap.add_argument("--rounds", type=int, default=None,
                    help="blocks per mode (default charlm 384, mlp 800: 1,536 / 3,200 steps per mode, a "
                         "none_check interval of about +-0.5%%, what a 1%% goal needs; quick 2)")
    ap.add_argument("--block", type=int, default=None,
                    help="steps per block (default 4; before issue 9's fifteenth pass charlm 16, mlp 20, which "
                         "left twice the interval for the same steps; quick 10)")
    ap.add_argument("--uniform", action="store_true",
                    help="add the modes uniform_1e4/1e5: the recorders with layout='uniform' (single weights)")
    ap.add_argument("--runs", action="store_true",
                    help="add the modes runs_1e4/1e5: the recorders with layout='runs' (runs of 16 at random)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's; quick: 1). On a loaded 2-core machine "
                         "2 threads can stall for ~0.4 s per step; 1 thread is then the meaningful setting")
    ap.add_argument("--compressor", default="auto", choices=("auto", "lz4", "zstd", "none"),
                    help="the Recorder's values codec (default: the Recorder's default, auto)")
    ap.add_argument("--checksum-cost", action="store_true",
                    help="add the mode nocrc_1e5 (recorder_1e5 without the crc32c checksum) and print its cost")
    ap.add_argument("--writer-cost", action="store_true",
                    help="add the modes nowrite_1e5 (recorder_1e5 whose writer drops its blocks) and "
                         "nice_1e5 (its writer at nice 10 instead of SCHED_IDLE): what writing costs training")
    ap.add_argument("--spin-wait", action="store_true",
                    help="wait for the writer at block ends by spinning instead of blocking (a diagnostic: on this "
                         "VM an idle moment slows the next ~30 steps; spinning did not remove the spill)")
    ap.add_argument("--settle", type=float, default=0.0, metavar="MS",
                    help="end every block, with or without a recorder, with the same pause of MS ms (a recorder "
                         "block's wait for its writer inside it), so that every block starts after the same pause: "
                         "on this VM a pause slows the next ~30 steps, and only recorder blocks paused before")
    ap.add_argument("--save", type=Path, default=None, metavar="FILE.npz",
                    help="also save every block in the order measured (mode, s per step, process CPU and steal per "
                         "step, start time) and each recorder's hook times, for offline analysis")
    args = ap.parse_args(argv)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    mlp = args.workload == "mlp"
    if args.quick:
        targets = {"recorder_1e4": 1_000, "recorder_1e5": 10_000}
        rounds, block = args.rounds or 2, args.block or 10
    else:
        targets = {"recorder_1e4": 10_000, "recorder_1e5": 100_000}
        rounds, block = args.rounds or (800 if mlp else 384), args.block or 4
    wl: Any
    if mlp:
        wl = MLPWorkload((64, 128, 128, 64), batch=16) if args.quick else MLPWorkload()
        title = f"MLP {'-'.join(map(str, wl.widths))} batch {wl.batch} AdamW"
    else:
        cfg = (CharLMConfig(d_model=32, n_layer=1, n_head=2, seq_len=16, batch_size=4, steps=10_000, text_bytes=50_000)
               if args.quick else CharLMConfig(steps=100_000))  # the default: d_model=128, 2 layers
        wl = CharLMWorkload(cfg)
        title = f"CharLM d_model={cfg.d_model} n_layer={cfg.n_layer}"
    n_matrix = sum(p.numel() for p in _matrices(wl.model))
    tmp = tempfile.TemporaryDirectory(prefix="corrtools-bench-")
    root = Path(tmp.name)
    sample = {mode: _sample(wl.model, t, per_matrix=mlp) for mode, t in targets.items()}
    common = {"seed": 0, "compressor": args.compressor, "flush_every": None}
    # flush_every=None: in a continuous run at these step times a block fills in 0.5-3 s, far inside
    # the default 30 s flush interval; alternating modes stretches one block over a minute of wall
    # time, which would make flushes (and unaligned writes) that a continuous run never makes
    recorders = {
        mode: _Timed(wl.model, root / f"{mode}.zarr", sample=sample[mode], **common) for mode in targets
    }
    for layout in [name for name in ("uniform", "runs") if getattr(args, name)]:
        for size in ("1e4", "1e5"):
            recorders[f"{layout}_{size}"] = _Timed(wl.model, root / f"{layout}_{size}.zarr",
                                                   sample=sample[f"recorder_{size}"], layout=layout, **common)
    if args.checksum_cost:
        recorders["nocrc_1e5"] = _NoChecksum(wl.model, root / "nocrc_1e5.zarr", sample=sample["recorder_1e5"],
                                             **common)
    if args.writer_cost:
        for mode, cls in (("nowrite_1e5", _NoWrite), ("nice_1e5", _NiceWriter)):
            recorders[mode] = cls(wl.model, root / f"{mode}.zarr", sample=sample["recorder_1e5"], **common)
    naive = NaiveRecorder(wl.model, root / "naive.zarr", sample["recorder_1e5"])
    weights = {"none": 0, **{m: r.n_weights for m, r in recorders.items()},
               "naive_1e5": naive.array.shape[1]}
    modes = ["none", "none_check", *recorders]
    weights["none_check"] = 0
    for _ in range(3):  # warm-up: allocator, first-call overheads
        wl.train_step()
    pauses = _GcPauses()  # freezes the set-up heap: a full collection of it paused a block 100-160 ms
    times: dict[str, list[float]] = {m: [] for m in [*modes, "naive_1e5"]}
    cpu: dict[str, list[float]] = {m: [] for m in [*modes, "naive_1e5"]}  # process CPU, all threads
    steal: dict[str, list[float]] = {m: [] for m in [*modes, "naive_1e5"]}  # machine's steal per step

    sequence: list[tuple[str, float]] = []  # (mode, s per step) in the order measured, naive's part last
    block_log: list[tuple[float, float, float]] = []  # per entry of `sequence`: (start s, CPU s and steal s per step)
    waits: dict[str, list[tuple[float, float]]] = {m: [] for m in recorders}  # per block: (wall, writer CPU) s
    walls: list[tuple[int, float]] = []  # (position in sequence, wait wall - writer CPU) s
    overrun: list[float] = []  # --settle: how far each block's wait ran past the pause, s

    def measure(mode: str) -> None:
        rec = recorders.get(mode)
        pauses.mode = mode
        after = naive.step if mode == "naive_1e5" else None
        if rec is not None:
            rec.attach(wl.optimizer)
        s0, c0 = _steal_s(), time.process_time()  # before the clock starts: reading /proc/stat takes ~20 us
        t0 = time.perf_counter()
        for _ in range(block):
            wl.train_step(after_step=after)
        wait_s = 0.0  # what the block is charged for the writing left when its steps are done
        if rec is not None:
            rec.detach()
            # background writing is charged to the block that caused it: the writer thread's CPU
            # until it has written every block handed to it (not the wait's wall time, which is
            # mostly the disk's latency: a continuous run never waits for it)
            clock = time.pthread_getcpuclockid(rec._thread.ident)
            t1, w0 = time.perf_counter(), time.clock_gettime(clock)
            if args.spin_wait:  # wait without going idle (time.sleep(0) only lets the writer have the GIL)
                while rec._queue.unfinished_tasks:
                    time.sleep(0)
            rec._wait_writer()
            wait_s = time.clock_gettime(clock) - w0
            waits[mode].append((time.perf_counter() - t1, wait_s))
            t_end = t1
            walls.append((len(sequence), waits[mode][-1][0] - wait_s))
        if mode == "naive_1e5":
            os.sync()  # and the page cache's writeback of the naive appends to the naive blocks
        if rec is None:
            t_end = time.perf_counter()
        if args.settle:  # the same pause after every block, counted from the end of its steps
            late = time.perf_counter() - t_end - args.settle / 1e3
            overrun.append(max(late, 0.0))
            if late < 0:
                time.sleep(-late)
        times[mode].append((t_end - t0 + wait_s) / block)
        cpu[mode].append((time.process_time() - c0) / block)
        steal[mode].append((_steal_s() - s0) / block)
        sequence.append((mode, times[mode][-1]))
        block_log.append((t0, cpu[mode][-1], steal[mode][-1]))

    slots = modes[1:]
    measure("none")
    for r in range(rounds):
        for mode in slots[r % len(slots):] + slots[: r % len(slots)]:  # rotated; each between two nones
            measure(mode)
            measure("none")
    n_main = len(sequence)
    # the naive recorder is 3-6x slower and leaves dirty pages behind: measured apart, after the rest
    naive_rounds = max(2, rounds // 8)
    for r in range(naive_rounds):
        for mode in (("none", "naive_1e5") if r % 2 == 0 else ("naive_1e5", "none")):
            measure(mode)
    pauses.stop()
    for rec in recorders.values():
        rec.close()
    hook = {m: statistics.median(r.hook_s) for m, r in recorders.items()}
    hook_mean = {m: statistics.fmean(r.hook_s) for m, r in recorders.items()}
    write = {m: r.write_cpu_s / max(r.rows_written, 1) for m, r in recorders.items()}
    sizes = {m: sum(f.stat().st_size for f in (root / f"{m}.zarr").rglob("*") if f.is_file())
             for m in recorders}
    tmp.cleanup()
    if args.save is not None:
        start, cpu_s, steal_s = np.array(block_log).T
        np.savez(args.save, mode=np.array([m for m, _ in sequence]), step_s=np.array([t for _, t in sequence]),
                 cpu_s=cpu_s, steal_s=steal_s, start_s=start - start[0], n_main=n_main, block=block,
                 **{f"hook_s_{m}": np.array(r.hook_s) for m, r in recorders.items()})

    def against_neighbours(seq: list[Any], m: str) -> tuple[np.ndarray, np.ndarray]:
        """Mode m's blocks (s per step) and the mean of each one's two no-recorder neighbours
        (interpolating between neighbours cancels drift)."""
        i = np.array([j for j, (mode, _) in enumerate(seq) if mode == m])
        t = np.array([x for _, x in seq])
        return t[i], (t[i - 1] + t[i + 1]) / 2

    pairs = {m: against_neighbours(sequence[:n_main], m) for m in slots}
    # the estimator before issue 9's sixth pass: the wait's whole wall time charged to the block
    seq_wall = [list(x) for x in sequence[:n_main]]
    for i, extra in walls:
        seq_wall[i][1] += extra / block
    over_wall = {m: ratio_of_sums(*against_neighbours(seq_wall, m))[0] for m in recorders}
    none_naive = np.array(times["none"][-naive_rounds:])  # naive: paired with its own no-recorder blocks
    pairs["naive_1e5"] = (np.array(times["naive_1e5"]), none_naive)
    estimates = {m: ratio_of_sums(*v) for m, v in pairs.items()}
    over = {m: e[0] for m, e in estimates.items()}
    ci = {m: (e[1], e[2]) for m, e in estimates.items()}
    step = {m: statistics.median(v) for m, v in times.items()}
    proc = {m: statistics.median(v) for m, v in cpu.items()}
    stolen = {m: statistics.fmean(v) for m, v in steal.items()}  # a mean: steal comes in 10 ms ticks
    base = step["none"]
    print(f"recorder overhead: {title} ({n_matrix} matrix weights), "
          f"{rounds} rounds x {block} steps per mode, each between two no-recorder blocks (naive: {naive_rounds} rounds apart), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load {' '.join(open('/proc/loadavg').read().split()[:3])}")
    print(f"{'mode':<14}{'weights':>9}{'step_ms':>10}{'overhead':>10} {'95% CI':<18}{'cpu_ms':>9}{'extra_us':>10}"
          f"{'hook_us':>9}{'write_us':>10}{'steal_us':>10}")
    for m in [*modes, "naive_1e5"]:
        h = f"{hook[m] * 1e6:>9.0f}{write[m] * 1e6:>10.0f}" if m in recorders else f"{'-':>9}{'-':>10}"
        o = (f" {over[m] * 100:>+8.1f}% {ci[m][0] * 100:>+7.1f}..{ci[m][1] * 100:>+.1f}%".ljust(29) if m != "none"
             else f" {'-':>9} {'-':<18}")
        print(f"{m:<14}{weights[m]:>9}{step[m] * 1e3:>10.3f}{o}{proc[m] * 1e3:>9.3f}"
              f"{over.get(m, 0.0) * base * 1e6:>10.0f}{h}{stolen[m] * 1e6:>10.0f}")  # none: no over
    factor = over["naive_1e5"] / over["recorder_1e5"] if over["recorder_1e5"] > 0 else float("inf")
    print(f"overhead {args.workload} recorder_1e5: {over['recorder_1e5'] * 100:.1f}% (goal <= 3%); "
          f"recorder_1e4: {over['recorder_1e4'] * 100:.1f}% (goal <= 1%); naive_1e5: {over['naive_1e5'] * 100:.1f}%"
          + "".join(f"; {m}: {over[m] * 100:.1f}%" for m in recorders if not m.startswith("recorder")))
    print(f"naive/recorder overhead at 1e5: {factor:.1f}x (goal >= 10x)")
    print(f"resolution: none_check (no recorder, measured like the others) {over['none_check'] * 100:+.1f}% "
          f"[{ci['none_check'][0] * 100:+.1f}, {ci['none_check'][1] * 100:+.1f}]")
    fit, fit_ci, spill_ci = spill_fit([m for m, _ in sequence[:n_main]], np.array([t for _, t in sequence[:n_main]]),
                                      slots, group=2 * len(slots))
    print("spill onto the next no-recorder block (least squares over every block, none_check's spill = 0): "
          + ", ".join(f"after {m} {fit[m][1] * 100:+.2f}% [{spill_ci[m][0] * 100:+.2f}, {spill_ci[m][1] * 100:+.2f}]"
                      for m in slots if m != "none_check")
          + f"; none_check's own {fit['none_check'][0] * 100:+.2f}% (should read 0)")
    print("overhead with the spill charged (own + spill; a wider interval): "
          + ", ".join(f"{m} {fit[m][2] * 100:+.1f}% [{fit_ci[m][0] * 100:+.1f}, {fit_ci[m][1] * 100:+.1f}]"
                      for m in slots if m != "none_check"))
    for m in recorders:
        # what the timers attribute to the recorder per step, far less noisy than the step ratio:
        # the hook on the training thread (its mean, as the overhead is a mean) and the writer
        # thread's CPU, which on a machine busy with training takes its time from training; the
        # hook runs every step, the writing once per row (every `every` steps)
        acc = hook_mean[m] + write[m] / recorders[m].every
        print(f"accounted {m}: hook {hook_mean[m] * 1e6:.0f} us (mean; median {hook[m] * 1e6:.0f}) + writer "
              f"{write[m] * 1e6:.0f} us CPU per row = {acc * 1e6:.0f} us per step = {acc / base * 100:.2f}% of a "
              f"no-recorder step (measured: {over[m] * 100:.1f}%)")
    for m in recorders:
        w = np.array(waits[m]) * 1e3
        print(f"writer wait {m}: {w[:, 0].mean():.2f} ms wall per block (max {w[:, 0].max():.2f}), of which "
              f"{w[:, 1].mean():.2f} ms writer CPU (charged); with the wall time charged instead (the "
              f"estimator before issue 9's sixth pass): {over_wall[m] * 100:.1f}%")
    if args.checksum_cost:
        print(f"checksum cost at 1e5: step {(over['recorder_1e5'] - over['nocrc_1e5']) * 100:+.1f}% of a step, "
              f"process CPU {(proc['recorder_1e5'] / proc['nocrc_1e5'] - 1) * 100:+.1f}% "
              f"(recorder_1e5 with crc32c vs nocrc_1e5 without)")
        print(_crc_alone(weights["recorder_1e5"], base))
    print("writer: " + ", ".join(
        f"{m} {'SCHED_IDLE' if r._writer_idle else 'nice 10'}"
        + (" (fell behind: promoted to nice 10)" if r._writer_promoted.is_set() else "") for m, r in recorders.items()))
    if args.settle:
        late = np.array(overrun)
        print(f"settle: every block ended with a {args.settle:g} ms pause; {int((late > 0).sum())} of {late.size} "
              f"waits ran past it (max by {late.max() * 1e3:.1f} ms)")
    print(pauses.summary())
    mb = sizes["recorder_1e5"] / 2**20
    raw = weights["recorder_1e5"] * 4 * rounds * block / 2**20
    print(f"store recorder_1e5: {mb:.1f} MiB on disk for {raw:.1f} MiB of float32 ({mb / raw:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
