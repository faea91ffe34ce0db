"""Figure 1's runs: record a dense run, then median Δ/T per bin of final |w|, per layer, several ways.

Each recorded run (workload, optimizer, seed) is analysed over the first half, the second half and the
whole of training, each raw and linearly detrended; one row per (window, detrend, layer, bin).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from corrtools.experiments.runs import RunSpec, build_workload

__all__ = ["ANALYSES", "record_and_analyse"]

# (label, window as fractions of the recorded steps, detrend)
ANALYSES: tuple[tuple[str, tuple[float, float], str], ...] = (
    ("whole", (0.0, 1.0), "none"),
    ("first half", (0.0, 0.5), "none"),
    ("second half", (0.5, 1.0), "none"),
    ("whole", (0.0, 1.0), "linear"),
    ("first half", (0.0, 0.5), "linear"),
    ("second half", (0.5, 1.0), "linear"),
)


def record_and_analyse(spec: RunSpec, sample: int = 1024, bins: int = 8,
                       analyses: tuple[tuple[str, tuple[float, float], str], ...] = ANALYSES,
                       n_boot: int = 200) -> list[dict[str, Any]]:
    """Train ``spec`` (dense) with a Recorder on ``sample`` weights per sparsifiable matrix; rows of Δ/T.

    One row per (analysis, layer, bin) of :func:`~corrtools.analysis.delta_by_magnitude` (quantile
    bins of final |w|; the bootstrap interval is not kept, seeds give the error bars).
    """
    from corrtools.analysis import delta_by_magnitude
    from corrtools.record.recorder import Recorder

    torch.set_num_threads(1)  # see runs.train
    wl = build_workload(spec)
    params = [n for n, p in wl.model.named_parameters() if p.dim() >= 2 and not n.startswith(("embed", "head"))]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "run.zarr"
        with Recorder(wl.model, store, sample=sample, params=params, seed=spec.seed).attach(wl.optimizer):
            for _ in range(spec.steps):
                wl.train_step()
        wall = time.perf_counter() - start
        rows: list[dict[str, Any]] = []
        for label, window, detrend in analyses:
            res = delta_by_magnitude(store, bins=bins, window=window, detrend=detrend, progress=False,
                                     n_boot=n_boot, seed=spec.seed)
            for param in res["param"].values.tolist():
                r = res.sel(param=param)
                for b in range(res.sizes["bin"]):
                    rows.append({
                        **spec.to_dict(),
                        "window": label,
                        "detrend": detrend,
                        "param": param,
                        "bin": b,
                        "magnitude": float(r["magnitude"][b]),
                        "median_over_T": float(r["median_over_T"][b]),
                        "censored_fraction": float(r["censored_fraction"][b]),
                        "T": int(res.attrs.get("T", 0)),
                        "wall_s": round(wall, 3),
                    })
    return rows
