"""Validation loss against RESET's interval z, fixed and chosen automatically (the paper's Figure 2, right).

    python -m corrtools.experiments.reset_z [--quick] [--out data/results] [--workers 2]

On the built-in character-level transformer, for each density d, RESET with fixed z ∈ {1, 10, 100,
1000, never} and with ``Reset(every="auto")``, each over the same seeds and step budget: the final
validation loss in bits per character on fixed held-out windows, and the z that auto chose. "never" is
NO EXPLOIT (n is never reset). The paper's claims tested: the loss falls as z grows and saturates;
auto z lands within the seed-to-seed spread of the best fixed z; z = 1 is worst.

Writes ``<out>/reset_z.csv`` (one row per run, the full configuration with it),
``<out>/reset_z_summary.csv`` (mean, std, min, max over seeds per (d, z)) and ``<out>/reset_z.png``;
``--quick`` writes ``reset_z.quick.*`` in seconds (the tests run it). The CSV is also the cache: a
rerun with the same setup trains only the runs it does not hold yet, so an interrupted grid continues;
runs go seed by seed, and ``--report`` writes the summary and the figure from the rows there are.
Each run uses one torch thread; ``--workers`` runs that many at once.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

__all__ = ["FULL", "QUICK", "ResetZSetup", "evaluate_bpc", "format_summary", "main", "plot", "run_grid", "write_report",
           "run_one", "summarize"]

Z = int | str  # a fixed interval (steps), "never" or "auto"


def _model(**kw: Any) -> Any:
    from corrtools.workloads import CharLMConfig

    return CharLMConfig(**kw)


def _auto(**kw: Any) -> Any:
    from corrtools.sparse.autoz import AutoZ

    return AutoZ(**kw)


@dataclass(frozen=True)
class ResetZSetup:
    """The grid and everything that decides its numbers (its hash keys the cached rows)."""

    name: str  # output file stem
    densities: tuple[float, ...]
    zs: tuple[Z, ...]  # fixed z in steps, "never" (NO EXPLOIT) or "auto"
    seeds: tuple[int, ...]
    model: Any  # CharLMConfig: size, steps (the budget), optimizer, schedule; its seed is replaced
    auto: Any  # AutoZ settings of z = "auto"
    eval_windows: int  # fixed held-out windows of seq_len characters, evenly spaced

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"], d["auto"] = self.model.to_dict(), self.auto.to_dict()
        return d

    def key(self) -> str:
        """A short hash of everything but the grid's extent (name, densities, zs, seeds)."""
        d = self.to_dict()
        for k in ("name", "densities", "zs", "seeds"):
            d.pop(k)
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# Sized for this 2-core machine shared with other jobs: 1500 steps of a 2-block, 32-wide model on
# 32-character windows is ~10 ms of CPU per step, ~16 CPU-seconds per run with its set-up and
# evaluation, ~15 CPU-minutes for the 54 runs. The auto window (300 steps = budget / 5, re-estimated
# 750 steps later) fits two estimates into the budget. 1 MB of text: its held-out last 10% is ordinary
# code (cmd.py, codeop.py); at 500 kB it would be the machine-specific _sysconfigdata file. What the
# short run means: README, "RESET interval z: fixed and automatic".
FULL = ResetZSetup(
    name="reset_z",
    densities=(0.5, 0.25, 0.1),
    zs=(1, 10, 100, 1000, "never", "auto"),
    seeds=(0, 1, 2),
    model=_model(d_model=32, n_layer=2, n_head=4, seq_len=32, batch_size=16, steps=1500,
                 text_bytes=1_000_000, warmup_steps=50),
    auto=_auto(window=300, reestimate_every=750),
    eval_windows=1024,
)
QUICK = ResetZSetup(
    name="reset_z.quick",
    densities=(0.5,),
    zs=(1, 10, "never", "auto"),
    seeds=(0,),
    model=_model(d_model=16, n_layer=1, n_head=2, seq_len=16, batch_size=4, steps=60,
                 text_bytes=60_000, warmup_steps=5),
    auto=_auto(window=16, reestimate_every=32),
    eval_windows=32,
)


def evaluate_bpc(workload: Any, windows: int, batch: int = 64) -> float:
    """Mean next-character loss in bits per character over ``windows`` fixed held-out windows,
    evenly spaced over the validation text (the same for every run of a setup)."""
    import torch
    import torch.nn.functional as F

    tokens = workload.val_tokens
    T = workload.cfg.seq_len
    starts = torch.linspace(0, len(tokens) - T - 2, windows).long()  # (windows,)
    model = workload.model
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, windows, batch):
            s = starts[i : i + batch]
            idx = s[:, None] + torch.arange(T + 1)  # (b, T + 1)
            w = tokens[idx].to(workload.device)
            logits = model(w[:, :-1])  # (b, T, V)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += w[:, 1:].numel()
    model.train()
    return total / count / math.log(2)


