"""Throughput of the Δ analysis: `delta_by_magnitude` end to end from a run store vs a naive loop.

    python benchmarks/analysis_throughput.py            # T = 8192 steps x N = 32768 weights
    python benchmarks/analysis_throughput.py --quick    # a tiny version, seconds
    python benchmarks/analysis_throughput.py --scheduler   # also on a 2-worker dask LocalCluster
    python benchmarks/analysis_throughput.py --threads 1,2   # also: how it scales with threads

1. Builds a run store with `RunWriter` in a temporary folder (default chunking and codec): AR(1)
   trajectories whose memories range from ~1 to ~2000 steps, plus a slow drift on a few.
2. Times `delta_by_magnitude(path)` end to end (open, read and decompress, ρ for all lags up to
   T/2, Δ, bins with bootstrap intervals) in a fresh Python process, and reports that process's peak
   resident memory (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which includes the interpreter and
   imported libraries).
3. Times a naive per-lag loop on a subset of columns (vectorised over weights, np.corrcoef-style:
   every lag 1..T/2 de-means both windows and sums products), scaled to the same work, and checks it
   finds the same Δ as the kernel (float32 FFT) on those columns.
4. With ``--threads 1,2,...``: times `delta_by_magnitude(path, threads=t)` on the same store for each
   t, alternating the thread counts round by round in one fresh process (best of ``--rounds``), and
   prints weight-steps/s per thread count and the ratio to the first; each count's peak memory is
   measured in a process of its own.
Prints weight-steps per second for both, their ratio and the peak memory; the last line is JSON.

With ``--scheduler``: 4. starts a dask.distributed ``LocalCluster`` (2 worker processes x 1 thread,
the machine's 2 cores) and times ``delta_by_magnitude(path, scheduler=client)`` in alternation with
the in-process call in this process, on the same store, and reports each worker's peak resident
memory beside the block budget.

``--checksum-cost`` also builds the same store without the crc32c checksum codec and times
`delta_by_magnitude` on both, alternating, each in a fresh process (``--repeat`` times each).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_store(path: Path, T: int, N: int, seed: int = 0, checksum: bool = True) -> dict:
    """A run store of T rows x N weights in 4 parameters; returns a summary of its layout."""
    from corrtools.record.store import RunWriter, run_info

    rng = np.random.default_rng(seed)
    params = [f"blocks.{i // 2}.mlp.fc{i % 2 + 1}.weight" for i in range(4)]
    names = [params[j * 4 // N] for j in range(N)]
    index = np.concatenate([np.arange(len([n for n in names if n == p])) for p in params])
    phi = (1.0 - np.geomspace(0.5, 5e-4, N)).astype(np.float32)  # memory 1/(1-phi): 2 .. 2000 steps
    rng.shuffle(phi)
    drift = np.where(rng.random(N) < 0.1, 2e-3, 0.0).astype(np.float32)
    state = rng.standard_normal(N).astype(np.float32)
    initial = state.copy()
    writer = RunWriter.create(path, param=names, index=index, initial=initial, attrs={"every": 1},
                              checksum=checksum)
    block = writer.chunk_steps
    for s in range(0, T, block):
        k = min(block, T - s)
        rows = np.empty((k, N), dtype=np.float32)
        noise = rng.standard_normal((k, N), dtype=np.float32) * 0.05
        for i in range(k):
            state = phi * state + noise[i] + drift
            rows[i] = state
        writer.write_block(np.arange(s, s + k), rows)
    writer.close(state, T)
    info = run_info(path)
    return {"chunks": info["chunks"], "codecs": info["codecs"], "size_bytes": info["size_bytes"]}


def analyse(path: str, threads: int | None = None) -> dict:
    """Run in a fresh process: time delta_by_magnitude end to end, report peak RSS."""
    from corrtools.analysis.delta import delta_by_magnitude
    from corrtools.analysis.threads import resolve_threads

    t0 = time.perf_counter()
    res = delta_by_magnitude(path, progress=False, threads=threads)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"seconds": seconds, "peak_rss_bytes": peak, "bins": int(res.sizes["bin"]),
            "threads": resolve_threads(threads)}


def scaling(path: str, counts: list[int], rounds: int) -> dict:
    """Run in a fresh process: delta_by_magnitude at each thread count, alternating, ``rounds`` times
    (after one untimed warm-up); returns the seconds of every round per count."""
    from corrtools.analysis.delta import delta_by_magnitude

    delta_by_magnitude(path, progress=False, threads=counts[0])  # page cache, imports, FFT plans
    times: dict[int, list[float]] = {t: [] for t in counts}
    for _ in range(rounds):
        for t in counts:
            t0 = time.perf_counter()
            delta_by_magnitude(path, progress=False, threads=t)
            times[t].append(time.perf_counter() - t0)
    return {str(t): v for t, v in times.items()}


def _fresh(*args: str) -> dict:
    """Run this script with ``args`` in a fresh Python process; its last stdout line, parsed."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _thread_counts(text: str) -> list[int]:
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit(f"--threads {text!r}: give positive thread counts separated by commas, e.g. 1,2")
    return counts


