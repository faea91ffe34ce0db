"""corrtools.analysis: ρ(τ), Δ, and Δ per bin of final |w| from a run store.

Kernels (pure, arrays in and out) are in ``correlation``; ``magnitude`` bins and takes medians;
``delta`` reads a store and returns xarray results; ``plot`` draws them.
"""
from __future__ import annotations

from corrtools.analysis.correlation import decorrelation_time, detrend, lagged_pearson
from corrtools.analysis.delta import (
    rho_by_magnitude,
    delta_by_magnitude,
    delta_per_weight,
    load_delta,
    save_delta,
    summarize_by_magnitude,
)
from corrtools.analysis.plot import format_table, plot_delta, plot_rho
from corrtools.analysis.threads import available_cores, resolve_threads

__all__ = [
    "available_cores",
    "decorrelation_time",
    "delta_by_magnitude",
    "delta_per_weight",
    "detrend",
    "format_table",
    "lagged_pearson",
    "load_delta",
    "plot_delta",
    "plot_rho",
    "resolve_threads",
    "rho_by_magnitude",
    "save_delta",
    "summarize_by_magnitude",
]
