"""``corrtools rho``: ρ(τ) curves per bin of |w| (median and quartiles over each bin's weights).

    corrtools rho run.zarr [-o rho.png] [--param NAME ...] [--bins 5] [--window 0.5:1] [--detrend linear]
"""
from __future__ import annotations

import argparse
import sys

from corrtools.commands.delta import add_analysis_arguments, check_analysis_arguments, print_unanalysed
from corrtools.errors import CorrtoolsError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "rho",
        help="lagged correlation ρ(τ) per bin of |w|",
        description="ρ(τ) between a weight's trajectory and itself τ steps later: the median and "
        "quartiles over the weights of each bin of |w| (final, or at the last recorded row), per parameter, on a log lag axis.",
    )
    add_analysis_arguments(p, bins=5)
    p.add_argument("-o", "--output", default="rho.png", help="figure file; .png, .svg or .pdf (default rho.png)")
    p.add_argument("--lags", type=int, default=48, help="number of log-spaced lags (default 48)")
    return p


def run(args: argparse.Namespace) -> int:
    from corrtools.analysis.delta import rho_by_magnitude
    from corrtools.analysis.magnitude_at import magnitude_labels, parse_magnitude_at
    from corrtools.analysis.plot import plot_rho

    window = check_analysis_arguments(args)  # every output is checked before the work, not after
    if args.lags < 1:
        raise CorrtoolsError(f"--lags {args.lags} must be a positive number of lags, e.g. --lags 48")
    res = rho_by_magnitude(
        args.store, params=args.param, bins=args.bins, binning=args.binning, window=window,
        max_lag=args.max_lag, n_lags=args.lags, detrend=args.detrend, progress=not args.no_progress,
        threads=args.threads, magnitude_at=parse_magnitude_at(args.magnitude_at),
    )
    plot_rho(res, args.output)
    print_unanalysed(res)
    print(f"# ρ(τ) median per bin of {magnitude_labels(res.attrs)[1]} (T={res.attrs['T']}); figure: {args.output}")
    lags = res["lag_steps"].values
    show = sorted({0, len(lags) // 4, len(lags) // 2, 3 * len(lags) // 4, len(lags) - 1})
    print("param\tbin\tn\t" + "\t".join(f"τ={int(lags[j])}" for j in show))
    for i, p in enumerate(res["param"].values):
        for b in res["bin"].values:
            r = res["rho_median"].values[i, b]
            cells = "\t".join(f"{r[j]:.3f}" for j in show)
            print(f"{p}\t{b}\t{int(res['n_weights'].values[i, b])}\t{cells}")
    sys.stdout.flush()
    return 0
