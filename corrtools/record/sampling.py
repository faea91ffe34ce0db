"""Which weights a Recorder follows: the parameters chosen and, inside each, a sample.

Sampling is per parameter, without replacement, reproducible from ``seed``: each parameter draws
from its own generator seeded by ``(seed, crc32(name))``, so adding or removing a parameter never
changes the sample of another. Indices are flat (row-major, as ``param.flatten()[index]``) and
sorted; columns are grouped by parameter in ``model.named_parameters()`` order.

Three layouts, each giving every weight of a parameter the same chance to be recorded:

- ``"strided"`` (default): aligned runs of `RUN` = 16 consecutive flat indices (64 bytes of float32,
  one cache line), every ``s``-th run from a uniformly random first run in ``[0, s)`` (systematic
  sampling: every run is recorded with probability exactly 1 / s). ``s`` is the largest stride
  that still records the requested count (``s <= R // m`` for m of the R runs) and is coprime to
  the period of the runs' column positions (a row of ``row`` weights starts a run at the same column
  every ``row / gcd(row, 16)`` runs), so that the sampled runs cover every column position rather
  than one residue class; where that would take the stride below 80% of ``R // m``, the plain
  ``R // m`` is kept (and the runs cover only some column positions). The count is therefore
  ``ceil((R - first) / s)`` runs: the request rounded up to whole runs and to the stride, by a few
  percent when the sample is a small fraction of the parameter (10^5 weights requested over the
  three matrices of a 512-1024-1024-512 MLP record 103,728), by up to 2x when it is over half of
  it. The last run of a parameter whose numel is not a multiple of 16 is shorter. A parameter's
  whole runs are then one strided view of it: the gather after an optimizer step is one strided
  copy, whose addresses the hardware prefetcher predicts.
- ``"runs"``: the same runs, drawn uniformly without replacement (no lattice): every sampled run is
  a random cache line, gathered with an index, latency-bound right after an optimizer step.
- ``"uniform"``: single weights drawn uniformly without replacement; statistically the most
  efficient sample, ~3-5x more costly to read per step on CPU.

Reading the sample after an optimizer step touches one cache line per 16 weights with runs instead
of one per weight, which is what the per-step cost of recording scales with (docs/recorder.md).
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from corrtools.errors import CorrtoolsError, close_matches

__all__ = [
    "DEFAULT_LAYOUT", "LAYOUTS", "RUN", "ParamSample", "SamplePlan", "plan_samples", "run_stride", "select_params",
    "sample_indices",
]

ParamFilter = None | Sequence[str] | Callable[[str, torch.Tensor], bool]
SampleSpec = int | float
LAYOUTS = ("strided", "runs", "uniform")
DEFAULT_LAYOUT = "strided"
RUN = 16  # weights per run in the "strided" and "runs" layouts: 64 bytes of float32, one cache line


@dataclass(frozen=True)
class ParamSample:
    """The sampled weights of one parameter: ``index`` (k,) sorted flat indices into its ``numel``."""

    name: str
    numel: int
    index: np.ndarray = field(repr=False)

    @property
    def whole(self) -> bool:
        return len(self.index) == self.numel


@dataclass(frozen=True)
class SamplePlan:
    """All sampled parameters in column order, plus notes for the store's attrs."""

    samples: tuple[ParamSample, ...]
    skipped: tuple[str, ...] = ()   # parameters left out because they are not floating point
    notes: tuple[str, ...] = ()     # e.g. "sample 4096 >= numel 128 of 'x': recorded all 128"

    @property
    def n_weights(self) -> int:
        return sum(len(s.index) for s in self.samples)

    def columns(self) -> tuple[list[str], np.ndarray]:
        """(param (N,) names, index (N,) int64) of every column."""
        names = [s.name for s in self.samples for _ in range(len(s.index))]
        index = np.concatenate([s.index for s in self.samples]) if self.samples else np.zeros(0, np.int64)
        return names, index.astype(np.int64)


def _check_sample(sample: SampleSpec) -> None:
    if isinstance(sample, bool) or not isinstance(sample, (int, float, np.integer, np.floating)):
        raise CorrtoolsError(f"sample={sample!r} must be an int (weights per parameter) or a float in (0, 1]")
    if isinstance(sample, (int, np.integer)):
        if sample < 1:
            raise CorrtoolsError(f"sample={sample} must be at least 1 weight per parameter")
    elif not 0.0 < float(sample) <= 1.0:
        raise CorrtoolsError(f"sample={sample} as a fraction must be in (0, 1]; pass an int for a count")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise CorrtoolsError(
            f"layout={layout!r} is unknown; use 'strided' (runs of {RUN} weights at a fixed stride), 'runs' "
            f"(runs of {RUN} weights at random) or 'uniform' (single weights)"
        )


