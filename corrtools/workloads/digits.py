"""A small convolutional classifier on the 8×8 digits that scikit-learn ships (no download).

Needs the optional extra ``corrtools[experiments]`` (scikit-learn); imported only when used. Reads
top to bottom: config, data, model, one training step. Test error is measured on a fixed held-out
split that does not depend on the run's seed.

The data are made harder than the plain digits, so that model width matters: every image is
corrupted with fixed Gaussian pixel noise (``noise``, in units of the [0, 1] pixel range), the
training set is a subset (``train_size``), and training batches are shifted by up to one pixel.
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

__all__ = ["DigitsConfig", "DigitsNet", "DigitsWorkload", "load_digits_split"]

_SPLIT_SEED = 20240  # the held-out split and the pixel noise: the same for every run
_TEST_SIZE = 597  # of 1797 images


@dataclass(frozen=True)
class DigitsConfig:
    channels: int = 16          # conv1 output channels (conv2: 2x, conv3: 4x); multiples of 16 for N:M
    hidden: int = 128           # width of the hidden fully connected layer
    steps: int = 1000           # planned optimizer steps (sets the LR schedule's length)
    batch_size: int = 64        # images per step
    optimizer: str = "adamw"    # "adamw" | "sgd"
    lr: float = 2e-3            # peak learning rate
    weight_decay: float = 0.0   # decoupled for AdamW, L2 for SGD
    momentum: float = 0.9       # SGD only
    warmup_steps: int = 20      # linear warm-up, then cosine to 10% of lr
    noise: float = 0.15         # std of the fixed Gaussian pixel noise (pixels in [0, 1])
    train_size: int = 1200      # training images used (of 1200)
    seed: int = 0               # seeds weights, batch order and shifts

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise CorrtoolsError(f"optimizer={self.optimizer!r} is unknown; use 'adamw' or 'sgd'.")
        for name in ("channels", "hidden", "steps", "batch_size", "train_size"):
            if getattr(self, name) < 1:
                raise CorrtoolsError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.train_size > 1797 - _TEST_SIZE:
            raise CorrtoolsError(f"train_size={self.train_size} exceeds the {1797 - _TEST_SIZE} training images.")

    def to_dict(self) -> dict:
        return asdict(self)

    def small(self, density: float) -> DigitsConfig:
        """SMALL at ``density``: every conv's channels and the hidden width times sqrt(d).

        conv2 (c -> 2c), conv3 (2c -> 4c) and fc (4c·4 -> hidden) are the sparsifiable layers; each
        has both its widths scaled by sqrt(d), so each holds about d of its weights. conv1's input
        (one image channel) and the head's output (10 classes) stay. Rounded to whole channels.
        """
        from corrtools.sparse.baselines import small_width

        f = math.sqrt(density)
        return replace(self, channels=small_width(self.channels, f), hidden=small_width(self.hidden, f))


def load_digits_split(noise: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images (n, 1, 8, 8) float32 in [0, 1] plus noise, labels int64.

    The split (1200 train, 597 test) and the noise are drawn with a fixed seed: identical for all runs.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise CorrtoolsError(
            "The digits workload needs scikit-learn: pip install 'corrtools[experiments]'."
        ) from err
    data = load_digits()
    x = data.images.astype(np.float32) / 16.0  # (1797, 8, 8)
    y = data.target.astype(np.int64)
    rng = np.random.default_rng(_SPLIT_SEED)
    x = x + noise * rng.standard_normal(x.shape).astype(np.float32)
    order = rng.permutation(len(y))
    test, train = order[:_TEST_SIZE], order[_TEST_SIZE:]
    t = torch.from_numpy
    return t(x[train, None]), t(y[train]), t(x[test, None]), t(y[test])


class DigitsNet(nn.Module):
    """images (B, 1, 8, 8) -> logits (B, 10): three 3×3 convs, two max-pools, two linear layers."""

    def __init__(self, cfg: DigitsConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.conv1 = nn.Conv2d(1, c, 3, padding=1)  # dense (one input channel)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * c, 4 * c, 3, padding=1)
        self.fc = nn.Linear(4 * c * 4, cfg.hidden)
        self.head = nn.Linear(cfg.hidden, 10)  # the output projection: dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))  # (B, c, 8, 8)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 2c, 4, 4)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # (B, 4c, 2, 2)
        return self.head(F.relu(self.fc(x.flatten(1))))


class DigitsWorkload:
    """Model, optimizer, schedule and seeded batches of the digits classifier, ready to step.

    Same interface as :class:`~corrtools.workloads.CharLMWorkload`: ``train_step(after_step)``,
    ``evaluate()`` (here: top-1 test error, a fraction).
    """

    def __init__(self, cfg: DigitsConfig = DigitsConfig(), device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        x_train, y_train, self.x_test, self.y_test = load_digits_split(cfg.noise)
        self.x_train, self.y_train = x_train[: cfg.train_size], y_train[: cfg.train_size]
        torch.manual_seed(cfg.seed)
        self.model = DigitsNet(cfg).to(self.device)
        self.optimizer, self.scheduler = optimizer_and_schedule(self.model, cfg)
        self._gen = torch.Generator().manual_seed(cfg.seed + 1)  # batch order and shifts

    def get_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A random training batch, each image shifted by up to one pixel: (B, 1, 8, 8), (B,)."""
        idx = torch.randint(0, len(self.y_train), (self.cfg.batch_size,), generator=self._gen)
        x = F.pad(self.x_train[idx], (1, 1, 1, 1))  # (B, 1, 10, 10)
        dy, dx = torch.randint(0, 3, (2,), generator=self._gen).tolist()  # one shift per batch
        return x[:, :, dy : dy + 8, dx : dx + 8].to(self.device), self.y_train[idx].to(self.device)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y)

    def train_step(self, after_step: Callable[[], None] | None = None) -> float:
        """One optimizer step; ``after_step`` runs right after ``optimizer.step()`` (e.g. a Sparsifier)."""
        return take_step(self.model, self.optimizer, self.scheduler, lambda: self.loss(*self.get_batch()), after_step)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Top-1 error on the fixed held-out split (fraction of the 597 test images)."""
        self.model.eval()
        pred = self.model(self.x_test.to(self.device)).argmax(1)
        self.model.train()
        return float((pred != self.y_test.to(self.device)).float().mean())
