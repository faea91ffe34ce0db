"""The paper's experiments at CPU scale: which runs each one makes, its summary table and its plot.

Every experiment is a list of :class:`~corrtools.experiments.runs.RunSpec` (one per configuration and
seed), a summary over seeds (mean, standard deviation, count) and a figure. Step budgets: ``full``
uses :data:`FULL_STEPS` (scaled by ``scale`` for a stated reduced run), ``quick`` 20 steps on tiny
models (a smoke test, not a result).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from corrtools.experiments.runs import RunSpec

__all__ = ["DENSITIES", "EXPERIMENTS", "Experiment", "FULL_STEPS", "QUICK_STEPS", "Scale", "gap_fraction",
           "steps_for"]

DENSITIES = (0.5, 0.25, 0.1)
QUICK_DENSITIES = (0.5, 0.1)  # quick mode: fewer configurations, the same code paths
FULL_STEPS = {"charlm": 1500, "digits": 2000}  # sized so that the full set fits ~2 h of 2 cores
QUICK_STEPS = 20
BLOCKS = (1, 2, 4, 8, 16, 32)


Scale = Union[float, Mapping[str, float]]  # one fraction of the full budget, or one per workload


def steps_for(workload: str, quick: bool, scale: Scale = 1.0) -> int:
    """The step budget of ``workload``: 20 in quick mode, else ``FULL_STEPS * scale`` (at least 20).

    ``scale`` is a fraction of the full budget, or a mapping workload -> fraction (missing: 1).
    """
    f = scale.get(workload, 1.0) if isinstance(scale, Mapping) else scale
    return QUICK_STEPS if quick else max(QUICK_STEPS, int(round(FULL_STEPS[workload] * f)))


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    claim: str  # what the paper claims, in one sentence
    specs: Callable[[bool, int, Scale], list[RunSpec]]  # (quick, seeds, scale) -> runs
    group: tuple[str, ...]  # columns that identify a configuration (seeds are averaged over)
    minutes_full: float  # estimated time of the full mode on the 2-core machine, minutes
    recorded: bool = False  # fig1: runs are recorded and analysed, many rows per run


def _base(workload: str, quick: bool, scale: Scale, seed: int, **kw: Any) -> RunSpec:
    return RunSpec(workload=workload, steps=steps_for(workload, quick, scale), seed=seed,
                   size="quick" if quick else "full", **kw)


def _densities(quick: bool) -> tuple[float, ...]:
    return QUICK_DENSITIES if quick else DENSITIES


def _sparse(workload: str, quick: bool, scale: Scale, seed: int, **kw: Any) -> RunSpec:
    """SPARSE: Algorithm 1 with RESET (r = 1, s = 1), z chosen from Δ during the run unless given."""
    z = kw.pop("z", "auto")
    return _base(workload, quick, scale, seed, method="sparse", z=z, **kw)


def _fig1(quick: bool, seeds: int, scale: Scale) -> list[RunSpec]:
    return [_base(w, quick, scale, s, method="dense", optimizer=o)
            for w in ("charlm", "digits") for o in ("adamw", "sgd") for s in range(seeds)]


def _fig2(quick: bool, seeds: int, scale: Scale) -> list[RunSpec]:
    w = "digits"
    T = steps_for(w, quick, scale)
    zs: list[int | str | None] = ["auto", 1, 10, 100, 1000, None] if not quick else ["auto", 1, 5, None]
    out: list[RunSpec] = []
    for s in range(seeds):
        for d in _densities(quick):
            out += [_sparse(w, quick, scale, s, density=d, rewire_every=r) for r in ((1, 10) if quick else (1, 10, 100))]
            out += [_sparse(w, quick, scale, s, density=d, grad_scale=g) for g in ((0.0, 1.0) if quick else (0.0, 0.1, 0.5, 1.0))]
            out += [_sparse(w, quick, scale, s, density=d, z=z) for z in zs if not isinstance(z, int) or z <= T]
    return list(dict.fromkeys(out))  # the default (r = 1, s = 1, z) appears in each sweep once


def _fig3(quick: bool, seeds: int, scale: Scale) -> list[RunSpec]:
    w = "digits"
    out = [_base(w, quick, scale, s, method="dense") for s in range(seeds)]
    for s in range(seeds):
        for d in _densities(quick):
            out += [_base(w, quick, scale, s, method=m, density=d)
                    for m in ("small", "no_exploit", "fix", "regularize")]
            out.append(_sparse(w, quick, scale, s, density=d))
    return out


def _fig4(quick: bool, seeds: int, scale: Scale) -> list[RunSpec]:
    out: list[RunSpec] = []
    for w in ("digits", "charlm"):
        for s in range(seeds):
            out.append(_base(w, quick, scale, s, method="dense"))
            for d in _densities(quick):
                out += [_base(w, quick, scale, s, method=m, density=d)
                        for m in ("small", "set", "rigl", "lottery")]
                out.append(_sparse(w, quick, scale, s, density=d))
    return out


def _table2(quick: bool, seeds: int, scale: Scale) -> list[RunSpec]:
    out: list[RunSpec] = []
    for w in ("digits", "charlm"):
        for s in range(seeds):
            out.append(_base(w, quick, scale, s, method="dense"))
            out += [_sparse(w, quick, scale, s, density=0.5, structure=st) for st in ("2:4", "2:4-2d")]
            out.append(_base(w, quick, scale, s, method="sr_ste", density=0.5, structure="2:4"))
    return out


def _table3(quick: bool, seeds: int, scale: Scale) -> list[RunSpec]:
    w = "charlm"  # every sparsifiable matrix's sides are multiples of 32 (the digits' convs are not)
    out: list[RunSpec] = []
    for s in range(seeds):
        out.append(_base(w, quick, scale, s, method="dense"))
        out.append(_base(w, quick, scale, s, method="small", density=0.5))
        out += [_sparse(w, quick, scale, s, density=0.5, structure=f"block:{b}") for b in BLOCKS]
    return out


_CFG = ("workload", "method", "density", "structure")
EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment("fig1", "Δ/T against final |w| per layer (dense runs)",
                   "Δ grows with weight magnitude in every layer.",
                   _fig1, ("workload", "optimizer", "window", "detrend", "param", "bin"), 25, recorded=True),
        Experiment("fig2", "Error against r, s and z (SPARSE = RESET), digits",
                   "Error falls as z grows and saturates; r and s matter less.",
                   _fig2, _CFG + ("rewire_every", "grad_scale", "z"), 50),
        Experiment("fig3", "Exploration vs exploitation across d, digits",
                   "Exploitation (FIX, RESET, REGULARIZE) beats NO EXPLOIT and SMALL, more so at low d.",
                   _fig3, _CFG, 20),
        Experiment("fig4", "Table 1: DENSE, SMALL, SPARSE, SET, RigL, LOTTERY across d",
                   "SPARSE at d = 0.5 is within 0.5% of DENSE and ahead of SET, RigL and LOTTERY, "
                   "the gap growing as d falls.",
                   _fig4, _CFG, 60),
        Experiment("table2", "Table 2: 2:4 and 2:4-2d against DENSE and SR-STE",
                   "2:4 and 2:4-2d are within 0.5% of DENSE.",
                   _table2, _CFG, 20),
        Experiment("table3", "Table 3: block sizes at d = 0.5 against SMALL, char-LM",
                   "Blocks are no better than SMALL.",
                   _table3, _CFG, 20),
        Experiment("fig9", "Fraction f of the DENSE-SMALL gap recovered (from fig4's runs)",
                   "Sparse training recovers most of the DENSE-SMALL gap, f = (SMALL - SPARSE)/(SMALL - DENSE).",
                   _fig4, _CFG, 0),
    )
}


def gap_fraction(err_small: float, err_sparse: float, err_dense: float) -> float:
    """f = (err_SMALL − err_SPARSE) / (err_SMALL − err_DENSE); NaN when SMALL equals DENSE."""
    den = err_small - err_dense
    return (err_small - err_sparse) / den if den != 0 else math.nan
