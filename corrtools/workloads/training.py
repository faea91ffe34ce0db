"""The optimizer and learning-rate schedule the built-in workloads share."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["optimizer_and_schedule"]


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
