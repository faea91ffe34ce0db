"""The sparse benchmarks' quick modes run and print lines that parse."""
from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=None)  # each script's quick mode runs once per session
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


def test_sparse_step_quick_prints_the_cost_of_auto_z():
    out = _run("sparse_step.py")
    fixed = re.search(r"^RESET z=100 d=0.25\s+([\d.]+) ms/step$", out, re.M)
    auto = re.search(r"^RESET auto d=0.25\s+([\d.]+) ms/step\s+([\d.]+)x fixed z while gathering$", out, re.M)
    est = re.search(r"^auto z estimate: ([\d.]+) ms per estimate \(window 64 steps x (\d+) sampled weights\)$", out, re.M)
    share = re.search(r"^auto z share of step time over a run: ([\d.]+)% \(gathering in 64 of every 512 steps", out, re.M)
    assert fixed and auto and est and share
    assert float(est.group(1)) > 0 and int(est.group(2)) > 0 and float(share.group(1)) >= 0
