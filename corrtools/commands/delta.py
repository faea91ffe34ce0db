"""``corrtools delta``: the paper's Figure 1 from a run store, and the table it plots.

    corrtools delta run.zarr [-o delta.png] [--param NAME ...] [--bins 10] [--density 0.5]
                             [--window 0.5:1] [--detrend linear] [--threads N] [--csv out.csv | --json]
                             [--scheduler tcp://HOST:8786]
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from corrtools.errors import CorrtoolsError

__all__ = ["add_parser", "run", "parse_window", "add_analysis_arguments", "check_analysis_arguments"]


def parse_window(text: str) -> tuple[float, float]:
    """``"0.5:1"`` → (0.5, 1.0): a fraction of the recorded steps; either side may be empty."""
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        a = float(parts[0]) if parts[0].strip() else 0.0
        b = float(parts[1]) if parts[1].strip() else 1.0
    except ValueError:
        raise CorrtoolsError(
            f"--window {text!r} is not START:END fractions of the run; write e.g. --window 0.5:1"
        ) from None
    return a, b


def check_analysis_arguments(args: argparse.Namespace) -> tuple[float, float]:
    """Checks shared by ``delta`` and ``rho``, before any work: the window (returned), --bins,
    --max-lag and the figure file -o."""
    from corrtools.analysis.plot import check_figure_path
    from corrtools.commands.outputs import check_output_file

    window = parse_window(args.window)
    if args.bins < 1:
        raise CorrtoolsError(f"--bins {args.bins} must be a positive number of bins, e.g. --bins 10")
    if args.max_lag is not None and args.max_lag < 1:
        raise CorrtoolsError(f"--max-lag {args.max_lag} must be a positive number of recorded steps")
    check_output_file(args.output, "-o")
    check_figure_path(args.output)
    return window


def add_analysis_arguments(p: argparse.ArgumentParser, bins: int) -> None:
    """Options shared by ``delta`` and ``rho``."""
    p.add_argument("store", help="run store written by corrtools.Recorder (a .zarr folder)")
    p.add_argument("--param", action="append", metavar="NAME",
                   help="parameter to analyse, e.g. blocks.0.mlp.fc1.weight (repeatable; default: all)")
    p.add_argument("--bins", type=int, default=bins, help=f"bins of final |w| (default {bins})")
    p.add_argument("--binning", choices=("quantile", "log", "linear"), default="quantile",
                   help="equal counts, equal ratios or equal widths (default quantile)")
    p.add_argument("--window", default="0:1", metavar="START:END",
                   help="fraction of the recorded steps to analyse, e.g. 0.5:1 (default 0:1)")
    p.add_argument("--detrend", choices=("none", "linear", "diff"), default="none",
                   help="remove a linear trend or analyse increments first (default none)")
    p.add_argument("--max-lag", type=int, default=None, metavar="ROWS",
                   help="largest lag searched, in recorded steps (default half the window)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads for the analysis (default: every core this process may use)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "delta",
        help="decorrelation time Δ per bin of final |w| (Figure 1)",
        description="Median decorrelation time Δ/T per bin of final |w|, per parameter, with bootstrap "
        "intervals: draws the paper's Figure 1 and prints the table it plots.",
    )
    add_analysis_arguments(p, bins=10)
    p.add_argument("-o", "--output", default="delta.png",
                   help="figure file; .png, .svg or .pdf (default delta.png)")
    p.add_argument("--density", type=float, default=0.5,
                   help="shade the weights removable at this density d (default 0.5)")
    p.add_argument("--ci", type=float, default=0.95, help="bootstrap interval level (default 0.95)")
    p.add_argument("--save", action="store_true", help="also write the results into the store as group 'delta'")
    p.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="run on a dask.distributed cluster, e.g. tcp://10.0.0.5:8786 (its workers must "
                        "reach the store's path or URL)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", metavar="PATH", help="also write the table as CSV")
    out.add_argument("--json", action="store_true", help="print the table as JSON instead of text")
    return p


def run(args: argparse.Namespace) -> int:
    from corrtools.analysis.delta import delta_by_magnitude, save_delta
    from corrtools.analysis.plot import check_density, format_table, plot_delta, table_rows
    from corrtools.commands.outputs import check_output_file, check_writable_folder

    window = check_analysis_arguments(args)  # every output is checked before the work, not after
    check_density(args.density)
    if not 0.0 < args.ci < 1.0:
        raise CorrtoolsError(f"--ci {args.ci} must lie in (0, 1), e.g. 0.95")
    if args.csv:
        check_output_file(args.csv, "--csv")
    if args.save and Path(args.store).is_dir():
        check_writable_folder(args.store, f"--save into {args.store!r}")
    res = delta_by_magnitude(
        args.store, params=args.param, bins=args.bins, binning=args.binning, window=window,
        max_lag=args.max_lag, detrend=args.detrend, ci=args.ci, progress=not args.no_progress,
        threads=args.threads,
        scheduler=args.scheduler,
    )
    plot_delta(res, args.output, density=args.density)
    for name in res.attrs.get("unanalysed", []):
        print(f"# note: {name} has no finite final values (NaN weights); its bins are empty", file=sys.stderr)
    if args.save:
        save_delta(args.store, res)
    rows = table_rows(res)
    if args.json:
        json.dump({"attrs": _plain(res.attrs), "rows": rows}, sys.stdout, indent=1)
        print()
    else:
        print(format_table(res))
        print(f"# figure: {args.output}", file=sys.stderr)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


def _plain(attrs: dict) -> dict:
    out = {}
    for k, v in attrs.items():
        out[k] = v.tolist() if hasattr(v, "tolist") else v
    return out
