"""Reset(every="auto"): the z estimator on known decorrelation times, uncut windows, bad settings; and
inside the Sparsifier: every structure, resume, the run store's z, the docs' examples."""
from __future__ import annotations

import copy
import doctest
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import corrtools.sparse.autoz as autoz_mod
from corrtools import Recorder, open_run
from corrtools.analysis.correlation import DETRENDS, decorrelation_time
from corrtools.errors import CorrtoolsError
from corrtools.sparse.autoz import AutoZ, ZEstimate, ZEstimator
from corrtools.sparse import Sparsifier
from corrtools.sparse.exploit import Reset, exploit_from_dict
from corrtools.sparse.masks import topk_mask


class MovingAverage:
    """Each element follows m_t = (e_t + ... + e_{t-L+1}) / sqrt(L), e iid N(0, 1): ρ(τ) = 1 - τ/L for
    τ ≤ L and 0 beyond, so Δ = L."""

    def __init__(self, L: int, n: int, seed: int) -> None:
        self.L = L
        self.g = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(L, n, generator=self.g, dtype=torch.float64)  # the last L innovations
        self.m = self.noise.sum(0) / math.sqrt(L)  # (n,)
        self.t = 0

    def advance(self) -> None:
        self.t += 1
        new = torch.randn(self.noise.shape[1], generator=self.g, dtype=torch.float64)
        slot = self.t % self.L
        self.m += (new - self.noise[slot]) / math.sqrt(self.L)
        self.noise[slot] = new


def drive(cfg: AutoZ, L: int, steps: int, *, level: float = 0.0, pull: float = 0.0, density: float = 0.5,
          seed: int = 0, keep: int = 0):
    """The estimator on a (64, 64) weight whose elements are w = s + m: m is MA(L) noise, s a level
    pulled toward ±``level`` by ``pull`` per step (as gradients pull a reset weight back). The optimizer
    does nothing; n is reset (w ← 0, i.e. s ← -m) when the estimator says so.
    Returns (estimator, reset steps, trajectory (steps, keep) and masks (steps, keep) of the first
    ``keep`` elements)."""
    ma = MovingAverage(L, 64 * 64, seed)
    g = torch.Generator().manual_seed(seed + 1)
    target = level * (torch.randint(0, 2, (64 * 64,), generator=g) * 2 - 1).double()
    s = target.clone()
    w = (s + ma.m).float().reshape(64, 64)
    est = ZEstimator(cfg, {"layer.weight": w})
    resets, traj, part = [], [], []
    for t in range(1, steps + 1):
        ma.advance()
        s += pull * (target - s)
        w.view(-1).copy_(s + ma.m)
        mask = topk_mask(w, density)  # the n of this step's forward pass
        est.observe(t, [w], [mask])
        if est.reset_due(t):
            w.masked_fill_(~mask, 0.0)
            s = w.view(-1).double() - ma.m
            est.note_reset(t)
            resets.append(t)
        traj.append(w.view(-1)[:keep].clone())
        part.append(mask.view(-1)[:keep].clone())
    return est, resets, torch.stack(traj).numpy(), torch.stack(part).numpy()


