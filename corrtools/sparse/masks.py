"""Pure mask functions: a weight tensor in, a boolean mask of the same shape out.

``True`` marks a participating weight (p), ``False`` a non-participating one (n). No state, no
printing, no files; the same input always gives the same mask (ties are broken deterministically,
as each function documents). Masks are computed from ``|w|`` of a detached copy, so calling these
under autograd records nothing.

Layouts (the GEMM view of a weight, :func:`gemm_view`):

- Linear ``(out, in)``: the inner (reduction) dimension is ``in`` (dim 1); the view is the weight.
- Conv ``(k, c, *kernel)``: the inner dimension of the implicit GEMM is ``c``. The 2D view used by
  the 2:4-2d and block masks is ``w.movedim(1, -1).reshape(k, -1)``: rows are output channels,
  columns run over (kernel position, ``c``) with ``c`` fastest, so groups of 4 consecutive columns
  are 4 consecutive input channels at one kernel position (the paper's Appendix E.2: 2:4 along
  ``c`` for the forward pass, along ``k`` for the backward). A 2:4-2d conv mask is therefore also
  a valid 2:4 (1D) mask, and a block is ``b`` output × ``b`` input channels at one kernel position.

Non-finite weights: every mask keeps exactly its count whatever the values. ``NaN`` ranks below
every other value (as ``|w| = -1``); ``±inf`` ranks above every finite value.

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
    "block_mask_many",
    "gemm_view",
    "kept_count",
    "nm_mask",
    "nm_mask_2d",
    "nm_mask_2d_many",
    "patterns_2d",
    "topk_mask",
    "topk_mask_many",
]

BLOCK_SIZES = (1, 2, 4, 8, 16, 32)

# On CPU, take the top-k threshold from numpy's introselect (False: the device path, as on GPUs).
_CPU_SELECT = True

# Tiles per chunk in nm_mask_2d: the (90, chunk) score block stays within a few MB of cache.
_TILES_PER_CHUNK = 4096


def kept_count(density: float, numel: int) -> int:
    """Number of elements kept at ``density``: ``floor(density * numel + 0.5)`` (round half up)."""
    return min(numel, max(0, math.floor(density * numel + 0.5)))


def gemm_view(w: Tensor) -> Tensor:
    """The 2D GEMM view ``(out, inner)`` of a weight ``(out, in, *kernel)``: ``w`` itself for 2D,
    ``w.movedim(1, -1).reshape(out, -1)`` for convs (columns: kernel position, then ``in`` fastest).
    A copy for convs, a view otherwise."""
    if w.ndim <= 2:
        return w
    return w.movedim(1, -1).reshape(w.shape[0], -1)


def _from_gemm_view(m: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`gemm_view` for a mask: ``(out, inner)`` back to ``shape`` (contiguous)."""
    if len(shape) <= 2:  # contiguous: a reshaped expand can be a stride-0 view (a single block)
        return m.reshape(shape).contiguous()
    return m.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1).contiguous()


def _magnitude(w: Tensor) -> Tensor:
    """``|w|`` as a new tensor with NaN as -1, so NaN ranks below every weight (inf stays inf)."""
    return torch.nan_to_num_(w.detach().abs(), nan=-1.0, posinf=math.inf)


def topk_mask(w: Tensor, density: float, *, name: str = "weight") -> Tensor:
    """Keep exactly ``kept_count(density, w.numel())`` weights of largest ``|w|`` in the tensor.

    Ties at the threshold are broken by flat (row-major) index: the lower index is kept. NaN ranks
    lowest. Returns a bool tensor shaped like ``w``. No host-device synchronisation on accelerators.
    """
    _check_density(density, name)
    return _topk_flat(_magnitude(w).reshape(-1), kept_count(density, w.numel())).view(w.shape)


def topk_mask_many(weights: Sequence[Tensor], density: float, *, name: str = "weights") -> list[Tensor]:
    """One global magnitude threshold over all ``weights``: keep exactly
    ``kept_count(density, total numel)`` of largest ``|w|`` among them together (ties to the lower
    index in the concatenation, in the given order; NaN lowest). All on one device. Returns one
    bool mask per weight, shaped like it; a layer may keep any number, 0 included.
    """
    _check_density(density, name)
    if not weights:
        return []
    if len({w.device for w in weights}) > 1:
        raise CorrtoolsError(
            f"A global magnitude threshold needs {name} on one device, found "
            f"{sorted({str(w.device) for w in weights})}; use allocation='uniform'."
        )
    flat = torch.cat([_magnitude(w).reshape(-1) for w in weights])
    keep = _topk_flat(flat, kept_count(density, flat.numel()))
    return [m.view(w.shape) for m, w in zip(keep.split([w.numel() for w in weights]), weights)]