def naive_delta(x: np.ndarray, max_lag: int) -> np.ndarray:
    """(T, n) → Δ (n,) in rows: per lag, de-mean both windows, Pearson, first crossing interpolated."""
    T, n = x.shape
    x = x.astype(np.float64)
    delta = np.full(n, float(max_lag))
    found = np.zeros(n, dtype=bool)
    prev = np.ones(n)
    for tau in range(1, max_lag + 1):
        a, b = x[: T - tau], x[tau:]
        am, bm = a - a.mean(axis=0), b - b.mean(axis=0)
        rho = (am * bm).sum(axis=0) / np.sqrt((am * am).sum(axis=0) * (bm * bm).sum(axis=0))
        new = ~found & (rho <= 0)
        delta[new] = (tau - 1) + prev[new] / (prev[new] - rho[new])
        found |= new
        prev = rho
    return delta


def cluster_side_by_side(path: Path, T: int, N: int, rounds: int) -> dict:
    """In process and on a 2-worker LocalCluster, alternating; weight-steps/s of each (best round)."""
    from distributed import Client, LocalCluster

    from corrtools.analysis.delta import _BLOCK_BYTES, delta_by_magnitude

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        delta_by_magnitude(str(path), progress=False, scheduler=client, n_boot=10)  # workers import corrtools
        seconds: dict[str, list[float]] = {"in process": [], "LocalCluster": []}
        results = {}
        for r in range(rounds):
            sides = list(seconds) if r % 2 == 0 else list(seconds)[::-1]
            for side in sides:
                t0 = time.perf_counter()
                results[side] = delta_by_magnitude(
                    str(path), progress=False, scheduler=client if side == "LocalCluster" else None
                )
                seconds[side].append(time.perf_counter() - t0)
        peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    same = all(
        np.array_equal(results["in process"][k].values, results["LocalCluster"][k].values, equal_nan=True)
        for k in results["in process"].data_vars
    )
    rate = {side: T * N / min(s) for side, s in seconds.items()}
    for side, s in seconds.items():
        print(f"{side:>13}: best {min(s):.2f} s of {', '.join(f'{x:.2f}' for x in s)} -> {rate[side]:.3g} weight-steps/s")
    ratio = rate["LocalCluster"] / rate["in process"]
    print(f"LocalCluster / in process: {ratio:.2f}x (2 workers x 1 thread vs 1 process x 2 threads); same numbers: {same}")
    print(
        "peak memory per worker: " + ", ".join(f"{v / 1e9:.2f} GB" for v in peaks.values())
        + f" (ru_maxrss, interpreter included; block budget {_BLOCK_BYTES / 1e6:.0f} MB per task)"
    )
    return {"cluster_weight_steps_per_s": rate["LocalCluster"], "in_process_weight_steps_per_s": rate["in process"],
            "cluster_ratio": ratio, "same_numbers": same, "worker_peak_rss_bytes": list(peaks.values())}