@pytest.mark.parametrize("L, window", [(8, 256), (40, 512)])
def test_z_recovers_the_moving_average_length(L, window) -> None:
    est, resets, _, _ = drive(AutoZ(window=window, reestimate_every=2 * window), L, 3 * window)
    assert [e.step for e in est.history] == [window, 3 * window]
    for e in est.history:
        assert 0.75 * L <= e.z <= 1.25 * L, e
        assert e.z == min(max(round(e.delta), 1), window // 2)
        assert e.weights > 100 and e.censored_fraction < 0.1 and not e.lower_bound and e.seconds >= 0
    assert est.z == est.history[-1].z
    assert resets and resets[0] == window  # the first reset right after the warm-up's estimate


def test_resets_firing_between_estimates_do_not_bias_z() -> None:
    """Weights pulled back to ±3 after a reset, reset every 10 steps (z_min = z_max = 10) while Δ = 40:
    a window with resets in it reads Δ far above 40; the estimator's held-back windows still read 40."""
    L, W = 40, 512
    cfg = AutoZ(window=W, z_min=10, z_max=10, reestimate_every=2 * W)
    est, resets, traj, part = drive(cfg, L, 3 * W, level=3.0, pull=0.05, keep=1024)
    assert [e.step for e in est.history] == [W, 3 * W]
    for e in est.history:
        assert 0.75 * L <= e.delta <= 1.25 * L and e.z == 10, e
        assert not any(e.first_step <= r < e.step for r in resets)  # none inside the window
    between = [r for r in resets if W < r <= 2 * W]
    assert len(between) > 40 and np.all(np.diff(between) == 10)  # resets did fire between the windows
    # the same weights over W steps with resets in them: far outside ±25% of L, so the test can fail
    cut, n_end = traj[W : 2 * W], ~part[2 * W - 1]  # steps W+1..2W
    delta, _ = decorrelation_time(cut, max_lag=W // 2)
    assert np.nanmedian(delta[n_end]) > 1.4 * L


def test_held_back_reset_fires_after_the_estimate() -> None:
    """z = 100 (z_min) and windows of 256: a reset due inside a window waits for its estimate."""
    cfg = AutoZ(window=256, z_min=100, z_max=128, reestimate_every=512)
    est, resets, _, _ = drive(cfg, 8, 1100)
    assert [e.step for e in est.history] == [256, 768]
    assert all(e.z == 100 for e in est.history)
    # 256 (after the warm-up), 356, 456; 556 and 656 fall in the window 513..768: held back to 768
    assert resets[:5] == [256, 356, 456, 768, 868]


def test_censored_window_gives_z_max_and_says_so() -> None:
    """Weights that drift steadily stay correlated past window/2: z = z_max, flagged, warned."""
    W = 64
    w = torch.zeros(16, 16)
    est = ZEstimator(AutoZ(window=W), {"w": w})
    g = torch.Generator().manual_seed(0)
    drift = torch.randn(16, 16, generator=g)
    none = torch.zeros_like(w, dtype=torch.bool)
    with pytest.warns(UserWarning, match="censored"):
        for t in range(1, W + 1):
            w.add_(drift + 0.1 * torch.randn(16, 16, generator=g))
            est.observe(t, [w], [none])
    (e,) = est.history
    assert e.lower_bound and e.censored_fraction > 0.9 and e.z == 32 and e.delta == 32.0 and est.z == 32


def test_no_qualifying_weight_keeps_z() -> None:
    w = torch.zeros(8, 8)
    est = ZEstimator(AutoZ(window=16, weights="never_participating"), {"w": w})
    ones = torch.ones_like(w, dtype=torch.bool)  # every weight participates: no n to measure
    g = torch.Generator().manual_seed(0)
    with pytest.warns(UserWarning, match="no sampled"):
        for t in range(1, 17):
            w.add_(torch.randn(w.shape, generator=g))
            est.observe(t, [w], [ones])
    (e,) = est.history
    assert e.z is None and e.weights == 0 and math.isnan(e.delta) and est.z is None
    assert not est.reset_due(17)


def test_which_weights_enter() -> None:
    """'nonparticipating' reads n at the window's last step; 'all' every sampled weight."""
    W = 32
    w = torch.zeros(2, 2)
    t = torch.arange(1, W + 1, dtype=torch.float32)
    series = torch.stack([torch.sin(2 * math.pi * t / p) for p in (8, 40, 16, 12)], dim=1)  # (W, 4)
    ref, _ = decorrelation_time(series.numpy(), max_lag=W // 2)
    mask = torch.tensor([[True, False], [True, False]])  # weights 1 and 3 are in n
    for weights, expect in [("nonparticipating", np.median(ref[[1, 3]])), ("all", np.median(ref))]:
        est = ZEstimator(AutoZ(window=W, weights=weights), {"w": w})
        for k in range(W):
            w.view(-1).copy_(series[k])
            est.observe(k + 1, [w], [mask])
        assert est.history[0].delta == pytest.approx(expect)
    assert abs(np.median(ref[[1, 3]]) - np.median(ref)) > 0.5  # the two selections differ


@pytest.mark.filterwarnings("ignore:auto z")
def test_never_participating_drops_weights_that_joined_p() -> None:
    W = 32
    w = torch.zeros(4)
    g = torch.Generator().manual_seed(1)
    est = ZEstimator(AutoZ(window=W, weights="never_participating"), {"w": w})
    for k in range(W):
        w.add_(torch.randn(4, generator=g))
        mask = torch.tensor([k == 3, False, False, True])  # weight 0 was in p once, weight 3 always
        est.observe(k + 1, [w], [mask])
    assert est.history[0].weights == 2


def test_sample_is_seeded_and_per_layer() -> None:
    a = ZEstimator(AutoZ(sample=5, seed=3), {"x": torch.zeros(100), "y": torch.zeros(100)})
    b = ZEstimator(AutoZ(sample=5, seed=3), {"x": torch.zeros(100), "y": torch.zeros(100)})
    c = ZEstimator(AutoZ(sample=5, seed=4), {"x": torch.zeros(100), "y": torch.zeros(100)})
    assert all(torch.equal(i, j) for i, j in zip(a._index, b._index))
    assert not torch.equal(a._index[0], a._index[1]) and not torch.equal(a._index[0], c._index[0])
    assert a.n_sampled == 10
    assert ZEstimator(AutoZ(sample=500), {"x": torch.zeros(7)}).n_sampled == 7
    assert a._values[0].shape == (1024, 5)  # the ring is bounded by the window


def test_state_round_trip_and_resume_collects_a_new_window() -> None:
    cfg = AutoZ(window=64, reestimate_every=128)
    est, _, _, _ = drive(cfg, 6, 100)
    state = est.state_dict()
    again = ZEstimator(cfg, {"layer.weight": torch.zeros(64, 64)})
    again.load_state_dict(state)
    assert again.z == est.z and again.history == est.history
    assert again.holding(192) and not again.holding(128)
    with pytest.raises(CorrtoolsError, match="other layers"):
        ZEstimator(cfg, {"other": torch.zeros(3)}).load_state_dict(state)
    assert [ZEstimate.from_dict(e.to_dict()) for e in est.history] == est.history


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window=8), "window=8"),
        (dict(window=64.0), "window=64.0"),
        (dict(sample=0), "sample=0"),
        (dict(weights="small"), "weights='small'"),
        (dict(quantile=1.0), "quantile=1.0"),
        (dict(z_min=0), "z_min=0"),
        (dict(window=100, z_max=51), "raise window to at least 102"),
        (dict(z_min=50, z_max=20), "z_min=50"),
        (dict(window=64, warmup=10), "warmup=10"),
        (dict(window=64, reestimate_every=100), "reestimate_every=100"),
        (dict(detrend="cubic"), "detrend='cubic'"),
        (dict(seed=-1), "seed=-1"),
    ],
)
def test_bad_settings_are_refused(kwargs, match) -> None:
    with pytest.raises(CorrtoolsError, match=match):
        AutoZ(**kwargs)


