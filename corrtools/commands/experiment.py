"""``corrtools experiment NAME``: run one of the paper's experiments at CPU scale.

Writes one tidy row per run to ``<out>/NAME.csv`` and the figure to ``<out>/NAME.png`` (quick mode:
``NAME.quick.csv`` / ``.png``). Each finished run is cached under ``<out>/cache/``, so an interrupted
experiment continues where it stopped. ``--quick`` runs tiny models for 20 steps (a smoke test in
seconds, not a result).
"""
from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from corrtools.experiments.paper import EXPERIMENTS

    names = ", ".join(f"{e.name} (~{e.minutes_full:g} min)" for e in EXPERIMENTS.values())
    p = sub.add_parser("experiment", help="run one of the paper's experiments (CSV and plot)",
                       description=__doc__ + f"\nExperiments and their full-mode time on 2 cores: {names}.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(EXPERIMENTS), metavar="NAME", help="fig1, fig2, fig3, fig4, table2, table3 or fig9")
    p.add_argument("--quick", action="store_true", help="tiny models, 20 steps: a smoke test in seconds")
    p.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 3; quick: 1)")
    p.add_argument("--scale", action="append", default=None, metavar="F or WORKLOAD=F",
                   help="fraction of the full step budget, for a stated reduced run (default 1); "
                        "WORKLOAD=F scales one workload (repeatable)")
    p.add_argument("--cached-only", action="store_true",
                   help="train nothing: write the CSV and plot from the runs finished so far")
    p.add_argument("--workload", action="append", default=None, choices=["charlm", "digits"],
                   help="only the runs of this workload (repeatable; default: all the experiment uses)")
    p.add_argument("--out", type=Path, default=Path("data/results"), help="results folder (default data/results)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from corrtools.experiments.runner import run_experiment

    res = run_experiment(args.name, quick=args.quick, seeds=args.seeds, scale=_scale(args.scale), out=args.out,
                         workloads=args.workload, cached_only=args.cached_only, progress=not args.no_progress)
    with __import__("pandas").option_context("display.width", 160, "display.max_rows", 200):
        print(res.summary.to_string(index=False))
    return 0


def _scale(values: list[str] | None) -> float | dict[str, float]:
    """``--scale`` values: one fraction, or WORKLOAD=F pairs."""
    from corrtools.errors import CorrtoolsError

    if not values:
        return 1.0
    try:
        if len(values) == 1 and "=" not in values[0]:
            return float(values[0])
        pairs = [v.split("=", 1) for v in values]
        if any(len(p) != 2 for p in pairs):
            raise ValueError
        return {w.strip(): float(f) for w, f in pairs}
    except ValueError:
        raise CorrtoolsError(f"--scale {' '.join(values)}: give one fraction (0.5) or WORKLOAD=F pairs "
                             "(charlm=0.25).") from None
