"""The Sparsifier against independent references: twin dense runs, hand-computed gradients."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from corrtools.errors import CorrtoolsError
from corrtools.sparse import Fix, Regularize, Reset, Sparsifier, SparsityConfig
from corrtools.sparse.config import Structure
from corrtools.sparse.masks import kept_count, nm_mask_2d, topk_mask


class Net(nn.Module):
    """embed -> fc1 -> fc2 -> head (the last Linear: the output projection)."""

    def __init__(self, vocab: int = 10, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, 32)
        self.fc2 = nn.Linear(32, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


def _make(seed=0, opt="adamw"):
    torch.manual_seed(seed)
    model = Net()
    if opt == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 10, (4, 6), generator=g), torch.randint(0, 10, (4, 6), generator=g)


def _loss(model, x, y):
    return F.cross_entropy(model(x).reshape(-1, 10), y.reshape(-1))


def _train(model, optimizer, sp, steps, start=0):
    for t in range(start, start + steps):
        x, y = _batch(t)
        _loss(model, x, y).backward()
        optimizer.step()
        if sp is not None:
            sp.step()
        optimizer.zero_grad()


SPARSE = ["fc1.weight", "fc2.weight"]


# ---------------------------------------------------------------- layers chosen
def test_default_layers_and_state_dict_keys():
    model, opt = _make()
    sp = Sparsifier(model, opt, density=0.25)
    assert sp.layer_names == SPARSE  # embedding and the last Linear (head) stay dense
    keys = list(model.state_dict())
    assert "fc1.weight" in keys and "fc1.weight_mask" in keys and "fc2.weight_mask" in keys
    assert "head.weight_mask" not in keys
    assert set(sp.masks) == set(SPARSE)


def test_include_exclude_names_and_predicates():
    model, opt = _make()
    sp = Sparsifier(model, opt, include=["head"], exclude=lambda name, m: name == "fc1")
    assert sp.layer_names == ["fc2.weight", "head.weight"]
    model, opt = _make()
    sp = Sparsifier(model, opt, exclude="fc2.weight")
    assert sp.layer_names == ["fc1.weight"]


def test_unknown_and_wrong_kind_names():
    model, opt = _make()
    with pytest.raises(CorrtoolsError, match="did you mean 'fc1'"):
        Sparsifier(model, opt, include=["fc_1"])
    with pytest.raises(CorrtoolsError, match="Embedding"):
        Sparsifier(model, opt, include="embed")
    with pytest.raises(CorrtoolsError, match="No layer"):
        Sparsifier(model, opt, exclude=["fc1", "fc2"])


def test_second_sparsifier_on_same_model_is_refused():
    model, opt = _make()
    Sparsifier(model, opt)
    with pytest.raises(CorrtoolsError, match="fc1.weight.*already masked"):
        Sparsifier(model, opt)


def test_tied_head_is_left_dense():
    class Tied(Net):
        def __init__(self):
            super().__init__()
            self.head2 = nn.Linear(16, 10)
            self.head.weight = self.embed.weight

    model = Tied()
    sp = Sparsifier(model, None)
    # head2 is the last Linear; head shares the embedding's weight: both dense
    assert sp.layer_names == SPARSE


def _conv_net():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3),  # first conv: in_channels 3
        nn.Conv2d(16, 16, 3, groups=16),  # depthwise
        nn.Conv2d(16, 32, 3),  # eligible
        nn.Conv1d(32, 32, 1),  # eligible
        nn.Flatten(),
        nn.Linear(32, 30),  # fits 2:4 along in=32
        nn.Linear(30, 16),  # in=30: misfit for 2:4
        nn.Linear(16, 5),  # head
    )


def test_conv_rules_for_2to4_and_misfit_warning():
    model = _conv_net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sp = Sparsifier(model, None, structure="2:4")
    assert sp.layer_names == ["2.weight", "3.weight", "5.weight"]
    assert len(caught) == 1 and "6.weight (16, 30)" in str(caught[0].message)
    # the paper's rule for every structure (Appendix B.1): in_channels % 16 != 0 stays dense;
    # unstructured keeps the depthwise conv (in_channels 16)
    sp2 = Sparsifier(_conv_net()[:4], None, structure="unstructured", include=["3"])
    assert sp2.layer_names == ["1.weight", "2.weight", "3.weight"]
    with pytest.warns(UserWarning, match=r"1\.weight \(16, 1, 3, 3\)"):
        sp3 = Sparsifier(_conv_net()[:4], None, structure="block:4", include=["3"])
    assert sp3.layer_names == ["2.weight", "3.weight"]  # 1: depthwise, c = 1 < 4 (misfit, warned)


# ---------------------------------------------------------------- Algorithm 1's gradients
@pytest.mark.parametrize("s", [1.0, 0.3, 0.0])
def test_gradients_masked_forward_dense_scaled_weight_grad(s):
    torch.manual_seed(1)
    layer = nn.Linear(8, 4)
    model = nn.Sequential(layer, nn.Linear(4, 2))
    sp = Sparsifier(model, None, density=0.25, grad_scale=s)
    mask = sp.masks["0.weight"]
    x = torch.randn(5, 8, requires_grad=True)
    model(x).pow(2).sum().backward()
    # independent reference: a plain leaf holding w * mask
    w_eff = (layer.weight.detach() * mask).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = F.linear(F.linear(x_ref, w_eff, layer.bias.detach()), model[1].weight.detach(), model[1].bias.detach())
    out.pow(2).sum().backward()
    g = w_eff.grad
    expected = torch.where(mask, g, s * g)
    assert torch.allclose(layer.weight.grad, expected, atol=1e-6)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)  # input gradient from participating weights
    if s > 0:
        assert (layer.weight.grad[~mask] != 0).any()  # n does get gradients


def test_loss_ignores_nonparticipating_weights():
    model, opt = _make()
    sp = Sparsifier(model, opt, density=0.25)
    x, y = _batch(0)
    before = _loss(model, x, y).item()
    mask = sp.masks["fc1.weight"]
    with torch.no_grad():
        model.fc1.weight[~mask] += 3.0  # perturb every n weight
    assert _loss(model, x, y).item() == before
    with torch.no_grad():
        model.fc1.weight[mask] += 3.0  # perturbing p does change it
    assert _loss(model, x, y).item() != before


# ---------------------------------------------------------------- rewiring
@pytest.mark.parametrize("opt_kind", ["adamw", "sgd"])
@pytest.mark.parametrize("structure", ["unstructured", "2:4", "2:4-2d", "block:4"])
def test_masks_follow_weights_after_each_step(opt_kind, structure):
    model, opt = _make(opt=opt_kind)
    sp = Sparsifier(model, opt, structure=structure, density=None, allocation="uniform")
    twin, twin_opt = _make(opt=opt_kind)  # dense run with the same masking done by hand
    twin_masks = {n: sp.masks[n] for n in SPARSE}
    flips = {n: 0 for n in SPARSE}
    for t in range(4):
        _train(model, opt, sp, 1, start=t)
        # twin: forward with masked weights, dense updates (s = 1)
        x, y = _batch(t)
        # straight-through: the value is w * mask, the gradient to w is the dense one
        w1, w2 = (p + (p * twin_masks[n] - p).detach() for n, p in zip(SPARSE, (twin.fc1.weight, twin.fc2.weight)))
        h = torch.relu(F.linear(torch.relu(F.linear(twin.embed(x), w1, twin.fc1.bias)), w2, twin.fc2.bias))
        logits = twin.head(h)
        loss = F.cross_entropy(logits.reshape(-1, 10), y.reshape(-1))
        loss.backward()
        twin_opt.step()
        twin_opt.zero_grad()
        for n in SPARSE:
            w = twin.get_parameter(n).detach()
            new = sp.config.parsed_structure.mask(w, sp.config.density)
            flips[n] += int((new & ~twin_masks[n]).sum())
            twin_masks[n] = new
    for n in SPARSE:
        assert torch.allclose(model.get_parameter(n), twin.get_parameter(n), atol=1e-6)
        assert torch.equal(sp.masks[n], twin_masks[n])
    report = {r.name: r for r in sp.density_report()}
    for n in SPARSE:
        assert report[n].rewired_total == flips[n]
        assert report[n].structure == sp.config.structure
        assert report[n].shape == tuple(model.get_parameter(n).shape)
        numel = model.get_parameter(n).numel()
        assert report[n].numel == numel
        assert report[n].density == int(sp.masks[n].sum()) / numel


def test_rewire_every_r_steps():
    model, opt = _make()
    sp = Sparsifier(model, opt, density=0.25, rewire_every=3, allocation="uniform")
    history = [sp.masks["fc1.weight"]]
    for t in range(6):
        _train(model, opt, sp, 1, start=t)
        history.append(sp.masks["fc1.weight"])
    w = model.fc1.weight.detach()
    assert torch.equal(history[1], history[0]) and torch.equal(history[2], history[0])
    assert not torch.equal(history[3], history[0])  # step 3 rewired
    assert torch.equal(history[6], topk_mask(w, 0.25))


def test_density_and_participating_fraction():
    model, opt = _make()
    sp = Sparsifier(model, opt, density=0.3, allocation="uniform")
    _train(model, opt, sp, 2)
    n1, n2 = model.fc1.weight.numel(), model.fc2.weight.numel()
    k = kept_count(0.3, n1) + kept_count(0.3, n2)
    assert sp.participating_fraction() == k / (n1 + n2)
    masks = sp.masks
    masks["fc1.weight"].fill_(False)  # a copy: the live mask is unchanged
    assert int(sp.masks["fc1.weight"].sum()) == kept_count(0.3, n1)


def test_2to4_2d_masks_valid_on_both_axes():
    model, opt = _make()
    sp = Sparsifier(model, opt, structure="2:4-2d")
    _train(model, opt, sp, 2)
    for n, m in sp.masks.items():
        assert torch.equal(m, nm_mask_2d(model.get_parameter(n)))
        assert (m.reshape(-1, 4).sum(1) == 2).all() and (m.t().reshape(-1, 4).sum(1) == 2).all()


# ---------------------------------------------------------------- exploitation: twin runs
def _twin_runs(exploit, opt_kind="adamw", steps=1, total_steps=None, **kw):
    a, a_opt = _make(opt=opt_kind)
    b, b_opt = _make(opt=opt_kind)
    sp_a = Sparsifier(a, a_opt, density=0.25, exploit=exploit, total_steps=total_steps, **kw)
    sp_b = Sparsifier(b, b_opt, density=0.25, exploit=None, total_steps=total_steps, **kw)
    _train(a, a_opt, sp_a, steps - 1)
    _train(b, b_opt, sp_b, steps - 1)
    forward_masks = sp_a.masks  # the p/n of the last step's forward: what its exploit acts on
    assert all(torch.equal(forward_masks[n], sp_b.masks[n]) for n in forward_masks)
    _train(a, a_opt, sp_a, 1, start=steps - 1)
    _train(b, b_opt, sp_b, 1, start=steps - 1)
    return (a, a_opt, forward_masks), (b, b_opt, sp_b)


@pytest.mark.parametrize("opt_kind", ["adamw", "sgd"])
def test_reset_zeroes_exactly_n(opt_kind):
    (a, a_opt, sp_a), (b, _, sp_b) = _twin_runs(Reset(every=2), opt_kind, steps=1)
    for n in SPARSE:  # step 1: no reset yet
        assert torch.equal(a.get_parameter(n), b.get_parameter(n))
    (a, a_opt, masks), (b, _, sp_b) = _twin_runs(Reset(every=2), opt_kind, steps=2)
    for n in SPARSE:
        m = masks[n]
        wa, wb = a.get_parameter(n).detach(), b.get_parameter(n).detach()
        assert torch.equal(wa[m], wb[m])
        assert (wa[~m] == 0).all() and (wb[~m] != 0).all()
    for n in ("head.weight", "embed.weight", "fc1.bias"):
        assert torch.equal(a.get_parameter(n), b.get_parameter(n))


@pytest.mark.parametrize("opt_kind", ["adamw", "sgd"])
def test_reset_optimizer_state_option(opt_kind):
    (a, a_opt, masks), (b, b_opt, _) = _twin_runs(Reset(every=2, reset_optimizer_state=True), opt_kind, steps=2)
    keys = ["exp_avg"] if opt_kind == "adamw" else ["momentum_buffer"]  # first moments only
    for n in SPARSE:
        m = masks[n]
        sa, sb = a_opt.state[a.get_parameter(n)], b_opt.state[b.get_parameter(n)]
        for key in keys:
            assert (sa[key][~m] == 0).all() and (sb[key][~m] != 0).any()
            assert torch.equal(sa[key][m], sb[key][m])
    sp = Sparsifier(_make()[0], None, exploit=Reset(every=2, reset_optimizer_state=True))
    with pytest.raises(CorrtoolsError, match="attach_optimizer"):  # at the first step, before any change
        sp.step()
    assert sp.steps_done == 0


def test_regularize_shrinks_exactly_n():
    beta = 0.1
    (a, _, masks), (b, _, _) = _twin_runs(Regularize(beta=beta), steps=1)
    for n in SPARSE:
        m = masks[n]
        wa, wb = a.get_parameter(n).detach(), b.get_parameter(n).detach()
        assert torch.equal(wa[m], wb[m])
        assert torch.allclose(wa[~m], (1 - beta) * wb[~m], rtol=1e-6, atol=0)


def test_fix_stops_rewiring_and_zeroes_n():
    model, opt = _make()
    sp = Sparsifier(model, opt, density=0.25, exploit=Fix(at=0.5), total_steps=8)  # fix at step 4
    twin, twin_opt = _make()
    sp_twin = Sparsifier(twin, twin_opt, density=0.25, exploit=None)
    masks = []
    for t in range(8):
        _train(model, opt, sp, 1, start=t)
        _train(twin, twin_opt, sp_twin, 1, start=t)
        masks.append(sp.masks)
        if t < 3:
            assert torch.equal(model.fc1.weight, twin.fc1.weight)
    for n in SPARSE:
        m = masks[2][n]  # rewired after step 3: the masks of step 4's forward, final from then on
        for later in masks[3:]:
            assert torch.equal(later[n], m)  # no rewiring from step 4 on
        w = model.get_parameter(n).detach()
        assert (w[~m] == 0).all()
    assert any(not torch.equal(masks[1][n], masks[2][n]) for n in SPARSE)  # it rewired before


def test_fix_step_rounding_and_validation():
    assert Fix(at=0.5).fix_step(9) == 5  # 4.5 -> 5, half up
    assert Fix(at=0.0).fix_step(100) == 0
    with pytest.raises(CorrtoolsError, match="total_steps"):
        Sparsifier(_make()[0], None, exploit=Fix())
    with pytest.raises(CorrtoolsError):
        Fix(at=1.5)
    with pytest.raises(CorrtoolsError):
        Reset(every=0)
    with pytest.raises(CorrtoolsError):
        Regularize(beta=-1)
    assert (Fix().at, Reset().every, Regularize().beta) == (0.5, 1000, 2e-4)


# ---------------------------------------------------------------- the end and persistence
@pytest.mark.parametrize("structure", ["unstructured", "2:4-2d"])
def test_finalize_gives_plain_model_with_equal_outputs(structure):
    model, opt = _make()
    sp = Sparsifier(model, opt, structure=structure)
    _train(model, opt, sp, 3)
    masks = sp.masks
    x, _ = _batch(99)
    with torch.no_grad():
        before = model(x)
    sp.finalize()
    with torch.no_grad():
        after = model(x)
    assert torch.equal(before, after)
    assert list(model.state_dict()) == list(Net().state_dict())
    for module in model.modules():
        assert "forward" not in vars(module)
    for n, m in masks.items():
        assert (model.get_parameter(n)[~m] == 0).all()
    with pytest.raises(CorrtoolsError, match="finalized"):
        sp.step()


def test_state_dict_round_trip():
    model, opt = _make()
    sp = Sparsifier(model, opt, density=0.25, exploit=Reset(every=3))
    _train(model, opt, sp, 4)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_sp = copy.deepcopy(sp.state_dict())
    model2, opt2 = _make(seed=7)
    sp2 = Sparsifier(model2, opt2, density=0.25, exploit=Reset(every=3))
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    sp2.load_state_dict(saved_sp)
    assert sp2.steps_done == 4
    for n in SPARSE:
        assert torch.equal(sp.masks[n], sp2.masks[n])
    assert sp.density_report() == sp2.density_report()
    _train(model, opt, sp, 3, start=4)
    _train(model2, opt2, sp2, 3, start=4)  # crosses the reset at step 6 in both
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    with pytest.raises(CorrtoolsError, match="config"):
        Sparsifier(_make()[0], None, density=0.5).load_state_dict(saved_sp)


def test_config_validation_and_dict_round_trip():
    cfg = SparsityConfig(density=None, structure="2:4", exploit=Reset(every=10, reset_optimizer_state=True))
    assert cfg.density == 0.5
    assert SparsityConfig.from_dict(cfg.to_dict()) == cfg
    assert SparsityConfig(structure="block:8", density=0.1).density == 0.1
    assert SparsityConfig().density == 0.5
    for bad in (
        dict(structure="2:4", density=0.25),
        dict(structure="3:2"),
        dict(structure="block:3"),
        dict(structure="dense"),
        dict(rewire_every=0),
        dict(grad_scale=-1.0),
        dict(density=0.0),
        dict(exploit="reset"),
    ):
        with pytest.raises(CorrtoolsError):
            SparsityConfig(**bad)


@pytest.mark.parametrize("structure", ["2:4", "2:4-2d", "block:2"])
def test_conv_model_trains_with_valid_masks(structure):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 8),
    ).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # every structure leaves the first conv (3 input channels) dense by default, silently
    sp = Sparsifier(model, opt, structure=structure, exploit=Reset(every=2))
    assert sp.layer_names == ["2.weight"]
    for _ in range(3):
        model(torch.randn(2, 3, 4, 4, dtype=torch.float64)).square().mean().backward()
        opt.step(); sp.step(); opt.zero_grad()
    m = sp.masks["2.weight"]
    w = model[2].weight.detach()
    if structure == "2:4":
        assert (m.movedim(1, -1).reshape(-1, 4).sum(1) == 2).all()  # along input channels
    elif structure == "2:4-2d":
        v = m.permute(0, 2, 3, 1).reshape(16, -1)  # the (k, r*s*c) view: rows along input channels
        assert (v.reshape(-1, 4).sum(1) == 2).all() and (v.t().reshape(-1, 4).sum(1) == 2).all()
    assert torch.equal(m, sp.config.parsed_structure.mask(w, sp.config.density))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    before = model(x)
    sp.finalize()
    assert torch.equal(before, model(x))


@pytest.mark.parametrize("structure", ["unstructured", "2:4", "2:4-2d", "block:4"])
def test_structure_masks_equal_one_at_a_time(structure):
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(s, generator=g) for s in [(32, 16), (16, 16, 1, 1), (8, 32, 2, 2), (64, 32)]]
    weights.append(torch.randint(-2, 3, (16, 16), generator=g).float())  # tie-heavy
    names = [f"l{i}.weight" for i in range(len(weights))]
    st = Structure.parse(structure)
    d = st.fixed_density or 0.3
    many = st.masks(weights, d, names)
    assert len(many) == len(weights)
    for w, name, m in zip(weights, names, many):
        assert torch.equal(m, st.mask(w, d, name=name))


def test_2to4_2d_mixed_linear_and_conv_masks_match_per_layer():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1), nn.Identity(),
        nn.Conv2d(32, 16, 1), nn.Flatten(), nn.Linear(16 * 2 * 2, 24), nn.Linear(24, 8), nn.Linear(8, 5),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = Sparsifier(model, opt, structure="2:4-2d")
    assert sp.layer_names == ["0.weight", "2.weight", "4.weight", "5.weight"]
    for _ in range(3):
        model(torch.randn(2, 16, 2, 2)).square().mean().backward()
        opt.step(); sp.step(); opt.zero_grad()
        for name, m in sp.masks.items():
            assert torch.equal(m, nm_mask_2d(model.get_parameter(name)))
