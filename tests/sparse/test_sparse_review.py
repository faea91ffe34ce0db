"""The review's defects (issue 7): shared weights, MHA, pickling, half-precision REGULARIZE,
no host reads in rewiring, validation, resuming, per-layer settings, allocations, HF Conv1D."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from corrtools.errors import CorrtoolsError
from corrtools.sparse import Fix, Regularize, Reset, Sparsifier, erk_densities, kernels
from corrtools.sparse.masks import kept_count, nm_mask, topk_mask


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _steps(model, opt, sp, n, x=None):
    x = torch.randn(8, 16) if x is None else x
    for _ in range(n):
        model(x).square().mean().backward()
        opt.step(); sp.step(); opt.zero_grad()


# ---------------------------------------------------------------- 4. shared weights
def test_shared_weight_is_masked_in_every_user():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)
            self.b = nn.Linear(16, 16)
            self.b.weight = self.a.weight  # ALBERT-style sharing
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            return self.head(self.b(torch.relu(self.a(x))))

    torch.manual_seed(0)
    model = Shared()
    sp = Sparsifier(model, None, density=0.25)
    assert sp.layer_names == ["a.weight"]
    assert model.a.weight_mask is model.b.weight_mask  # one mask, both users
    x = torch.randn(3, 16)
    w_eff = model.a.weight.detach() * model.a.weight_mask
    ref = F.linear(F.linear(torch.relu(F.linear(x, w_eff, model.a.bias)), w_eff, model.b.bias), model.head.weight, model.head.bias)
    assert torch.allclose(model(x), ref, atol=1e-6)


def test_weight_tied_to_an_embedding_is_refused_when_included():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 16)
            self.proj = nn.Linear(16, 10, bias=False)
            self.proj.weight = self.embed.weight
            self.fc = nn.Linear(16, 16)
            self.out = nn.Linear(16, 3)

    model = Tied()
    assert Sparsifier(model, None).layer_names == ["fc.weight"]  # tied: dense by default
    with pytest.raises(CorrtoolsError, match=r"also embed\.weight of a Embedding.*untie"):
        Sparsifier(Tied(), None, include=["proj"])


# ---------------------------------------------------------------- 5. MultiheadAttention
class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.fc(self.attn(x, x, x)[0]))


def test_mha_out_proj_is_left_dense_with_a_warning():
    with pytest.warns(UserWarning, match=r"MultiheadAttention.*attn\.out_proj\.weight"):
        sp = Sparsifier(_Attn(), None)
    assert sp.layer_names == ["fc.weight"]
    with pytest.raises(CorrtoolsError, match="MultiheadAttention, which reads the weight directly"):
        Sparsifier(_Attn(), None, include=["attn.out_proj"])
    with warnings_none():
        Sparsifier(_Attn(), None, exclude=["attn.out_proj"])  # excluded: no warning


class warnings_none:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


# ---------------------------------------------------------------- 6. pickling
def test_masked_model_pickles_with_torch_save():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = Sparsifier(model, opt, density=0.25)
    _steps(model, opt, sp, 2)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(5, 16)
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded[0].weight_mask, model[0].weight_mask)
    with torch.no_grad():  # the loaded copy still computes with its own mask only
        loaded[0].weight[~loaded[0].weight_mask] += 1.0
    assert torch.equal(loaded(x), model(x))


# ---------------------------------------------------------------- 7. REGULARIZE in half precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_regularize_takes_effect_in_half_precision(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 2)).to(dtype)
    sp = Sparsifier(model, None, density=0.25, exploit=Regularize(beta=2e-4), rewire_every=10_000)
    mask = sp.masks["0.weight"]
    w0 = model[0].weight.detach().float().clone()
    for _ in range(1000):
        sp.step()
    w = model[0].weight.detach().float()
    ratio = (w[~mask].abs().sum() / w0[~mask].abs().sum()).item()
    assert abs(ratio - (1 - 2e-4) ** 1000) < 0.005, ratio  # 0.819; round-to-nearest gave 1.000
    assert torch.equal(w[mask], w0[mask])  # p untouched


def test_stochastic_round_is_unbiased():
    from corrtools.sparse.exploit import stochastic_round

    g = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2**-10)  # 1/8 of a bf16 ulp above 1; bf16 nearest gives 1.0
    for dtype in (torch.bfloat16, torch.float16):
        y = stochastic_round(x, dtype, g).float()
        assert abs(y.mean().item() - x[0].item()) < 2e-5
    sub = torch.full((200_000,), 2.0**-26)  # a quarter of fp16's subnormal spacing 2^-24
    assert abs(stochastic_round(sub, torch.float16, g).float().mean().item() / 2.0**-26 - 1) < 0.02
    assert torch.isinf(stochastic_round(torch.tensor([math.inf]), torch.bfloat16, g)).all()


# ---------------------------------------------------------------- 10. no host reads while training
class _HostReads(TorchDispatchMode):
    """Counts ops that need a device value on the host (a GPU sync): scalar reads and data-dependent shapes."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "is_nonzero", "item"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCING:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cpu_select", [True, False])