def _checksum_cost(tmp: Path, path: Path, T: int, N: int, repeat: int) -> None:
    """Time the analysis of `path` (with crc32c) and of the same data without it, alternating."""
    plain = tmp / "nocrc.zarr"
    layout = build_store(plain, T, N, checksum=False)
    print(f"store without checksum: codecs {layout['codecs']}, {layout['size_bytes'] / 1e6:.1f} MB on disk")
    times: dict[str, list[float]] = {"crc32c": [], "none": []}
    for _ in range(repeat):
        times["crc32c"].append(_fresh("--analyse", str(path))["seconds"])
        times["none"].append(_fresh("--analyse", str(plain))["seconds"])
    med = {k: float(np.median(v)) for k, v in times.items()}
    from corrtools.record.store import open_run

    read: dict[str, list[float]] = {"crc32c": [], "none": []}
    for _ in range(repeat):  # the read alone, in CPU time (less sensitive to other load than wall time)
        for key, p in (("crc32c", path), ("none", plain)):
            c0 = time.process_time()
            open_run(p)["values"].values
            read[key].append(time.process_time() - c0)
    rmed = {k: float(np.median(v)) for k, v in read.items()}
    print(f"reading every value: {rmed['crc32c']:.2f} s CPU with crc32c vs {rmed['none']:.2f} s without "
          f"(median of {repeat}): {(rmed['crc32c'] / rmed['none'] - 1) * 100:+.1f}%")
    print(f"checksum cost on the analysis: {med['crc32c']:.2f} s with crc32c vs {med['none']:.2f} s without "
          f"(median of {repeat} alternating runs each): {(med['crc32c'] / med['none'] - 1) * 100:+.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8192)
    ap.add_argument("--weights", type=int, default=32768)
    ap.add_argument("--naive-columns", type=int, default=128, help="columns timed with the naive loop")
    ap.add_argument("--quick", action="store_true", help="T=512, N=2048: runs in seconds")
    ap.add_argument("--scheduler", action="store_true",
                    help="also time the analysis on a 2-worker dask.distributed LocalCluster, beside in process")
    ap.add_argument("--threads", default=None, metavar="LIST",
                    help="also time the analysis at these thread counts, e.g. 1,2 (comma-separated)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the --threads and --scheduler alternations (default 3)")
    ap.add_argument("--checksum-cost", action="store_true",
                    help="also time the analysis of the same store without the crc32c checksum")
    ap.add_argument("--repeat", type=int, default=3, help="analyses per store with --checksum-cost")
    ap.add_argument("--analyse", help=argparse.SUPPRESS)  # internal: the fresh analysing process
    ap.add_argument("--scaling", help=argparse.SUPPRESS)  # internal: the thread-count alternation
    args = ap.parse_args()
    counts = _thread_counts(args.threads) if args.threads else []
    if args.analyse:
        print(json.dumps(analyse(args.analyse, counts[0] if counts else None)))
        return
    if args.scaling:
        print(json.dumps(scaling(args.scaling, counts, max(1, args.rounds))))
        return
    if args.quick:
        args.steps, args.weights, args.naive_columns = 512, 2048, 64
    T, N = args.steps, args.weights
    load = os.getloadavg()[0]
    print(f"load average (1 min) at start: {load:.2f}" + ("  -- the machine is loaded: timings are noisy" if load > 1.0 else ""))
    tmp = Path(tempfile.mkdtemp(prefix="corrtools-bench-"))
    try:
        path = tmp / "run.zarr"
        t0 = time.perf_counter()
        layout = build_store(path, T, N)
        built = time.perf_counter() - t0
        print(
            f"store: T={T} steps x N={N} weights, {layout['size_bytes'] / 1e6:.1f} MB on disk, "
            f"chunks {layout['chunks']}, codecs {layout['codecs']} (built in {built:.1f} s)"
        )
        fast = _fresh("--analyse", str(path))
        fast_rate = T * N / fast["seconds"]
        print(f"delta_by_magnitude end to end: {fast['seconds']:.2f} s -> {fast_rate:.3g} weight-steps/s "
              f"({fast['threads']} threads, the default on this machine)")

        from corrtools.analysis.correlation import decorrelation_time
        from corrtools.record.store import open_run

        n_sub = min(args.naive_columns, N)
        cols = np.linspace(0, N - 1, n_sub).astype(int)
        x = open_run(path)["values"].values[:, cols]  # (T, n_sub)
        t0 = time.perf_counter()
        d_naive = naive_delta(x, T // 2)
        naive_s = time.perf_counter() - t0
        naive_rate = T * n_sub / naive_s
        print(
            f"naive per-lag loop: {n_sub} columns, lags 1..{T // 2} in {naive_s:.2f} s -> "
            f"{naive_rate:.3g} weight-steps/s (scaled to N: {naive_s * N / n_sub:.0f} s)"
        )
        ours, _ = decorrelation_time(x)  # the kernel delta_by_magnitude runs, float32 FFT
        agree = float(np.nanmax(np.abs(ours - d_naive)))
        ratio = fast_rate / naive_rate
        peak = fast["peak_rss_bytes"]
        print(f"ratio: {ratio:.0f}x faster than the naive loop (max |dDelta| on its columns: {agree:.2g} steps)")
        print(f"peak memory: {peak / 1e9:.2f} GB (ru_maxrss of the analysing process, interpreter included)")
        by_threads = {}
        if counts:
            times = _fresh("--scaling", str(path), "--threads", args.threads, "--rounds", str(args.rounds))
            base = T * N / min(times[str(counts[0])])
            print(f"threads (same store, alternated in one process, best of {args.rounds} rounds; "
                  f"this process may use {_cores()} cores):")
            for t in counts:
                best = min(times[str(t)])
                rate = T * N / best
                peak_t = _fresh("--analyse", str(path), "--threads", str(t))["peak_rss_bytes"]
                by_threads[t] = {"seconds": times[str(t)], "weight_steps_per_s": rate, "peak_rss_bytes": peak_t}
                print(f"  threads={t:<3d} {best:6.2f} s -> {rate:.3g} weight-steps/s   "
                      f"ratio to threads={counts[0]}: {rate / base:.2f}   peak memory {peak_t / 1e9:.2f} GB")
        if args.checksum_cost:
            _checksum_cost(tmp, path, T, N, args.repeat)
        summary = {
            "T": T, "N": N, "seconds": fast["seconds"], "weight_steps_per_s": fast_rate,
            "naive_weight_steps_per_s": naive_rate, "ratio": ratio, "peak_rss_bytes": peak,
            "max_abs_delta_diff": agree, "threads": fast["threads"], "by_threads": by_threads,
            "load_at_start": load,
        }
        if args.scheduler:
            summary.update(cluster_side_by_side(path, T, N, args.rounds))
        print(json.dumps(summary))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cores() -> int:
    from corrtools.analysis.threads import available_cores

    return available_cores()


if __name__ == "__main__":
    main()
