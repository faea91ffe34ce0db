"""benchmarks/recorder_overhead.py --quick runs and prints a parseable table."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_recorder_overhead_quick_prints_table():
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "recorder_overhead.py"), "--quick"],
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    rows = dict()
    for line in out.stdout.splitlines():
        m = re.fullmatch(r"(\w+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", line.strip())
        if m:
            rows[m.group(1)] = (int(m.group(2)), float(m.group(3)), float(m.group(4)))
    assert set(rows) == {"none", "recorder_1e4", "recorder_1e5", "naive_1e5"}
    assert rows["none"][2] == 1.0 and all(r[1] > 0 for r in rows.values())
    assert rows["recorder_1e5"][0] == rows["naive_1e5"][0] > rows["recorder_1e4"][0] > 0
    assert re.search(r"naive/recorder overhead at 1e5: ([\d.]+|inf)x", out.stdout)
