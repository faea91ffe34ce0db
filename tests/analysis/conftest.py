"""A small run store written with the store module's RunWriter, shared by the analysis tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from corrtools.record.store import RunWriter

PARAMS = {"layer.a.weight": 40, "layer.b.weight": 30, "head.weight": 20}
T_STEPS = 240
EVERY = 5


def ar1_columns(T: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, n) float32 AR(1) trajectories with memories 1..~100 steps, and their final values."""
    rng = np.random.default_rng(seed)
    phi = np.linspace(0.0, 0.99, n)
    x = np.zeros((T, n))
    eps = rng.standard_normal((T, n))
    level = rng.normal(0.0, 1.0, n)  # offsets, so |final| varies with the column too
    for t in range(1, T):
        x[t] = phi * x[t - 1] + eps[t]
    x = (x * 0.01 + level * phi).astype(np.float32)
    return x, x[-1]


def write_store(path: Path, x: np.ndarray, names: list[str], every: int = EVERY, **chunks) -> Path:
    N = x.shape[1]
    index = np.concatenate([np.arange(names.count(p)) for p in dict.fromkeys(names)])
    w = RunWriter.create(path, param=names, index=index, initial=x[0], attrs={"every": every}, **chunks)
    for s in range(0, x.shape[0], 64):
        w.write_block(np.arange(s, min(s + 64, x.shape[0])) * every, x[s : s + 64])
    w.close(x[-1], x.shape[0] * every)
    return path


@pytest.fixture(scope="session")
def run_store(tmp_path_factory) -> tuple[Path, np.ndarray, list[str]]:
    """(path, values (T, N) float32, param name per column) of a complete store, chunk_weights 16."""
    names = [p for p, n in PARAMS.items() for _ in range(n)]
    x, _ = ar1_columns(T_STEPS, len(names), seed=0)
    path = write_store(tmp_path_factory.mktemp("store") / "run.zarr", x, names, chunk_steps=32, chunk_weights=16)
    return path, x, names


@pytest.fixture(autouse=True)
def _close_figures():
    """Figures made by a test are closed after it (plot functions return them open)."""
    yield
    import sys

    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")
