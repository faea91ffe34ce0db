"""`corrtools experiment` in quick mode: rows, cache and resume, CSV and plot; workloads; notebooks."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from corrtools.errors import CorrtoolsError
from corrtools.experiments import EXPERIMENTS, RunSpec, run_experiment, train
from corrtools.experiments.paper import FULL_STEPS, gap_fraction
from corrtools.experiments.runner import fig9_table
from corrtools.sparse.config import Structure
from corrtools.sparse.selection import select_layers

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("fig1", "fig2", "fig3", "fig4", "table2", "table3", "fig9")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Every experiment run once in quick mode into one folder (fig9 reuses fig4's cached runs)."""
    out = tmp_path_factory.mktemp("results")
    return out, {n: run_experiment(n, quick=True, out=out, progress=False) for n in NAMES}


def test_quick_rows_csv_and_plot(quick):
    out, res = quick
    for name in NAMES:
        r = res[name]
        assert r.csv == out / f"{name}.quick.csv" and r.plot.stat().st_size > 10_000
        df = pd.read_csv(r.csv)
        assert (df["mode"] == "quick").all() and (df.experiment == name).all()
        if name == "fig9":
            continue
        specs = EXPERIMENTS[name].specs(True, 1, 1.0)
        if name != "fig1":
            assert len(df) == len(specs)  # one row per run
            for col in ("workload", "method", "density", "structure", "seed", "steps", "wall_s", "error"):
                assert df[col].notna().all(), col
            assert (df.steps == 20).all()
    assert res["fig9"].trained == 0  # all of fig4's runs came from the cache


def test_interrupted_experiment_resumes_from_cache(quick):
    out, res = quick
    spec = EXPERIMENTS["table2"].specs(True, 1, 1.0)[1]
    (out / "cache" / f"{spec.key()}.json").unlink()  # as if the run had been killed before it ended
    partial = run_experiment("table2", quick=True, out=out, cached_only=True, progress=False)
    assert (partial.missing, partial.trained, len(partial.rows)) == (1, 0, len(res["table2"].rows) - 1)
    again = run_experiment("table2", quick=True, out=out, progress=False)
    assert again.trained == 1
    pd.testing.assert_frame_equal(again.rows.drop(columns="wall_s"), res["table2"].rows.drop(columns="wall_s"))


def test_run_rows_and_counts(quick):
    _, res = quick
    df = res["fig4"].rows
    digits = df[df.workload == "digits"]
    dense_n = int(digits[digits.method == "dense"].sparse_layer_weights.iloc[0])
    for r in digits.itertuples():
        if r.method in ("sparse", "set", "rigl", "lottery"):
            assert r.participating_weights / r.sparse_layer_weights == pytest.approx(r.density, abs=2e-3)
        if r.method == "small":  # SMALL holds about d of the sparsifiable weights
            assert r.sparse_layer_weights / dense_n == pytest.approx(r.density, rel=0.1)
    charlm = df[df.workload == "charlm"]
    dense_c = int(charlm[charlm.method == "dense"].sparse_layer_weights.iloc[0])
    for r in charlm[charlm.method == "small"].itertuples():
        assert r.sparse_layer_weights / dense_c == pytest.approx(r.density, rel=0.15)
    t2 = res["table2"].rows
    assert (t2[t2.method != "dense"].participating_weights * 2 == t2[t2.method != "dense"].sparse_layer_weights).all()


def test_fig9_is_the_gap_formula(quick):
    _, res = quick
    f = res["fig9"].rows
    fig4 = res["fig4"].rows
    row = f.iloc[0]
    sel = fig4[(fig4.workload == row.workload) & (fig4.seed == row.seed)]
    es = float(sel[(sel.method == "small") & (sel.density == row.density)].error.iloc[0])
    ep = float(sel[(sel.method == "sparse") & (sel.density == row.density)].error.iloc[0])
    ed = float(sel[sel.method == "dense"].error.iloc[0])
    assert row.f == pytest.approx((es - ep) / (es - ed))
    assert math.isnan(gap_fraction(0.3, 0.2, 0.3))
    assert len(fig9_table(fig4)) == len(f)


def test_scales_per_workload():
    from corrtools.commands.experiment import _scale
    from corrtools.experiments.paper import steps_for

    assert _scale(["0.5"]) == 0.5 and _scale(["charlm=0.25", "digits=1"]) == {"charlm": 0.25, "digits": 1.0}
    with pytest.raises(CorrtoolsError, match="--scale"):
        _scale(["fast"])
    specs = EXPERIMENTS["table2"].specs(False, 1, {"charlm": 0.25})
    assert {(s.workload, s.steps) for s in specs} == {("digits", FULL_STEPS["digits"]),
                                                      ("charlm", round(FULL_STEPS["charlm"] / 4))}
    assert steps_for("digits", True, 0.1) == 20


def test_train_is_seeded_and_specs_are_validated():
    spec = RunSpec(workload="digits", method="rigl", steps=20, size="quick", density=0.25, seed=3)
    a, b = train(spec), train(spec)
    assert a["error"] == b["error"] and a["train_loss"] == b["train_loss"]
    assert spec.key() == RunSpec(**spec.to_dict()).key() and len(spec.key()) == 16
    with pytest.raises(CorrtoolsError, match="method"):
        RunSpec(workload="digits", method="magic", steps=10)
    with pytest.raises(CorrtoolsError, match="Unknown experiment"):
        run_experiment("fig7", quick=True, progress=False)