@pytest.mark.parametrize("structure", ["unstructured", "2:4", "2:4-2d", "block:4"])
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_step_reads_nothing_on_the_host(monkeypatch, structure, cpu_select, allocation):
    import corrtools.sparse.masks as masks

    monkeypatch.setattr(masks, "_CPU_SELECT", cpu_select, raising=False)  # False: the accelerators' path
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    exploit = Reset(every=2, reset_optimizer_state=True)
    sp = Sparsifier(model, opt, structure=structure, allocation=allocation, exploit=exploit)
    x = torch.randn(8, 16)
    model(x).square().mean().backward()
    opt.step()
    reads = _HostReads()
    with reads:
        sp.step()
        sp.step()  # not stepped: a no-op
    opt.step()  # (Adam itself reads its step count on the host)
    with reads:
        sp.step()  # a reset step
        for layer in (model[0], model[2]):  # small integers: ties at every threshold
            layer.weight.data.copy_(torch.randint(-2, 3, layer.weight.shape, generator=torch.Generator().manual_seed(0)))
        sp.rewire()
    assert reads.seen == []
    assert sp.steps_done == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the CPU test above reads the ops")
@pytest.mark.parametrize("structure", ["unstructured", "2:4", "2:4-2d", "block:4"])
def test_step_does_not_sync_a_gpu(structure):
    model = _mlp().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = Sparsifier(model, opt, structure=structure, exploit=Reset(every=1, reset_optimizer_state=True))
    model(torch.randn(8, 16, device="cuda")).square().mean().backward()
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sp.step()
        sp.rewire()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------- 11. validation and resuming
def test_density_that_keeps_nothing_is_an_error():
    with pytest.raises(CorrtoolsError, match=r"density=1e-09 keeps 0 of the 512 weights of '0\.weight'"):
        Sparsifier(_mlp(), None, density=1e-9, allocation="uniform")
    with pytest.raises(CorrtoolsError, match=r"keeps 0 of the 1536 weights of the unstructured layers"):
        Sparsifier(_mlp(), None, density=1e-9)
    with pytest.raises(CorrtoolsError, match=r"keeps 0 of the 32 4x4 blocks"):
        Sparsifier(_mlp(), None, density=1e-3, structure="block:4", allocation="uniform")


def test_included_misfit_is_an_error_and_all_misfit_message():
    model = nn.Sequential(nn.Linear(16, 30), nn.Linear(30, 16), nn.Linear(16, 2))
    with pytest.raises(CorrtoolsError, match=r"include names '1\.weight', but .*\(16, 30\) cannot be 2:4"):
        Sparsifier(model, None, structure="2:4", include=["1"])
    bad = nn.Sequential(nn.Linear(6, 30), nn.Linear(30, 2))
    with pytest.raises(CorrtoolsError) as err:
        Sparsifier(bad, None, structure="2:4")
    assert "include" not in str(err.value) and "0.weight (30, 6)" in str(err.value)
    assert "structure these shapes fit" in str(err.value)


