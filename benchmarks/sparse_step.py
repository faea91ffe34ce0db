"""Training-step cost of Algorithm 1 on the built-in workload, side by side with dense training.

One process, four runs of the character LM (same config and seed), stepped in alternating blocks so
that machine load falls on all of them alike:

    dense                    plain AdamW training
    unstructured d=0.25 r=1  Sparsifier(density=0.25), masks recomputed every step (one global threshold)
    unstructured uniform     the same with allocation="uniform" (each layer keeps d of its weights)
    2:4-2d r=1               Sparsifier(structure="2:4-2d"), masks recomputed every step

Prints the median step time of each (ms), its ratio to dense (goal <= 1.15x), the share spent in
``Sparsifier.step()``, and the throughput of ``nm_mask_2d`` on a 4096x4096 float32 weight
(weights/s; goal >= 1e8). ``--quick`` runs a tiny version in seconds.

    python benchmarks/sparse_step.py [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from corrtools.sparse import Sparsifier
from corrtools.sparse.masks import nm_mask_2d
from corrtools.workloads import CharLMConfig, CharLMWorkload

VARIANTS: list[tuple[str, dict | None]] = [
    ("dense", None),
    ("unstructured d=0.25 r=1", dict(density=0.25, structure="unstructured", rewire_every=1)),  # global τ
    ("unstructured uniform", dict(density=0.25, structure="unstructured", rewire_every=1, allocation="uniform")),
    ("2:4-2d r=1", dict(structure="2:4-2d", rewire_every=1)),
]


def _timed(fn: Callable[[], None], clock: list[float]) -> Callable[[], None]:
    def wrapped() -> None:
        t0 = time.perf_counter()
        fn()
        clock[0] += time.perf_counter() - t0

    return wrapped


def step_times(cfg: CharLMConfig, rounds: int, block: int, warmup: int) -> list[tuple[str, float, float]]:
    """(name, median ms per step, median ms per step inside Sparsifier.step) for each variant."""
    runs = []
    for name, kwargs in VARIANTS:
        wl = CharLMWorkload(cfg)
        sp = Sparsifier(wl.model, wl.optimizer, total_steps=cfg.steps, **kwargs) if kwargs else None
        clock = [0.0]
        after = _timed(sp.step, clock) if sp is not None else None
        for _ in range(warmup):
            wl.train_step(after_step=after)
        runs.append((name, wl, after, clock, [], []))
    for _ in range(rounds):
        for name, wl, after, clock, totals, inside in runs:
            clock[0] = 0.0
            t0 = time.perf_counter()
            for _ in range(block):
                wl.train_step(after_step=after)
            totals.append((time.perf_counter() - t0) / block * 1e3)
            inside.append(clock[0] / block * 1e3)
    return [(name, statistics.median(t), statistics.median(i)) for name, _, _, _, t, i in runs]


def mask_throughput(side: int, repeats: int) -> tuple[float, float]:
    """(best seconds, weights per second) of nm_mask_2d on a (side, side) float32 weight."""
    w = torch.randn(side, side, generator=torch.Generator().manual_seed(0))
    nm_mask_2d(w)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        nm_mask_2d(w)
        best = min(best, time.perf_counter() - t0)
    return best, side * side / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and matrix, runs in seconds")
    args = parser.parse_args(argv)
    if args.quick:
        cfg = CharLMConfig(d_model=32, n_layer=1, n_head=2, seq_len=16, batch_size=4, steps=100, text_bytes=50_000)
        rounds, block, warmup, side, repeats = 2, 3, 2, 512, 2
    else:
        cfg = CharLMConfig()
        rounds, block, warmup, side, repeats = 10, 20, 20, 4096, 5
    print(f"workload: CharLM d_model={cfg.d_model} n_layer={cfg.n_layer} seq_len={cfg.seq_len} "
          f"batch_size={cfg.batch_size}; torch threads={torch.get_num_threads()}; "
          f"{rounds} rounds x {block} steps each")
    results = step_times(cfg, rounds, block, warmup)
    dense = results[0][1]
    for name, ms, inside in results:
        print(f"{name:<24} {ms:8.2f} ms/step  {ms / dense:5.2f}x dense  (Sparsifier.step {inside:6.2f} ms)")
    seconds, rate = mask_throughput(side, repeats)
    print(f"nm_mask_2d {side}x{side} float32: {seconds * 1e3:.1f} ms, {rate:.3g} weights/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
