"""benchmarks/recorder_overhead.py --quick runs and prints a parseable table, for both workloads."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _run_benchmark(*args: str) -> subprocess.CompletedProcess:
    """benchmarks/recorder_overhead.py --quick ARGS in a clean environment; its exit status must be 0."""
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "recorder_overhead.py"), "--quick", *args],
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return out


@pytest.mark.parametrize("workload", ["charlm", "mlp"])
def test_recorder_overhead_quick_prints_table(workload):
    out = _run_benchmark("--workload", workload)
    rows = dict()
    num = r"(-?[\d.]+)"
    for line in out.stdout.splitlines():
        m = re.fullmatch(rf"(\w+)\s+(\d+)\s+{num}\s+(-|[+-][\d.]+%)\s+(-|[+-][\d.]+\.\.[+-][\d.]+%)\s+{num}"
                         rf"\s+{num}\s+(-|\d+)\s+(-|\d+)\s+(\d+)", line.strip())
        if m:
            rows[m.group(1)] = (int(m.group(2)), float(m.group(3)), m.group(4), m.group(8), m.group(9), m.group(5),
                                int(m.group(10)))
    assert set(rows) == {"none", "none_check", "recorder_1e4", "recorder_1e5", "naive_1e5"}
    assert rows["none"][2] == "-" and all(r[1] > 0 for r in rows.values())
    # every other mode: its mean overhead lies inside its own bootstrap interval
    for mode in ("none_check", "recorder_1e4", "recorder_1e5", "naive_1e5"):
        lo, hi = (float(v) for v in rows[mode][5].rstrip("%").split(".."))
        assert lo <= float(rows[mode][2].rstrip("%")) <= hi
    assert rows["recorder_1e5"][0] == rows["naive_1e5"][0] > rows["recorder_1e4"][0] > 0
    # the Recorder's own per-step work and its writer's CPU per row are reported, naive's are not
    assert int(rows["recorder_1e5"][3]) > 0 and int(rows["recorder_1e5"][4]) > 0 and rows["naive_1e5"][3] == "-"
    if workload == "mlp":  # 10^4 weights split evenly over the three matrices: 3334 each, rounded up
        # to whole runs of 16 and to the default layout's stride (MLP 64-128-128-64: weights (out, in))
        from corrtools.record.sampling import sample_indices

        shapes = {"0.weight": (128, 64), "2.weight": (128, 128), "4.weight": (64, 128)}
        want = sum(len(sample_indices(a * b, 3334, 0, name, row=b)) for name, (a, b) in shapes.items())
        assert 3 * 3334 <= rows["recorder_1e5"][0] == want
    assert re.search(rf"overhead {workload} recorder_1e5: -?[\d.]+%", out.stdout)
    assert re.search(r"naive/recorder overhead at 1e5: ([\d.]+|inf)x", out.stdout)
    assert rows["none_check"][0] == 0 and rows["none_check"][3] == "-"
    for mode in ("recorder_1e4", "recorder_1e5"):  # hook mean + writer CPU per row, and their sum
        m = re.search(rf"accounted {mode}: hook (\d+) us \(mean; median (\d+)\) \+ writer (\d+) us CPU per row = "
                      rf"(\d+) us per step = ([\d.]+)% of a no-recorder step \(measured: -?[\d.]+%\)", out.stdout)
        assert m, mode
        hook_mean, hook_median, writer, total = (int(m.group(i)) for i in range(1, 5))
        assert hook_median == int(rows[mode][3]) and writer == int(rows[mode][4])
        assert hook_mean > 0 and abs(hook_mean + writer - total) <= 1
        share = total / (rows["none"][1] * 1e3) * 100  # of the printed no-recorder step: rounding only
        assert share == pytest.approx(float(m.group(5)), rel=0.02, abs=0.01)
        # the writer's wait at block ends: its CPU is charged, not its wall time; charging the wall
        # time (the earlier estimator) can only read higher
        w = re.search(rf"writer wait {mode}: ([\d.]+) ms wall per block \(max ([\d.]+)\), of which ([\d.]+) ms "
                      rf"writer CPU \(charged\); with the wall time charged instead \(the estimator before issue "
                      rf"9's sixth pass\): (-?[\d.]+)%", out.stdout)
        assert w, mode
        assert float(w.group(3)) <= float(w.group(1)) + 0.01 and float(w.group(1)) <= float(w.group(2)) + 0.01
        assert float(w.group(4)) >= float(rows[mode][2].rstrip("%")) - 0.1
    assert re.search(r"gc \(set-up heap frozen\): (no collections|\d+ collections during the measured blocks, longest "
                     r"[\d.]+ ms \(generation [012], \w+\); ms per mode: )", out.stdout)
    assert re.search(r"resolution: none_check \(no recorder, measured like the others\) [+-][\d.]+% "
                     r"\[[+-][\d.]+, [+-][\d.]+\]", out.stdout)
    assert re.search(r"spill onto the next no-recorder block \(least squares over every block, none_check's spill "
                     r"= 0\): after recorder_1e4 [+-][\d.]+% \[[+-][\d.]+, [+-][\d.]+\], after recorder_1e5 "
                     r"[+-][\d.]+% \[[+-][\d.]+, [+-][\d.]+\]; none_check's own [+-][\d.]+% \(should read 0\)",
                     out.stdout)
    charged = re.search(r"overhead with the spill charged \(own \+ spill; a wider interval\): recorder_1e4 "
                        r"([+-][\d.]+)% \[([+-][\d.]+), ([+-][\d.]+)\], recorder_1e5 ([+-][\d.]+)% "
                        r"\[([+-][\d.]+), ([+-][\d.]+)\]", out.stdout)
    assert charged
    for g in (1, 4):  # nothing about the quick run's size forces the estimate inside its interval, but a
        # bootstrap interval far from its estimate would mean the resampling is wrong
        est, lo, hi = (float(charged.group(g + i)) for i in range(3))
        assert lo <= hi and lo - 5 <= est <= hi + 5


def test_recorder_overhead_save_reproduces_the_printed_overheads(tmp_path):
    """--save keeps every block in the order measured: the printed overheads and hook medians follow
    from the saved blocks alone (the blocks' summed time over the summed means of their two
    no-recorder neighbours)."""
    saved = tmp_path / "blocks.npz"
    out = _run_benchmark("--workload", "mlp", "--save", str(saved))
    d = np.load(saved)
    mode, step_s, n_main = d["mode"], d["step_s"], int(d["n_main"])
    assert len(mode) == len(step_s) == len(d["cpu_s"]) == len(d["steal_s"]) == len(d["start_s"])
    assert np.all(np.diff(d["start_s"]) > 0) and np.all(step_s > 0)
    assert all(mode[i] == "none" for i in range(0, n_main, 2))  # every measured block between two nones
    for m in ("none_check", "recorder_1e4", "recorder_1e5"):
        i = np.flatnonzero(mode[:n_main] == m)
        mine = step_s[i].sum() / ((step_s[i - 1] + step_s[i + 1]) / 2).sum() - 1
        printed = re.search(rf"^{m}\s+\d+\s+[\d.]+\s+([+-][\d.]+)%", out.stdout, re.M)
        assert printed, m
        assert mine * 100 == pytest.approx(float(printed.group(1)), abs=0.051)
    for m in ("recorder_1e4", "recorder_1e5"):
        hook_us = int(re.search(rf"^{m}\s+\d+\s+.*?(\d+)\s+(\d+)\s+(\d+)$", out.stdout, re.M).group(1))
        assert len(d[f"hook_s_{m}"]) == 2 * 10  # quick: 2 rounds x 10 steps
        assert abs(np.median(d[f"hook_s_{m}"]) * 1e6 - hook_us) <= 0.5


def test_recorder_overhead_settle_pauses_after_every_block(tmp_path):
    """--settle MS ends every block, with or without a recorder, with the same pause of at least MS ms,
    counted from the end of the block's steps; the pause is not charged to the block."""
    saved = tmp_path / "blocks.npz"
    out = _run_benchmark("--workload", "mlp", "--settle", "60", "--save", str(saved))
    m = re.search(r"settle: every block ended with a 60 ms pause; (\d+) of (\d+) waits ran past it "
                  r"\(max by ([\d.]+) ms\)", out.stdout)
    assert m
    d = np.load(saved)
    start, step_s, block = d["start_s"], d["step_s"], int(d["block"])
    assert int(m.group(2)) == len(start)
    # from one block's start to the next: its steps (its printed time, which may include up to a
    # few ms of writer CPU in the quick run) and then the pause, which is not in the block's time
    gap = np.diff(start) - step_s[:-1] * block
    assert np.all(gap >= 0.060 - 0.005), gap.min()


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("recorder_overhead", REPO / "benchmarks" / "recorder_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spill_fit_recovers_known_own_and_spill_costs_where_the_neighbour_ratio_does_not():
    """A synthetic run in the benchmark's order (rotated rounds, every measured block between two
    no-recorder blocks) with known costs: a block's own excess, and an excess of the no-recorder block
    right after it (the spill), on a drifting, noisy step time. The least-squares fit recovers both;
    the neighbour ratio reads the 10^5 mode low by more than its spill."""
    bench = _benchmark_module()
    slots = ["none_check", "recorder_1e4", "recorder_1e5"]
    own = {"none_check": 0.0, "recorder_1e4": 0.005, "recorder_1e5": 0.02}
    spill = {"none_check": 0.0, "recorder_1e4": 0.001, "recorder_1e5": 0.006}
    mode = ["none"]
    for r in range(400):
        for m in slots[r % 3:] + slots[: r % 3]:
            mode += [m, "none"]
    rng = np.random.default_rng(1)
    n = len(mode)
    y = np.cumsum(rng.normal(0, 0.003, n)) + 0.1 * np.sin(np.arange(n) / 50) + rng.normal(0, 0.002, n)
    for i, m in enumerate(mode):
        if m != "none":
            y[i] += own[m]
        elif mode[i - 1] != "none":
            y[i] += spill[mode[i - 1]]
    step_s = 0.014 * np.exp(y)
    est, ci_total, ci_spill = bench.spill_fit(mode, step_s, slots, group=6, n_boot=200)
    for m in slots:
        assert est[m][0] == pytest.approx(own[m], abs=0.001), m
        assert est[m][1] == pytest.approx(spill[m], abs=0.001), m
        assert est[m][2] == pytest.approx(own[m] + spill[m], abs=0.0015), m
        assert ci_total[m][0] <= own[m] + spill[m] <= ci_total[m][1], m
    assert est["none_check"][1] == 0.0 and ci_spill["none_check"] == (0.0, 0.0)  # the reference
    assert ci_spill["recorder_1e5"][0] > 0.003  # a spill of 0.6% is resolved
    i = np.array([j for j, m in enumerate(mode) if m == "recorder_1e5"])
    neighbour = bench.ratio_of_sums(step_s[i], (step_s[i - 1] + step_s[i + 1]) / 2)[0]  # what is printed
    # below even the own excess: the spill is not charged, and half of it sits in the denominator
    assert neighbour < own["recorder_1e5"] - spill["recorder_1e5"] / 4


def test_ratio_of_sums_is_unbiased_where_the_mean_of_block_ratios_reads_high():
    """Blocks with no cost and 15% independent noise: the mean of the per-block ratios to the
    neighbours' mean reads high by about the neighbour mean's relative variance (~1.1%), the ratio of
    sums reads 0; with a known cost of 0.7% of a step, the ratio of sums recovers it."""
    bench = _benchmark_module()
    rng = np.random.default_rng(3)
    k = 40_000
    step = 0.01 * (1 + 0.15 * rng.standard_normal((3, k)))  # a block and its two neighbours, s per step
    x, y = step[0], (step[1] + step[2]) / 2
    assert np.mean(x / y) - 1 > 0.007  # the old estimator's bias
    est, lo, hi = bench.ratio_of_sums(x, y)
    assert abs(est) < 0.003 and lo < 0 < hi
    est, lo, hi = bench.ratio_of_sums(x + 0.007 * 0.01, y)
    assert est == pytest.approx(0.007, abs=0.003) and lo < 0.007 < hi