def test_defaults_and_dict_round_trip() -> None:
    cfg = AutoZ()
    assert (cfg.window, cfg.z_max, cfg.warmup, cfg.reestimate_every) == (1024, 512, 1024, 8192)
    assert AutoZ.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(CorrtoolsError, match="no setting 'windw'"):
        AutoZ.from_dict({"windw": 3})
    assert autoz_mod._DETRENDS == DETRENDS


def test_reset_auto_config() -> None:
    r = Reset(every="auto")
    assert r.is_auto and r.auto == AutoZ()
    assert exploit_from_dict(r.to_dict()) == r
    custom = Reset(every="auto", auto=AutoZ(window=64))
    assert exploit_from_dict(custom.to_dict()) == custom
    assert exploit_from_dict({"kind": "reset", "every": 5, "reset_optimizer_state": False}) == Reset(5)
    with pytest.raises(CorrtoolsError, match='pass every="auto"'):
        Reset(every=5, auto=AutoZ())
    with pytest.raises(CorrtoolsError, match='or "auto"'):
        Reset(every="sometimes")
    with pytest.raises(CorrtoolsError, match="no fixed schedule"):
        r.due(3)


def test_estimator_refuses_bad_input() -> None:
    with pytest.raises(CorrtoolsError, match="AutoZ"):
        ZEstimator({"window": 64}, {"w": torch.zeros(3)})  # type: ignore[arg-type]
    with pytest.raises(CorrtoolsError, match="at least one weight"):
        ZEstimator(AutoZ(), {})


