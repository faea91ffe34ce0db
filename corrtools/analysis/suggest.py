"""Offline choice of RESET's interval z from a recorded run: ``suggest_z``.

The weights a sparse run at density d would leave out are, at the end of a dense run, those below the
(1 − d) quantile of final |w| in their layer. Their median Δ, in optimizer steps, is the z the run
implies (the paper's section 3.2: error saturates once z reaches the decorrelation time of the
non-participating weights). Δ comes from ``delta_per_weight`` (the analysis' own kernel), censored
weights enter at max_lag and a censored median is flagged as a lower bound, as everywhere in the analysis.

How it relates to ``Reset(every="auto")`` (online, ``corrtools.sparse.autoz``). Both take a quantile
of the Δ of non-participating weights with the same kernel and the same censoring rule; they differ in
what they read:

- window: offline, the recorded window (default the whole run, T steps, max_lag T/2); online, windows
  of ``AutoZ.window`` steps (max_lag window/2). Weights that drift have Δ that grows with the window,
  so the two agree only when the window lengths agree (``window``/``max_lag`` here select the same
  span) or when Δ is much shorter than both windows;
- which weights: offline, final |w| below the (1 − d) quantile of a dense run; online, the actual
  mask of the sparse run at the end of each window (whose n also get grad_scale-scaled gradients);
- when: offline, one number for the whole span, over the lr schedule; online, re-estimated every
  ``AutoZ.reestimate_every`` steps, so it follows the schedule;
- resolution: offline Δ is in multiples of the store's ``every``; online every step is used.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from corrtools.analysis.correlation import Detrend
from corrtools.analysis.delta import delta_per_weight
from corrtools.analysis.magnitude import censored_quantile
from corrtools.errors import CorrtoolsError

__all__ = ["suggest_z", "z_rows"]


def suggest_z(
    ds_or_path: xr.Dataset | str | os.PathLike[str],
    density: float,
    params: Sequence[str] | str | None = None,
    *,
    quantile: float = 0.5,
    window: tuple[float, float] = (0.0, 1.0),
    max_lag: int | None = None,
    detrend: Detrend = "none",
    progress: bool = False,
    threads: int | None = None,
) -> xr.Dataset:
    """The z (optimizer steps) a recorded run implies for RESET at ``density``: the ``quantile``
    (0.5: median) of Δ of the weights below their layer's (1 − density) quantile of final |w|.

    Returns a Dataset over ``param`` with ``z`` (float, optimizer steps), ``n_weights`` (those weights),
    ``censored_fraction``, ``lower_bound`` (the quantile is censored: z ≥ the value) and ``threshold``
    (the final-|w| cut), and the same pooled over all selected layers as 0-d ``z_all``,
    ``n_weights_all``, ``censored_fraction_all``, ``lower_bound_all``. Attrs are ``delta_per_weight``'s
    plus ``density`` and ``quantile``. ``window``, ``max_lag`` (recorded rows), ``detrend`` and
    ``threads`` are passed to ``delta_per_weight``.

    >>> import numpy as np, xarray as xr
    >>> t = np.arange(400)[:, None]
    >>> x = np.hstack([np.sin(2 * np.pi * t / 40), 3 + np.sin(2 * np.pi * t / 100)])  # Δ = 10, 25 steps
    >>> ds = xr.Dataset({"values": (("step", "weight"), x.astype("float32"))},
    ...                 coords={"step": np.arange(1, 401), "param": ("weight", ["w", "w"]),
    ...                         "index": ("weight", [0, 1]), "initial": ("weight", [0.0, 3.0]),
    ...                         "final": ("weight", x[-1])}, attrs={"every": 1})
    >>> res = suggest_z(ds, density=0.5)   # the smaller final |w| is left out: the Δ = 10 weight
    >>> round(float(res["z_all"])), int(res["n_weights_all"]), bool(res["lower_bound_all"])
    (10, 1, False)
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density < 1.0:
        raise CorrtoolsError(f"density={density!r} must lie in (0, 1): the fraction of weights kept, e.g. 0.25.")
    if not 0.0 < float(quantile) < 1.0:
        raise CorrtoolsError(f"quantile={quantile!r} must lie in (0, 1), e.g. 0.5 for the median.")
    per = delta_per_weight(ds_or_path, params, window=window, max_lag=max_lag, detrend=detrend,
                           progress=progress, threads=threads)
    names = np.asarray(per["param"].values).astype(str)
    mag = np.abs(np.asarray(per["final"].values, dtype=np.float64))
    if not np.isfinite(mag).any():
        raise CorrtoolsError(
            "the run has no final values (still recording or killed); suggest_z ranks weights by final |w|, "
            "so close the Recorder first."
        )
    delta = np.asarray(per["delta"].values)
    censored = np.asarray(per["censored"].values)
    layers = list(dict.fromkeys(names.tolist()))
    out: dict[str, list[Any]] = {k: [] for k in ("z", "n_weights", "censored_fraction", "lower_bound", "threshold")}
    pooled = np.zeros(names.size, dtype=bool)
    for p in layers:
        sel = names == p
        thr = float(np.nanquantile(mag[sel], 1.0 - float(density)))
        below = sel & (mag < thr)
        pooled |= below
        z, cfrac, lower, n = censored_quantile(delta[below], censored[below], quantile)
        for key, v in zip(out, (z, n, cfrac, lower, thr)):
            out[key].append(v)
    z, cfrac, lower, n = censored_quantile(delta[pooled], censored[pooled], quantile)
    units = {"units": "optimizer steps"}
    return xr.Dataset(
        {
            "z": ("param", np.asarray(out["z"], dtype=np.float64), units),
            "n_weights": ("param", np.asarray(out["n_weights"], dtype=np.int64)),
            "censored_fraction": ("param", np.asarray(out["censored_fraction"], dtype=np.float64)),
            "lower_bound": ("param", np.asarray(out["lower_bound"], dtype=bool)),
            "threshold": ("param", np.asarray(out["threshold"], dtype=np.float64),
                          {"long_name": "final |w| below which a weight counts as non-participating"}),
            "z_all": ((), z, units),
            "n_weights_all": ((), n),
            "censored_fraction_all": ((), cfrac),
            "lower_bound_all": ((), lower),
        },
        coords={"param": layers},
        attrs={**per.attrs, "density": float(density), "quantile": float(quantile)},
    )


def z_rows(res: xr.Dataset) -> list[dict[str, Any]]:
    """``suggest_z`` results as plain dicts, one per layer and a last one for ``param="all"``."""
    rows = []
    for i, p in enumerate(res["param"].values):
        rows.append({"param": str(p), **{k: _plain(res[k].values[i]) for k in
                                         ("z", "n_weights", "censored_fraction", "lower_bound", "threshold")}})
    rows.append({"param": "all", "z": _plain(res["z_all"].values), "n_weights": _plain(res["n_weights_all"].values),
                 "censored_fraction": _plain(res["censored_fraction_all"].values),
                 "lower_bound": _plain(res["lower_bound_all"].values), "threshold": None})
    return rows


def _plain(v: Any) -> Any:
    v = np.asarray(v).item()
    return None if isinstance(v, float) and not np.isfinite(v) else v
