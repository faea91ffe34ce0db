"""The masked-weight op inside Linear/Conv layers, and the semi-structured (2:4) path on CPU."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from corrtools.errors import CorrtoolsError
from corrtools.sparse import (
    Sparsifier,
    is_2to4,
    mask_module_,
    masked_weight,
    semi_structured_candidates,
    to_semi_structured_,
    unmask_module_,
)
from corrtools.sparse.masks import nm_mask, nm_mask_2d, topk_mask


@pytest.mark.parametrize(
    "layer, x",
    [
        (nn.Conv2d(16, 8, 3, padding=1), torch.randn(2, 16, 5, 5)),
        (nn.Conv2d(16, 8, 3, padding=1, padding_mode="reflect"), torch.randn(2, 16, 5, 5)),
        (nn.Conv1d(16, 8, 3, stride=2), torch.randn(2, 16, 9)),
        (nn.Linear(16, 8), torch.randn(3, 4, 16)),
    ],
)
def test_masked_layer_matches_functional_reference(layer, x):
    torch.manual_seed(0)
    mask = nm_mask(layer.weight)
    reference = copy.deepcopy(layer)
    with torch.no_grad():
        reference.weight.mul_(mask)
    mask_module_(layer, mask)
    assert torch.allclose(layer(x), reference(x), atol=1e-6)
    assert "weight_mask" in layer.state_dict()
    unmask_module_(layer, apply=False)
    assert "weight_mask" not in layer.state_dict() and "forward" not in vars(layer)


def test_conv_weight_gradient_is_dense_and_scaled():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 4, 3)
    mask = topk_mask(conv.weight, 0.25)
    mask_module_(conv, mask, grad_scale=0.5)
    x = torch.randn(2, 16, 6, 6)
    conv(x).square().sum().backward()
    w_eff = (conv.weight.detach() * mask).requires_grad_(True)
    F.conv2d(x, w_eff, conv.bias.detach()).square().sum().backward()
    assert torch.allclose(conv.weight.grad, torch.where(mask, w_eff.grad, 0.5 * w_eff.grad), atol=1e-5)


def test_masked_layer_follows_every_change_of_its_mask():
    """The forward reuses the mask converted to the weight dtype; every way the mask can change shows."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    x = torch.randn(3, 8)

    def expected(mask):
        return F.linear(x, layer.weight.detach() * mask, layer.bias.detach())

    mask_module_(layer, topk_mask(layer.weight, 0.5))
    assert torch.equal(layer(x), expected(layer.weight_mask))
    layer.weight_mask.logical_not_()  # in place, as the Sparsifier rewires
    assert torch.equal(layer(x), expected(layer.weight_mask))
    other = torch.rand(4, 8) > 0.5
    layer.load_state_dict({**layer.state_dict(), "weight_mask": other})  # copied into the buffer
    assert torch.equal(layer(x), expected(other))
    layer.weight_mask = torch.ones(4, 8, dtype=torch.bool)  # a new buffer tensor
    assert torch.equal(layer(x), expected(torch.ones(4, 8)))
    layer.double()  # the weight's dtype changes
    y = layer(x.double())
    assert y.dtype == torch.float64 and torch.equal(y, F.linear(x.double(), layer.weight.detach(), layer.bias))
    unmask_module_(layer, apply=False)
    assert "_corrtools_mask_factor" not in vars(layer)


def test_masked_weight_function_and_errors():
    w = torch.randn(4, 4, requires_grad=True)
    m = torch.rand(4, 4) > 0.5
    masked_weight(w, m, 2.0).sum().backward()
    assert torch.equal(w.grad, torch.where(m, 1.0, 2.0))
    with pytest.raises(CorrtoolsError, match="bool"):
        mask_module_(nn.Linear(4, 4), torch.ones(4, 4))
    with pytest.raises(CorrtoolsError, match="LayerNorm"):
        mask_module_(nn.LayerNorm(4), torch.ones(4, dtype=torch.bool))
    with pytest.raises(CorrtoolsError, match="not masked"):
        unmask_module_(nn.Linear(4, 4))


def _finalized_model(structure: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64), nn.Linear(64, 8))
    sp = Sparsifier(model, None, structure=structure)
    assert sp.layer_names == ["0.weight", "2.weight", "4.weight"]
    sp.finalize()
    return model


