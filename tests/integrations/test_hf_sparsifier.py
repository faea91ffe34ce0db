"""The Sparsifier on Hugging Face models as they are (tiny configs, no download).

GPT-2 computes with ``transformers.pytorch_utils.Conv1D`` (weight stored (in, out)); Llama with
``nn.Linear`` (out, in). For every structure: the tied / output head stays dense, the groups run
along the inner dimension ``in`` (axis 0 of a Conv1D weight, axis 1 of a Linear's), and the masked
model computes what an unmasked copy computes with ``weight * mask``.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from corrtools.sparse import Sparsifier

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STRUCTURES = ["unstructured", "2:4", "2:4-2d", "block:4"]


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _in_major(module: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``t`` (shaped like the weight) as (out, in): a Conv1D stores (in, out)."""
    return t.t() if type(module).__name__ == "Conv1D" else t


def _groups_of_4_keep_2(mask: torch.Tensor) -> bool:
    """(rows, cols) bool: every group of 4 consecutive entries along a row keeps exactly 2."""
    return bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2-conv1d", "llama-linear"])
def test_every_structure_on_hf_models(make, structure):
    model = make()
    reference = copy.deepcopy(model)  # never masked: computes with weight * mask set by hand below
    density = None if structure in ("2:4", "2:4-2d") else 0.5
    sp = Sparsifier(model, density=density, structure=structure)
    modules = dict(model.named_modules())
    kinds = {type(modules[n[: -len(".weight")]]).__name__ for n in sp.layer_names}
    assert kinds == ({"Conv1D"} if make is _gpt2 else {"Linear"})
    # the output projection (GPT-2: tied to the embedding) stays dense by default
    assert "lm_head.weight" not in sp.layer_names and not hasattr(model.lm_head, "weight_mask")
    if make is _gpt2:
        assert model.lm_head.weight is model.transformer.wte.weight
        assert len(sp.layer_names) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in 2 blocks
    else:
        assert len(sp.layer_names) == 14  # q, k, v, o, gate, up, down in 2 blocks

    for name in sp.layer_names:
        module = modules[name[: -len(".weight")]]
        mask = module.weight_mask
        assert mask.shape == module.weight.shape
        gemm = _in_major(module, mask)  # (out, in)
        if structure in ("2:4", "2:4-2d"):
            assert _groups_of_4_keep_2(gemm), name  # 2:4 along the inner dimension `in`
        if structure == "2:4-2d":
            assert _groups_of_4_keep_2(gemm.t().contiguous()), name  # and along `out`
        if structure == "block:4":  # 4x4 tiles kept or dropped whole
            tiles = gemm.reshape(gemm.shape[0] // 4, 4, gemm.shape[1] // 4, 4).sum((1, 3))
            assert bool(((tiles == 0) | (tiles == 16)).all()), name
        with torch.no_grad():
            reference.get_parameter(name).mul_(mask)
    kept = sum(int(modules[n[:-7]].weight_mask.sum()) for n in sp.layer_names)
    total = sum(modules[n[:-7]].weight_mask.numel() for n in sp.layer_names)
    assert kept / total == pytest.approx(0.5, abs=1e-3)

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)

    # the weight gradient is dense (grad_scale=1): on p and n alike, the gradient of the loss at
    # weight * mask, which is what the reference computes for its (masked-by-hand) weights
    model(input_ids=ids, labels=ids).loss.backward()
    reference(input_ids=ids, labels=ids).loss.backward()
    for name in sp.layer_names:
        torch.testing.assert_close(model.get_parameter(name).grad, reference.get_parameter(name).grad)
    # one optimizer step and a rewiring: the masks keep their structure
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.step()
    sp.step()
    assert sp.steps_done == 1
    if structure in ("2:4", "2:4-2d"):
        assert all(_groups_of_4_keep_2(_in_major(modules[n[:-7]], modules[n[:-7]].weight_mask)) for n in sp.layer_names)