def test_docstring_examples_run() -> None:
    assert doctest.testmod(autoz_mod).failed == 0


# ------------------------------------------------------------------ inside the Sparsifier
DOCS = Path(__file__).resolve().parents[2] / "docs" / "autoz.md"


def test_sparsifier_auto_z_recovers_L_and_resets_every_z() -> None:
    """The first layer's weights move by MA(L) increments, the optimizer does nothing."""
    L, W = 12, 256
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 1))
    sp = Sparsifier(model, None, density=0.5, exploit=Reset(every="auto", auto=AutoZ(window=W, reestimate_every=2 * W)))
    w = model[0].weight
    with torch.no_grad():
        ma = MovingAverage(L, w.numel(), seed=3)
        w.copy_(ma.m.reshape(64, 64))
        zero_steps = []
        for t in range(1, 3 * W + 1):
            before = ma.m.clone()
            ma.advance()
            w.view(-1).add_((ma.m - before).float())
            n = ~sp.masks["0.weight"]  # the n of this step's forward pass
            sp.step()
            if bool((w[n] == 0).all()):
                zero_steps.append(t)
    assert [e.step for e in sp.z_history] == [W, 3 * W]
    for e in sp.z_history:
        assert 0.75 * L <= e.z <= 1.25 * L, e
    z = sp.z_history[0].z
    assert sp.z == sp.z_history[-1].z
    # resets: at the first estimate, then every z steps, none inside the held-back window 2W+1..3W
    expected = list(range(W, 2 * W + 1, z)) + [3 * W]
    assert zero_steps == expected


@pytest.mark.filterwarnings("ignore:auto z")
@pytest.mark.parametrize("structure", ["unstructured", "2:4", "2:4-2d", "block:4"])
def test_auto_z_works_with_every_structure(structure) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = Sparsifier(model, opt, density=None if "2:4" in structure else 0.25, structure=structure,
                    exploit=Reset(every="auto", auto=AutoZ(window=16, reestimate_every=32, sample=64)))
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    for _ in range(50):
        F.mse_loss(model(x), y).backward()
        opt.step()
        sp.step()
        opt.zero_grad()
    assert [e.step for e in sp.z_history] == [16, 48]
    assert all(1 <= e.z <= 8 and e.weights > 0 for e in sp.z_history)
    assert sp.z == sp.z_history[-1].z


def _train(model, opt, sp, steps, start=0):
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(t)
        F.mse_loss(model(torch.randn(32, 16, generator=g)), torch.randn(32, 1, generator=g)).backward()
        opt.step()
        sp.step()
        opt.zero_grad()


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = Sparsifier(model, opt, density=0.25, exploit=Reset(every="auto", auto=AutoZ(window=16, reestimate_every=40)))
    return model, opt, sp


