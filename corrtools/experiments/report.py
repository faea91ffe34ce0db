"""Tables in the paper's layout and claim-by-claim checks, from an experiment's tidy rows.

"Within 0.5% of DENSE" is read as 0.5 percentage points of test error on digits (the paper's
accuracy gaps are in points) and as 0.5% of DENSE's validation loss on the char-LM. A difference is
called real only when it exceeds the seeds' spread (the larger of the two standard deviations).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from corrtools.experiments.plots import LABELS, is_auto, mean_std, z_numeric

__all__ = ["claims", "size_line", "table"]

_STRUCTS = ["unstructured", "2:4", "2:4-2d"] + [f"block:{b}" for b in (1, 2, 4, 8, 16, 32)]
_ORDER = ["dense", "small", "sparse", "no_exploit", "fix", "regularize", "set", "rigl", "lottery", "sr_ste"]


def size_line(df: pd.DataFrame) -> str:
    """One sentence saying which mode, step budgets and seeds the rows come from."""
    mode = ", ".join(sorted(set(df["mode"].astype(str))))
    steps = ", ".join(f"{w} {int(s)} steps" for w, s in df.groupby("workload").steps.max().items())
    seeds = int(df.seed.nunique())
    return f"mode: {mode}; {steps}; {seeds} seed(s) per configuration"


def _fmt(mean: float, std: float, workload: str) -> str:
    if workload == "digits":
        return f"{100 * mean:.2f} ± {100 * std:.2f}"
    return f"{mean:.4f} ± {std:.4f}"


def table(df: pd.DataFrame, columns: str = "density") -> pd.DataFrame:
    """Methods (and structures) as rows, ``columns`` values as columns, "mean ± std" over seeds.

    Digits: test error in percent; char-LM: validation bits per character.
    """
    label = [
        LABELS[m] if s == "unstructured" or m == "sr_ste" else f"{LABELS[m]} {s}"
        for m, s in zip(df.method, df.structure)
    ]
    order = [_ORDER.index(m) * 100 + (int(st.split(":")[1]) if st.startswith("block:") else len(st))
             for m, st in zip(df.method, df.structure)]  # method order, then block side / structure
    d = df.assign(label=label, order=order)
    cells = []
    for (w, lab, col), g in d.groupby(["workload", "label", columns], sort=False):
        s = mean_std(g, ["workload"]).iloc[0]
        cells.append({"workload": w, "method": lab, "order": g.order.iloc[0], columns: col,
                      "cell": _fmt(s["mean"], s["std"], w)})
    t = pd.DataFrame(cells)
    col_order = sorted(set(t[columns]), key=lambda v: (-v if isinstance(v, float) else _STRUCTS.index(v)))
    out = t.pivot_table(index=["workload", "order", "method"], columns=columns, values="cell", aggfunc="first")
    out = out.reindex(columns=col_order).fillna("")
    return out.droplevel("order").sort_index(level=0, sort_remaining=False)


def _stat(df: pd.DataFrame, **sel: object) -> tuple[float, float, int]:
    g = df
    for k, v in sel.items():
        g = g[g[k] == v]
    e = g.error
    return float(e.mean()), float(e.std()) if len(e) > 1 else 0.0, len(e)


def _band(workload: str, dense: float) -> float:
    """The "within 0.5% of DENSE" band: 0.5 points of error (digits), 0.5% of the loss (char-LM)."""
    return 0.005 if workload == "digits" else 0.005 * dense


def _within_verdict(workload: str, m: float, s: float, dm: float, ds: float) -> str:
    """"held" inside the band; "did not hold" when the gap exceeds the band by more than the seed
    spread; otherwise the seeds cannot tell."""
    gap, band = abs(m - dm), _band(workload, dm)
    if gap <= band:
        return "held"
    if gap - max(s, ds) > band:
        return "did not hold"
    return "not settled: outside the band, but by less than the seed spread"


def claims(name: str, df: pd.DataFrame) -> list[str]:
    """The paper's claims for experiment ``name``, each with what these rows show ("held" or not)."""
    lines: list[str] = []
    if name in ("fig4", "table2", "fig3", "table3"):
        for w in [w for w in ("digits", "charlm") if w in set(df.workload)]:
            sub = df[df.workload == w]
            dm, ds, _ = _stat(sub, method="dense")
            if name == "fig4":
                lines += _fig4_claims(w, sub, dm, ds)
            elif name == "table2":
                for st in ("2:4", "2:4-2d"):
                    m, s, n = _stat(sub, method="sparse", structure=st)
                    if n:
                        lines.append(f"{w}: SPARSE {st} {_fmt(m, s, w)} vs DENSE {_fmt(dm, ds, w)}: "
                                     f"within 0.5% {_within_verdict(w, m, s, dm, ds)}")
                m, s, n = _stat(sub, method="sr_ste")
                if n:
                    lines.append(f"{w}: SR-STE 2:4 {_fmt(m, s, w)} (reference)")
            elif name == "table3":
                sm, ss, _ = _stat(sub, method="small", density=0.5)
                for st in sorted(set(sub.structure[sub.method == "sparse"]), key=lambda t: int(t.split(":")[1])):
                    m, s, _ = _stat(sub, method="sparse", structure=st)
                    better = sm - m > max(s, ss)
                    lines.append(f"{w}: {st} {_fmt(m, s, w)} vs SMALL {_fmt(sm, ss, w)}: "
                                 f"{'better than SMALL (claim did not hold)' if better else 'no better than SMALL (held)'}")
            elif name == "fig3":
                for d in sorted(set(sub.density[sub.method == "sparse"]), reverse=True):
                    ne, nes, _ = _stat(sub, method="no_exploit", density=d)
                    parts = []
                    for m in ("fix", "sparse", "regularize", "small"):
                        mm, _, n = _stat(sub, method=m, density=d)
                        if n:
                            parts.append(f"{LABELS[m]} {_fmt(mm, 0, w).split(' ±')[0]}")
                    lines.append(f"{w} d={d:g}: NO EXPLOIT {_fmt(ne, nes, w)}; " + ", ".join(parts))
    elif name == "fig9":
        for (w, d), g in df.groupby(["workload", "density"]):
            lines.append(f"{w} d={d:g}: f = {g.f.mean():.2f} ± {g.f.std() if len(g) > 1 else 0:.2f}")
    elif name == "fig2":
        for d, g in df[(df.rewire_every == 1) & (df.grad_scale == 1.0)].groupby("density"):
            auto = is_auto(g.z)
            s = mean_std(g[~auto].assign(zs=z_numeric(g.z[~auto]).fillna(np.inf)), ["zs"])
            seq = "; ".join(f"z={'never' if np.isinf(z) else int(z)}: {_fmt(m, sd, g.workload.iloc[0])}"
                            for z, m, sd in zip(s.zs, s["mean"], s["std"]))
            if auto.any():
                a = g[auto]
                used = pd.to_numeric(a.z_used, errors="coerce")
                seq += (f"; z from Δ (ended at z = {used.min():g}–{used.max():g}): "
                        f"{_fmt(a.error.mean(), a.error.std() if len(a) > 1 else 0.0, g.workload.iloc[0])}")
            lines.append(f"d={d:g}: {seq}")
    elif name == "fig1":
        for keys, g in df.groupby(["workload", "optimizer", "window", "detrend"], sort=False):
            per = g.groupby(["param", "bin"]).median_over_T.mean().unstack("bin")
            rises = int((per.iloc[:, -1] > per.iloc[:, 0]).sum())
            lines.append(f"{' / '.join(map(str, keys))}: Δ/T higher in the top |w| bin than the bottom one "
                         f"in {rises} of {len(per)} layers")
    return lines


