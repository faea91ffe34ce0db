"""Pure mask functions: a weight tensor in, a boolean mask of the same shape out.

``True`` marks a participating weight (p), ``False`` a non-participating one (n). No state, no
printing, no files; the same input always gives the same mask (ties are broken deterministically,
as each function documents). Masks are computed from ``|w|`` of a detached copy, so calling these
under autograd records nothing.

Layouts (the GEMM view of a weight):

- Linear ``(out, in)``: the inner (reduction) dimension is ``in`` (dim 1).
- Conv ``(k, c, *kernel)``: the inner dimension of the implicit GEMM is ``c``; the 2D view used by
  the 2:4-2d and block masks is ``w.reshape(k, c * r * s)``, columns in memory order (``c`` slowest,
  the last kernel dimension fastest) -- the matrix whose transpose the input-gradient GEMM uses.

Shapes that do not fit a structure raise :class:`~corrtools.errors.CorrtoolsError` naming the
parameter (``name``) and its shape.

>>> import torch
>>> w = torch.tensor([[0.1, -0.9, 0.3, 0.2], [0.5, 0.5, 0.0, -0.7]])
>>> nm_mask(w).int().tolist()  # 2 of every 4 along the input features; tie 0.5/0.5 -> lower index
[[0, 1, 1, 0], [1, 0, 0, 1]]
>>> int(topk_mask(w, 0.25).sum())  # round(0.25 * 8) = 2 weights
2
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from corrtools.errors import CorrtoolsError

__all__ = [
    "BLOCK_SIZES",
    "block_mask",
    "kept_count",
    "nm_mask",
    "nm_mask_2d",
    "nm_mask_2d_many",
    "patterns_2d",
    "topk_mask",
]

BLOCK_SIZES = (1, 2, 4, 8, 16, 32)

# Tiles per chunk in nm_mask_2d: the (90, chunk) score block stays within a few MB of cache.
_TILES_PER_CHUNK = 4096


def kept_count(density: float, numel: int) -> int:
    """Number of elements kept at ``density``: ``floor(density * numel + 0.5)`` (round half up)."""
    return min(numel, max(0, math.floor(density * numel + 0.5)))


def topk_mask(w: Tensor, density: float, *, name: str = "weight") -> Tensor:
    """Keep exactly ``kept_count(density, w.numel())`` weights of largest ``|w|`` in the tensor.

    Ties at the threshold are broken by flat (row-major) index: the lower index is kept. Returns a
    bool tensor shaped like ``w``. ``w`` should be finite (NaN ranks are unspecified).
    """
    _check_density(density, name)
    numel = w.numel()
    k = kept_count(density, numel)
    if k == numel:
        return torch.ones(w.shape, dtype=torch.bool, device=w.device)
    if k == 0:
        return torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    a = w.detach().abs().reshape(-1)
    threshold, tied_below = _kth_smallest(a, numel - k + 1)  # the k-th largest |w|
    keep = a >= threshold
    surplus = int(keep.sum()) - k if tied_below else 0
    if surplus > 0:  # more weights equal the threshold than places left: drop the highest-index ones
        ties = a == threshold
        keep &= ~(ties & (ties.cumsum(0) > int(ties.sum()) - surplus))
    return keep.view(w.shape)


def _kth_smallest(a: Tensor, rank: int) -> tuple[Tensor, bool]:
    """The ``rank``-th smallest (1-based) element of 1D ``a``, as a 0-d tensor on ``a``'s device,
    and whether one of the ``rank - 1`` smaller elements may equal it (False: none does)."""
    if a.device.type == "cpu" and a.dtype in (torch.float16, torch.float32, torch.float64):
        # numpy's introselect is ~10x faster than torch.kthvalue on CPU.
        part = np.partition(a.numpy(), rank - 1)
        value = part[rank - 1]
        tied_below = rank > 1 and bool(part[: rank - 1].max() == value)
        return torch.tensor(value, dtype=a.dtype), tied_below
    return a.kthvalue(rank).values, True


def nm_mask(w: Tensor, n: int = 2, m: int = 4, *, name: str = "weight") -> Tensor:
    """N:M mask along the GEMM inner dimension (dim 1): exactly ``n`` kept in every group of ``m``.

    Linear ``(out, in)``: groups of ``m`` consecutive input features in each row. Conv
    ``(k, c, *kernel)``: groups of ``m`` consecutive input channels at each (filter, kernel position).
    Within a group the ``n`` largest ``|w|`` are kept; ties go to the lower index.
    ``w.shape[1]`` must be a multiple of ``m``.
    """
    if not (isinstance(n, int) and isinstance(m, int) and 0 <= n <= m and m >= 1):
        raise CorrtoolsError(f"N:M structure needs integers 0 <= n <= m with m >= 1, got {n}:{m}.")
    if w.ndim < 2:
        raise CorrtoolsError(
            f"Parameter {name!r} of shape {tuple(w.shape)} has no inner dimension for {n}:{m}; "
            "only Linear and Conv weights (2 or more dims) can be N:M sparse."
        )
    if w.shape[1] % m:
        raise CorrtoolsError(
            f"Parameter {name!r} of shape {tuple(w.shape)} cannot be {n}:{m} along its inner "
            f"dimension (dim 1 = {w.shape[1]} is not a multiple of {m}); exclude it."
        )
    a = w.detach().abs().movedim(1, -1)  # (out, *kernel, in)
    groups = a.reshape(-1, m)  # (G, m)
    cols = [groups[:, i] for i in range(m)]
    keep = torch.empty(groups.shape, dtype=torch.bool, device=w.device)
    for i in range(m):  # m*m vector ops over all groups: no loop over elements
        # rank of element i: the others that beat it (larger, or equal at a lower index)
        rank = torch.zeros(groups.shape[0], dtype=torch.int16, device=w.device)
        for j in range(m):
            if j != i:
                rank += torch.ge(cols[j], cols[i]) if j < i else torch.gt(cols[j], cols[i])
        keep[:, i] = rank < n
    return keep.reshape(a.shape).movedim(-1, 1).contiguous()


@functools.lru_cache(maxsize=None)
def _patterns_cpu() -> Tensor:
    combos = list(itertools.combinations(range(4), 2))  # (0,1) < (0,2) < ... < (2,3)
    found = []
    for rows in itertools.product(combos, repeat=4):  # lexicographic over (row0, row1, row2, row3)
        tile = torch.zeros(4, 4, dtype=torch.bool)
        for r, (i, j) in enumerate(rows):
            tile[r, i] = tile[r, j] = True
        if bool((tile.sum(0) == 2).all()):
            found.append(tile)
    return torch.stack(found)  # (90, 4, 4)


def patterns_2d() -> Tensor:
    """The 90 transposable 2:4 patterns of a 4×4 tile, ``(90, 4, 4)`` bool, in tie-break order.

    Order: lexicographic in (row 0's kept column pair, row 1's, row 2's, row 3's), pairs ordered
    (0,1) < (0,2) < (0,3) < (1,2) < (1,3) < (2,3). Equivalently: descending in the 16-bit number read
    row-major with the tile's first element as the most significant bit. Returns a new tensor.
    """
    return _patterns_cpu().clone()


def nm_mask_2d(w: Tensor, *, name: str = "weight") -> Tensor:
    """2:4 2D (transposable) mask: every 4×4 tile is 2:4 along its rows and its columns.

    The 2D view is ``w.reshape(w.shape[0], -1)`` (Linear ``(out, in)``; conv ``(k, c*r*s)``), tiled
    from the top-left corner; both of its dimensions must be multiples of 4. Each tile keeps the
    pattern of largest L1 norm (sum of kept ``|w|``) among the 90 of :func:`patterns_2d`, chosen
    exactly (up to rounding of the 8-term sums in ``w``'s floating dtype; half precision is scored
    in float32). Ties go to the pattern that comes first in :func:`patterns_2d` order.
    Vectorised over chunks of tiles: scores = patterns (90, 16) @ tiles (16, T), then the first
    maximum over the 90. A tile containing NaN gets an unspecified valid pattern.
    """
    return nm_mask_2d_many([w], names=[name])[0]


def nm_mask_2d_many(weights: Sequence[Tensor], *, names: Sequence[str] | None = None) -> list[Tensor]:
    """:func:`nm_mask_2d` of each tensor in ``weights``, scoring all their tiles in one pass.

    Returns one bool mask per weight, shaped like it, equal to ``nm_mask_2d(w)``. The tiles of all
    weights that share a device and scoring dtype are scored together, in chunks of about
    ``_TILES_PER_CHUNK`` tiles that may span several weights, which saves the per-call overhead when
    many small layers are rewired at once.
    ``names`` (one per weight, default ``"weight"``) name the parameters in shape errors.
    """
    if names is None:
        names = ["weight"] * len(weights)
    if len(names) != len(weights):
        raise CorrtoolsError(f"nm_mask_2d_many got {len(weights)} weights but {len(names)} names.")
    grids = [_tile_grid_2d(w, name) for w, name in zip(weights, names)]
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault((w.device, _score_dtype(w)), []).append(i)
    out: list[Tensor | None] = [None] * len(weights)
    for (device, dtype), members in groups.items():
        total = sum(grids[i][0] * grids[i][1] for i in members)
        best = torch.empty(total, dtype=torch.long, device=device)  # weight after weight, row-major
        # Pieces of whole 4-row strips, packed into chunks of about _TILES_PER_CHUNK tiles: small
        # layers share a chunk, large ones are split, and each chunk's copy stays in cache.
        chunk: list[tuple[Tensor, int, int]] = []  # (strips of w as (r, 4, C, 4), r, C)
        size, done = 0, 0
        for i in members:
            R, C = grids[i]
            w4 = weights[i].detach().reshape(R, 4, C, 4)
            strips = max(1, _TILES_PER_CHUNK // C)
            for r0 in range(0, R, strips):
                r1 = min(r0 + strips, R)
                if chunk and size + (r1 - r0) * C > _TILES_PER_CHUNK:
                    _score_chunk_(chunk, size, dtype, best[done : done + size])
                    done, size, chunk = done + size, 0, []
                chunk.append((w4[r0:r1], r1 - r0, C))
                size += (r1 - r0) * C
        _score_chunk_(chunk, size, dtype, best[done : done + size])
        pats64 = _constants_2d(device, dtype)[0]
        # (T, 4) int32: a tile row's 4 bools as one word, so the re-layout moves 4x fewer items.
        rows4 = pats64.index_select(0, best).view(torch.int32)  # gathering 2 words a tile
        start = 0
        for i in members:
            R, C = grids[i]
            mask = rows4[start : start + R * C].view(R, C, 4).transpose(1, 2).contiguous()  # (R, 4, C)
            out[i] = mask.view(-1).view(torch.bool).view(weights[i].shape)
            start += R * C
    return out  # type: ignore[return-value]


def _tile_grid_2d(w: Tensor, name: str, tile: int = 4, structure: str = "2:4-2d") -> tuple[int, int]:
    """(rows, cols) of ``tile``×``tile`` tiles in ``w``'s 2D view ``(w.shape[0], -1)``; a clear error
    naming the parameter and ``structure`` when it has no 2D view or does not tile."""
    if w.ndim < 2:
        raise CorrtoolsError(
            f"Parameter {name!r} of shape {tuple(w.shape)} has no 2D view for {structure}; "
            f"only Linear and Conv weights (2 or more dims) can be {structure}."
        )
    rows = w.shape[0]
    cols = w.numel() // rows if rows else 0
    if rows % tile or cols % tile or rows == 0 or cols == 0:
        raise CorrtoolsError(
            f"Parameter {name!r} of shape {tuple(w.shape)} cannot be {structure}: its 2D view "
            f"({rows}, {cols}) must have both sides multiples of {tile}; exclude it."
        )
    return rows // tile, cols // tile


def _score_dtype(w: Tensor) -> torch.dtype:
    return w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32


@functools.lru_cache(maxsize=None)
def _constants_2d(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """On ``device``: the patterns (90, 16) bool viewed as (90, 2) int64, the patterns (90, 16) in
    ``dtype``, and the tie-break key (90, 1) in the signed integer type as wide as ``dtype``.
    Built once per (device, dtype)."""
    pats = _patterns_cpu().reshape(90, 16).to(device)
    # key[p] = 90 - p: the largest key among the maximal patterns is the first of them in order.
    bits = torch.int64 if dtype == torch.float64 else torch.int32  # same width as a score
    key = torch.arange(90, 0, -1, dtype=bits, device=device)[:, None]
    return pats.view(torch.int64), pats.to(dtype), key  # int64 view: 2 words per pattern


def _score_chunk_(
    pieces: list[tuple[Tensor, int, int]], size: int, dtype: torch.dtype, best: Tensor
) -> None:
    """Write into ``best`` (``size``,) the kept pattern index of each tile of ``pieces``, in order.

    ``pieces``: (w4, r, C) with ``w4`` a (r, 4, C, 4) view of weight rows. Their ``|w|`` go into one
    (16, size) block (tile element (i, j) on row 4i+j); scores = patterns (90, 16) @ block, and the
    first pattern reaching each tile's maximum wins.
    """
    if size == 0:
        return
    device = pieces[0][0].device
    _, weights, key = _constants_2d(device, dtype)
    tiles = torch.empty(16, size, dtype=dtype, device=device)
    start = 0
    for w4, r, C in pieces:
        tiles[:, start : start + r * C].view(4, 4, r, C).copy_(w4.permute(1, 3, 0, 2))  # casts too
        start += r * C
    tiles.abs_()
    scores = torch.mm(weights, tiles)  # (90, size) L1 norm each pattern keeps
    top = scores.amax(0)  # (size,)
    # The first p with scores[p] == top (argmax over dim 0 and bool compares are slow on CPU):
    # scores - top is +0.0 (integer bits 0) exactly where scores == top and negative (sign bit set)
    # elsewhere, also when flushed to zero (-0.0); or-ing key[p] = 90 - p into the bits keeps that
    # sign, so the column maximum is the key of the first maximal pattern.
    hits = scores.sub_(top).view(key.dtype).bitwise_or_(key)  # (90, size)
    torch.sub(90, hits.amax(0), out=best)
    best.clamp_(0, 89)  # a tile holding NaN matches no pattern: give it a valid one


def block_mask(w: Tensor, density: float, block: int, *, name: str = "weight") -> Tensor:
    """Keep whole ``block``×``block`` tiles of the 2D view, ranked by their largest ``|w|``.

    The 2D view is ``w.reshape(w.shape[0], -1)`` (as in :func:`nm_mask_2d`); both of its sides must
    be multiples of ``block`` (no partial edge blocks). Exactly ``kept_count(density, n_blocks)``
    blocks are kept (rounding is at block granularity), ties to the lower row-major block index.
    ``block`` must be one of :data:`BLOCK_SIZES`.
    """
    _check_density(density, name)
    if block not in BLOCK_SIZES:
        raise CorrtoolsError(f"Block size {block!r} is not supported; use one of {BLOCK_SIZES}.")
    R, C = _tile_grid_2d(w, name, tile=block, structure=f"block:{block}")
    scores = w.detach().reshape(R, block, C, block).abs().amax(dim=(1, 3))  # (R, C)
    keep = topk_mask(scores, density, name=name)
    # contiguous: with one block column the reshape can be a stride-0 view, which rewiring cannot copy into
    return keep[:, None, :, None].expand(R, block, C, block).reshape(w.shape).contiguous()


def _check_density(density: float, name: str) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 <= density <= 1:
        raise CorrtoolsError(f"Density for {name!r} must be a number in [0, 1], got {density!r}.")