def test_digits_split_fixed_and_small_widths():
    from corrtools.workloads.digits import DigitsConfig, DigitsWorkload

    a, b = DigitsWorkload(DigitsConfig(seed=0, steps=1)), DigitsWorkload(DigitsConfig(seed=5, steps=1))
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)
    assert a.x_test.shape == (597, 1, 8, 8) and len(a.x_train) == 1200
    assert not torch.equal(a.model.conv2.weight, b.model.conv2.weight)
    nm = Structure.parse("2:4")
    chosen = select_layers(a.model, lambda n, m: nm, None, None)  # the default: conv1 (1 channel) stays dense
    assert [sel.name for sel in chosen] == ["conv2.weight", "conv3.weight", "fc.weight"]
    assert all(m.in_channels % 16 == 0 for sel in chosen for m in sel.modules if isinstance(m, torch.nn.Conv2d))

    def count(model):
        return sum(model.get_parameter(sel.name).numel() for sel in chosen)

    dense = count(a.model)
    for d in (0.5, 0.25, 0.1):
        small = DigitsWorkload(DigitsConfig(steps=1).small(d))
        assert count(small.model) / dense == pytest.approx(d, rel=0.12)


def test_cli_experiment(quick, capsys):
    from corrtools.cli import main

    out, _ = quick
    assert main(["experiment", "fig9", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert "density" in capsys.readouterr().out
    assert main(["experiment", "fig4", "--quick", "--seeds", "0", "--out", str(out), "--no-progress"]) == 2
    assert main(["experiment", "table3", "--quick", "--workload", "digits", "--out", str(out), "--no-progress"]) == 2
    digits = run_experiment("fig9", quick=True, out=out, workloads=["digits"], progress=False)
    assert set(digits.rows.workload) == {"digits"} and digits.trained == 0


NOTEBOOKS = ("fig1", "fig2", "fig3", "fig4_table1", "table2", "table3", "fig9")


def test_notebooks_execute(quick, monkeypatch):
    """Every notebook runs against the committed results (the quick run where none are committed).

    The notebooks' cells are executed in order in one kernel (one start and one import of torch and
    pandas instead of seven), each notebook's first cell setting where it reads from.
    """
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    out, _ = quick
    combined = nbformat.v4.new_notebook()
    sections = []
    for stem in NOTEBOOKS:
        name = "fig4" if stem == "fig4_table1" else stem
        committed = (ROOT / "data" / "results" / f"{name}.csv").exists()
        env = (f"os.environ['CORRTOOLS_RESULTS'] = {str(ROOT / 'data' / 'results')!r}; "
               "os.environ['CORRTOOLS_QUICK'] = '0'") if committed else (
               f"os.environ['CORRTOOLS_RESULTS'] = {str(out)!r}; os.environ['CORRTOOLS_QUICK'] = '1'")
        nb = nbformat.read(ROOT / "notebooks" / f"{stem}.ipynb", as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code, stem
        start = len(combined.cells)
        combined.cells.append(nbformat.v4.new_code_cell("import os; " + env))
        combined.cells += code
        sections.append((stem, start, len(combined.cells)))
    nbclient.NotebookClient(combined, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    for stem, a, b in sections:
        text = json.dumps([c.get("outputs", []) for c in combined.cells[a:b]])
        assert "image/png" in text and "seed(s) per configuration" in text, stem


def test_sparse_chooses_z_from_delta_with_a_window_scaled_to_the_run():
    from corrtools.experiments.runs import auto_z_config

    spec = EXPERIMENTS["fig4"].specs(False, 1, 1.0)
    sparse = [s for s in spec if s.method == "sparse"]
    assert sparse and all(s.z == "auto" for s in sparse)
    cfg = auto_z_config(2000)
    assert (cfg.window, cfg.reestimate_every, cfg.warmup) == (500, 1000, 500)  # estimates at T/4 and 3T/4
    row = train(RunSpec(workload="digits", method="sparse", steps=50, size="quick", density=0.5, z="auto"))
    steps = [int(e.split(":")[0]) for e in row["z_estimates"].split(";")]
    assert steps == [16, 48]  # window max(16, 50 // 4) = 16: first estimate at 16, again 2 * 16 steps later
    assert 1 <= row["z_used"] <= 8


def test_within_half_percent_verdict_separates_held_failed_and_unsettled():
    from corrtools.experiments.report import _within_verdict

    assert _within_verdict("digits", 0.074, 0.002, 0.070, 0.002) == "held"  # 0.4 points: inside the band
    assert _within_verdict("digits", 0.090, 0.003, 0.070, 0.002) == "did not hold"  # 2 points, spread 0.3
    assert _within_verdict("digits", 0.080, 0.008, 0.070, 0.002).startswith("not settled")  # 1 point, spread 0.8
    assert _within_verdict("charlm", 2.32, 0.001, 2.30, 0.001) == "did not hold"  # band 0.0115 bits/char
    assert _within_verdict("charlm", 2.31, 0.001, 2.30, 0.001) == "held"
