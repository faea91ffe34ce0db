"""The usage examples in docs/analysis.md run as written."""
from __future__ import annotations

import re
from pathlib import Path

from corrtools.record.store import run_info

from .conftest import write_store

NOTES = Path(__file__).resolve().parents[2] / "docs" / "analysis.md"


def test_notes_examples_run(run_store, tmp_path, monkeypatch) -> None:
    _, x, names = run_store
    path = str(write_store(tmp_path / "run.zarr", x, names))  # a fresh store: the example writes into it
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", NOTES.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {"path": path}
    for block in blocks:
        exec(compile(block, str(NOTES), "exec"), namespace)
    assert (tmp_path / "delta.png").exists() and (tmp_path / "rho.png").exists()
    assert "delta" in run_info(path)["groups"]
