"""Recorder overhead on the built-in workload, measured side by side in one process.

Trains one CharLM workload in alternating blocks of steps, rotating through four modes:

    none          no recorder
    recorder_1e4  corrtools.Recorder with ~10^4 sampled weights per step
    recorder_1e5  corrtools.Recorder with ~10^5 sampled weights per step
    naive_1e5     per step: ``.detach().cpu().numpy()`` of the same ~10^5 sampled values and a
                  ``zarr`` append of that row (same chunks and codec as the run store)

Each recorder keeps one store open for the whole benchmark and is attached only during its own
blocks; at the end of a block the benchmark waits until the recorder's writer thread has written
every block handed to it, so background writing is charged to the mode that caused it. The step
time of a mode is the median over rounds of its blocks' mean step time (wall clock, including the
wait for the writer). Prints a table and the ratios to no recorder; ``cpu_ms`` is the CPU time of the
whole process per step (training, the writer thread, zarr's threads), a figure less sensitive to
other load on the machine than the wall clock. Goal: recorder_1e5 overhead <= 3%, and >= 10x less overhead than naive_1e5.

``--checksum-cost`` adds the mode ``nocrc_1e5``: recorder_1e5 without the crc32c checksum codec
that every store carries, and prints what the checksum costs per step.

    python benchmarks/recorder_overhead.py           # full: ~1-2 minutes on 2 cores
    python benchmarks/recorder_overhead.py --quick   # a tiny version in seconds (used by the tests)
    python benchmarks/recorder_overhead.py --checksum-cost   # also without the checksum
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from corrtools import Recorder
from corrtools.record.sampling import plan_samples
from corrtools.record.store import _compressor, default_chunks
from corrtools.workloads import CharLMConfig, CharLMWorkload


class NaiveRecorder:
    """The straightforward recorder: per step, copy each sampled parameter to numpy and append a row."""

    def __init__(self, model: torch.nn.Module, path: Path, fraction: float, seed: int = 0) -> None:
        plan = plan_samples(model, sample=fraction, seed=seed)
        params = dict(model.named_parameters())
        self.entries = [(params[s.name], torch.as_tensor(s.index)) for s in plan.samples]
        n = plan.n_weights
        cs, cw = default_chunks(n)
        self.array = zarr.create_array(str(path), shape=(0, n), chunks=(cs, cw), dtype="float32",
                                       compressors=_compressor("lz4"), fill_value=np.nan)

    def step(self) -> None:
        row = np.concatenate([p.detach().flatten()[idx].cpu().numpy() for p, idx in self.entries])
        self.array.append(row[None, :])


class _NoChecksum(Recorder):
    _checksum = False


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


def _fraction(model: torch.nn.Module, target: int) -> float:
    total = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and p.is_floating_point())
    return min(1.0, target / total)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and blocks: seconds, for tests")
    ap.add_argument("--rounds", type=int, default=None, help="blocks per mode (default 6; quick 2)")
    ap.add_argument("--block", type=int, default=None, help="steps per block (default 80; quick 10)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's; quick: 1). On a loaded 2-core machine "
                         "2 threads can stall for ~0.4 s per step; 1 thread is then the meaningful setting")
    ap.add_argument("--compressor", default="auto", choices=("auto", "lz4", "zstd", "none"),
                    help="the Recorder's values codec (default: the Recorder's default, auto)")
    ap.add_argument("--checksum-cost", action="store_true",
                    help="add the mode nocrc_1e5 (recorder_1e5 without the crc32c checksum) and print its cost")
    args = ap.parse_args(argv)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    if args.quick:
        cfg = CharLMConfig(d_model=32, n_layer=1, n_head=2, seq_len=16, batch_size=4, steps=10_000,
                           text_bytes=50_000)
        targets = {"recorder_1e4": 1_000, "recorder_1e5": 10_000}
        rounds, block = args.rounds or 2, args.block or 10
    else:
        cfg = CharLMConfig(steps=100_000)  # the default workload: d_model=128, 2 layers, ~426k matrix weights
        targets = {"recorder_1e4": 10_000, "recorder_1e5": 100_000}
        rounds, block = args.rounds or 5, args.block or 80
    wl = CharLMWorkload(cfg)
    n_matrix = sum(p.numel() for p in wl.model.parameters() if p.dim() >= 2)
    tmp = tempfile.TemporaryDirectory(prefix="corrtools-bench-")
    root = Path(tmp.name)
    recorders = {
        mode: Recorder(wl.model, root / f"{mode}.zarr", sample=_fraction(wl.model, t), seed=0,
                       compressor=args.compressor)
        for mode, t in targets.items()
    }
    if args.checksum_cost:
        recorders["nocrc_1e5"] = _NoChecksum(wl.model, root / "nocrc_1e5.zarr", seed=0, compressor=args.compressor,
                                             sample=_fraction(wl.model, targets["recorder_1e5"]))
    naive = NaiveRecorder(wl.model, root / "naive.zarr", _fraction(wl.model, targets["recorder_1e5"]))
    weights = {"none": 0, **{m: r.n_weights for m, r in recorders.items()},
               "naive_1e5": naive.array.shape[1]}
    modes = ["none", *recorders, "naive_1e5"]
    for _ in range(3):  # warm-up: allocator, first-call overheads
        wl.train_step()
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}  # CPU time of the whole process, all threads
    for r in range(rounds):
        order = modes[r % len(modes):] + modes[: r % len(modes)]  # rotate to spread drift evenly
        for mode in order:
            rec = recorders.get(mode)
            after = naive.step if mode == "naive_1e5" else None
            if rec is not None:
                rec.attach(wl.optimizer)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(block):
                wl.train_step(after_step=after)
            if rec is not None:
                rec.detach()
                rec._wait_writer()
            times[mode].append((time.perf_counter() - t0) / block)
            cpu[mode].append((time.process_time() - c0) / block)
    for rec in recorders.values():
        rec.close()
    sizes = {m: sum(f.stat().st_size for f in (root / f"{m}.zarr").rglob("*") if f.is_file())
             for m in recorders}
    tmp.cleanup()

    step = {m: statistics.median(v) for m, v in times.items()}
    proc = {m: statistics.median(v) for m, v in cpu.items()}
    base = step["none"]
    print(f"recorder overhead: CharLM d_model={cfg.d_model} n_layer={cfg.n_layer} ({n_matrix} matrix weights), "
          f"{rounds} rounds x {block} steps per mode, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'mode':<14}{'weights':>9}{'step_ms':>10}{'ratio':>8}{'cpu_ms':>9}")
    for m in modes:
        print(f"{m:<14}{weights[m]:>9}{step[m] * 1e3:>10.3f}{step[m] / base:>8.3f}{proc[m] * 1e3:>9.3f}")
    over = {m: step[m] / base - 1 for m in modes}
    factor = over["naive_1e5"] / over["recorder_1e5"] if over["recorder_1e5"] > 0 else float("inf")
    print(f"overhead recorder_1e5: {over['recorder_1e5'] * 100:.1f}% (goal <= 3%); "
          f"recorder_1e4: {over['recorder_1e4'] * 100:.1f}%; naive_1e5: {over['naive_1e5'] * 100:.1f}%")
    print(f"naive/recorder overhead at 1e5: {factor:.1f}x (goal >= 10x)")
    if args.checksum_cost:
        print(f"checksum cost at 1e5: step {(step['recorder_1e5'] / step['nocrc_1e5'] - 1) * 100:+.1f}%, "
              f"process CPU {(proc['recorder_1e5'] / proc['nocrc_1e5'] - 1) * 100:+.1f}% "
              f"(recorder_1e5 with crc32c vs nocrc_1e5 without)")
        print(_crc_alone(weights["recorder_1e5"], base))
    mb = sizes["recorder_1e5"] / 2**20
    raw = weights["recorder_1e5"] * 4 * rounds * block / 2**20
    print(f"store recorder_1e5: {mb:.1f} MiB on disk for {raw:.1f} MiB of float32 ({mb / raw:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
