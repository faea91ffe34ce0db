"""Figures of the experiments, drawn from their tidy rows with error bars over seeds (±1 std)."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["COLORS", "LABELS", "is_auto", "mean_std", "plot_experiment", "z_numeric"]

LABELS = {"dense": "DENSE", "small": "SMALL", "sparse": "SPARSE (RESET)", "no_exploit": "NO EXPLOIT",
          "fix": "FIX", "regularize": "REGULARIZE", "set": "SET", "rigl": "RigL", "lottery": "LOTTERY",
          "sr_ste": "SR-STE (REGULARIZE 2:4, β=2e-4)"}
# one colour per method in every panel and figure (a method missing from one panel keeps its colour)
COLORS = {m: f"C{i}" for i, m in enumerate(["small", "sparse", "set", "rigl", "lottery", "no_exploit", "fix",
                                             "regularize", "sr_ste"])}
METRIC = {"charlm": "val. loss (bits/char)", "digits": "test error"}


def mean_std(df: pd.DataFrame, by: list[str], value: str = "error") -> pd.DataFrame:
    """Mean and std (ddof 1; 0 for one seed) of ``value`` over seeds, per ``by``."""
    g = df.groupby(by, sort=True, dropna=False)[value]
    out = g.agg(["mean", "std", "count"]).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def plot_experiment(name: str, df: pd.DataFrame, path: str | os.PathLike[str], title: str = "") -> None:
    """Draw experiment ``name`` from its rows into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = _DRAW[name](df, plt)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _workloads(df: pd.DataFrame) -> list[str]:
    return [w for w in ("digits", "charlm") if w in set(df.workload)]


def _dense_band(ax: Any, df: pd.DataFrame) -> None:
    dense = df[df.method == "dense"].error
    if len(dense):
        m, s = dense.mean(), (dense.std() if len(dense) > 1 else 0.0)
        ax.axhline(m, color="k", lw=1, label="DENSE")
        ax.axhspan(m - s, m + s, color="k", alpha=0.1)


def _by_density(df: pd.DataFrame, plt: Any, methods: list[str]) -> Any:
    ws = _workloads(df)
    fig, axes = plt.subplots(1, len(ws), figsize=(5 * len(ws), 3.6), squeeze=False)
    for ax, w in zip(axes[0], ws):
        sub = df[df.workload == w]
        _dense_band(ax, sub)
        for m in methods:
            s = mean_std(sub[sub.method == m], ["density"])
            if len(s):
                ax.errorbar(s.density, s["mean"], yerr=s["std"], marker="o", capsize=3, label=LABELS[m],
                            color=COLORS[m])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xticks(sorted(set(sub.density[sub.method != "dense"])))
        ax.set_xticklabels([f"{d:g}" for d in sorted(set(sub.density[sub.method != "dense"]))])
        ax.set_xlabel("density d")
        ax.set_ylabel(METRIC[w])
        ax.set_title(w, fontsize=9)
        ax.legend(fontsize=7)
    return fig


def _fig1(df: pd.DataFrame, plt: Any) -> Any:
    panels = [(w, o) for w in ("charlm", "digits") for o in ("adamw", "sgd") if ((df.workload == w) & (df.optimizer == o)).any()]
    analyses = list(dict.fromkeys(zip(df.window, df.detrend)))
    fig, axes = plt.subplots(len(panels), len(analyses), figsize=(2.6 * len(analyses), 2.3 * len(panels)),
                             squeeze=False, sharey=True)
    for i, (w, o) in enumerate(panels):
        for j, (win, det) in enumerate(analyses):
            ax = axes[i][j]
            sub = df[(df.workload == w) & (df.optimizer == o) & (df.window == win) & (df.detrend == det)]
            for p, g in sub.groupby("param", sort=False):
                s = g.groupby("bin").agg(x=("magnitude", "mean"), y=("median_over_T", "mean"),
                                         e=("median_over_T", "std")).fillna(0.0)
                ax.errorbar(s.x, s.y, yerr=s.e, marker=".", lw=0.8, capsize=2, label=p)
            ax.set_xscale("log")
            if i == 0:
                ax.set_title(f"{win}, detrend {det}", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{w} {o}\nmedian Δ/T", fontsize=8)
            if i == len(panels) - 1:
                ax.set_xlabel("final |w|", fontsize=8)
            ax.tick_params(labelsize=7)
    return fig


def z_numeric(z: pd.Series) -> pd.Series:
    """RESET's z column as floats: fixed intervals as numbers, "auto" and never (empty) as NaN."""
    return pd.to_numeric(z.astype(object).where(z.astype(str) != "auto"), errors="coerce")


def is_auto(z: pd.Series) -> pd.Series:
    """Rows whose z was chosen from Δ during the run."""
    return z.astype(str) == "auto"


def _fig2(df: pd.DataFrame, plt: Any) -> Any:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), squeeze=False)
    T = int(df.steps.max())
    never = 10.0 ** np.ceil(np.log10(max(T, 10)) + 1)  # z = never is drawn right of every fixed z
    auto = is_auto(df.z)
    zval = z_numeric(df.z).where(auto | df.z.notna(), never)
    default = auto if auto.any() else zval == zval.mode().iloc[0]  # r and s sweeps: at the default z
    sweeps = [
        ("rewire_every", "r (steps between rewirings)", (df.grad_scale == 1.0) & default),
        ("grad_scale", "s (gradient scale on n)", (df.rewire_every == 1) & default),
        ("z_plot", "z (steps between resets; right-most: never; ★: z chosen from Δ)",
         (df.rewire_every == 1) & (df.grad_scale == 1.0)),
    ]
    d2 = df.assign(z_plot=zval)
    for ax, (col, label, sel) in zip(axes[0], sweeps):
        for i, d in enumerate(sorted(set(df.density), reverse=True)):
            rows = d2[sel & (d2.density == d)]
            if col == "z_plot":
                s = mean_std(rows[~auto[rows.index]], [col])
                a = rows[auto[rows.index]]
                if len(a) and "z_used" in a:  # auto: drawn at the mean z it ended with
                    x = pd.to_numeric(a.z_used, errors="coerce").mean()
                    e = a.error.std() if len(a) > 1 else 0.0
                    ax.errorbar([x], [a.error.mean()], yerr=[e], marker="*", ms=11, capsize=3, color=f"C{i}",
                                ls="none")
            else:
                s = mean_std(rows, [col])
            ax.errorbar(s[col], s["mean"], yerr=s["std"], marker="o", capsize=3, label=f"d={d:g}", color=f"C{i}")
        if col != "grad_scale":
            ax.set_xscale("log")
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel(METRIC[df.workload.iloc[0]])
        ax.legend(fontsize=7)
    return fig


