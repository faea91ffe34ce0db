"""The `corrtools` command as a user runs it: subcommands listed, the demo end to end."""
import subprocess
import sys

import numpy as np
import pytest

from corrtools import open_run
from corrtools.cli import main


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("demo", "info", "delta", "rho"):
        assert name in out


def test_demo_records_a_run_and_draws_its_plot(tmp_path, capsys):
    store, plot = tmp_path / "d.zarr", tmp_path / "d.png"
    rc = main(["demo", "-o", str(store), "--steps", "40", "--sample", "64", "--plot", str(plot),
               "--param", "blocks.0.mlp.fc1.weight", "--param", "head.weight", "--no-progress"])
    assert rc == 0
    ds = open_run(store)
    assert ds.attrs["status"] == "complete"
    assert ds["step"].values.tolist() == list(range(1, 41))
    assert sorted(set(ds["param"].values.tolist())) == ["blocks.0.mlp.fc1.weight", "head.weight"]
    assert ds["values"].shape == (40, 128)
    assert np.isfinite(ds["loss"].values).all()  # the demo logs every step's loss
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "blocks.0.mlp.fc1.weight" in out and f"drew {plot}" in out


def test_bad_plot_path_fails_before_training(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "corrtools.cli", "demo", "-o", str(tmp_path / "r.zarr"),
                           "--plot", str(tmp_path / "x.bmp"), "--no-progress"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "r.zarr").exists()
