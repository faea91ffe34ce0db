"""What the Lightning and Hugging Face adapters share. Imports no framework.

- `recorder_options` / `open_recorder`: a Recorder for a fit that starts after optimizer step ``step`` (0: a new run;
  > 0: a fit resumed from a checkpoint, continuing the same store).
- `LossMeter`: the mean of the micro-batch losses that went into one optimizer step.
- `sparsifier_options` / `build_sparsifier`: the SparsifierCallbacks' settings, validated when the
  callback is made, and the Sparsifier built from them once the model is known.
- `follow_optimizer`: the Sparsifier steps after every step of the trainer's optimizer.
- `sparsity_metrics`: the per-layer density and rewired count (and z) that the callbacks log.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from corrtools.errors import CorrtoolsError

__all__ = [
    "LossMeter",
    "build_sparsifier",
    "latest_z",
    "open_recorder",
    "recorder_options",
    "sparsifier_options",
    "sparsity_metrics",
    "follow_optimizer",
    "torch_optimizer",
]


def recorder_options(
    sample: Any, every: int, params: Any, seed: int, chunk_steps: int | None, compressor: str
) -> dict[str, Any]:
    """The Recorder's keyword arguments of a RecorderCallback, checked when the callback is made
    (the rest are checked by the Recorder when training starts)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise CorrtoolsError(f"every={every!r} must be a positive int (record every k-th step)")
    return dict(sample=sample, every=every, params=params, seed=seed, chunk_steps=chunk_steps, compressor=compressor)


def open_recorder(
    model: nn.Module,
    path: str | Path,
    step: int,
    recorder_kwargs: Mapping[str, Any],
    overwrite: bool,
    resume_hint: str,
) -> Any:
    """A `Recorder` on ``model`` whose next row is taken after optimizer step ``step + 1``.

    ``step == 0``: a new store (an existing one is replaced only with ``overwrite``). ``step > 0``
    (a fit resumed from a checkpoint taken after ``step`` steps): an existing store is continued;
    rows it holds for steps after ``step`` belong to the continuation that was abandoned and are
    dropped, with a warning. Without a store a new one is begun, numbering rows like the trainer.
    """
    from corrtools.record._location import Location
    from corrtools.record.recorder import Recorder
    from corrtools.record.store import truncate_run

    where = Location(path)  # a folder or an fsspec URL
    if step > 0 and where.is_file("zarr.json"):
        dropped = truncate_run(path, step)
        if dropped:
            warnings.warn(
                f"corrtools: dropped {dropped} row(s) recorded after step {step} from {where.url!r}: the "
                f"fit resumes from a checkpoint taken at step {step}, so those steps are recorded again.",
                stacklevel=3,
            )
        return Recorder(model, path, resume=True, start_step=step, **recorder_kwargs)
    if where.exists() and not overwrite:
        raise CorrtoolsError(
            f"{where.url!r} already exists; pass overwrite=True to replace it, or {resume_hint} to continue it"
        )
    rec = Recorder(model, path, overwrite=overwrite, **recorder_kwargs)
    rec.step = step  # a store begun mid-run numbers its rows like the trainer
    return rec


class LossMeter:
    """Collects the losses of the micro-batches of one optimizer step; `take` returns their mean."""

    def __init__(self) -> None:
        self._sum = 0.0
        self._n = 0

    def add(self, loss: float | torch.Tensor | None) -> None:
        if loss is None:
            return
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        self._sum += value
        self._n += 1

    def take(self) -> float | None:
        """The mean of the losses added since the last call (None when none were)."""
        if not self._n:
            return None
        mean = self._sum / self._n
        self._sum, self._n = 0.0, 0
        return mean


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside framework wrappers (accelerate's ``AcceleratedOptimizer``)."""
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):  # wrappers subclass it too
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise CorrtoolsError(f"{type(optimizer).__name__} is not a torch optimizer; corrtools needs one to follow")
    return inner