def _fig4_claims(w: str, sub: pd.DataFrame, dm: float, ds: float) -> list[str]:
    out = []
    m5, s5, n5 = _stat(sub, method="sparse", density=0.5)
    if n5:
        out.append(f"{w}: SPARSE d=0.5 {_fmt(m5, s5, w)} vs DENSE {_fmt(dm, ds, w)}: within 0.5% "
                   f"{_within_verdict(w, m5, s5, dm, ds)}")
    sm, ss, _ = _stat(sub, method="small", density=min(sub.density))
    out.append(f"{w}: DENSE vs SMALL at d={min(sub.density):g}: {_fmt(dm, ds, w)} vs {_fmt(sm, ss, w)} "
               f"({'apart by more than the seed spread' if sm - dm > max(ds, ss) else 'within the seed spread'})")
    for d in sorted(set(sub.density[sub.method == "sparse"]), reverse=True):
        sp, sps, _ = _stat(sub, method="sparse", density=d)
        gaps = []
        for m in ("set", "rigl", "lottery"):
            mm, ms, n = _stat(sub, method=m, density=d)
            if n:
                verdict = "ahead" if mm - sp > max(sps, ms) else ("behind" if sp - mm > max(sps, ms) else "tied")
                gap = f"{100 * (mm - sp):+.2f} points" if w == "digits" else f"{mm - sp:+.4f} bits/char"
                gaps.append(f"{LABELS[m]} {gap} ({verdict})")
        out.append(f"{w} d={d:g}: SPARSE vs " + ", ".join(gaps) + " [others minus SPARSE; SPARSE 'ahead' if "
                   "the others are worse by more than the seed spread]")
    return out
