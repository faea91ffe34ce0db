"""The RESET-interval experiment's quick mode: rows, summary, figure, cache, and its evaluation."""
from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F

from corrtools.experiments.reset_z import QUICK, evaluate_bpc, run_grid, summarize, write_report


@pytest.mark.filterwarnings("ignore:auto z")
def test_quick_grid_writes_rows_summary_and_figure(tmp_path) -> None:
    rows = run_grid(QUICK, tmp_path, progress=False, report=lambda _: None)
    grid = [(d, str(z), s) for d in QUICK.densities for z in QUICK.zs for s in QUICK.seeds]
    assert [(float(r["density"]), str(r["z"]), int(r["seed"])) for r in rows] == grid
    with open(tmp_path / "reset_z.quick.csv", newline="") as f:
        on_disk = list(csv.DictReader(f))
    assert len(on_disk) == len(grid) and all(r["setup"] == QUICK.key() for r in on_disk)
    by_z = {r["z"]: r for r in on_disk}
    auto = by_z["auto"]
    # auto chose z from its estimates (window 16: at step 16 and 48), clamped to [1, 8]
    assert [int(h.split(":")[0]) for h in auto["z_history"].split(";")] == [16, 48]
    assert 1 <= int(auto["z_chosen"]) <= 8 and by_z["never"]["z_chosen"] == "" and by_z["10"]["z_chosen"] == "10"
    for r in on_disk:
        assert 2.0 < float(r["val_bpc"]) < math.log2(100)  # trained a little: below a uniform guess
    summary = summarize(rows)
    assert [(s["density"], s["z"], s["n"]) for s in summary] == [(d, z, 1) for d, z, _ in grid]
    assert (tmp_path / "reset_z.quick.png").stat().st_size > 10_000
    assert (tmp_path / "reset_z.quick_summary.csv").exists()
    # the CSV is the cache: a second call trains nothing and returns the same rows
    calls = []
    again = run_grid(QUICK, tmp_path, progress=False, report=calls.append)
    assert "0 trained now" in calls[0] and [r["val_bpc"] for r in again] == [r["val_bpc"] for r in on_disk]
    # --report: from a partial CSV (an interrupted grid), the summary of what is there
    with open(tmp_path / "reset_z.quick.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(on_disk[0]))
        w.writeheader()
        w.writerows(on_disk[:2])
    partial = write_report(QUICK, tmp_path)
    assert [s["z"] for s in summarize(partial)] == [str(z) for z in QUICK.zs[:2]]


def test_evaluate_bpc_matches_window_by_window() -> None:
    from corrtools.workloads import CharLMWorkload

    wl = CharLMWorkload(QUICK.model)
    got = evaluate_bpc(wl, 10, batch=4)
    T, tokens = wl.cfg.seq_len, wl.val_tokens
    starts = torch.linspace(0, len(tokens) - T - 2, 10).long()
    with torch.no_grad():
        ref = [F.cross_entropy(wl.model(tokens[s : s + T][None]).reshape(T, -1), tokens[s + 1 : s + T + 1]).item()
               for s in starts.tolist()]
    assert got == pytest.approx(sum(ref) / len(ref) / math.log(2), rel=1e-5)


def test_workers_must_be_positive_and_report_needs_rows(tmp_path) -> None:
    from corrtools.errors import CorrtoolsError

    with pytest.raises(CorrtoolsError, match="--workers 0"):
        run_grid(QUICK, tmp_path, workers=0)
    with pytest.raises(CorrtoolsError, match="holds no run of this setup"):
        write_report(QUICK, tmp_path)