def _topk_flat(a: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` largest of 1D ``a`` (values >= -1), ties to the lower index.

    Never reads a device scalar on the host: the tie count stays a 0-d tensor on ``a``'s device.
    On CPU the threshold comes from numpy's introselect (~10x faster than ``torch.kthvalue``).
    """
    numel = a.numel()
    if k >= numel:
        return torch.ones(numel, dtype=torch.bool, device=a.device)
    if k <= 0:
        return torch.zeros(numel, dtype=torch.bool, device=a.device)
    rank = numel - k  # 0-based rank of the threshold (the k-th largest) in ascending order
    need: int | Tensor
    if _CPU_SELECT and a.device.type == "cpu" and a.dtype in (torch.float16, torch.float32, torch.float64):
        x = a.numpy()
        value = _select_rank(x, rank)
        threshold = torch.tensor(value, dtype=a.dtype)
        if numel - np.count_nonzero(x < value) == k:  # no tie across the threshold: exactly k are >= value
            return a >= threshold
        need = k - int(np.count_nonzero(x > value))  # numpy: no torch scalar read
    else:
        threshold = a.kthvalue(rank + 1).values  # 0-d, on a's device
        need = k - (a > threshold).sum()  # 0-d tensor: no sync
    ties = a == threshold
    return (a > threshold) | (ties & (ties.cumsum(0) <= need))


_SELECT_SAMPLE = 4096  # values sampled to bracket the rank in _select_rank


def _select_rank(x: np.ndarray, rank: int) -> np.generic:
    """``np.partition(x, rank)[rank]`` of 1D ``x`` (no NaN), the same value ~2.5x faster on large arrays.

    A seeded sample of `_SELECT_SAMPLE` values brackets the rank ([lo, hi], ~4 standard deviations of
    the sample quantile either side); then one pass counts the values below ``lo`` and another keeps the
    values inside the bracket, and only those (~1% of ``x``) are partitioned. When the bracket misses the
    rank (probability ~1e-4, or heavy ties) it falls back to partitioning all of ``x``: exact either way.
    """
    n, s = x.size, _SELECT_SAMPLE
    if n >= 16 * s:
        sample = np.sort(x[np.random.default_rng(n * 7919 + rank).integers(0, n, s)])
        q = (rank + 0.5) / n * s
        margin = 4.0 * math.sqrt(s * (rank / n) * (1 - rank / n)) + 4
        lo, hi = sample[max(0, int(q - margin))], sample[min(s - 1, int(q + margin))]
        below = int(np.count_nonzero(x < lo))
        if below <= rank:
            band = x[(x >= lo) & (x <= hi)]
            if rank - below < band.size:
                return np.partition(band, rank - below)[rank - below]
    return np.partition(x, rank)[rank]


def nm_mask(w: Tensor, n: int = 2, m: int = 4, *, name: str = "weight") -> Tensor:
    """N:M mask along the GEMM inner dimension (dim 1): exactly ``n`` kept in every group of ``m``.

    Linear ``(out, in)``: groups of ``m`` consecutive input features in each row. Conv
    ``(k, c, *kernel)``: groups of ``m`` consecutive input channels at each (filter, kernel position).
    Within a group the ``n`` largest ``|w|`` are kept (NaN lowest); ties go to the lower index.
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
    a = _magnitude(w).movedim(1, -1)  # (out, *kernel, in)
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

    The 2D view is :func:`gemm_view` (Linear ``(out, in)``; conv ``(k, r*s*c)`` with ``c`` fastest,
    so tile rows are 2:4 along input channels and tile columns along output channels), tiled from
    the top-left corner; both of its dimensions (and a conv's ``c``) must be multiples of 4. Each tile
    keeps the pattern of largest L1 norm (sum of kept ``|w|``) among the 90 of :func:`patterns_2d`,
    chosen exactly (up to rounding of the 8-term sums in ``w``'s floating dtype; half precision is
    scored in float32). Ties go to the pattern that comes first in :func:`patterns_2d` order.
    Vectorised over chunks of tiles: scores = patterns (90, 16) @ tiles (16, T), then the first
    maximum over the 90. Non-finite values: a pattern that keeps a NaN never wins over one that does
    not (NaN ranks lowest); ``|w|`` is capped at ``finfo.max / 128`` of the scoring dtype, so inf
    ranks with the largest values and the sums stay finite.
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
            w4 = gemm_view(weights[i].detach()).reshape(R, 4, C, 4)
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
            out[i] = _from_gemm_view(mask.view(-1).view(torch.bool).view(4 * R, 4 * C), weights[i].shape)
            start += R * C
    return out  # type: ignore[return-value]


def _tile_grid_2d(w: Tensor, name: str, tile: int = 4, structure: str = "2:4-2d") -> tuple[int, int]:
    """(rows, cols) of ``tile``×``tile`` tiles in ``w``'s :func:`gemm_view`; a clear error naming
    the parameter and ``structure`` when it has no 2D view or does not tile (for a conv, ``c`` must
    be a multiple of ``tile`` too, so no tile straddles two kernel positions)."""
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
    if w.ndim > 2 and w.shape[1] % tile:
        raise CorrtoolsError(
            f"Parameter {name!r} of shape {tuple(w.shape)} cannot be {structure}: its input "
            f"channels ({w.shape[1]}) must be a multiple of {tile}; exclude it."
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
    # NaN -> -2^k (any pattern avoiding NaN beats any pattern keeping one: a tile always has such
    # a pattern), |w| capped at 2^k / 8: all 8-term sums and their differences stay finite.
    cap = torch.finfo(dtype).max / 16
    torch.nan_to_num_(tiles, nan=-cap, posinf=cap / 8).clamp_max_(cap / 8)
    scores = torch.mm(weights, tiles)  # (90, size) L1 norm each pattern keeps
    top = scores.amax(0)  # (size,)
    # The first p with scores[p] == top (argmax over dim 0 and bool compares are slow on CPU):
    # scores - top is +0.0 (integer bits 0) exactly where scores == top and negative (sign bit set)
    # elsewhere, also when flushed to zero (-0.0); or-ing key[p] = 90 - p into the bits keeps that
    # sign, so the column maximum is the key of the first maximal pattern.
    hits = scores.sub_(top).view(key.dtype).bitwise_or_(key)  # (90, size)
    torch.sub(90, hits.amax(0), out=best)
    best.clamp_(0, 89)  # safety: every tile matches at least its maximum


def block_mask(w: Tensor, density: float, block: int, *, name: str = "weight") -> Tensor:
    """Keep whole ``block``×``block`` tiles of the 2D view, ranked by their largest ``|w|``.

    The 2D view is :func:`gemm_view` (as in :func:`nm_mask_2d`: for a conv, a block is ``block``
    output channels × ``block`` consecutive input channels at one kernel position); both of its sides
    (and a conv's ``c``) must be multiples of ``block`` (no partial edge blocks). Exactly
    ``kept_count(density, n_blocks)`` blocks are kept (rounding is at block granularity), ties to the
    lower row-major block index, NaN lowest. ``block`` must be one of :data:`BLOCK_SIZES`.
    """
    return block_mask_many([w], density, block, names=[name], global_threshold=False)[0]


def block_mask_many(
    weights: Sequence[Tensor],
    density: float,
    block: int,
    *,
    names: Sequence[str] | None = None,
    global_threshold: bool = True,
) -> list[Tensor]:
    """:func:`block_mask` of each weight; with ``global_threshold`` one block threshold over all of
    them (exactly ``kept_count(density, total blocks)`` blocks kept among all weights together)."""
    names = ["weight"] * len(weights) if names is None else names
    for name in names:
        _check_density(density, name)
    if block not in BLOCK_SIZES:
        raise CorrtoolsError(f"Block size {block!r} is not supported; use one of {BLOCK_SIZES}.")
    grids = [_tile_grid_2d(w, name, tile=block, structure=f"block:{block}") for w, name in zip(weights, names)]
    scores = [
        _magnitude(gemm_view(w)).reshape(R, block, C, block).amax(dim=(1, 3)) for w, (R, C) in zip(weights, grids)
    ]  # (R, C) each
    if global_threshold:
        keeps = topk_mask_many(scores, density)
    else:
        keeps = [_topk_flat(sc.reshape(-1), kept_count(density, sc.numel())).view(sc.shape) for sc in scores]
    return [
        _from_gemm_view(keep[:, None, :, None].expand(R, block, C, block).reshape(R * block, C * block), w.shape)
        for w, keep, (R, C) in zip(weights, keeps, grids)
    ]


def _check_density(density: float, name: str) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 <= density <= 1:
        raise CorrtoolsError(f"Density for {name!r} must be a number in [0, 1], got {density!r}.")
