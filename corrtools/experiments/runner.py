"""Run one experiment: each configuration once, cached, then one tidy CSV and one plot beside it.

Each run's rows are saved as ``<out>/cache/<key>.json`` the moment the run ends; a later call with
the same configurations reads them instead of training again, so an interrupted experiment continues
where it stopped. ``<out>/<name>.csv`` holds one row per run (the full configuration, seed, steps,
wall time, final metrics) and ``<out>/<name>.png`` its figure; quick mode writes ``<name>.quick.csv``
and ``<name>.quick.png`` so that it never replaces real results.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from corrtools.errors import CorrtoolsError
from corrtools.experiments.paper import EXPERIMENTS, Scale, gap_fraction
from corrtools.experiments.runs import RunSpec, train

__all__ = ["ExperimentResult", "fig9_table", "load_results", "run_experiment", "summarize"]


@dataclass(frozen=True)
class ExperimentResult:
    name: str
    csv: Path
    plot: Path
    rows: pd.DataFrame  # one row per run (fig1: per run, analysis, layer and bin)
    summary: pd.DataFrame  # mean, std and count over seeds per configuration
    trained: int  # runs trained now (the rest came from the cache)
    missing: int = 0  # runs left out by cached_only (not finished yet)


def _cache_path(out: Path, spec: RunSpec, recorded: bool) -> Path:
    return out / "cache" / f"{'rec-' if recorded else ''}{spec.key()}.json"


def _run_cached(out: Path, spec: RunSpec, recorded: bool) -> tuple[list[dict[str, Any]], bool]:
    path = _cache_path(out, spec, recorded)
    if path.exists():
        return json.loads(path.read_text())["rows"], False
    if recorded:
        from corrtools.experiments.fig1 import ANALYSES, record_and_analyse

        if spec.size == "quick":  # two of the six analyses, few weights and bins: a smoke test
            rows = record_and_analyse(spec, sample=64, bins=4, analyses=ANALYSES[::5], n_boot=20)
        else:
            rows = record_and_analyse(spec)
    else:
        rows = [train(spec)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"spec": spec.to_dict(), "rows": rows}, indent=1))
    os.replace(tmp, path)  # atomic: a killed run leaves no half-written entry
    return rows, True


def run_experiment(name: str, *, quick: bool = False, seeds: int | None = None, scale: Scale = 1.0,
                   out: str | os.PathLike[str] = "data/results", workloads: Sequence[str] | None = None,
                   cached_only: bool = False, progress: bool = True) -> ExperimentResult:
    """Run (or read from the cache) every configuration of ``name``; write its CSV and plot.

    ``scale``: fraction of the full step budget, or a mapping workload -> fraction (a reduced run,
    stated in the ``mode`` column). ``workloads`` keeps only the runs of those workloads (default:
    all the experiment uses). ``cached_only`` trains nothing: the CSV and plot hold the runs finished
    so far (for a deadline); the rest are counted in ``missing``.
    """
    from tqdm.auto import tqdm

    from corrtools.experiments.plots import plot_experiment

    exp = EXPERIMENTS.get(name)
    if exp is None:
        raise CorrtoolsError(f"Unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}.")
    n_seeds = (1 if quick else 3) if seeds is None else seeds
    if n_seeds < 1:
        raise CorrtoolsError(f"--seeds {n_seeds} must be at least 1.")
    fractions = list(scale.values()) if isinstance(scale, Mapping) else [scale]
    if not quick and not all(0 < f <= 1 for f in fractions):
        raise CorrtoolsError(f"--scale {scale} must be a fraction of the full step budget in (0, 1].")
    out = Path(out)
    specs = exp.specs(quick, n_seeds, 1.0 if quick else scale)
    if workloads is not None:
        unknown = set(workloads) - {s.workload for s in specs}
        if unknown:
            raise CorrtoolsError(f"{name} has no runs on workload(s) {sorted(unknown)}; "
                                 f"it uses {sorted({s.workload for s in specs})}.")
        specs = [s for s in specs if s.workload in workloads]
    rows: list[dict[str, Any]] = []
    trained = missing = 0
    start = time.perf_counter()
    for spec in tqdm(specs, desc=f"{name}", unit="run", disable=not progress):
        if cached_only and not _cache_path(out, spec, exp.recorded).exists():
            missing += 1
            continue
        got, new = _run_cached(out, spec, exp.recorded)
        rows += got
        trained += new
    if not rows:
        raise CorrtoolsError(f"No finished runs of {name} in {out / 'cache'}; run it without --cached-only.")
    mode = "quick" if quick else _mode(scale)
    df = pd.DataFrame(rows)
    df.insert(0, "mode", mode)
    df.insert(0, "experiment", name)
    suffix = ".quick" if quick else ""
    csv = out / f"{name}{suffix}.csv"
    plot = out / f"{name}{suffix}.png"
    table = fig9_table(df) if name == "fig9" else df
    table.to_csv(csv, index=False)
    summary = summarize(table, name)
    plot_experiment(name, table, plot, title=f"{exp.title} [{mode}, {n_seeds} seed(s)]")
    if progress:
        print(f"{name}: {len(specs) - missing} runs ({trained} trained now, {missing} not run) in {time.perf_counter() - start:.0f} s; "
              f"wrote {csv} and {plot}")
    return ExperimentResult(name, csv, plot, table, summary, trained, missing)


def _mode(scale: Scale) -> str:
    if isinstance(scale, Mapping):
        parts = [f"{w} steps x {f:g}" for w, f in sorted(scale.items()) if f != 1.0]
        return f"reduced ({', '.join(parts)})" if parts else "full"
    return "full" if scale == 1.0 else f"reduced (steps x {scale:g})"


def load_results(name: str, out: str | os.PathLike[str] = "data/results", quick: bool = False) -> pd.DataFrame:
    """The rows of ``<out>/<name>.csv`` (``.quick.csv`` with ``quick``) as a DataFrame."""
    path = Path(out) / f"{name}{'.quick' if quick else ''}.csv"
    if not path.exists():
        raise CorrtoolsError(f"No results at {path}; run `corrtools experiment {name}` first.")
    return pd.read_csv(path, keep_default_na=True)


def summarize(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """Mean, standard deviation (ddof 1) and count over seeds, per configuration of ``name``."""
    exp = EXPERIMENTS[name]
    value = "median_over_T" if exp.recorded else ("f" if name == "fig9" else "error")
    group = [c for c in exp.group if c in df.columns]
    if name == "fig9":
        group = ["workload", "density"]
    keyed = df.assign(**{c: df[c].astype(str) for c in group if df[c].isna().any() or c == "z"})
    agg = keyed.groupby(group, sort=False, dropna=False)[value].agg(["mean", "std", "count"]).reset_index()
    return agg


def fig9_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per workload, density and seed: f = (err_SMALL − err_SPARSE) / (err_SMALL − err_DENSE)."""
    out = []
    for (w, seed), g in df.groupby(["workload", "seed"]):
        dense = g[g.method == "dense"].error
        if dense.empty:
            continue
        for d in sorted(g.density[g.method == "sparse"].unique(), reverse=True):
            small = g[(g.method == "small") & (g.density == d)].error
            sparse = g[(g.method == "sparse") & (g.density == d)].error
            if small.empty or sparse.empty:
                continue
            es, ep, ed = float(small.iloc[0]), float(sparse.iloc[0]), float(dense.iloc[0])
            out.append({"experiment": "fig9", "mode": g["mode"].iloc[0], "workload": w, "seed": seed,
                        "density": d, "steps": int(g.steps.iloc[0]), "err_dense": ed, "err_small": es,
                        "err_sparse": ep, "f": gap_fraction(es, ep, ed)})
    return pd.DataFrame(out)