@pytest.mark.parametrize("structure", ["2:4", "2:4-2d"])
def test_semi_structured_candidates_are_valid_2to4(structure):
    model = _finalized_model(structure)
    names = semi_structured_candidates(model)
    # fp16 kernels need (out, in) multiples of (32, 64) [CUTLASS] or (16, 16) [cuSPARSELt]:
    # "4" (64, 32) fits only the latter; the dense head is never a candidate.
    assert "0" in names and "2" in names and "5" not in names
    for name in names:
        w = model.get_submodule(name).weight
        assert is_2to4(w)
        # 2:4 along the input features: exactly 2 non-zeros of every 4 (random weights)
        assert ((w.reshape(-1, 4) != 0).sum(1) == 2).all()
        if structure == "2:4-2d":
            assert is_2to4(w.t().contiguous())  # transposable
    assert not is_2to4(model[5].weight)


def test_is_2to4_reference():
    w = torch.randn(8, 8)
    assert is_2to4(w * nm_mask(w)) and is_2to4(w * nm_mask_2d(w))
    assert not is_2to4(w) and not is_2to4(torch.zeros(8, 6)) and not is_2to4(torch.zeros(2, 2, 4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU error path; the CUDA path is benchmarks/semi_structured.py")
def test_to_semi_structured_on_cpu_says_what_is_needed():
    model = _finalized_model("2:4")
    with pytest.raises(CorrtoolsError, match=r"CUDA GPU with Sparse Tensor Cores \(compute capability 8\.0\+\) in fp16/bf16"):
        to_semi_structured_(model.half())
    assert isinstance(model[0].weight, nn.Parameter) and model[0].weight.layout == torch.strided


def _fake_converted(w: torch.Tensor) -> nn.Parameter:
    """A semi-structured weight built on CPU (torch converts only on CUDA): shape and dtype of ``w``."""
    packed = torch.zeros(w.numel() // 2 + w.numel() // 8, dtype=w.dtype)
    t = torch.sparse.SparseSemiStructuredTensorCUSPARSELT(w.shape, packed, None, None, None, None)
    return nn.Parameter(t, requires_grad=False)


def test_converted_layers_are_skipped_and_a_second_conversion_does_nothing():
    # Seen on an H200: a second to_semi_structured_ (and semi_structured_candidates, is_2to4) on a
    # converted model raised torch's NotImplementedError about `view`.
    from corrtools.sparse import kernels

    model = _finalized_model("2:4").half()
    model[0].weight = _fake_converted(model[0].weight)
    assert is_2to4(model[0].weight)
    assert "0" not in semi_structured_candidates(model) and "2" in semi_structured_candidates(model)
    assert kernels._conversion_targets(model) == semi_structured_candidates(model, torch.float16)  # "2", and "4" under cuSPARSELt
    model[2].weight = _fake_converted(model[2].weight)
    model[4].weight = _fake_converted(model[4].weight)
    assert kernels._conversion_targets(model) == [] and semi_structured_candidates(model) == []
    to_semi_structured_(model)  # nothing left to convert: no error, even on CPU
    assert isinstance(model[0].weight, torch.sparse.SparseSemiStructuredTensor)
    assert model[5].weight.layout == torch.strided


def test_cutlass_kernels_are_refused_off_compute_capability_8(monkeypatch):
    # Seen on an H200 (9.0): with the CUTLASS backend conversion succeeded and the first matmul
    # failed ("sparse_semi_structured_mad_op : Supported only on GPUs with compute capability 8.x").
    from corrtools.sparse import kernels

    cutlass = torch.sparse.SparseSemiStructuredTensorCUTLASS
    cusparselt = torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    kernels._check_capability(cusparselt, (9, 0), "H200")
    kernels._check_capability(cusparselt, (8, 0), "A100")
    kernels._check_capability(cutlass, (8, 6), "A10")
    with pytest.raises(CorrtoolsError, match=r"8\.0\+.*T4 has 7\.5"):
        kernels._check_capability(cusparselt, (7, 5), "T4")
    with pytest.raises(CorrtoolsError, match=r"CUTLASS .* 8\.x and H200 has 9\.0.*no cuSPARSELt"):
        kernels._check_capability(cutlass, (9, 0), "H200")
    monkeypatch.setattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", True)
    with pytest.raises(CorrtoolsError, match="_FORCE_CUTLASS is set"):
        kernels._check_capability(cutlass, (9, 0), "H200")


def test_docstring_examples_run():
    import doctest

    import corrtools.sparse as sparse_pkg
    from corrtools.sparse import masks

    for module in (sparse_pkg, masks):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0
