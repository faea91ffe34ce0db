"""Figures and tables of Δ results: the paper's Figure 1 (``plot_delta``), ρ(τ) per bin (``plot_rho``),
and the plain-text table the CLI prints (``format_table``).

Matplotlib is imported inside the functions, with the Agg backend, so importing corrtools stays light
and plotting works without a display. The output format follows the file extension (.png/.svg/.pdf).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from corrtools.analysis.magnitude_at import magnitude_labels
from corrtools.errors import CorrtoolsError

__all__ = ["FORMATS", "check_density", "check_figure_path", "format_table", "plot_delta", "plot_rho", "removable_threshold", "table_rows"]

FORMATS = (".png", ".svg", ".pdf")


def _log_x_axis(ax: Any) -> None:
    """Log x axis with a few readable labels: 1·10^k only over wide ranges, 1, 2 and 5·10^k over
    narrow ones; minor ticks unlabeled (matplotlib labels them on narrow ranges, and they overlap)."""
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator, NullFormatter

    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    subs = (1.0,) if np.log10(hi / lo) > 2 else (1.0, 2.0, 5.0)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(LogFormatterSciNotation(base=10, labelOnlyBase=False))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def check_figure_path(path: str | os.PathLike[str] | None) -> Path | None:
    """The figure path as a Path (None stays None); CorrtoolsError for an unknown extension or folder."""
    if path is None:
        return None
    p = Path(path)
    if p.suffix.lower() not in FORMATS:
        raise CorrtoolsError(
            f"cannot tell the image format of {str(p)!r}; end the file name in {', '.join(FORMATS)}."
        )
    if not p.parent.exists():
        raise CorrtoolsError(f"the folder {str(p.parent)!r} for {str(p)!r} does not exist; create it first.")
    return p


def check_density(density: float | None) -> None:
    """CorrtoolsError unless density is None or in (0, 1]."""
    if density is not None and not 0.0 < float(density) <= 1.0:
        raise CorrtoolsError(f"density={density} must lie in (0, 1], e.g. 0.5 to keep half the weights.")


def removable_threshold(res: xr.Dataset, density: float) -> xr.DataArray:
    """Per param, the |w| (as binned: final, or the step in ``res.attrs["magnitude_step"]``) below
    which weights are removable at ``density`` (keep the top d): the (1 - d) quantile of |w|,
    interpolated from ``magnitude_quantile``."""
    check_density(density)
    q = res["quantile"].values
    return xr.apply_ufunc(
        lambda v: np.interp(1.0 - float(density), q, v), res["magnitude_quantile"],
        input_core_dims=[["quantile"]], vectorize=True,
    )


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def plot_delta(
    res: xr.Dataset,
    path: str | os.PathLike[str] | None = None,
    *,
    density: float | None = 0.5,
    title: str | None = None,
) -> Any:
    """The paper's Figure 1 from ``delta_by_magnitude`` results: one panel per param, median Δ/T with
    its bootstrap interval against |w| (median of each bin, log axis; final |w|, or the recorded step
    the results' attrs name, which the x label and the title then show); bins whose median is
    censored are drawn as open triangles (a lower bound), the max_lag/T ceiling dashed, and the
    magnitudes removable at ``density`` shaded (None: no shading). Saves to ``path`` if given
    (format from the extension) and returns the matplotlib Figure.
    """
    p = check_figure_path(path)
    check_density(density)
    plt = _pyplot()
    params = [str(v) for v in res["param"].values]
    rows, cols = _grid(len(params))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    ceiling = float(res.attrs["max_lag"]) / float(res.attrs["T"])
    mag_label, mag_text = magnitude_labels(res.attrs)
    thresholds = removable_threshold(res, density) if density is not None else None
    for i, name in enumerate(params):
        ax = axes[i // cols][i % cols]
        r = res.isel(param=i)
        x = r["magnitude"].values
        y = r["median_over_T"].values
        lo, hi = r["ci_low_over_T"].values, r["ci_high_over_T"].values
        cens = r["median_censored"].values
        ok = np.isfinite(x) & np.isfinite(y) & (x > 0)
        err = np.vstack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])
        ax.plot(x[ok], y[ok], "-", color="C0", lw=1.2)
        ax.errorbar(x[ok], y[ok], yerr=err[:, ok], fmt="none", ecolor="C0", capsize=2, lw=1)
        ax.plot(x[ok & ~cens], y[ok & ~cens], "o", color="C0", ms=4, label="median Δ/T (bootstrap CI)")
        if (ok & cens).any():
            ax.plot(x[ok & cens], y[ok & cens], "^", mfc="white", color="C0", ms=6,
                    label="median censored (≥ max_lag/T)")
        top = float(np.nanmax(np.r_[hi[ok], y[ok], 0.0])) * 1.2 or 1.0
        if ceiling <= top * 1.02 or (ok & cens).any():
            ax.axhline(ceiling, ls="--", lw=0.8, color="0.5", label="max_lag/T")
            top = max(top, ceiling * 1.08)
        if ok.any():
            ax.set_xlim(float(np.min(x[ok])) / 1.6, float(np.max(x[ok])) * 1.6)
        else:  # nothing to draw (e.g. a layer with NaN weights): a log axis still needs positive limits
            ax.set_xlim(1e-3, 1.0)
            ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center", va="center")
        _log_x_axis(ax)
        if thresholds is not None:
            thr = float(thresholds.values[i])
            left = ax.get_xlim()[0]
            if thr > left:
                ax.axvspan(left, thr, color="C3", alpha=0.12, lw=0,
                           label=f"removable at d={float(density):g}")
        ax.set_ylim(bottom=0, top=top)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(mag_label)
        ax.set_ylabel("Δ / T")
        ax.grid(True, which="major", alpha=0.3, lw=0.5)
    for j in range(len(params), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    legend: dict[str, Any] = {}
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=len(legend), fontsize=8,
               frameon=False)
    window = res.attrs.get("window", [0, 1])
    text = title or (
        f"Decorrelation time by magnitude (T={res.attrs['T']} recorded steps, "
        f"window {window[0]:g}–{window[1]:g}, detrend={res.attrs.get('detrend', 'none')})"
    )
    if res.attrs.get("magnitude_at", "final") != "final":  # say where |w| comes from, on any title
        text += f"\nbinned by {mag_text}"
    fig.suptitle(text, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95 if "\n" not in text else 0.91))
    if p is not None:
        fig.savefig(p, dpi=150)
    return fig


def plot_rho(res: xr.Dataset, path: str | os.PathLike[str] | None = None, *, title: str | None = None) -> Any:
    """ρ(τ) curves from ``rho_by_magnitude``: per param, the median over each magnitude bin's weights
    with its interquartile band, lag (optimizer steps) on a log axis; the legend and the title say
    which |w| was binned by. Saves to ``path`` if given; returns the Figure."""
    p = check_figure_path(path)
    plt = _pyplot()
    params = [str(v) for v in res["param"].values]
    rows, cols = _grid(len(params))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    lag = res["lag_steps"].values
    cmap = plt.get_cmap("viridis")
    B = res.sizes["bin"]
    mag_label, mag_text = magnitude_labels(res.attrs)
    for i, name in enumerate(params):
        ax = axes[i // cols][i % cols]
        for b in range(B):
            r = res.isel(param=i, bin=b)
            color = cmap(b / max(B - 1, 1))
            lo_e, hi_e = float(r["edge_low"]), float(r["edge_high"])
            ax.plot(lag, r["rho_median"].values, color=color, lw=1.2, label=f"|w| {lo_e:.2g}–{hi_e:.2g}")
            ax.fill_between(lag, r["rho_q25"].values, r["rho_q75"].values, color=color, alpha=0.15, lw=0)
        ax.axhline(0.0, color="0.4", lw=0.8)
        if lag.size:  # set explicitly: with all-NaN curves (a constant layer) autoscaling gives 0..1
            ax.set_xlim(float(lag.min()) / 1.2, float(lag.max()) * 1.2)
        _log_x_axis(ax)
        ax.set_ylim(-1.05, 1.05)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("lag τ (optimizer steps)")
        ax.set_ylabel("ρ(τ)")
        ax.grid(True, which="both", alpha=0.25, lw=0.5)
        ax.legend(fontsize=6, loc="lower left", title=f"{mag_label} bin", title_fontsize=6)
    for j in range(len(params), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    text = title or f"ρ(τ) by magnitude bin (median and quartiles, T={res.attrs['T']})"
    if res.attrs.get("magnitude_at", "final") != "final":
        text += f"\nbinned by {mag_text}"
    fig.suptitle(text, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95 if "\n" not in text else 0.91))
    if p is not None:
        fig.savefig(p, dpi=150)
    return fig


_COLUMNS = (
    ("param", "param", "{}"),
    ("bin", "bin", "{}"),
    ("edge_low", "|w| from", "{:.3g}"),
    ("edge_high", "|w| to", "{:.3g}"),
    ("n_weights", "n", "{}"),
    ("median_delta", "median Δ", "{:.4g}"),
    ("ci_low", "CI low", "{:.4g}"),
    ("ci_high", "CI high", "{:.4g}"),
    ("median_over_T", "Δ/T", "{:.4f}"),
    ("censored_fraction", "censored", "{:.0%}"),
)


def table_rows(res: xr.Dataset) -> list[dict[str, Any]]:
    """The results as a list of plain dicts, one per (param, bin) (for CSV and JSON output)."""
    out = []
    names = ["edge_low", "edge_high", "magnitude", "n_weights", "undefined", "median_delta", "ci_low",
             "ci_high", "median_over_T", "ci_low_over_T", "ci_high_over_T", "censored_fraction",
             "median_censored"]
    for i, p in enumerate(res["param"].values):
        for b in res["bin"].values:
            row: dict[str, Any] = {"param": str(p), "bin": int(b)}
            for n in names:
                v = res[n].values[i, b].item()
                row[n] = None if isinstance(v, float) and not math.isfinite(v) else v
            out.append(row)
    return out


def format_table(res: xr.Dataset) -> str:
    """The plain-text table of ``delta_by_magnitude`` results that ``corrtools delta`` prints
    (Δ in optimizer steps; a median marked ≥ is censored, i.e. a lower bound). The header names the
    |w| binned by: final, or the recorded step (and why)."""
    header = [h for _, h, _ in _COLUMNS]
    lines = []
    for row in table_rows(res):
        cells = []
        for key, _, fmt in _COLUMNS:
            v = row[key]
            cell = "nan" if v is None else fmt.format(v)
            if key == "median_delta" and row["median_censored"]:
                cell = "≥" + cell
            cells.append(cell)
        lines.append(cells)
    widths = [max(len(h), *(len(r[j]) for r in lines)) if lines else len(h) for j, h in enumerate(header)]
    fmt_row = lambda cells: "  ".join(c.rjust(w) if j > 0 else c.ljust(w) for j, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    attrs = res.attrs
    head = (
        f"# Δ by {magnitude_labels(attrs)[1]}: T={attrs.get('T')} recorded steps (every {attrs.get('every', 1)}), "
        f"window {attrs.get('window')}, max_lag={attrs.get('max_lag_steps', attrs.get('max_lag'))} steps, "
        f"detrend={attrs.get('detrend')}, {attrs.get('binning')} bins, {attrs.get('ci', 0.95):.0%} bootstrap CI"
    )
    return "\n".join([head, fmt_row(header), *(fmt_row(r) for r in lines)])