def _key(history):
    return [(e.step, e.first_step, e.z, e.delta, e.weights) for e in history]  # all but the seconds


def _resumed(saved, steps, start):
    model, opt, sp = _setup(seed=1)  # other initial weights: everything must come from the state
    model.load_state_dict(saved[1])
    opt.load_state_dict(saved[2])
    sp.load_state_dict(saved[0])
    _train(model, opt, sp, steps, start=start)
    return model, sp


def _saved(model, opt, sp):
    """Copies of the three state dicts (an optimizer's state_dict shares its live buffers)."""
    return copy.deepcopy((sp.state_dict(), model.state_dict(), opt.state_dict()))


@pytest.mark.filterwarnings("ignore:auto z")
def test_resume_continues_with_the_same_z_and_history() -> None:
    """Saved at step 30 (z from the estimate at 16, next window 41..56): the resumed run matches the
    uninterrupted one exactly, weights included."""
    model, opt, sp = _setup()
    _train(model, opt, sp, 30)
    saved = _saved(model, opt, sp)
    assert saved[0]["autoz"]["z"] == sp.z is not None
    _train(model, opt, sp, 60, start=30)
    model2, sp2 = _resumed(saved, 60, 30)
    assert [e.step for e in sp.z_history] == [16, 56]
    assert _key(sp2.z_history) == _key(sp.z_history) and sp2.z == sp.z
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:auto z")
def test_resume_inside_a_window_collects_a_new_one() -> None:
    """Saved at step 50, inside the window 41..56: the buffer is not saved, so resets stay held back
    until 16 uncut steps exist again (51..66), and the estimate comes at step 66."""
    model, opt, sp = _setup()
    _train(model, opt, sp, 50)
    _, sp2 = _resumed(_saved(model, opt, sp), 30, 50)
    assert [e.step for e in sp2.z_history] == [16, 66]
    assert sp2.z_history[1].first_step == 51


def test_fixed_z_has_no_history() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    sp = Sparsifier(model, None, density=0.5, exploit=Reset(every=7))
    assert sp.z == 7 and sp.z_history == [] and "autoz" not in sp.state_dict()
    assert Sparsifier(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1)), None, density=0.5).z is None


@pytest.mark.filterwarnings("ignore:auto z")
def test_recorder_stores_the_chosen_z(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with Recorder(model, tmp_path / "run.zarr", sample=8, chunk_steps=8).attach(opt) as rec:
        sp = Sparsifier(model, opt, density=0.25, recorder=rec,
                        exploit=Reset(every="auto", auto=AutoZ(window=16, reestimate_every=40)))
        _train(model, opt, sp, 70)
    ds = open_run(tmp_path / "run.zarr")
    steps, z = ds["step"].values, ds["z"].values
    e1, e2 = sp.z_history
    assert np.isnan(z[steps < e1.step]).all()
    assert (z[(steps >= e1.step) & (steps < e2.step)] == e1.z).all() and (z[steps >= e2.step] == e2.z).all()


def test_recorder_stores_a_fixed_z(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Recorder(model, tmp_path / "run.zarr", sample=8).attach(opt) as rec:
        sp = Sparsifier(model, opt, density=0.25, recorder=rec, exploit=Reset(every=5))
        _train(model, opt, sp, 12)
    assert (open_run(tmp_path / "run.zarr")["z"].values == 5).all()


@pytest.mark.filterwarnings("ignore:auto z")
def test_docs_examples_run(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    exec(compile(blocks[0], str(DOCS), "exec"), namespace)
    # the offline example needs a recorded run: record one, then run it as written
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with Recorder(model, "run.zarr", sample=64).attach(opt):
        for _ in range(40):
            F.mse_loss(model(torch.randn(8, 16)), torch.randn(8, 1)).backward()
            opt.step()
            opt.zero_grad()
    exec(compile(blocks[1], str(DOCS), "exec"), namespace)
    assert float(namespace["res"]["z_all"]) > 0