def run_stride(n_runs: int, m: int, row: int | None = None) -> int:
    """Stride in runs of a "strided" sample of at least ``m`` of ``n_runs`` runs of a parameter whose
    rows hold ``row`` weights (None: no rows, a vector): the largest ``s <= n_runs // m`` coprime to
    ``row // gcd(row, RUN)`` (the period of the runs' column positions), or ``n_runs // m`` itself
    where that would take the stride below 80% of it (and record over 25% more runs)."""
    plain = max(1, n_runs // max(m, 1))
    period = 1 if row is None else max(1, row) // math.gcd(max(1, row), RUN)
    for s in range(plain, 0, -1):
        if math.gcd(s, period) == 1:
            return s if 5 * s >= 4 * plain else plain
    return plain  # pragma: no cover - s = 1 is coprime to every period


def sample_indices(
    numel: int, sample: SampleSpec, seed: int, name: str, layout: str = DEFAULT_LAYOUT, row: int | None = None
) -> np.ndarray:
    """Sorted flat indices (k,) int64 of a sample without replacement from ``range(numel)``:
    ``k = min(sample, numel)`` for an int, ``max(1, round(sample * numel))`` for a float; with
    ``layout="runs"`` k is rounded up to whole aligned runs of `RUN`, with ``"strided"`` also up to
    the stride (see the module docstring). ``row``: weights per row (``numel // shape[0]``; None for
    a vector), for "strided"."""
    _check_sample(sample)
    _check_layout(layout)
    if isinstance(sample, (int, np.integer)):
        k = min(int(sample), numel)
    else:
        k = min(numel, max(1, round(float(sample) * numel)))
    n_runs = -(-numel // RUN)  # the last run may be shorter than RUN
    if k == numel or (layout != "uniform" and -(-k // RUN) >= n_runs):
        return np.arange(numel, dtype=np.int64)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])
    if layout == "uniform":
        return np.sort(rng.choice(numel, size=k, replace=False)).astype(np.int64)
    m = -(-k // RUN)
    if layout == "runs":
        runs = np.sort(rng.choice(n_runs, size=m, replace=False))
    else:
        s = run_stride(n_runs, m, row)
        runs = np.arange(int(rng.integers(s)), n_runs, s, dtype=np.int64)
    index = (runs[:, None] * RUN + np.arange(RUN)).reshape(-1)
    return index[index < numel].astype(np.int64)


def select_params(model: nn.Module, params: ParamFilter = None) -> tuple[list[tuple[str, nn.Parameter]], list[str]]:
    """The parameters to record and the names skipped as non-floating.

    ``params``: None (every floating parameter with >= 2 dims: weight matrices and conv kernels), a
    list of names (each must exist), or a predicate ``(name, param) -> bool``.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.dim() >= 2]
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]
    else:
        if isinstance(params, str):
            raise CorrtoolsError(f"params={params!r} is a string; pass a list of names, e.g. [{params!r}]")
        by_name = dict(named)
        for name in params:
            if name not in by_name:
                raise CorrtoolsError(
                    f"model has no parameter {name!r}{close_matches(name, by_name)}; pass names from "
                    "model.named_parameters()"
                )
        wanted = set(params)
        chosen = [(n, p) for n, p in named if n in wanted]  # model order, duplicates dropped
    kept = [(n, p) for n, p in chosen if p.is_floating_point()]
    skipped = [n for n, p in chosen if not p.is_floating_point()]
    if not kept:
        raise CorrtoolsError(
            "no floating-point parameter matches params=" + repr(params) + "; pass names or a predicate "
            "that selects at least one floating parameter"
        )
    return kept, skipped


def plan_samples(
    model: nn.Module, sample: SampleSpec = 4096, params: ParamFilter = None, seed: int = 0,
    layout: str = DEFAULT_LAYOUT,
) -> SamplePlan:
    """Choose the parameters and sample each (see the module docstring)."""
    _check_sample(sample)
    _check_layout(layout)
    kept, skipped = select_params(model, params)
    samples, notes = [], []
    for name, p in kept:
        row = p.numel() // p.shape[0] if p.dim() >= 2 and p.shape[0] else None
        index = sample_indices(p.numel(), sample, seed, name, layout, row=row)
        if isinstance(sample, (int, np.integer)) and sample > p.numel():
            notes.append(f"sample {int(sample)} > numel {p.numel()} of {name!r}: recorded all {p.numel()}")
        samples.append(ParamSample(name, p.numel(), index))
    notes += [f"{n!r} is not floating point: skipped" for n in skipped]
    return SamplePlan(tuple(samples), tuple(skipped), tuple(notes))
