"""Do the run sampling layouts change Δ per magnitude bin? Every layout on one demo run.

Trains the demo workload (`corrtools demo`'s CharLM, AdamW, cosine schedule, seed 0) once, with one
Recorder per layout attached to the same optimizer: ``layout="uniform"`` (single weights), ``"runs"``
(aligned runs of 16 consecutive weights drawn at random) and ``"strided"`` (the same runs at a fixed
stride from a random start), the same ``sample`` per weight matrix. Then analyses every store as the
demo does (whole run, no detrending, 8 quantile bins of final |w| per layer, 95% bootstrap
intervals) and compares each run layout's median Δ/T with the uniform one's, bin by bin:

    inside   the layout's median lies inside the uniform sample's bootstrap interval
    overlap  the two bootstrap intervals overlap

It also prints the intra-run correlation of Δ/T (the share of Δ's variance that lies between runs of
16; 0 means the 16 weights of a run are as different as 16 random weights): the per-weight bootstrap
treats weights as independent, so with runs its intervals are too narrow by about
sqrt(1 + 15 * icc).

    python benchmarks/sampling_layout.py              # the demo's 1500 steps, ~1-2 minutes on 2 cores
    python benchmarks/sampling_layout.py --threads 1  # on a loaded machine
    python benchmarks/sampling_layout.py --quick      # a tiny version in seconds (used by the tests)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from corrtools import Recorder
from corrtools.analysis import delta_by_magnitude, delta_per_weight
from corrtools.commands.demo import DEMO_BINS, DEMO_SAMPLE, DEMO_STEPS
from corrtools.record.sampling import RUN
from corrtools.workloads import CharLMConfig, CharLMWorkload


def intra_run_correlation(per_weight) -> float:
    """One-way ANOVA intraclass correlation of Δ/T within runs of `RUN` (whole runs only, pooled
    over parameters): (MSB - MSW) / (MSB + (RUN - 1) MSW)."""
    groups = []
    for name in np.unique(per_weight["param"].values):
        sel = per_weight["param"].values == name
        d = per_weight["delta_over_T"].values[sel]
        run = per_weight["index"].values[sel] // RUN
        for r in np.unique(run):
            g = d[run == r]
            if len(g) == RUN and np.isfinite(g).all():
                groups.append(g)
    x = np.array(groups)  # (runs, RUN)
    grand = x.mean()
    msb = RUN * ((x.mean(axis=1) - grand) ** 2).sum() / (len(x) - 1)
    msw = ((x - x.mean(axis=1, keepdims=True)) ** 2).sum() / (len(x) * (RUN - 1))
    return float((msb - msw) / (msb + (RUN - 1) * msw))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and run: seconds, for tests")
    ap.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {DEMO_STEPS}, the demo's)")
    ap.add_argument("--sample", type=int, default=None, help=f"weights per matrix (default {DEMO_SAMPLE})")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0, help="the Recorders' sampling seed (training is seed 0 always)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        cfg = CharLMConfig(d_model=32, n_layer=1, n_head=2, seq_len=16, batch_size=4, steps=args.steps or 60,
                           text_bytes=50_000)
        sample = args.sample or 256
    else:
        cfg = CharLMConfig(steps=args.steps or DEMO_STEPS, seed=0)
        sample = args.sample or DEMO_SAMPLE
    wl = CharLMWorkload(cfg)
    tmp = tempfile.TemporaryDirectory(prefix="corrtools-layout-")
    paths = {layout: Path(tmp.name) / f"{layout}.zarr" for layout in ("uniform", "runs", "strided")}
    recs = [Recorder(wl.model, p, sample=sample, seed=args.seed, layout=layout).attach(wl.optimizer)
            for layout, p in paths.items()]
    for _ in range(cfg.steps):
        loss = wl.train_step()
        for rec in recs:
            rec.log(loss=loss)
    for rec in recs:
        rec.close()
    res = {layout: delta_by_magnitude(p, bins=DEMO_BINS, progress=False) for layout, p in paths.items()}
    icc = {layout: intra_run_correlation(delta_per_weight(paths[layout], progress=False)) for layout in ("runs", "strided")}
    tmp.cleanup()

    u = res["uniform"]
    print(f"sampling layouts on one demo run: CharLM d_model={cfg.d_model} n_layer={cfg.n_layer}, {cfg.steps} "
          f"AdamW steps, sample={sample} per matrix (seed {args.seed}), {DEMO_BINS} quantile bins, 95% bootstrap intervals")
    print(f"{'param':<28}{'bin':>4}{'uniform Δ/T [interval]':>28}" + "".join(
        f"{f'{lay} Δ/T [interval]':>28}  inside overlap" for lay in ("runs", "strided")))
    counts = {lay: [0, 0, 0] for lay in ("runs", "strided")}  # inside, overlap, total
    diffs: dict[str, list[float]] = {lay: [] for lay in counts}
    for p in u["param"].values:
        for b in range(DEMO_BINS):
            a = u.sel(param=p).isel(bin=b)
            ua, ul, uh = (float(a[k]) for k in ("median_over_T", "ci_low_over_T", "ci_high_over_T"))
            line = f"{str(p):<28}{b:>4}{ua:>10.3f} [{ul:.3f}, {uh:.3f}]"
            for lay, n in counts.items():
                c = res[lay].sel(param=p).isel(bin=b)
                ra, rl, rh = (float(c[k]) for k in ("median_over_T", "ci_low_over_T", "ci_high_over_T"))
                i, o = ul <= ra <= uh, max(ul, rl) <= min(uh, rh)
                n[0], n[1], n[2] = n[0] + i, n[1] + o, n[2] + 1
                diffs[lay].append(ra - ua)
                line += f"{ra:>10.3f} [{rl:.3f}, {rh:.3f}]  {'yes' if i else 'NO':>6} {'yes' if o else 'NO':>7}"
            print(line)
    for lay, (inside, overlap, total) in counts.items():
        d = np.abs(np.array(diffs[lay]))
        print(f"{lay} median inside the uniform interval: {inside}/{total} bins; intervals overlap: {overlap}/{total}")
        print(f"|{lay} - uniform| median Δ/T: mean {d.mean():.3f}, max {d.max():.3f}")
        print(f"intra-run correlation of Δ/T ({lay}, runs of {RUN}): {icc[lay]:.3f} -> per-weight bootstrap "
              f"intervals too narrow by ~{np.sqrt(1 + (RUN - 1) * max(icc[lay], 0.0)):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
