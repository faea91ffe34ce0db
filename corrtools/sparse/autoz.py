"""RESET's interval z from the measured decorrelation time Δ of the non-participating weights.

``Reset(every="auto")`` hands the choice of z to a :class:`ZEstimator` configured by :class:`AutoZ`.
The paper's reasoning (section 3.2, Figure 2 right): error falls as z grows and saturates at about the
time non-participating weights take to decorrelate, so z ≈ Δ of n is the smallest interval that loses
nothing.

Sample. For each sparse layer, ``sample`` weights drawn uniformly without replacement with the
recorder's sampler (``sample_indices(numel, sample, seed, name, layout="uniform")``), fixed for the
run. The recorder's run layouts (aligned runs of 16 weights, its default) are not used here: neighbouring weights
are slightly correlated, and the estimator's gather of a few hundred weights per layer is cheap anyway.

Uncut segments. A reset sets n to 0, so a window that spans a reset measures the jump, not learning.
Estimates therefore use only ``window`` consecutive steps that no reset has cut:

- warm-up: no reset fires during the first ``warmup`` steps (the warm-up value of z is "never");
  the first estimate is made at step ``warmup`` from the steps ``warmup - window + 1 .. warmup``;
- re-estimation: the next estimate is due ``reestimate_every`` steps after the previous one, and
  resets are held back in the ``window`` steps that end there. A reset that falls due while they are
  held back fires right after the estimate (postponed, not skipped). If the window is cut anyway
  (a resumed run does not carry the buffer), resets stay held back until ``window`` uncut steps exist.

Trajectories are gathered only in those windows, into a ring buffer of ``window`` rows per layer
kept on the weight's device: (window, sample) float32 values and bool participation.

Estimate. Δ of each sampled weight by ``corrtools.analysis.correlation.decorrelation_time`` over the
window (max_lag = window // 2, ``detrend``), for the weights chosen by ``weights``, pooled over layers;
z = their ``quantile`` of Δ (0.5: the median), rounded to whole steps and clamped to [z_min, z_max].
Censored weights enter at max_lag, as in the analysis (``censored_quantile``). When the quantile itself
is censored (for the median: at least half of the weights are), Δ is only known to be ≥ max_lag ≥ z_max,
so z = z_max -- the clamp of any such Δ -- and the entry says ``lower_bound=True``; no Δ value is made
up. When no sampled weight qualifies (none non-participating, or all undefined), z keeps its value and
the entry has ``z=None``. Every estimate is one :class:`ZEstimate` in ``history``.

Steps are optimizer steps counted from 1, as in the Sparsifier.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from corrtools.errors import CorrtoolsError
from corrtools.record.sampling import sample_indices

__all__ = ["AUTOZ_WEIGHTS", "AutoZ", "ZEstimate", "ZEstimator"]

AUTOZ_WEIGHTS: tuple[str, ...] = ("nonparticipating", "never_participating", "all")
_MIN_WINDOW = 16
_DETRENDS = ("none", "linear", "diff")  # corrtools.analysis.correlation.DETRENDS, without importing
# the analysis package (and xarray) with the sparse trainer; a test checks that they agree


def _whole(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise CorrtoolsError(f"AutoZ({name}={value!r}) needs a whole number >= {low}.")
    return int(value)


@dataclass(frozen=True)
class AutoZ:
    """Settings of the z estimator behind ``Reset(every="auto")``; see the module docstring.

    All lengths are optimizer steps. ``None`` fields are resolved on construction.
    """

    window: int = 1024  # uncut steps per estimate; Δ is measurable up to window // 2
    sample: int = 256  # weights sampled per sparse layer (all of a smaller layer)
    weights: str = "nonparticipating"  # whose Δ: n at the window's last step | n at all its steps | "all"
    quantile: float = 0.5  # the statistic: this quantile of Δ (0.5 = the median)
    z_min: int = 1  # smallest z chosen
    z_max: int | None = None  # largest z chosen; None: window // 2, the longest measurable Δ
    warmup: int | None = None  # steps with no reset before the first estimate; None: window
    reestimate_every: int | None = None  # steps from one estimate to the next; None: 8 * window
    detrend: str = "none"  # as in the analysis: "none" | "linear" | "diff"
    seed: int = 0  # seeds the per-layer samples

    def __post_init__(self) -> None:
        window = _whole(self.window, "window", _MIN_WINDOW)
        _whole(self.sample, "sample", 1)
        if self.weights not in AUTOZ_WEIGHTS:
            raise CorrtoolsError(
                f"AutoZ(weights={self.weights!r}) is not one of {', '.join(map(repr, AUTOZ_WEIGHTS))}."
            )
        q = self.quantile
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < q < 1.0:
            raise CorrtoolsError(f"AutoZ(quantile={q!r}) needs a fraction in (0, 1), e.g. 0.5 for the median.")
        z_min = _whole(self.z_min, "z_min", 1)
        longest = window // 2
        z_max = longest if self.z_max is None else _whole(self.z_max, "z_max", 1)
        if z_max > longest:
            raise CorrtoolsError(
                f"AutoZ(z_max={z_max}) exceeds the longest Δ a window of {window} steps measures "
                f"({longest}); raise window to at least {2 * z_max} or lower z_max."
            )
        if z_min > z_max:
            raise CorrtoolsError(f"AutoZ(z_min={z_min}) is above z_max={z_max}; pick z_min <= z_max.")
        warmup = window if self.warmup is None else _whole(self.warmup, "warmup", 1)
        if warmup < window:
            raise CorrtoolsError(
                f"AutoZ(warmup={warmup}) is shorter than window={window}: the first estimate needs a "
                "whole window of steps; pass warmup >= window or a smaller window."
            )
        again = 8 * window if self.reestimate_every is None else _whole(
            self.reestimate_every, "reestimate_every", 1)
        if again < 2 * window:
            raise CorrtoolsError(
                f"AutoZ(reestimate_every={again}) is under 2 * window = {2 * window}: resets would be "
                "held back most of the time; estimate less often or use a smaller window."
            )
        if self.detrend not in _DETRENDS:
            raise CorrtoolsError(
                f"AutoZ(detrend={self.detrend!r}) is not one of {', '.join(map(repr, _DETRENDS))}."
            )
        _whole(self.seed, "seed", 0)
        for name, value in (("window", window), ("z_max", z_max), ("warmup", warmup),
                            ("reestimate_every", again), ("quantile", float(q))):
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AutoZ:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CorrtoolsError(f"AutoZ has no setting {unknown[0]!r}; known: {', '.join(sorted(known))}.")
        return cls(**data)


@dataclass(frozen=True)
class ZEstimate:
    """One estimate of z (an entry of ``sp.z_history``); steps and Δ in optimizer steps."""

    step: int  # the step it was made at: the window's last step
    first_step: int  # the window's first step
    z: int | None  # the interval chosen from here on; None: no weight qualified, z unchanged
    delta: float  # the statistic of Δ before rounding and clamping (NaN when no weight qualified)
    weights: int  # sampled weights whose Δ entered (defined ones)
    censored_fraction: float  # of those, censored at max_lag (NaN when none)
    lower_bound: bool  # the statistic is censored: Δ ≥ max_lag, z = z_max
    seconds: float  # wall time of the estimate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ZEstimate:
        return cls(**data)


class ZEstimator:
    """Samples trajectories of the sparse layers' weights and turns them into z (module docstring).

    ``weights``: parameter name -> weight tensor, in layer order. Per step, after the optimizer step
    and before any exploitation, call :meth:`observe` with the masks of that step's forward pass; ask
    :meth:`reset_due` whether n is reset now, and report a reset with :meth:`note_reset`.
    """

    def __init__(self, config: AutoZ, weights: Mapping[str, Tensor]) -> None:
        if not isinstance(config, AutoZ):
            raise CorrtoolsError(f"config={config!r} must be an AutoZ(...).")
        if not weights:
            raise CorrtoolsError("ZEstimator needs at least one weight to sample.")
        self.config = config
        self.names = list(weights)
        W = config.window
        self._index: list[Tensor] = []  # per layer (k,) int64 flat indices, on the weight's device
        self._values: list[Tensor] = []  # per layer (W, k) float32 ring of sampled values
        self._masks: list[Tensor] = []  # per layer (W, k) bool ring: participating at that step
        for name, w in weights.items():
            # uniform single weights (not the recorder's default runs of 16): the median over a few
            # hundred weights wants independent draws, and this gather is small
            idx = sample_indices(w.numel(), config.sample, config.seed, name, layout="uniform")
            self._index.append(torch.as_tensor(idx, dtype=torch.int64, device=w.device))
            self._values.append(torch.zeros((W, len(idx)), dtype=torch.float32, device=w.device))
            self._masks.append(torch.zeros((W, len(idx)), dtype=torch.bool, device=w.device))
        self.z: int | None = None  # the interval in use; None: no reset yet (warm-up)
        self.history: list[ZEstimate] = []
        self._due = config.warmup  # step of the next estimate
        self._last_reset = 0  # step of the last reset (0: none yet)
        self._last_row = -1  # step of the last recorded row
        self._clean = 0  # consecutive rows recorded since the last reset (uncut)
        self._warned: set[str] = set()
        self._stacklevel = 4  # warnings point at observe's caller; an owner adds its own frames

    @property
    def n_sampled(self) -> int:
        """Sampled weights over all layers."""
        return sum(len(i) for i in self._index)

    def holding(self, step: int) -> bool:
        """Whether resets are held back at ``step``: the window before a due estimate."""
        return step > self._due - self.config.window

    def observe(self, step: int, weights: Sequence[Tensor], masks: Sequence[Tensor]) -> ZEstimate | None:
        """Record step ``step`` (weights after the optimizer step, masks of its forward pass) if it
        falls in an estimation window, and estimate z once the window is complete and uncut.

        Returns the new estimate, or None.
        """
        if not self.holding(step):
            return None
        if step != self._last_row + 1:
            self._clean = 0  # a gap: the rows before it are not consecutive with this one
        row = step % self.config.window
        for w, m, idx, vals, msk in zip(weights, masks, self._index, self._values, self._masks):
            vals[row].copy_(w.detach().reshape(-1).index_select(0, idx))
            msk[row].copy_(m.detach().reshape(-1).index_select(0, idx))
        self._last_row = step
        self._clean += 1
        if step >= self._due and self._clean >= self.config.window:
            return self._estimate(step)
        return None

    def reset_due(self, step: int) -> bool:
        """Whether n is reset after ``step``: z steps since the last reset, unless held back."""
        if self.z is None or self.holding(step):
            return False
        return step - self._last_reset >= self.z

    def note_reset(self, step: int) -> None:
        """A reset happened after ``step``: the segment recorded so far is cut."""
        self._last_reset = step
        self._clean = 0

    def _estimate(self, step: int) -> ZEstimate:
        # the analysis' own kernels; imported here so that importing the sparse trainer stays light
        from corrtools.analysis.correlation import decorrelation_time
        from corrtools.analysis.magnitude import censored_quantile

        cfg = self.config
        W = cfg.window
        t0 = time.perf_counter()
        order = torch.arange(step - W + 1, step + 1) % W  # ring rows, oldest first
        x = torch.cat([v.cpu()[order] for v in self._values], dim=1).numpy()  # (W, K) float32
        part = torch.cat([m.cpu()[order] for m in self._masks], dim=1).numpy()  # (W, K) bool
        delta, censored = decorrelation_time(x, max_lag=W // 2, detrend=cfg.detrend)  # (K,) each
        if cfg.weights == "nonparticipating":
            chosen = ~part[-1]
        elif cfg.weights == "never_participating":
            chosen = ~part.any(axis=0)
        else:
            chosen = np.ones(part.shape[1], dtype=bool)
        value, cfrac, lower, n = censored_quantile(delta[chosen], censored[chosen], cfg.quantile)
        z: int | None
        if n == 0:
            z = None
            self._warn_once("none", f"auto z at step {step}: no sampled {cfg.weights} weight has a defined Δ "
                            "in the window; z stays as it was (raise AutoZ.sample, or weights='all').")
        elif lower:
            z = cfg.z_max
            self._warn_once("censored", f"auto z at step {step}: {cfrac:.0%} of the weights' Δ are censored at "
                            f"{W // 2} steps (half the window), so Δ ≥ {W // 2} and z = z_max = {cfg.z_max}; "
                            "raise AutoZ.window to measure longer memories.")
        else:
            z = int(min(max(math.floor(value + 0.5), cfg.z_min), cfg.z_max))  # type: ignore[type-var]
        if z is not None:
            self.z = z
        self._due = step + cfg.reestimate_every  # type: ignore[operator]
        est = ZEstimate(step, step - W + 1, z, float(value), n, float(cfrac), bool(lower),
                        time.perf_counter() - t0)
        self.history.append(est)
        return est

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=self._stacklevel)

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """z, the history and the schedule; not the ring buffer (a resumed run collects a new window)."""
        return {
            "z": self.z,
            "history": [e.to_dict() for e in self.history],
            "due": self._due,
            "last_reset": self._last_reset,
            "names": list(self.names),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise CorrtoolsError(
                "The saved auto-z state samples other layers; use the same model and include/exclude."
            )
        self.z = None if state["z"] is None else int(state["z"])
        self.history = [ZEstimate.from_dict(e) for e in state["history"]]
        self._due = int(state["due"])
        self._last_reset = int(state["last_reset"])
        self._last_row, self._clean = -1, 0  # the buffer is not saved: the next window starts afresh
