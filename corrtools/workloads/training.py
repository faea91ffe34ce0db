"""The optimizer, learning-rate schedule and training step the built-in workloads share."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["optimizer_and_schedule", "take_step"]


def optimizer_and_schedule(model: nn.Module, cfg: Any) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW or SGD with momentum from ``cfg`` (``optimizer``, ``lr``, ``weight_decay``, ``momentum``),
    and its schedule: linear warm-up over ``cfg.warmup_steps``, then a cosine to 10% of ``lr`` at
    ``cfg.steps``; constant when ``cfg.schedule == "constant"``."""
    if cfg.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    constant = getattr(cfg, "schedule", "cosine") == "constant"

    def factor(step: int) -> float:
        if constant:
            return 1.0
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def take_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss: Callable[[], torch.Tensor],
    after_step: Callable[[], None] | None = None,
) -> float:
    """One optimizer step on ``loss()`` (a scalar computed on a fresh batch); ``after_step`` runs
    right after ``optimizer.step()`` (e.g. a Sparsifier), before the schedule advances. Returns the
    loss as a float."""
    model.train()
    value = loss()
    value.backward()
    optimizer.step()
    if after_step is not None:
        after_step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(value.detach())
