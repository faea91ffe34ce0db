"""corrtools.analysis: ρ(τ), Δ, and Δ per bin of |w| from a run store.

Kernels (pure, arrays in and out) are in ``correlation``; ``magnitude`` bins and takes medians;
``magnitude_at`` picks the |w| binned by (final, or a recorded row for runs still recording);
``delta`` reads a store and returns xarray results; ``plot`` draws them; ``follow`` re-reads a
store as it grows; ``threads`` decides how many threads all of them use; ``suggest`` turns Δ into
RESET's interval z (``suggest_z``).
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
from corrtools.analysis.follow import LiveRun
from corrtools.analysis.magnitude_at import MagnitudeSource, magnitudes_at
from corrtools.analysis.plot import format_table, plot_delta, plot_rho
from corrtools.analysis.suggest import suggest_z
from corrtools.analysis.threads import available_cores, resolve_threads

__all__ = [
    "LiveRun",
    "MagnitudeSource",
    "available_cores",
    "decorrelation_time",
    "delta_by_magnitude",
    "delta_per_weight",
    "detrend",
    "format_table",
    "lagged_pearson",
    "load_delta",
    "magnitudes_at",
    "plot_delta",
    "plot_rho",
    "resolve_threads",
    "rho_by_magnitude",
    "save_delta",
    "suggest_z",
    "summarize_by_magnitude",
]
