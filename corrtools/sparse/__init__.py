"""Sparse training (Algorithm 1): masks, the masked-weight op, the Sparsifier, FIX / RESET / REGULARIZE.

>>> import torch
>>> from torch import nn
>>> from corrtools.sparse import Sparsifier, Reset
>>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
>>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
>>> sp = Sparsifier(model, optimizer, density=0.25, exploit=Reset(every=1000))
>>> sp.layer_names  # the last Linear is the output projection: left dense
['0.weight']
>>> for _ in range(3):
...     loss = model(torch.randn(8, 16)).square().mean()
...     loss.backward(); optimizer.step(); sp.step(); optimizer.zero_grad()
>>> sp.participating_fraction()
0.25
>>> sp.finalize()  # a plain model whose non-participating weights are 0
>>> float((model[0].weight == 0).float().mean())
0.75
"""
from __future__ import annotations

from corrtools.sparse.allocation import erk_densities
from corrtools.sparse.config import SparsityConfig, Structure
from corrtools.sparse.exploit import Fix, Regularize, Reset
from corrtools.sparse.kernels import is_2to4, semi_structured_candidates, to_semi_structured_
from corrtools.sparse.masks import (
    block_mask,
    block_mask_many,
    gemm_view,
    nm_mask,
    nm_mask_2d,
    nm_mask_2d_many,
    patterns_2d,
    topk_mask,
    topk_mask_many,
)
from corrtools.sparse.ops import mask_module_, masked_weight, unmask_module_
from corrtools.sparse.sparsifier import LayerReport, Sparsifier

__all__ = [
    "Fix",
    "LayerReport",
    "Regularize",
    "Reset",
    "Sparsifier",
    "SparsityConfig",
    "Structure",
    "block_mask",
    "block_mask_many",
    "erk_densities",
    "gemm_view",
    "is_2to4",
    "mask_module_",
    "masked_weight",
    "nm_mask",
    "nm_mask_2d",
    "nm_mask_2d_many",
    "patterns_2d",
    "semi_structured_candidates",
    "to_semi_structured_",
    "topk_mask",
    "topk_mask_many",
    "unmask_module_",
]
