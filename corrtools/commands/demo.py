"""``corrtools demo``: record the built-in workload, then draw its Δ plot.

Trains the character-level transformer on stdlib source with a Recorder attached, writes the run to
``runs/demo.zarr``, and (once the analysis is available) draws median Δ/T against final |w|.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from corrtools.errors import CorrtoolsError

__all__ = ["add_parser", "run", "DEMO_CONFIG"]

# Chosen so the Δ plot is informative in about a minute on 2 CPU cores: AdamW with a cosine schedule,
# no weight decay, analysed over the whole run (see the README's "What the demo shows").
DEMO_STEPS = 1500
DEMO_SAMPLE = 2048
DEMO_BINS = 8


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="record the built-in training run and draw its Δ plot",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--out", type=Path, default=Path("runs/demo.zarr"),
                   help="run store to write (default: runs/demo.zarr); must not exist unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run store at --out (never anything that is not a run store)")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"optimizer steps (default {DEMO_STEPS})")
    p.add_argument("--sample", type=int, default=DEMO_SAMPLE,
                   help=f"weights recorded per weight matrix (default {DEMO_SAMPLE})")
    p.add_argument("--every", type=int, default=1, help="record every k-th optimizer step (default 1)")
    p.add_argument("--param", action="append", default=None, metavar="NAME",
                   help="record only this parameter (repeatable; default: every weight matrix)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, the data order and the sample")
    p.add_argument("--plot", type=Path, default=None,
                   help="where to draw the Δ plot (default: next to the store, <name>_delta.png)")
    p.add_argument("--density", type=float, default=0.5,
                   help="shade the weights removable at this density (default 0.5)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from corrtools.analysis import delta_by_magnitude
    from corrtools.analysis.plot import check_density, check_figure_path, format_table, plot_delta
    from corrtools.commands.outputs import check_output_file, make_folder
    from corrtools.record.store import check_new_store
    from corrtools.record.recorder import Recorder
    from corrtools.workloads import CharLMConfig, CharLMWorkload

    plot_path = args.plot or args.out.with_name(args.out.stem + "_delta.png")
    if args.out.exists() and not args.overwrite:  # fail on bad paths or density before training, not after
        raise CorrtoolsError(f"{str(args.out)!r} already exists; pass --overwrite to replace it or choose "
                             "another path with -o")
    check_new_store(args.out, overwrite=args.overwrite)
    check_density(args.density)
    for folder in (args.out.parent, plot_path.parent):
        make_folder(folder)
    check_output_file(plot_path, "--plot")
    check_figure_path(plot_path)
    cfg = CharLMConfig(steps=args.steps, seed=args.seed)
    wl = CharLMWorkload(cfg)
    start = time.perf_counter()
    with Recorder(wl.model, args.out, sample=args.sample, every=args.every, params=args.param,
                  seed=args.seed, overwrite=args.overwrite).attach(wl.optimizer) as rec:
        bar = tqdm(range(cfg.steps), desc="training", unit="step", disable=args.no_progress)
        for _ in bar:
            loss = wl.train_step()
            rec.log(loss=loss)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    elapsed = time.perf_counter() - start
    print(f"wrote {args.out}: {cfg.steps} steps x {rec.n_weights} weights "
          f"in {elapsed:.1f} s (final train loss {loss:.3f}, held-out {wl.evaluate():.3f} nats)")

    # Δ over the whole run, no detrending: the setting in which this workload shows the trend
    res = delta_by_magnitude(args.out, bins=DEMO_BINS, progress=not args.no_progress)
    print(format_table(res))
    plot_delta(res, plot_path, density=args.density,
               title=f"corrtools demo: char-LM, {cfg.steps} AdamW steps, Δ over the whole run")
    print(f"drew {plot_path}")
    return 0
