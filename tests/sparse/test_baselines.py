"""SET, RigL, LOTTERY, ERK, SMALL widths and SR-STE, checked against brute-force references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from corrtools.errors import CorrtoolsError
from corrtools.sparse import Regularize
from corrtools.sparse.allocation import erk_densities
from corrtools.sparse.baselines import SET, Lottery, RigL, layer_densities, small_width, sr_ste
from corrtools.sparse.masks import kept_count


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3))


def _batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(10, 12, generator=gen), torch.randint(0, 3, (10,), generator=gen)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


# ----------------------------------------------------------------------------- densities
def test_erk_matches_formula_and_total():
    shapes = [(64, 32, 3, 3), (128, 64), (64, 128)]
    d = erk_densities(shapes, 0.2)
    sizes = [math.prod(s) for s in shapes]
    assert sum(di * n for di, n in zip(d, sizes)) == pytest.approx(0.2 * sum(sizes))
    raw = [sum(s) / math.prod(s) for s in shapes]
    ratios = [di / r for di, r in zip(d, raw)]
    assert max(ratios) == pytest.approx(min(ratios))  # one scale for all (none capped here)


def test_erk_caps_small_layers_at_one():
    shapes = [(4, 4), (256, 256)]  # the tiny layer would get density > 1
    d = erk_densities(shapes, 0.5)
    assert d[0] == 1.0
    assert d[0] * 16 + d[1] * 65536 == pytest.approx(0.5 * (16 + 65536))


def test_layer_densities_uniform_and_bad_name():
    assert layer_densities([(3, 4), (5, 6)], 0.3, "uniform") == [0.3, 0.3]
    with pytest.raises(CorrtoolsError, match="distribution"):
        layer_densities([(3, 4)], 0.3, "global")


def test_small_width_rounds_to_multiple():
    assert small_width(128, 0.1, 4) == 12
    assert small_width(512, 0.1) == 51
    assert small_width(32, math.sqrt(0.1)) == 10
    assert small_width(8, 0.01, 4) == 4  # never below one multiple


def test_sr_ste_is_regularize_2to4():
    model = _net()
    sp = sr_ste(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert sp.config.structure == "2:4" and sp.config.exploit == Regularize(beta=2e-4)
    assert sp.config.grad_scale == 1.0 and sp.config.rewire_every == 1


# ----------------------------------------------------------------------------- SET / RigL
def test_cosine_drop_fraction_schedule():
    model = _net()
    s = SET(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.5, total_steps=400,
            update_every=10, drop_fraction=0.3)
    assert s.fraction_at(0) == pytest.approx(0.3)
    assert s.fraction_at(150) == pytest.approx(0.15)  # half-way to 0.75 * 400
    assert s.fraction_at(300) == 0.0 and not s.update_due(300) and s.update_due(290)


@pytest.mark.parametrize("cls", [SET, RigL])
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_counts_exact_and_nonparticipating_frozen_at_zero(cls, distribution):
    model = _net(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sp = cls(model, opt, density=0.3, total_steps=40, update_every=3, distribution=distribution)
    want = {n: kept_count(sp.densities[n], model.get_parameter(n).numel()) for n in sp.layer_names}
    assert sp.layer_names == ["0.weight", "2.weight"]
    gen = torch.Generator().manual_seed(0)
    changed = 0
    for _ in range(30):
        before = sp.masks
        _loss(model, *_batch(gen)).backward()
        opt.step()
        sp.step()
        opt.zero_grad()
        for name, mask in sp.masks.items():
            w = model.get_parameter(name)
            assert int(mask.sum()) == want[name]
            assert bool((w[~mask] == 0).all())
            state = opt.state[w]
            assert bool((state["exp_avg"][~mask] == 0).all()) and bool((state["exp_avg_sq"][~mask] == 0).all())
            changed += int((mask != before[name]).sum())
    assert changed > 0


def _rigl_update_reference(model, opt, sp, gen, update_step):
    """Run to the step before ``update_step``; then predict drop and grow sets by brute force."""
    while sp.steps_done < update_step - 1:
        _loss(model, *_batch(gen)).backward(); opt.step(); sp.step(); opt.zero_grad()
    x, y = _batch(gen)
    # the dense gradient at the update step, from a plain copy of the (masked) model
    plain = _net()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("_mask")})
    _loss(plain, x, y).backward()
    _loss(model, x, y).backward()
    opt.step()
    w_after = {n: model.get_parameter(n).detach().clone() for n in sp.layer_names}
    masks = sp.masks
    frac = sp.fraction_at(update_step)
    expect = {}
    for name in sp.layer_names:
        m = masks[name].reshape(-1).numpy()
        w = w_after[name].reshape(-1).numpy()
        active = np.flatnonzero(m)
        k = math.floor(frac * len(active))
        drop = set(active[np.argsort(np.abs(w[active]), kind="stable")[:k]].tolist())
        kept = set(active.tolist()) - drop
        g = plain.get_parameter(name).grad.reshape(-1).numpy()
        candidates = np.array(sorted(set(range(len(m))) - kept))
        grow = set(candidates[np.argsort(-np.abs(g[candidates]), kind="stable")[:k]].tolist())
        expect[name] = (kept | grow, grow, k)
    sp.step()
    opt.zero_grad()
    return expect


def test_rigl_drop_and_grow_sets_brute_force():
    model = _net(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = RigL(model, opt, density=0.4, total_steps=60, update_every=5, drop_fraction=0.3)
    gen = torch.Generator().manual_seed(3)
    for update_step in (5, 10):
        expect = _rigl_update_reference(model, opt, sp, gen, update_step)
        for name, (want, grown, k) in expect.items():
            got = set(np.flatnonzero(sp.masks[name].reshape(-1).numpy()).tolist())
            assert k > 0 and got == want
            w = model.get_parameter(name).detach().reshape(-1)
            assert bool((w[sorted(grown)] == 0).all())  # new weights start at zero
            assert sp.last_update[name] == (k, k)
            buf = opt.state[model.get_parameter(name)]["momentum_buffer"].reshape(-1)
            assert bool((buf[sorted(grown)] == 0).all())


def test_rigl_dense_gradient_summed_over_accumulation():
    model = _net(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights never move: grads only
    sp = RigL(model, opt, density=0.5, total_steps=20, update_every=1)
    gen = torch.Generator().manual_seed(5)
    b1, b2 = _batch(gen), _batch(gen)
    plain = _net()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("_mask")})
    (_loss(plain, *b1) + _loss(plain, *b2)).backward()
    _loss(model, *b1).backward()
    _loss(model, *b2).backward()
    torch.testing.assert_close(sp._dense_grad["0.weight"], plain[0].weight.grad)
    mask = sp.masks["0.weight"]
    assert bool((model[0].weight.grad[~mask] == 0).all())  # the optimizer sees only p's gradient


def test_set_grows_randomly_but_seeded():
    def run(seed):
        model = _net(6)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sp = SET(model, opt, density=0.3, total_steps=30, update_every=4, seed=seed)
        gen = torch.Generator().manual_seed(0)
        for _ in range(12):
            _loss(model, *_batch(gen)).backward(); opt.step(); sp.step(); opt.zero_grad()
        return sp.masks["0.weight"]
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_dynamic_sparse_bad_settings():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(CorrtoolsError, match="total_steps"):
        SET(model, opt, density=0.5)
    with pytest.raises(CorrtoolsError, match="update_every"):
        RigL(model, opt, density=0.5, total_steps=10, update_every=0)
    with pytest.raises(CorrtoolsError, match="drop_fraction"):
        RigL(model, opt, density=0.5, total_steps=10, drop_fraction=1.5)


# ----------------------------------------------------------------------------- LOTTERY
def test_lottery_prunes_final_magnitude_and_rewinds_to_epsilon():
    model = _net(7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lot = Lottery(model, opt, density=0.25, total_steps=200, prune_at=0.5, rewind_to=5)
    assert (lot.prune_step, lot.rewind_step) == (100, 5)
    gen = torch.Generator().manual_seed(8)
    at_eps = at_k = None
    for t in range(1, 131):
        _loss(model, *_batch(gen)).backward()
        opt.step()
        if t == 5:
            at_eps = {k: v.clone() for k, v in model.state_dict().items()}
        if t == 100:
            at_k = {n: model.get_parameter(n).detach().clone() for n in lot.layer_names}
            assert not lot.pruned and all(bool(m.all()) for m in lot.masks.values())
        lot.step()
        opt.zero_grad()
        if t == 100:
            assert lot.pruned
            for name, mask in lot.masks.items():
                w = at_k[name].reshape(-1).numpy()
                k = kept_count(0.25, w.size)
                want = np.zeros(w.size, bool)
                want[np.argsort(-np.abs(w), kind="stable")[:k]] = True
                assert np.array_equal(mask.reshape(-1).numpy(), want)
                now = model.get_parameter(name).detach()
                torch.testing.assert_close(now[mask], at_eps[name][mask], rtol=0, atol=0)
                assert bool((now[~mask] == 0).all())
            torch.testing.assert_close(model[4].weight.detach(), at_eps["4.weight"], rtol=0, atol=0)
            masks_at_k = lot.masks
    for name, mask in lot.masks.items():  # the mask stays fixed, n stays 0
        assert torch.equal(mask, masks_at_k[name])
        assert bool((model.get_parameter(name).detach()[~mask] == 0).all())


def test_lottery_rewind_range_checked():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(CorrtoolsError, match=r"\[k/100, k/10\]"):
        Lottery(model, opt, density=0.5, total_steps=200, rewind_to=50)
    assert Lottery(model, opt, density=0.5, total_steps=200).rewind_step == 5  # round(k / 20)
