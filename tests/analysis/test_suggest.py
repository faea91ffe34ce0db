"""suggest_z and `corrtools delta --suggest-z` against a brute-force reference, and censored_quantile."""
from __future__ import annotations

import doctest
import json

import numpy as np
import pytest

import corrtools.analysis.suggest as suggest_mod
from corrtools.analysis import suggest_z
from corrtools.analysis.magnitude import binned_median, censored_quantile
from corrtools.cli import main
from corrtools.errors import CorrtoolsError

from .conftest import EVERY, PARAMS


def _reference(x: np.ndarray, names: list[str], density: float) -> tuple[dict[str, float], float]:
    """Per layer and pooled median Δ (optimizer steps) of the weights below the (1 - d) quantile of
    final |w|: Δ from np.corrcoef lag by lag, censored at T // 2."""
    T = x.shape[0]
    max_lag = T // 2

    def delta(col: np.ndarray) -> float:
        prev = 1.0
        for tau in range(1, max_lag + 1):
            r = np.corrcoef(col[: T - tau], col[tau:])[0, 1]
            if r <= 0:
                return (tau - 1) + prev / (prev - r)
            prev = r
        return float(max_lag)

    names_arr = np.array(names)
    mag = np.abs(x[-1].astype(np.float64))
    per, pooled = {}, []
    for p in dict.fromkeys(names):
        sel = np.nonzero(names_arr == p)[0]
        thr = np.quantile(mag[sel], 1 - density)
        ds = [delta(x[:, j].astype(np.float64)) * EVERY for j in sel if mag[j] < thr]
        per[p] = float(np.median(ds))
        pooled += ds
    return per, float(np.median(pooled))


def test_suggest_z_matches_brute_force(run_store) -> None:
    path, x, names = run_store
    res = suggest_z(path, density=0.25)
    per, pooled = _reference(x, names, 0.25)
    assert list(res["param"].values) == list(PARAMS)
    np.testing.assert_allclose(res["z"].values, [per[p] for p in PARAMS], rtol=1e-3)
    assert float(res["z_all"]) == pytest.approx(pooled, rel=1e-3)
    assert int(res["n_weights_all"]) == int(res["n_weights"].sum())
    assert res["n_weights"].values.tolist() == [30, 22, 15]  # below the 75% quantile of 40, 30, 20
    assert res.attrs["density"] == 0.25 and res["z"].attrs["units"] == "optimizer steps"
    # a smaller density leaves out more weights, larger ones among them
    assert int(suggest_z(path, density=0.1)["n_weights_all"]) > int(res["n_weights_all"])


def test_suggest_z_refuses_bad_input(run_store) -> None:
    path, _, _ = run_store
    for d in (0.0, 1.0, 1.5, True):
        with pytest.raises(CorrtoolsError, match="density"):
            suggest_z(path, density=d)
    with pytest.raises(CorrtoolsError, match="quantile"):
        suggest_z(path, density=0.5, quantile=1.0)


def test_cli_suggest_z(run_store, tmp_path, capsys) -> None:
    path, x, names = run_store
    csv_path = tmp_path / "z.csv"
    assert main(["delta", str(path), "--suggest-z", "--density", "0.25", "--no-progress",
                 "--csv", str(csv_path), "-o", str(tmp_path / "never.png")]) == 0
    out = capsys.readouterr().out
    per, pooled = _reference(x, names, 0.25)
    lines = out.strip().splitlines()
    assert lines[0].startswith("# suggested RESET interval z at density 0.25")
    assert lines[-1].split()[0] == "all" and lines[-1].split()[-1].lstrip("≥") == f"{pooled:.0f}"
    assert not (tmp_path / "never.png").exists()  # no figure with --suggest-z
    assert csv_path.read_text().splitlines()[0] == "param,z,n_weights,censored_fraction,lower_bound,threshold"
    assert main(["delta", str(path), "--suggest-z", "--density", "0.25", "--no-progress", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["param"] for r in rows] == [*PARAMS, "all"]
    assert rows[-1]["z"] == pytest.approx(pooled, rel=1e-3)


def test_cli_suggest_z_bad_density(run_store, capsys) -> None:
    path, _, _ = run_store
    assert main(["delta", str(path), "--suggest-z", "--density", "1"]) == 2
    assert "--density 1.0 must lie in (0, 1)" in capsys.readouterr().err


def test_censored_quantile_rule_matches_brute_force() -> None:
    """A quantile is a lower bound exactly when moving the censored values up would change it."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 12))
        q = float(rng.choice([0.25, 0.5, 0.75]))
        cens = rng.random(n) < rng.random()
        d = np.where(cens, 10.0, rng.uniform(0, 10, n))
        value, cfrac, lower, count = censored_quantile(d, cens, q)
        moved = np.quantile(np.where(cens, 1e6, d), q)
        assert lower == (moved != value) and count == n and cfrac == pytest.approx(cens.mean())
        assert value == pytest.approx(np.quantile(d, q))


def test_binned_median_still_uses_the_same_rule() -> None:
    s = binned_median([1.0, 9.0, 9.0, 2.0, 3.0, 9.0], [0, 1, 1, 0, 0, 1], [0, 0, 0, 1, 1, 1], 2)
    assert s.median.tolist() == [9.0, 3.0] and s.median_censored.tolist() == [True, False]
    assert censored_quantile([np.nan], [False]) [3] == 0
    with pytest.raises(CorrtoolsError, match="q=2"):
        censored_quantile([1.0], [False], 2)


def test_docstring_examples_run() -> None:
    assert doctest.testmod(suggest_mod).attempted > 0 and doctest.testmod(suggest_mod).failed == 0
