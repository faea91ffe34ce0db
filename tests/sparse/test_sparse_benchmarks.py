"""The sparse benchmarks' quick modes run and print lines that parse."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )
    return done.stdout


def test_sparse_step_quick_prints_ratios_and_throughput():
    out = _run("sparse_step.py")
    rows = re.findall(r"^(.+?)\s+([\d.]+) ms/step\s+([\d.]+)x dense\s+\(Sparsifier\.step\s+([\d.]+) ms\)$", out, re.M)
    assert [name.strip() for name, *_ in rows] == ["dense", "unstructured d=0.25 r=1", "unstructured uniform", "2:4-2d r=1"]
    assert float(rows[0][2]) == 1.0 and all(float(ms) > 0 for _, ms, _, _ in rows)
    rate = re.search(r"^nm_mask_2d (\d+)x\1 float32: [\d.]+ ms, ([\d.e+]+) weights/s$", out, re.M)
    assert rate is not None and float(rate.group(2)) > 0


def test_semi_structured_quick():
    out = _run("semi_structured.py")
    if not torch.cuda.is_available():
        assert out.strip() == "no CUDA device"
    else:
        assert re.search(r"speed-up\s+[\d.]+x", out) or "no Sparse Tensor Cores" in out
