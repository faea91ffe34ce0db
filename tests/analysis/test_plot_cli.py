"""Figures, the printed table, and the `corrtools delta` / `corrtools rho` commands."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import corrtools.cli as cli
from corrtools.analysis.delta import delta_by_magnitude, rho_by_magnitude
from corrtools.analysis.plot import format_table, plot_delta, plot_rho, removable_threshold
from corrtools.errors import CorrtoolsError

ROOT = Path(__file__).resolve().parents[2]
MAGIC = {".png": b"\x89PNG", ".pdf": b"%PDF", ".svg": b"<?xml"}


@pytest.fixture(scope="module")
def res(run_store):
    return delta_by_magnitude(run_store[0], bins=4, progress=False)


@pytest.mark.parametrize("ext", [".png", ".svg", ".pdf"])
def test_plot_delta_writes_each_format(res, tmp_path, ext) -> None:
    out = tmp_path / f"delta{ext}"
    fig = plot_delta(res, out, density=0.5)
    assert out.read_bytes().startswith(MAGIC[ext])
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == res.sizes["param"]
    assert all(ax.get_xscale() == "log" for ax in panels)
    assert all(any(p.get_label().startswith("removable") for p in ax.patches) for ax in panels)


def test_removable_threshold_is_the_quantile(run_store, res) -> None:
    _, x, names = run_store
    thr = removable_threshold(res, 0.25)
    for i, p in enumerate(res["param"].values):
        mags = np.abs(x[-1, [j for j, n in enumerate(names) if n == p]])
        assert float(thr[i]) == pytest.approx(np.quantile(mags, 0.75), rel=0.02)


def test_plot_rho(run_store, tmp_path) -> None:
    r = rho_by_magnitude(run_store[0], bins=3, n_lags=12, progress=False)
    fig = plot_rho(r, tmp_path / "rho.png")
    assert (tmp_path / "rho.png").read_bytes().startswith(MAGIC[".png"])
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 3


def test_bad_figure_path(res, tmp_path) -> None:
    with pytest.raises(CorrtoolsError, match="end the file name"):
        plot_delta(res, tmp_path / "delta.gif")
    with pytest.raises(CorrtoolsError, match="does not exist"):
        plot_delta(res, tmp_path / "nope" / "delta.png")
    with pytest.raises(CorrtoolsError, match="density"):
        plot_delta(res, None, density=1.5)


def test_format_table(res) -> None:
    text = format_table(res).splitlines()
    assert text[0].startswith("# Δ by final |w|") and "median Δ" in text[1]
    assert len(text) == 2 + res.sizes["param"] * res.sizes["bin"]


def _main(monkeypatch, argv: list[str]) -> int:
    monkeypatch.setattr(cli, "_COMMANDS", ("delta", "rho"))  # demo/info live on other branches
    return cli.main(argv)


def test_cli_delta(run_store, tmp_path, monkeypatch, capsys) -> None:
    path = str(run_store[0])
    png, table = tmp_path / "d.png", tmp_path / "d.csv"
    rc = _main(monkeypatch, ["delta", path, "-o", str(png), "--bins", "3", "--window", "0.5:1",
                             "--param", "head.weight", "--csv", str(table), "--no-progress"])
    assert rc == 0 and png.exists()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# Δ by final |w|") and len(out) == 2 + 3
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 3 and {r["param"] for r in rows} == {"head.weight"}
    rc = _main(monkeypatch, ["delta", path, "-o", str(tmp_path / "d.svg"), "--json", "--detrend", "diff",
                             "--no-progress"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["attrs"]["detrend"] == "diff" and len(data["rows"]) == 3 * 10


@pytest.mark.parametrize(
    "argv, message",
    [
        (["delta", "{missing}"], "no run store"),
        (["delta", "{tmp}"], "not a corrtools run store"),
        (["delta", "{store}", "--param", "layer.c.weight"], "did you mean"),
        (["delta", "{store}", "--window", "0.99:1"], "Δ needs at least 3"),
        (["delta", "{store}", "--window", "half"], "START:END"),
        (["delta", "{store}", "-o", "x.gif"], "end the file name"),
        (["rho", "{store}", "--window", "0.5:0.2"], "start < end"),
    ],
)
def test_cli_errors_are_one_line(run_store, tmp_path, monkeypatch, capsys, argv, message) -> None:
    subs = {"{missing}": str(tmp_path / "missing.zarr"), "{tmp}": str(tmp_path), "{store}": str(run_store[0])}
    argv = [subs.get(a, a) for a in argv] + ["--no-progress"]
    monkeypatch.chdir(tmp_path)
    rc = _main(monkeypatch, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_cli_rho(run_store, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "r.pdf"
    rc = _main(monkeypatch, ["rho", str(run_store[0]), "-o", str(out), "--bins", "2", "--lags", "8",
                             "--no-progress"])
    assert rc == 0 and out.read_bytes().startswith(MAGIC[".pdf"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("param\tbin\tn\tτ=") and len(lines) == 2 + 3 * 2


def test_benchmark_quick_mode_runs_and_parses() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "analysis_throughput.py"), "--quick", "--threads", "1,2",
         "--rounds", "1"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith("delta_by_magnitude end to end") for line in lines)
    result = json.loads(lines[-1])
    assert result["weight_steps_per_s"] > 0 and result["naive_weight_steps_per_s"] > 0
    assert result["peak_rss_bytes"] > 0
    assert result["max_abs_delta_diff"] < 1e-2  # the naive loop finds the same Δ
    assert set(result["by_threads"]) == {"1", "2"}
    assert all(r["weight_steps_per_s"] > 0 and r["peak_rss_bytes"] > 0 for r in result["by_threads"].values())
    assert sum(line.lstrip().startswith("threads=") for line in lines) == 2
