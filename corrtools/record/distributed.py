"""Recording under ``torch.distributed``: which rank records which sampled columns.

Three cases, decided from the model when the Recorder is built (no option to set):

- single process (``torch.distributed`` not initialised): everything is recorded here;
- replicated parameters (DDP, or any run whose sampled parameters are plain tensors): rank 0 records
  a normal run store and every other rank gets an idle Recorder (no sampling, no buffers, no thread,
  no optimizer hook, no file): they pay nothing;
- sharded parameters (FSDP2 ``fully_shard`` / DTensor with ``Shard(0)`` on a 1-D mesh): every rank
  records the sampled columns whose rows live in its shard, into its own part of one store (see
  ``store.create_sharded``); replicated parameters of such a model are recorded by rank 0.

The sample is drawn on the full (global) shapes, exactly as a single process would draw it, so the
store holds the same columns in the same order as a single-process recording.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from corrtools.errors import CorrtoolsError
from corrtools.record.sampling import ParamSample, SamplePlan

__all__ = ["Role", "barrier", "broadcast_error", "is_idle", "local_tensor", "role", "unwrap"]


@dataclasses.dataclass(frozen=True)
class Role:
    """This process's share of a distributed recording.

    ``segments``: (owner rank, column start, column stop) over all N columns in store order; every
    rank's columns, concatenated in that order, are its part of the store. ``local``: this rank's
    samples, with indices into the flat *local* shard (``p.to_local().flatten()``).
    """

    rank: int
    world_size: int
    sharded: bool
    segments: tuple[tuple[int, int, int], ...]
    local: SamplePlan


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _is_dtensor(p: torch.Tensor) -> bool:
    return hasattr(p, "placements") and hasattr(p, "to_local")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (so names match a single-process run)."""
    if _dist() is not None:
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            return model.module
    return model


def is_idle(model: nn.Module) -> bool:
    """True on ranks other than 0 of a distributed run without sharded parameters: they record nothing."""
    dist = _dist()
    if dist is None or dist.get_rank() == 0:
        return False
    return not any(_is_dtensor(p) for p in unwrap(model).parameters())


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor parameter (looked up each time: FSDP2 may swap it), else ``p``."""
    return p.to_local() if _is_dtensor(p) else p


def _shard_rows(p: torch.Tensor, name: str, world: int) -> tuple[int, int] | None:
    """Rows per shard (torch.chunk along dim 0, as DTensor's Shard(0)) and the row count; None if
    the parameter is replicated."""
    if not _is_dtensor(p):
        return None
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    if all(isinstance(pl, Replicate) for pl in placements):
        return None
    if mesh.ndim != 1 or mesh.size() != world or placements != (Shard(0),):
        raise CorrtoolsError(
            f"parameter {name!r} is distributed as {placements} on a mesh of shape {tuple(mesh.shape)}; "
            "corrtools records Shard(0) on a 1-D mesh of all ranks (FSDP2's fully_shard) or replicated "
            "parameters, so record a model sharded that way"
        )
    rows = int(p.shape[0])
    return -(-rows // world), rows


def role(model: nn.Module, plan: SamplePlan) -> Role | None:
    """This rank's share of ``plan`` (drawn on global shapes), or None outside ``torch.distributed``."""
    dist = _dist()
    if dist is None:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    by_name = dict(model.named_parameters())
    segments: list[tuple[int, int, int]] = []
    local: list[ParamSample] = []
    col = 0
    sharded = False
    for s in plan.samples:
        p = by_name[s.name]
        shard = _shard_rows(p, s.name, world)
        if shard is None:  # replicated: rank 0 records it
            segments.append((0, col, col + len(s.index)))
            if rank == 0:
                local.append(s)
            col += len(s.index)
            continue
        sharded = True
        per, rows = shard
        inner = s.numel // max(rows, 1)
        for r in range(world):
            lo, hi = min(r * per, rows) * inner, min((r + 1) * per, rows) * inner
            a, b = np.searchsorted(s.index, [lo, hi])
            if b > a:
                segments.append((r, col + int(a), col + int(b)))
            if r == rank:
                mine = local_tensor(p)
                if mine.numel() != hi - lo:
                    raise CorrtoolsError(  # pragma: no cover - a sharding this module does not know
                        f"parameter {s.name!r} has {mine.numel()} local values on rank {rank} where "
                        f"{hi - lo} were expected from Shard(0); record it unsharded"
                    )
                if b > a:
                    local.append(ParamSample(s.name, hi - lo, s.index[a:b] - lo))
        col += len(s.index)
    merged: list[tuple[int, int, int]] = []
    for seg in segments:  # neighbouring segments of one rank become one
        if merged and merged[-1][0] == seg[0] and merged[-1][2] == seg[1]:
            merged[-1] = (seg[0], merged[-1][1], seg[2])
        else:
            merged.append(seg)
    local_plan = dataclasses.replace(plan, samples=tuple(local))
    return Role(rank, world, sharded, tuple(merged), local_plan)


def broadcast_error(message: str | None) -> None:
    """Share rank 0's setup error (or None) with every rank, so that none waits for a store that
    will not exist; raises it everywhere. A collective: every rank calls it."""
    box = [message]
    _dist().broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise CorrtoolsError(box[0])


def barrier() -> None:
    """Wait for every rank (the default process group)."""
    _dist().barrier()
