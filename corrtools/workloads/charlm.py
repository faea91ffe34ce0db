"""A small character-level transformer language model on stdlib source: the built-in workload.

CPU-sized and seeded: the demo, the benchmarks and the sparse experiments use it. Reads top to bottom:
config, model, data, one training step.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from corrtools.errors import CorrtoolsError
from corrtools.workloads.training import optimizer_and_schedule, take_step
from corrtools.workloads.text import VOCAB_SIZE, encode, stdlib_text

__all__ = ["CharLMConfig", "CharTransformer", "CharLMWorkload"]


@dataclass(frozen=True)
class CharLMConfig:
    d_model: int = 128          # residual width
    n_layer: int = 2            # transformer blocks
    n_head: int = 4             # attention heads; d_model must divide by it
    seq_len: int = 64           # context length in characters
    batch_size: int = 16        # sequences per step
    steps: int = 2000           # planned optimizer steps (sets the LR schedule's length)
    optimizer: str = "adamw"    # "adamw" | "sgd"
    lr: float = 3e-3            # peak learning rate
    weight_decay: float = 0.0   # decoupled for AdamW, L2 for SGD
    momentum: float = 0.9       # SGD only
    schedule: str = "cosine"    # "cosine" (linear warm-up, cosine to 10% of lr) | "constant"
    warmup_steps: int = 50      # linear warm-up steps for "cosine"
    text_bytes: int = 2_000_000 # characters of stdlib source to train on (last 10% held out)
    seed: int = 0               # seeds weights and batch order
    attn_width: int | None = None  # inner width of attention (q, k, v, heads); None: d_model
    mlp_width: int | None = None   # hidden width of the MLP; None: 4 * d_model

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise CorrtoolsError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                                 "choose d_model a multiple of n_head.")
        if self.optimizer not in ("adamw", "sgd"):
            raise CorrtoolsError(f"optimizer={self.optimizer!r} is unknown; use 'adamw' or 'sgd'.")
        if self.schedule not in ("cosine", "constant"):
            raise CorrtoolsError(f"schedule={self.schedule!r} is unknown; use 'cosine' or 'constant'.")
        for name in ("d_model", "n_layer", "n_head", "seq_len", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise CorrtoolsError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.attn_width is not None and (self.attn_width < 1 or self.attn_width % self.n_head):
            raise CorrtoolsError(f"attn_width={self.attn_width} must be a positive multiple of n_head={self.n_head}.")
        if self.mlp_width is not None and self.mlp_width < 1:
            raise CorrtoolsError(f"mlp_width={self.mlp_width} must be at least 1.")

    def small(self, density: float) -> CharLMConfig:
        """SMALL at ``density``: attention's inner width and the MLP's hidden width times d.

        The sparsifiable layers are qkv (d_model -> 3a), proj (a -> d_model), fc1 (d_model -> h) and
        fc2 (h -> d_model); only a and h shrink (a to a multiple of n_head), so they hold about d of
        their weights while the residual width, embedding and output head stay as they are.
        """
        from corrtools.sparse.baselines import small_width

        a = self.attn_width or self.d_model
        h = self.mlp_width or 4 * self.d_model
        return replace(self, attn_width=small_width(a, density, self.n_head), mlp_width=small_width(h, density))

    def to_dict(self) -> dict:
        return asdict(self)


class _Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int, width: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.width = width  # A, the inner width
        self.qkv = nn.Linear(d_model, 3 * width, bias=False)
        self.proj = nn.Linear(width, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        A = self.width
        q, k, v = self.qkv(x).split(A, dim=2)  # each (B, T, A)
        q, k, v = (t.view(B, T, self.n_head, A // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, A/H)
        return self.proj(y.transpose(1, 2).reshape(B, T, A))


class _MLP(nn.Module):
    def __init__(self, d_model: int, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, width, bias=False)
        self.fc2 = nn.Linear(width, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, cfg: CharLMConfig) -> None:
        super().__init__()
        d_model = cfg.d_model
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = _Attention(d_model, cfg.n_head, cfg.attn_width or d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = _MLP(d_model, cfg.mlp_width or 4 * d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Decoder-only transformer: ids (B, T) -> logits (B, T, vocab)."""

    def __init__(self, cfg: CharLMConfig, vocab_size: int = VOCAB_SIZE) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.seq_len, cfg.d_model))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
        for block in self.blocks:  # scaled residual projections, as in GPT-2
            for p in (block.attn.proj.weight, block.mlp.fc2.weight):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, V)


class CharLMWorkload:
    """Model, optimizer, schedule and seeded batches of the character LM, ready to step.

    >>> wl = CharLMWorkload(CharLMConfig(d_model=32, n_layer=1, seq_len=16, batch_size=4, steps=3))
    >>> x, y = wl.get_batch(); tuple(x.shape)
    (4, 16)
    >>> loss = wl.train_step(); 0.0 < loss < 10.0
    True
    """

    def __init__(self, cfg: CharLMConfig = CharLMConfig(), device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        tokens = torch.from_numpy(encode(stdlib_text(cfg.text_bytes)).astype(np.int64))
        split = int(0.9 * len(tokens))
        self.train_tokens, self.val_tokens = tokens[:split], tokens[split:]
        torch.manual_seed(cfg.seed)
        self.model = CharTransformer(cfg).to(self.device)
        self.optimizer, self.scheduler = optimizer_and_schedule(self.model, cfg)
        self._gen = torch.Generator().manual_seed(cfg.seed + 1)  # batch order only

    def get_batch(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows of the text: inputs and next-character targets, (batch, seq_len) int64 each."""
        tokens = self.train_tokens if split == "train" else self.val_tokens
        T = self.cfg.seq_len
        starts = torch.randint(0, len(tokens) - T - 1, (self.cfg.batch_size,), generator=self._gen)
        offsets = starts[:, None] + torch.arange(T + 1)  # (B, T+1)
        window = tokens[offsets]
        return window[:, :-1].to(self.device), window[:, 1:].to(self.device)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean next-character cross-entropy in nats."""
        logits = self.model(x)  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def train_step(self, after_step: Callable[[], None] | None = None) -> float:
        """One optimizer step; ``after_step`` runs right after ``optimizer.step()`` (e.g. a Sparsifier)."""
        return take_step(self.model, self.optimizer, self.scheduler, lambda: self.loss(*self.get_batch()), after_step)

    @torch.no_grad()
    def evaluate(self, batches: int = 8, seed: int | None = None) -> float:
        """Mean held-out loss over ``batches`` validation batches, in nats.

        With ``seed`` the batches come from their own generator (the same windows for every run and
        every call, the training batch order untouched); without it, from the training generator.
        """
        self.model.eval()
        saved = self._gen
        if seed is not None:
            self._gen = torch.Generator().manual_seed(seed)
        try:
            losses = [float(self.loss(*self.get_batch("val"))) for _ in range(batches)]
        finally:
            self._gen = saved
            self.model.train()
        return sum(losses) / len(losses)