def run_one(setup: ResetZSetup, density: float, z: Z, seed: int) -> dict[str, Any]:
    """Train one run of the grid and return its CSV row."""
    from corrtools.sparse import Reset, Sparsifier
    from corrtools.workloads import CharLMWorkload

    cfg = replace(setup.model, seed=seed)
    start = time.perf_counter()
    wl = CharLMWorkload(cfg)
    exploit = None if z == "never" else Reset(every="auto", auto=setup.auto) if z == "auto" else Reset(every=int(z))
    sp = Sparsifier(wl.model, wl.optimizer, density=density, exploit=exploit, total_steps=cfg.steps)
    losses = [wl.train_step(after_step=sp.step) for _ in range(cfg.steps)]
    history = list(getattr(sp, "z_history", []))
    tail = losses[-max(1, cfg.steps // 20):]
    return {
        "experiment": "reset_z",
        "setup": setup.key(),
        "density": density,
        "z": str(z),
        "seed": seed,
        "steps": cfg.steps,
        "val_bpc": evaluate_bpc(wl, setup.eval_windows),
        "train_bpc_last5pct": sum(tail) / len(tail) / math.log(2),
        "z_chosen": (history[-1].z if history else None) if z == "auto" else (None if z == "never" else int(z)),
        "z_history": ";".join(f"{e.step}:{e.z}{'+' if e.lower_bound else ''}" for e in history),
        "auto_censored_fraction": history[-1].censored_fraction if history else None,
        "auto_seconds": sum(e.seconds for e in history) if history else None,
        "wall_s": time.perf_counter() - start,
        "model": json.dumps(cfg.to_dict(), sort_keys=True),
        "auto": json.dumps(setup.auto.to_dict(), sort_keys=True) if z == "auto" else "",
    }


def _run_job(args: tuple[ResetZSetup, float, Z, int]) -> dict[str, Any]:
    return run_one(*args)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)  # atomic: an interrupted write leaves the previous rows


def _job_key(density: Any, z: Any, seed: Any) -> tuple[float, str, int]:
    return float(density), str(z), int(seed)


def run_grid(
    setup: ResetZSetup = FULL,
    out: str | os.PathLike[str] = "data/results",
    *,
    workers: int = 1,
    progress: bool = True,
    report: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train every run of ``setup`` not already in ``<out>/<name>.csv`` (seed by seed), then write the
    CSV, the summary and the figure. Returns the rows (those of this setup, in grid order)."""
    from tqdm.auto import tqdm

    from corrtools.errors import CorrtoolsError

    if workers < 1:
        raise CorrtoolsError(f"--workers {workers} must be at least 1.")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{setup.name}.csv"
    key = setup.key()
    done = {_job_key(r["density"], r["z"], r["seed"]): r for r in _read_rows(csv_path) if r.get("setup") == key}
    grid = [(d, z, s) for d in setup.densities for z in setup.zs for s in setup.seeds]
    # trained seed by seed, so that an interrupted grid holds every configuration for its first seeds
    todo = [(setup, d, z, s) for s in setup.seeds for d in setup.densities for z in setup.zs
            if _job_key(d, z, s) not in done]
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc=setup.name, unit="run", disable=not progress)

    def keep(row: dict[str, Any]) -> None:
        done[_job_key(row["density"], row["z"], row["seed"])] = row
        _write_rows(csv_path, [done[k] for k in map(lambda g: _job_key(*g), grid) if k in done])
        bar.update(1)

    if workers == 1:
        _one_thread()
        for job in todo:
            keep(run_one(*job))
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_one_thread) as pool:
            for row in pool.map(_run_job, todo):
                keep(row)
    bar.close()
    rows = _outputs(setup, out_dir, [done[_job_key(*g)] for g in grid])
    report(f"{setup.name}: {len(grid)} runs ({len(todo)} trained now, {time.perf_counter() - start:.0f} s); "
           f"wrote {csv_path}, {setup.name}_summary.csv and {setup.name}.png")
    return rows


def _outputs(setup: ResetZSetup, out_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    _write_rows(out_dir / f"{setup.name}_summary.csv", summarize(rows))
    plot(rows, out_dir / f"{setup.name}.png", title=_title(setup, len({r["seed"] for r in rows})))
    return rows


def write_report(setup: ResetZSetup = FULL, out: str | os.PathLike[str] = "data/results") -> list[dict[str, Any]]:
    """The summary CSV and the figure from the rows of this setup that ``<out>/<name>.csv`` holds
    (e.g. of an interrupted grid), without training."""
    out_dir = Path(out)
    rows = [r for r in _read_rows(out_dir / f"{setup.name}.csv") if r.get("setup") == setup.key()]
    if not rows:
        from corrtools.errors import CorrtoolsError

        raise CorrtoolsError(f"{out_dir / (setup.name + '.csv')} holds no run of this setup; run the grid first.")
    return _outputs(setup, out_dir, rows)


def _title(setup: ResetZSetup, seeds: int) -> str:
    m = setup.model
    return (f"RESET interval z on the char LM (d_model {m.d_model}, {m.n_layer} blocks, {m.steps} steps, "
            f"{seeds} seed(s))")


def _f(v: Any) -> float:
    return math.nan if v in (None, "", "None") else float(v)


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (density, z) in grid order: n, mean, std (ddof 1), min, max of val_bpc, and for auto the
    chosen z (mean, min, max over seeds)."""
    import numpy as np

    groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((float(r["density"]), str(r["z"])), []).append(r)
    out = []
    for (d, z), rs in groups.items():
        v = np.array([_f(r["val_bpc"]) for r in rs])
        chosen = np.array([_f(r["z_chosen"]) for r in rs])
        out.append({
            "density": d, "z": z, "n": len(rs), "val_bpc_mean": float(v.mean()),
            "val_bpc_std": float(v.std(ddof=1)) if len(v) > 1 else math.nan,
            "val_bpc_min": float(v.min()), "val_bpc_max": float(v.max()),
            "z_chosen_mean": float(np.nanmean(chosen)) if np.isfinite(chosen).any() else math.nan,
            "z_chosen_min": float(np.nanmin(chosen)) if np.isfinite(chosen).any() else math.nan,
            "z_chosen_max": float(np.nanmax(chosen)) if np.isfinite(chosen).any() else math.nan,
        })
    return out


def plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = "") -> Any:
    """Validation bits per character against z (log axis), one line per density with mean ± std over
    seeds; "never" drawn at the right edge, auto z as a star at the mean z it chose (its horizontal bar:
    the range of z chosen over seeds)."""
    import numpy as np

    from corrtools.analysis.plot import _pyplot

    plt = _pyplot()
    summary = summarize(rows)
    fixed = sorted({int(s["z"]) for s in summary if s["z"] not in ("never", "auto")})
    never_x = (fixed[-1] if fixed else 1) * 10.0
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, d in enumerate(sorted({s["density"] for s in summary}, reverse=True)):
        color = f"C{i}"
        mine = [s for s in summary if s["density"] == d]
        line = sorted((int(s["z"]), s) for s in mine if s["z"] not in ("never", "auto"))
        pts = [(float(x), s) for x, s in line] + [(never_x, s) for s in mine if s["z"] == "never"]
        x = np.array([p for p, _ in pts])
        y = np.array([s["val_bpc_mean"] for _, s in pts])
        e = np.nan_to_num(np.array([s["val_bpc_std"] for _, s in pts]))
        ax.errorbar(x, y, yerr=e, color=color, marker="o", ms=4, capsize=3, lw=1.2, label=f"d = {d:g}")
        for s in mine:
            if s["z"] == "auto" and np.isfinite(s["z_chosen_mean"]):
                xe = [[s["z_chosen_mean"] - s["z_chosen_min"]], [s["z_chosen_max"] - s["z_chosen_mean"]]]
                ax.errorbar([s["z_chosen_mean"]], [s["val_bpc_mean"]], xerr=xe,
                            yerr=[[np.nan_to_num(s["val_bpc_std"])]] * 2, color=color, marker="*", ms=13,
                            mec="black", mew=0.6, capsize=3, lw=1, ls="none",
                            label=f"auto z, d = {d:g}")
    ax.set_xscale("log")
    ticks = fixed + [never_x]
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in fixed] + ["never"])
    ax.set_xlabel("RESET interval z (optimizer steps)")
    ax.set_ylabel("validation loss (bits per character)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return fig


def format_summary(summary: Sequence[dict[str, Any]]) -> str:
    """The summary as a Markdown table (for the README and notes)."""
    lines = ["| d | z | val bpc mean ± std (n) | min – max | auto z chosen |", "|---|---|---|---|---|"]
    for s in summary:
        chosen = ""
        if s["z"] == "auto" and math.isfinite(s["z_chosen_mean"]):
            chosen = f"{s['z_chosen_mean']:.0f} ({s['z_chosen_min']:.0f}–{s['z_chosen_max']:.0f})"
        lines.append(f"| {s['density']:g} | {s['z']} | {s['val_bpc_mean']:.4f} ± {s['val_bpc_std']:.4f} ({s['n']}) "
                     f"| {s['val_bpc_min']:.4f} – {s['val_bpc_max']:.4f} | {chosen} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny grid in seconds (what the tests run)")
    p.add_argument("--out", default="data/results", help="folder for the CSVs and the figure")
    p.add_argument("--workers", type=int, default=1, help="runs trained at once, one torch thread each")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report", action="store_true",
                   help="train nothing: write the summary and the figure from the rows the CSV holds")
    args = p.parse_args(argv)
    setup = QUICK if args.quick else FULL
    if args.report:
        rows = write_report(setup, args.out)
    else:
        rows = run_grid(setup, args.out, workers=args.workers, progress=not args.no_progress)
    print(format_summary(summarize(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
