"""``corrtools delta``: the paper's Figure 1 from a run store, and the table it plots.

    corrtools delta run.zarr [-o delta.png] [--param NAME ...] [--bins 10] [--density 0.5]
                             [--window 0.5:1] [--detrend linear] [--magnitude-at final|last|STEP]
                             [--threads N] [--scheduler tcp://HOST:8786] [--follow SECONDS]
                             [--csv out.csv | --json]
    corrtools delta run.zarr --suggest-z --density 0.25 [--csv z.csv | --json]

On a run that is still recording (or was interrupted) the bins are of |w| at the last recorded row,
and the header and the figure say so. ``--follow SECONDS`` redraws the figure and reprints the table
every SECONDS while the run grows, until it completes or Ctrl-C.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import sys
from collections.abc import Callable
import time
from pathlib import Path

from corrtools.errors import CorrtoolsError

__all__ = ["add_parser", "run", "parse_window", "add_analysis_arguments", "check_analysis_arguments",
           "print_unanalysed"]


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
    p.add_argument("--bins", type=int, default=bins, help=f"bins of |w| (default {bins})")
    p.add_argument("--binning", choices=("quantile", "log", "linear"), default="quantile",
                   help="equal counts, equal ratios or equal widths (default quantile)")
    p.add_argument("--window", default="0:1", metavar="START:END",
                   help="fraction of the recorded steps to analyse, e.g. 0.5:1 (default 0:1)")
    p.add_argument("--detrend", choices=("none", "linear", "diff"), default="none",
                   help="remove a linear trend or analyse increments first (default none)")
    p.add_argument("--max-lag", type=int, default=None, metavar="ROWS",
                   help="largest lag searched, in recorded steps (default half the window)")
    p.add_argument("--magnitude-at", default="auto", metavar="final|last|STEP",
                   help="bin by final |w|, by |w| at the last recorded row, or at this optimizer step "
                        "(default: final when the run has final values, else last)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads for the analysis (default: every core this process may use)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "delta",
        help="decorrelation time Δ per bin of |w| (Figure 1)",
        description="Median decorrelation time Δ/T per bin of final |w| (or, on a run still recording, "
        "|w| at the last recorded row), per parameter, with bootstrap intervals: draws the paper's "
        "Figure 1 and prints the table it plots.",
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
    p.add_argument("--suggest-z", action="store_true",
                   help="instead of the figure, print the RESET interval z the run implies at --density: the "
                   "median Δ (optimizer steps) of the weights below each layer's (1-d) quantile of final |w|")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", metavar="PATH", help="also write the table as CSV")
    out.add_argument("--json", action="store_true", help="print the table as JSON instead of text")
    p.add_argument("--follow", type=float, default=None, metavar="SECONDS",
                   help="redraw and reprint every SECONDS while the run is recorded, until it completes "
                        "or Ctrl-C (reads only new rows; never locks the store)")
    return p


def run(args: argparse.Namespace) -> int:
    from corrtools.analysis.magnitude_at import parse_magnitude_at
    from corrtools.analysis.plot import check_density
    from corrtools.commands.outputs import check_output_file, check_writable_folder

    if args.suggest_z:
        return _suggest_z(args, parse_window(args.window))
    window = check_analysis_arguments(args)  # every output is checked before the work, not after
    magnitude_at = parse_magnitude_at(args.magnitude_at)
    check_density(args.density)
    if not 0.0 < args.ci < 1.0:
        raise CorrtoolsError(f"--ci {args.ci} must lie in (0, 1), e.g. 0.95")
    if args.csv:
        check_output_file(args.csv, "--csv")
    if args.save and Path(args.store).is_dir():
        check_writable_folder(args.store, f"--save into {args.store!r}")
    if args.follow is not None:
        return _follow(args, window, magnitude_at)
    _analyse_and_report(args, args.store, window, magnitude_at, progress=not args.no_progress)
    return 0


def _analyse_and_report(args: argparse.Namespace, source, window, magnitude_at, progress: bool) -> None:
    """One analysis of ``source`` (a path or a Dataset): figure, --save, table or JSON, --csv."""
    from corrtools.analysis.delta import delta_by_magnitude, save_delta
    from corrtools.analysis.plot import format_table, plot_delta, table_rows

    res = delta_by_magnitude(
        source, params=args.param, bins=args.bins, binning=args.binning, window=window,
        max_lag=args.max_lag, detrend=args.detrend, ci=args.ci, progress=progress,
        threads=args.threads, magnitude_at=magnitude_at, scheduler=args.scheduler,
    )
    plot_delta(res, args.output, density=args.density)
    print_unanalysed(res)
    if args.save:
        save_delta(args.store, res)
    _emit(args, res.attrs, table_rows(res), lambda: format_table(res))
    if not args.json:
        print(f"# figure: {args.output}", file=sys.stderr)
    sys.stdout.flush()


def print_unanalysed(res) -> None:
    """A note on stderr for each parameter left out because none of its binned |w| is finite."""
    at = res.attrs.get("magnitude_at", "final")
    what = "final values" if at == "final" else f"|w| at step {res.attrs.get('magnitude_step')}"
    for name in res.attrs.get("unanalysed", []):
        print(f"# note: {name} has no finite {what} (NaN weights); its bins are empty", file=sys.stderr)


def _follow(args: argparse.Namespace, window, magnitude_at) -> int:
    """Re-analyse every ``args.follow`` seconds while the store grows; stop when it is complete or on
    Ctrl-C. Rows too few for the window so far are waited for, not an error."""
    from corrtools.analysis.follow import LiveRun

    if not args.follow > 0:
        raise CorrtoolsError(f"--follow {args.follow:g} must be a positive number of seconds, e.g. --follow 30")
    live = LiveRun(args.store, params=args.param)
    seen = None
    try:
        while True:
            ds = live.refresh()
            status = ds.attrs.get("status")
            n = ds.sizes["step"]
            if (n, status) != seen:
                seen = (n, status)
                now = _dt.datetime.now().strftime("%H:%M:%S")
                last = int(ds["step"].values[-1]) if n else None
                print(f"# {now}  {n} rows recorded (last step {last}), status {status}", file=sys.stderr)
                try:
                    _analyse_and_report(args, ds, window, magnitude_at, progress=False)
                except CorrtoolsError as err:
                    if status == "complete":
                        raise
                    print(f"# waiting for more rows: {err}", file=sys.stderr)
            if status == "complete":
                return 0
            time.sleep(args.follow)
    except KeyboardInterrupt:
        print("# stopped following", file=sys.stderr)
        return 0


def _emit(args: argparse.Namespace, attrs: dict, rows: list[dict], text: Callable[[], str]) -> None:
    """Print the rows as JSON (``--json``) or as ``text()``, and write them to ``--csv``."""
    if args.json:
        json.dump({"attrs": _plain(attrs), "rows": rows}, sys.stdout, indent=1)
        print()
    else:
        print(text())
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def _suggest_z(args: argparse.Namespace, window: tuple[float, float]) -> int:
    from corrtools.analysis.suggest import suggest_z, z_rows

    if not 0.0 < args.density < 1.0:
        raise CorrtoolsError(f"--density {args.density} must lie in (0, 1) with --suggest-z, e.g. 0.25")
    if args.csv:
        from corrtools.commands.outputs import check_output_file

        check_output_file(args.csv, "--csv")
    res = suggest_z(args.store, args.density, params=args.param, window=window, max_lag=args.max_lag,
                    detrend=args.detrend, progress=not args.no_progress, threads=args.threads)
    rows = z_rows(res)
    _emit(args, res.attrs, rows, lambda: _format_z(res, rows))
    return 0


def _format_z(res: object, rows: list[dict]) -> str:
    a = res.attrs  # type: ignore[attr-defined]
    head = (f"# suggested RESET interval z at density {a['density']:g}: median Δ (optimizer steps) of the "
            f"weights below each layer's {1 - a['density']:.0%} quantile of final |w|; T={a['T']} recorded "
            f"steps (every {a['every']}), max_lag={a['max_lag_steps']} steps, detrend={a['detrend']}; "
            "≥: a lower bound (at least half censored)")
    table = [["param", "weights", "censored", "z"]]
    for r in rows:
        z = "nan" if r["z"] is None else ("≥" if r["lower_bound"] else "") + f"{r['z']:.0f}"
        cens = "nan" if r["censored_fraction"] is None else f"{r['censored_fraction']:.0%}"
        table.append([r["param"], str(r["n_weights"]), cens, z])
    widths = [max(len(row[j]) for row in table) for j in range(4)]
    lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
             for row in table]
    return "\n".join([head, *lines])


def _plain(attrs: dict) -> dict:
    out = {}
    for k, v in attrs.items():
        out[k] = v.tolist() if hasattr(v, "tolist") else v
    return out