def test_resume_with_other_total_steps_when_the_exploit_does_not_use_it():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = Sparsifier(model, opt, exploit=Reset(every=5), total_steps=100)
    _steps(model, opt, sp, 3)
    state = sp.state_dict()
    sp2 = Sparsifier(_mlp(), None, exploit=Reset(every=5), total_steps=300)  # the run is extended
    sp2.load_state_dict(state)
    assert sp2.steps_done == 3
    fix = Sparsifier(_mlp(), None, exploit=Fix(), total_steps=100).state_dict()
    with pytest.raises(CorrtoolsError, match="config"):
        Sparsifier(_mlp(), None, exploit=Fix(), total_steps=300).load_state_dict(fix)
    with pytest.raises(CorrtoolsError, match="config"):
        Sparsifier(_mlp(), None, exploit=Reset(every=6), total_steps=100).load_state_dict(state)


# ---------------------------------------------------------------- per-layer settings, allocations
def test_per_layer_density_and_structure_mapping_and_callable():
    model = _mlp()
    sp = Sparsifier(model, None, density={"0": 0.1, "2.weight": 0.3}, structure={"2": "unstructured"})
    assert sp.plan == {"0.weight": ("unstructured", 0.1), "2.weight": ("unstructured", 0.3)}
    assert int(sp.masks["0.weight"].sum()) == kept_count(0.1, 512)
    assert torch.equal(sp.masks["2.weight"], topk_mask(model[2].weight, 0.3))
    model = _mlp()
    sp = Sparsifier(model, None, structure=lambda name, m: "2:4" if name == "2" else None, density=0.25)
    assert sp.plan == {"0.weight": ("unstructured", 0.25), "2.weight": ("2:4", 0.5)}
    assert torch.equal(sp.masks["2.weight"], nm_mask(model[2].weight))
    assert [r.structure for r in sp.density_report()] == ["unstructured", "2:4"]
    with pytest.raises(CorrtoolsError, match="did you mean '0.weight'"):
        Sparsifier(_mlp(), None, density={"0.weigth": 0.1})
    with pytest.raises(CorrtoolsError, match="keeps exactly 0.5"):
        Sparsifier(_mlp(), None, density={"0": 0.3}, structure="2:4")
    with pytest.raises(CorrtoolsError, match="allocation='uniform'"):
        Sparsifier(_mlp(), None, density={"0": 0.3}, allocation="global")


def test_global_allocation_is_one_threshold_over_all_layers():
    model = _mlp()
    with torch.no_grad():
        model[2].weight.mul_(3.0)  # this layer's weights are larger: it keeps more
    sp = Sparsifier(model, None, density=0.25)  # default: global
    both = torch.cat([model[0].weight.detach().reshape(-1), model[2].weight.detach().reshape(-1)])
    ref = topk_mask(both, 0.25)  # independent: top-k of the concatenation
    got = torch.cat([sp.masks["0.weight"].reshape(-1), sp.masks["2.weight"].reshape(-1)])
    assert torch.equal(got, ref)
    densities = [r.density for r in sp.density_report()]
    assert densities[1] > 0.25 > densities[0]
    assert sp.participating_fraction() == kept_count(0.25, both.numel()) / both.numel()


def test_erk_densities():
    shapes = [(32, 16), (32, 32), (4, 32), (64, 16, 3, 3)]
    d = erk_densities(shapes, 0.2)
    numels = [math.prod(s) for s in shapes]
    assert abs(sum(x * n for x, n in zip(d, numels)) - 0.2 * sum(numels)) < 1e-6
    assert all(0 < x <= 1 for x in d)
    raw = [sum(s) / n for s, n in zip(shapes, numels)]
    free = [i for i in range(4) if d[i] < 1]
    for i in free:  # proportional to sum/prod among the layers below 1
        assert abs(d[i] / d[free[0]] - raw[i] / raw[free[0]]) < 1e-9
    assert d[2] == 1.0  # the small (4, 32) layer saturates: dense
    model = _mlp()
    sp = Sparsifier(model, None, density=0.2, allocation="erk")
    expect = erk_densities([(32, 16), (32, 32)], 0.2)
    assert [v[1] for v in sp.plan.values()] == expect
    assert int(sp.masks["0.weight"].sum()) == kept_count(expect[0], 512)


