"""One training run of the paper's experiments: a frozen spec in, one tidy result row out.

A :class:`RunSpec` names the workload, its size preset, the method and its settings, the step
budget and the seed. :func:`train` builds the workload, attaches the method's object (a Sparsifier or
a baseline from :mod:`corrtools.sparse.baselines`), trains, and returns the final metrics.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from corrtools.errors import CorrtoolsError

__all__ = ["DENSE_LAYERS", "METHODS", "RunSpec", "WORKLOADS", "auto_z_config", "build_workload", "method_object",
           "train"]

WORKLOADS = ("charlm", "digits")
# DENSE and SMALL, Algorithm 1 with each exploitation (SPARSE = RESET), and the baselines.
METHODS = ("dense", "small", "sparse", "no_exploit", "fix", "regularize", "set", "rigl", "lottery", "sr_ste")
_CHARLM_EVAL_BATCHES = 32  # fixed validation windows: 32 x 16 x 64 characters at full size
_EVAL_SEED = 1234
# Layers every method leaves dense besides the output head: the digits' first conv has one input
# channel (the paper leaves convs whose input channels are not a multiple of 16 dense).
DENSE_LAYERS: dict[str, list[str] | None] = {"charlm": None, "digits": ["conv1"]}


@dataclass(frozen=True)
class RunSpec:
    """Everything that decides a run's result; its :meth:`key` names the run's cache entry."""

    workload: str  # "charlm" | "digits"
    method: str  # one of METHODS
    steps: int  # optimizer steps (the budget of every method)
    seed: int = 0
    size: str = "full"  # workload preset: "full" | "quick"
    density: float = 1.0  # d; 1.0 for DENSE
    structure: str = "unstructured"  # Sparsifier structure ("2:4", "2:4-2d", "block:b")
    rewire_every: int = 1  # r
    grad_scale: float = 1.0  # s
    z: int | str | None = None  # RESET interval in steps; "auto": chosen from Δ (auto_z_config); None: never
    distribution: str = "uniform"  # per-layer densities of free-density masks: "uniform" | "erk"
    optimizer: str = "adamw"  # "adamw" | "sgd"

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise CorrtoolsError(f"workload={self.workload!r} is unknown; use one of {WORKLOADS}.")
        if self.method not in METHODS:
            raise CorrtoolsError(f"method={self.method!r} is unknown; use one of {METHODS}.")
        if self.size not in ("full", "quick"):
            raise CorrtoolsError(f"size={self.size!r} is unknown; use 'full' or 'quick'.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def key(self) -> str:
        """A short hash of the spec (stable across runs and machines): the cache file name."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def workload_config(spec: RunSpec) -> Any:
    """The workload's config for ``spec``: size preset, steps, seed, optimizer; SMALL shrinks it."""
    sgd = spec.optimizer == "sgd"
    if spec.workload == "charlm":
        from corrtools.workloads import CharLMConfig

        if spec.size == "quick":
            cfg = CharLMConfig(d_model=32, n_layer=1, n_head=4, seq_len=16, batch_size=4,
                               text_bytes=100_000, warmup_steps=2)
        else:
            cfg = CharLMConfig()  # d_model 128, 2 blocks, 64-character windows, batches of 16
        cfg = replace(cfg, steps=spec.steps, seed=spec.seed, optimizer=spec.optimizer,
                      lr=0.3 if sgd else cfg.lr)
    else:
        from corrtools.workloads.digits import DigitsConfig

        cfg = DigitsConfig(hidden=32, batch_size=16, warmup_steps=2) if spec.size == "quick" else DigitsConfig()
        cfg = replace(cfg, steps=spec.steps, seed=spec.seed, optimizer=spec.optimizer,
                      lr=0.05 if sgd else cfg.lr)
    return cfg.small(spec.density) if spec.method == "small" else cfg


def build_workload(spec: RunSpec) -> Any:
    """The workload object (model, optimizer, scheduler, ``train_step``, ``evaluate``) for ``spec``."""
    cfg = workload_config(spec)
    if spec.workload == "charlm":
        from corrtools.workloads import CharLMWorkload

        return CharLMWorkload(cfg)
    from corrtools.workloads.digits import DigitsWorkload

    return DigitsWorkload(cfg)