def follow_optimizer(sp: Any, optimizer: Any) -> Any:
    """Give the Sparsifier ``optimizer`` and call ``sp.step()`` after every step it really takes
    (a step that ``GradScaler`` skips calls no ``optimizer.step``); returns the hook's handle."""
    inner = torch_optimizer(optimizer)
    sp.attach_optimizer(inner)  # registers its own step flag first, so step() sees this step
    return inner.register_step_post_hook(lambda opt, args, kwargs: sp.step())


def sparsifier_options(
    density: float | None, structure: str, exploit: Any, options: Mapping[str, Any]
) -> dict[str, Any]:
    """The Sparsifier's keyword arguments, checked now (before any training) as far as they can be
    without the model: ``total_steps`` may still be filled in from the trainer."""
    from corrtools.sparse.config import SparsityConfig
    from corrtools.sparse.exploit import Fix

    kwargs = {"density": density, "structure": structure, "exploit": exploit, **options}
    for reserved in ("model", "optimizer"):
        if reserved in kwargs:
            raise CorrtoolsError(f"{reserved}= is given by the trainer; leave it out of the callback's arguments")
    fields = ("density", "structure", "allocation", "rewire_every", "grad_scale", "exploit", "total_steps")
    known = {f: kwargs[f] for f in fields if f in kwargs and kwargs[f] is not None}
    for per_layer in ("density", "structure"):  # a mapping or callable is checked against the model later
        if isinstance(known.get(per_layer), Mapping) or callable(known.get(per_layer)):
            known.pop(per_layer)
    if isinstance(exploit, Fix) and known.get("total_steps") is None:
        known["total_steps"] = 1  # checked again with the trainer's planned steps
    SparsityConfig(**known)
    return kwargs


def build_sparsifier(model: nn.Module, kwargs: Mapping[str, Any], planned_steps: int | None) -> Any:
    """The Sparsifier on ``model``, before the trainer has an optimizer (`follow_optimizer` gives it).
    ``Fix`` without ``total_steps`` takes ``planned_steps``, the trainer's planned optimizer steps."""
    from corrtools.sparse.exploit import Fix
    from corrtools.sparse.sparsifier import Sparsifier

    kw = dict(kwargs)
    if isinstance(kw.get("exploit"), Fix) and kw.get("total_steps") is None:
        if planned_steps is None or planned_steps <= 0 or planned_steps == math.inf:
            raise CorrtoolsError(
                "Fix(at=...) needs the planned number of optimizer steps; set the trainer's max_steps "
                "or pass total_steps=... to the SparsifierCallback"
            )
        kw["total_steps"] = int(planned_steps)
    return Sparsifier(model, None, **kw)


def latest_z(sp: Any) -> int | None:
    """The RESET interval z in use: the last z chosen in ``sp.z_history`` (``Reset(every="auto")``),
    else a fixed ``Reset(every=z)``'s z, else None."""
    for entry in reversed(list(getattr(sp, "z_history", None) or [])):
        z = getattr(entry, "z", entry)
        if z is not None:
            return int(z)
    every = getattr(getattr(sp.config, "exploit", None), "every", None)
    return every if isinstance(every, int) and not isinstance(every, bool) else None


def sparsity_metrics(sp: Any, prefix: str = "sparsity") -> dict[str, float]:
    """``{prefix}/{layer}/density`` (fraction participating) and ``{prefix}/{layer}/rewired``
    (weights that joined p at the last rewiring) per sparse layer (the parameter name without
    ``.weight``), ``{prefix}/density`` over all of them, and ``{prefix}/z`` when RESET has one."""
    out: dict[str, float] = {}
    kept = total = 0
    for r in sp.density_report():
        layer = r.name[: -len(".weight")] if r.name.endswith(".weight") else r.name
        out[f"{prefix}/{layer}/density"] = float(r.density)
        out[f"{prefix}/{layer}/rewired"] = float(r.rewired_last)
        kept += round(r.density * r.numel)
        total += r.numel
    if total:
        out[f"{prefix}/density"] = kept / total
    z = latest_z(sp)
    if z is not None:
        out[f"{prefix}/z"] = float(z)
    return out