def test_public_rewire():
    model = _mlp()
    sp = Sparsifier(model, None, density=0.25, allocation="uniform")
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(32, 16))
    sp.rewire()
    assert torch.equal(sp.masks["0.weight"], topk_mask(model[0].weight, 0.25))
    assert sp.steps_done == 0 and sp.density_report()[0].rewired_last > 0


# ---------------------------------------------------------------- Hugging Face Conv1D (GPT-2)
class Conv1D(nn.Module):
    """Stand-in with transformers.pytorch_utils.Conv1D's layout: weight (in, out), x @ W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


@pytest.mark.parametrize("structure", ["2:4", "2:4-2d", "unstructured"])
def test_hf_conv1d_is_masked_along_its_input_axis(structure):
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(32, 16), nn.ReLU(), Conv1D(16, 32), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = Sparsifier(model, opt, structure=structure, density=None if structure != "unstructured" else 0.25)
    assert sp.layer_names == ["0.weight", "2.weight"]
    _steps(model, opt, sp, 2, x=torch.randn(4, 16))
    m = sp.masks["0.weight"]  # shaped like the weight: (in=16, out=32)
    assert m.shape == (16, 32)
    w = model[0].weight.detach()
    if structure == "2:4":
        assert (m.t().reshape(-1, 4).sum(1) == 2).all()  # groups of 4 consecutive inputs per output
        assert torch.equal(m, nm_mask(w.t()).t())
    x = torch.randn(3, 16)
    ref = torch.addmm(model[0].bias, x, w * m)
    assert torch.allclose(model[0](x), ref, atol=1e-6)
    before = model(x)
    sp.finalize()
    assert torch.equal(model(x), before)


# ---------------------------------------------------------------- to_semi_structured_ with fp32 norms
def test_semi_structured_checks_only_the_linear_weights(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 64), nn.Linear(64, 8))
    Sparsifier(model, None, structure="2:4").finalize()
    model[0].half(); model[2].half(); model[3].half()  # LayerNorm stays fp32, as in mixed precision
    assert kernels._conversion_targets(model) == ["0", "2"]
    model[2].float()
    with pytest.raises(CorrtoolsError, match=r"fp16 or bf16.*'2'"):
        kernels._conversion_targets(model)


# ---------------------------------------------------------------- grad_scale under Adam (documented)
def test_grad_scale_barely_changes_adam_updates_of_n():
    """Adam divides by the root of each weight's own second moment: a constant s cancels (up to eps)."""
    runs = {}
    for s in (1.0, 0.1):
        model = _mlp(seed=3)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sp = Sparsifier(model, opt, density=0.25, grad_scale=s, rewire_every=10_000)
        _steps(model, opt, sp, 10, x=torch.randn(8, 16, generator=torch.Generator().manual_seed(0)))
        runs[s] = (model[0].weight.detach().clone(), sp.masks["0.weight"])
    (w1, m), (w01, _) = runs[1.0], runs[0.1]
    w_init = _mlp(seed=3)[0].weight.detach()
    moved = (w1 - w_init)[~m].abs().mean()
    assert moved > 1e-3  # n did move
    # ...by the same amount under s = 0.1, except where gradients are as small as Adam's eps
    assert (w1 - w01)[~m].abs().median() < 0.01 * moved
    sgd = {}
    for s in (1.0, 0.1):  # under SGD, s scales n's steps
        model = _mlp(seed=3)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        sp = Sparsifier(model, opt, density=0.25, grad_scale=s, rewire_every=10_000)
        _steps(model, opt, sp, 1, x=torch.randn(8, 16, generator=torch.Generator().manual_seed(0)))
        sgd[s] = (model[0].weight.detach() - w_init)[~m]
    assert torch.allclose(sgd[0.1], 0.1 * sgd[1.0], atol=1e-7)