def auto_z_config(steps: int) -> Any:
    """The :class:`~corrtools.sparse.AutoZ` of an experiment run of ``steps`` optimizer steps.

    AutoZ's defaults (a 1024-step window) aim at runs of 10^4+ steps; here the window is a quarter of
    the run (at least AutoZ's minimum of 16), so the first estimate comes at T/4 and, re-estimated
    every T/2 steps, a second one at 3T/4. z is then the median Δ of the non-participating weights,
    clamped to [1, window // 2].
    """
    from corrtools.sparse import AutoZ

    window = max(16, steps // 4)
    return AutoZ(window=window, reestimate_every=max(2 * window, steps // 2))


def method_object(spec: RunSpec, wl: Any) -> Any:
    """The object whose ``step()`` runs after each optimizer step, or None (DENSE, SMALL)."""
    from corrtools.sparse import Fix, Regularize, Reset, Sparsifier
    from corrtools.sparse.baselines import SET, Lottery, RigL, sr_ste

    m, T, d = spec.method, spec.steps, spec.density
    model, opt = wl.model, wl.optimizer
    exclude = DENSE_LAYERS[spec.workload]
    if m in ("dense", "small"):
        return None
    if m in ("set", "rigl"):
        cls = SET if m == "set" else RigL
        # RigL's published ΔT = 100, shortened for runs with fewer than 20 updates' worth of steps
        return cls(model, opt, density=d, total_steps=T, update_every=max(1, min(100, T // 20)),
                   drop_fraction=0.3, distribution=spec.distribution, seed=spec.seed, exclude=exclude)
    if m == "lottery":
        return Lottery(model, opt, density=d, total_steps=T, distribution=spec.distribution, exclude=exclude)
    if m == "sr_ste":
        return sr_ste(model, opt, exclude=exclude)
    density = None if spec.structure in ("2:4", "2:4-2d") else d
    exploit = {
        "sparse": None if spec.z is None else (
            Reset(every="auto", auto=auto_z_config(T)) if spec.z == "auto" else Reset(every=int(spec.z))),
        "no_exploit": None,
        "fix": Fix(at=0.5),
        "regularize": Regularize(beta=2e-4),
    }[m]
    # the same per-layer densities as SET, RigL, LOTTERY and SMALL (not the Sparsifier's global default)
    allocation = None if density is None else spec.distribution
    return Sparsifier(model, opt, density=density, structure=spec.structure, allocation=allocation,
                      rewire_every=spec.rewire_every, grad_scale=spec.grad_scale, exploit=exploit,
                      total_steps=T, exclude=exclude)


def _sparse_weights(spec: RunSpec, wl: Any, obj: Any) -> tuple[int, int]:
    """(weights in the sparsifiable layers, of which participating at the end)."""
    from corrtools.sparse.config import Structure
    from corrtools.sparse.selection import select_layers

    if obj is None:  # DENSE, SMALL: the layers the sparse methods sparsify in the dense model
        unstructured = Structure("unstructured")
        reference = build_workload(replace(spec, method="dense")).model if spec.method == "small" else wl.model
        names = [sel.name for sel in select_layers(reference, lambda n, m: unstructured, None,
                                                   DENSE_LAYERS[spec.workload])]
        n = sum(wl.model.get_parameter(name).numel() for name in names)
        return n, n
    masks = obj.masks
    return sum(m.numel() for m in masks.values()), sum(int(m.sum()) for m in masks.values())


def train(spec: RunSpec, threads: int = 1) -> dict[str, Any]:
    """Train ``spec`` and return its row: the spec, the final metrics, wall time and weight counts.

    ``error``: charlm -- validation loss in bits per character on fixed windows; digits -- top-1
    test error (fraction) on the fixed held-out split. ``train_loss``: mean of the last 10% of steps.
    ``threads``: torch CPU threads (1 by default: on a shared 2-core machine two OpenMP threads
    slow a small model down many times over when the other core is busy).
    """
    torch.set_num_threads(threads)
    torch.manual_seed(spec.seed)
    wl = build_workload(spec)
    obj = method_object(spec, wl)
    after = None if obj is None else obj.step
    start = time.perf_counter()
    with warnings.catch_warnings():  # auto z's censoring warning: the row's z_estimates say it
        warnings.filterwarnings("ignore", message="auto z at step")
        losses = [wl.train_step(after) for _ in range(spec.steps)]
    wall = time.perf_counter() - start
    if spec.workload == "charlm":
        batches = 4 if spec.size == "quick" else _CHARLM_EVAL_BATCHES
        error = wl.evaluate(batches=batches, seed=_EVAL_SEED) / math.log(2)
        metric = "val_bpc"
    else:
        error = wl.evaluate()
        metric = "test_error"
    tail = losses[-max(1, len(losses) // 10):]
    total, kept = _sparse_weights(spec, wl, obj)
    history = getattr(obj, "z_history", [])
    return {
        **spec.to_dict(),
        "metric": metric,
        "error": float(error),
        "train_loss": float(sum(tail) / len(tail)),
        "wall_s": round(wall, 3),
        "sparse_layer_weights": total,
        "participating_weights": kept,
        "z_used": getattr(obj, "z", None),  # RESET's interval at the end (the last estimate for "auto")
        # "step:z" per estimate; "step:>=z" where Δ was censored (z = z_max is a lower bound)
        "z_estimates": ";".join(f"{e.step}:{'>=' if e.lower_bound else ''}{e.z}" for e in history) or None,
        "torch_threads": torch.get_num_threads(),
    }