def _fig3(df: pd.DataFrame, plt: Any) -> Any:
    return _by_density(df, plt, ["small", "no_exploit", "fix", "sparse", "regularize"])


def _fig4(df: pd.DataFrame, plt: Any) -> Any:
    return _by_density(df, plt, ["small", "sparse", "set", "rigl", "lottery"])


def _table2(df: pd.DataFrame, plt: Any) -> Any:
    ws = _workloads(df)
    fig, axes = plt.subplots(1, len(ws), figsize=(5 * len(ws), 3.6), squeeze=False)
    for ax, w in zip(axes[0], ws):
        sub = df[df.workload == w]
        s = mean_std(sub.assign(label=[_config_label(r) for r in sub.itertuples()]), ["label"])
        order = [lab for lab in ("DENSE", "SPARSE 2:4", "SPARSE 2:4-2d", "SR-STE 2:4") if lab in set(s.label)]
        s = s.set_index("label").loc[order]
        ax.bar(range(len(s)), s["mean"], yerr=s["std"], capsize=4, color="C0")
        ax.set_xticks(range(len(s)))
        ax.set_xticklabels(order, fontsize=8)
        lo = (s["mean"] - 2 * s["std"]).min()
        ax.set_ylim(lo * 0.95, (s["mean"] + 2 * s["std"]).max() * 1.02)
        ax.set_ylabel(METRIC[w])
        ax.set_title(w, fontsize=9)
    return fig


def _config_label(r: Any) -> str:
    if r.method == "dense":
        return "DENSE"
    if r.method == "sr_ste":
        return "SR-STE 2:4"
    return f"SPARSE {r.structure}"


def _table3(df: pd.DataFrame, plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    sub = df[df.method == "sparse"].assign(b=lambda t: t.structure.str.split(":").str[1].astype(int))
    s = mean_std(sub, ["b"])
    ax.errorbar(s.b, s["mean"], yerr=s["std"], marker="o", capsize=3, label="SPARSE, blocks b×b, d=0.5")
    _dense_band(ax, df)
    small = df[df.method == "small"].error
    if len(small):
        m, e = small.mean(), (small.std() if len(small) > 1 else 0.0)
        ax.axhline(m, color="C3", ls="--", label="SMALL (d=0.5)")
        ax.axhspan(m - e, m + e, color="C3", alpha=0.1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block side b")
    ax.set_ylabel(METRIC[df.workload.iloc[0]])
    ax.legend(fontsize=7)
    return fig


def _fig9(df: pd.DataFrame, plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for w in _workloads(df):
        s = mean_std(df[df.workload == w], ["density"], value="f")
        ax.errorbar(s.density, s["mean"], yerr=s["std"], marker="o", capsize=3, label=w)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.0, color="k", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xticks(sorted(set(df.density)))
    ax.set_xticklabels([f"{d:g}" for d in sorted(set(df.density))])
    ax.set_xlabel("density d")
    ax.set_ylabel("f = (SMALL − SPARSE) / (SMALL − DENSE)")
    ax.legend(fontsize=7)
    return fig


_DRAW = {"fig1": _fig1, "fig2": _fig2, "fig3": _fig3, "fig4": _fig4, "table2": _table2,
         "table3": _table3, "fig9": _fig9}
