"""Mask functions against brute-force references written independently here."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from corrtools.errors import CorrtoolsError
from corrtools.sparse.masks import (
    block_mask,
    kept_count,
    nm_mask,
    nm_mask_2d,
    nm_mask_2d_many,
    patterns_2d,
    topk_mask,
)


def _ints(shape, high=4, seed=0):
    """Small integer values as floats: many exact ties, exact sums."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-high, high + 1, shape, generator=g)).float()


def _normal(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


# ---------------------------------------------------------------- unstructured
def _topk_reference(w: torch.Tensor, k: int) -> torch.Tensor:
    a = np.abs(w.numpy().reshape(-1))
    order = sorted(range(a.size), key=lambda i: (-a[i], i))  # larger first, then lower index
    keep = np.zeros(a.size, dtype=bool)
    keep[order[:k]] = True
    return torch.from_numpy(keep.reshape(tuple(w.shape)))


@pytest.mark.parametrize("density", [0.0, 0.1, 0.25, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("make", [_ints, _normal])
def test_topk_mask_exact_count_and_brute_force(density, make):
    w = make((12, 10))
    m = topk_mask(w, density)
    k = kept_count(density, w.numel())
    assert m.dtype == torch.bool and m.shape == w.shape
    assert int(m.sum()) == k
    assert torch.equal(m, _topk_reference(w, k))


def test_kept_count_rounds_half_up():
    assert kept_count(0.5, 5) == 3  # 2.5 -> 3
    assert kept_count(0.25, 10) == 3  # 2.5 -> 3
    assert kept_count(0.24, 10) == 2
    assert kept_count(1.0, 7) == 7 and kept_count(0.0, 7) == 0


def test_topk_mask_ties_go_to_lower_index():
    w = torch.ones(2, 5)
    m = topk_mask(w, 0.3)  # 3 of 10 equal values
    assert m.reshape(-1).tolist() == [True] * 3 + [False] * 7


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_topk_mask_ties_below_and_above_the_threshold(dtype):
    for seed in range(4):
        w = _ints((16, 9), high=2, seed=seed).to(dtype)  # 5 values: the threshold is always tied
        for density in (0.1, 0.3, 0.6):
            k = kept_count(density, w.numel())
            assert torch.equal(topk_mask(w, density), _topk_reference(w.double(), k))
    w = torch.tensor([3.0, 3.0, 3.0, 1.0, 0.5, 0.25], dtype=dtype)  # ties above the threshold only
    assert topk_mask(w, 4 / 6).tolist() == [True] * 4 + [False] * 2


def test_select_rank_equals_a_full_partition_on_large_arrays_with_and_without_ties():
    """The CPU threshold brackets the rank with a sample and partitions only the bracket (arrays of
    >= 65536 values): the value must be np.partition's, also when ties fill the bracket or when the
    rank sits at either end; and the masks built on it must match a stable brute-force top-k."""
    from corrtools.sparse.masks import _select_rank

    rng = np.random.default_rng(0)
    for t in range(60):
        n = int(rng.integers(65536, 150000))
        if t % 3 == 0:
            x = rng.standard_normal(n).astype(np.float32)
        elif t % 3 == 1:
            x = rng.integers(0, int(rng.integers(2, 50)), n).astype(np.float32)  # heavy ties
        else:
            x = np.abs(rng.standard_normal(n)).astype(np.float16)
        for rank in (0, n - 1, int(rng.integers(0, n)), n // 2):
            assert _select_rank(x, rank) == np.partition(x, rank)[rank]
    for make, kw in ((_normal, {}), (_ints, {"high": 6})):
        w = make((300, 260), **kw)  # 78000 weights: the bracketed path
        for density in (0.1, 0.25, 0.5):
            k = kept_count(density, w.numel())
            a = np.abs(w.numpy().reshape(-1))
            order = np.lexsort((np.arange(a.size), -a))  # larger first, then lower index
            want = np.zeros(a.size, dtype=bool)
            want[order[:k]] = True
            assert np.array_equal(topk_mask(w, density).numpy().reshape(-1), want)


def test_topk_mask_conv_and_bad_density():
    w = _normal((8, 4, 3, 3), dtype=torch.float32)
    assert int(topk_mask(w, 0.25).sum()) == kept_count(0.25, w.numel())
    with pytest.raises(CorrtoolsError, match="fc1"):
        topk_mask(w, 1.5, name="fc1")


# ---------------------------------------------------------------- N:M along the inner dimension
def _nm_reference(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    a = np.abs(w.numpy())
    keep = np.zeros(a.shape, dtype=bool)
    out_ch, in_ch = a.shape[:2]
    for k in range(out_ch):
        for pos in itertools.product(*(range(s) for s in a.shape[2:])):
            for c0 in range(0, in_ch, m):
                vals = [a[(k, c0 + i) + pos] for i in range(m)]
                order = sorted(range(m), key=lambda i: (-vals[i], i))
                for i in order[:n]:
                    keep[(k, c0 + i) + pos] = True
    return torch.from_numpy(keep)


@pytest.mark.parametrize("shape", [(6, 16), (4, 8, 3, 3), (5, 12, 3)])
@pytest.mark.parametrize("make", [_ints, _normal])
def test_nm_mask_brute_force_and_validity(shape, make):
    w = make(shape)
    m = nm_mask(w, 2, 4)
    assert torch.equal(m, _nm_reference(w, 2, 4))
    # exactly 2 of every 4 consecutive entries along dim 1 (Linear: in, Conv: c)
    groups = m.movedim(1, -1).reshape(-1, 4)
    assert (groups.sum(1) == 2).all()
    assert m.float().mean().item() == 0.5


def test_nm_mask_other_n_m():
    w = _ints((4, 16), seed=3)
    assert torch.equal(nm_mask(w, 1, 8), _nm_reference(w, 1, 8))
    assert torch.equal(nm_mask(w, 3, 4), _nm_reference(w, 3, 4))


def test_nm_mask_is_along_input_channels_of_conv():
    # one big value per (k, r, s) position: the 2:4 groups must run along c, not along s
    w = torch.zeros(1, 4, 1, 4)
    w[0, 0, 0, :] = 10.0
    w[0, 1, 0, :] = 5.0
    m = nm_mask(w)
    assert m[0, :2].all() and not m[0, 2:].any()


def test_nm_mask_misfit_names_param_and_shape():
    with pytest.raises(CorrtoolsError, match=r"blocks\.0\.fc1\.weight.*\(8, 10\)"):
        nm_mask(torch.randn(8, 10), name="blocks.0.fc1.weight")
    with pytest.raises(CorrtoolsError, match="bias"):
        nm_mask(torch.randn(8), name="bias")


# ---------------------------------------------------------------- 2:4 2D
def _all_transposable_patterns() -> list[np.ndarray]:
    """Every 0/1 4x4 matrix with two ones in each row and each column, by exhaustive search."""
    found = []
    for bits in range(1 << 16):
        t = np.array([(bits >> (15 - i)) & 1 for i in range(16)]).reshape(4, 4)
        if (t.sum(0) == 2).all() and (t.sum(1) == 2).all():
            found.append(t)
    return found  # ascending in the 16-bit value, first element most significant


_BRUTE = _all_transposable_patterns()


def test_patterns_2d_are_all_90_in_documented_order():
    assert len(_BRUTE) == 90
    ours = patterns_2d().numpy().astype(int)
    assert ours.shape == (90, 4, 4)
    # documented tie-break order: descending 16-bit value read row-major
    assert [p.tolist() for p in ours] == [p.tolist() for p in reversed(_BRUTE)]


def _chan_view(w: torch.Tensor) -> torch.Tensor:
    """Appendix E.2's view, written out per rank: rows = output channels, columns = (kernel
    position, input channel) with the input channel fastest."""
    if w.ndim == 2:
        return w
    if w.ndim == 3:
        return w.permute(0, 2, 1).reshape(w.shape[0], -1)
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def _from_chan_view(v: torch.Tensor, shape) -> torch.Tensor:
    if len(shape) == 2:
        return v.reshape(shape)
    if len(shape) == 3:
        return v.reshape(shape[0], shape[2], shape[1]).permute(0, 2, 1).contiguous()
    return v.reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2).contiguous()


def _nm2d_reference(w: torch.Tensor) -> torch.Tensor:
    a = np.abs(_chan_view(w).numpy()).astype(np.float64)
    keep = np.zeros(a.shape, dtype=bool)
    for r in range(0, a.shape[0], 4):
        for c in range(0, a.shape[1], 4):
            tile = a[r : r + 4, c : c + 4]
            best, best_score = None, -1.0
            for p in reversed(_BRUTE):  # from the largest 16-bit value down: strict > keeps the first
                score = float((tile * p).sum())
                if score > best_score:
                    best, best_score = p, score
            keep[r : r + 4, c : c + 4] = best.astype(bool)
    return _from_chan_view(torch.from_numpy(keep), tuple(w.shape))


def _assert_2d_valid(m: torch.Tensor) -> None:
    v = _chan_view(m)
    assert (v.reshape(-1, 4).sum(1) == 2).all()  # rows: 2 of each 4 along the inner dimension
    assert (v.t().reshape(-1, 4).sum(1) == 2).all()  # columns: w^T is 2:4 as well


@pytest.mark.parametrize("shape", [(8, 8), (12, 16), (8, 4, 2, 2)])
@pytest.mark.parametrize("make", [_ints, _normal])
def test_nm_mask_2d_equals_brute_force(shape, make):
    for seed in range(3):
        w = make(shape, seed=seed)
        m = nm_mask_2d(w)
        _assert_2d_valid(m)
        assert torch.equal(m, _nm2d_reference(w))


def test_nm_mask_2d_float32_and_ties():
    w = _normal((16, 32), seed=5, dtype=torch.float32)
    assert torch.equal(nm_mask_2d(w), _nm2d_reference(w))
    # all equal: every pattern ties; the first in order keeps columns (0,1),(0,1),(2,3),(2,3)
    m = nm_mask_2d(torch.ones(4, 4))
    assert m.int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]


def test_nm_mask_2d_chunk_boundaries(monkeypatch):
    import corrtools.sparse.masks as masks

    monkeypatch.setattr(masks, "_TILES_PER_CHUNK", 3)  # many ragged chunks
    w = _normal((20, 12), seed=7)
    assert torch.equal(masks.nm_mask_2d(w), _nm2d_reference(w))


@pytest.mark.parametrize("shape", [(8, 16, 3, 3), (8, 16, 3)])
def test_nm_mask_2d_conv_is_2to4_along_input_channels(shape):
    """Appendix E.2: rows 2:4 along c at every kernel position, columns 2:4 along k."""
    w = _normal(shape, seed=2)
    m = nm_mask_2d(w)
    along_c = m.movedim(1, -1).reshape(-1, 4).sum(1)  # groups of 4 consecutive input channels
    along_k = m.movedim(0, -1).reshape(-1, 4).sum(1)  # groups of 4 consecutive output channels
    assert (along_c == 2).all() and (along_k == 2).all()
    assert torch.equal(m, _nm2d_reference(w))
    # 1D and 2D are consistent: the 2D mask is a valid 1D 2:4 mask, and 1D groups the same weights
    assert (nm_mask(w).movedim(1, -1).reshape(-1, 4).sum(1) == 2).all()
    w_small = _ints((4, 4, 1, 2), seed=2)
    assert torch.equal(nm_mask_2d(w_small), _from_chan_view(nm_mask_2d(_chan_view(w_small)), (4, 4, 1, 2)))
    with pytest.raises(CorrtoolsError, match="input channels"):
        nm_mask_2d(torch.randn(8, 2, 1, 2), name="conv.weight")  # (8, 4) view, but c = 2


def _per_layer_mm_reference(w: torch.Tensor) -> torch.Tensor:
    """The original single-layer scoring: one (90, 16) @ (16, T) mm, then numpy's first argmax."""
    dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
    rows = w.shape[0]
    R, C = rows // 4, w.numel() // rows // 4
    pats = patterns_2d().reshape(90, 16)
    tiles = _chan_view(w).reshape(R, 4, C, 4).permute(1, 3, 0, 2).reshape(16, R * C).to(dtype).abs()
    best = np.argmax(torch.mm(pats.to(dtype), tiles).numpy(), axis=0)  # first maximum
    keep = pats[torch.from_numpy(best)]
    return _from_chan_view(keep.reshape(R, C, 4, 4).transpose(1, 2).reshape(4 * R, 4 * C), tuple(w.shape))


_MANY_SHAPES = [(384, 128), (4, 4), (8, 12), (128, 512), (16, 8, 3, 3), (12, 16, 4), (64, 4, 1, 1)]


@pytest.mark.parametrize("make", [_ints, _normal])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nm_mask_2d_many_equals_per_layer(make, dtype):
    for seed in range(3):
        ws = [make(s, seed=seed + 10 * i).to(dtype) for i, s in enumerate(_MANY_SHAPES)]
        many = nm_mask_2d_many(ws)
        assert len(many) == len(ws)
        for w, m in zip(ws, many):
            assert m.dtype == torch.bool and m.shape == w.shape
            assert torch.equal(m, nm_mask_2d(w))
            assert torch.equal(m, _per_layer_mm_reference(w))


def test_nm_mask_2d_many_brute_force_and_ragged_chunks(monkeypatch):
    import corrtools.sparse.masks as masks

    monkeypatch.setattr(masks, "_TILES_PER_CHUNK", 5)  # chunks straddle the weights' boundaries
    ws = [_ints((8, 12), seed=1), _normal((4, 8), seed=2), _ints((8, 4, 1, 2), seed=3)]
    ws += [_normal((12, 4), seed=4), _ints((8, 32), seed=5)]  # 8 tiles a strip: wider than a chunk
    for w, m in zip(ws, masks.nm_mask_2d_many(ws)):
        _assert_2d_valid(m)
        assert torch.equal(m, _nm2d_reference(w))


def test_nm_mask_2d_many_mixed_dtypes_and_empty():
    ws = [_normal((8, 8), seed=1, dtype=torch.float16), _normal((8, 8), seed=2), _ints((4, 8), seed=3)]
    for w, m in zip(ws, nm_mask_2d_many(ws)):
        assert torch.equal(m, nm_mask_2d(w))
        assert torch.equal(m, _per_layer_mm_reference(w))
    assert nm_mask_2d_many([]) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nm_mask_2d_tiny_and_nan_values(dtype):
    # Subnormal weights: scores that differ by one ulp near zero still rank exactly.
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    w = (_ints((16, 24), seed=9, high=3).to(dtype) * tiny).to(dtype)
    assert torch.equal(nm_mask_2d(w), _nm2d_reference(w))
    w = _normal((8, 8), seed=4).to(dtype)
    w[1, 5] = float("nan")  # its tile gets some valid pattern; the other tiles are unaffected
    m = nm_mask_2d(w)
    _assert_2d_valid(m)
    clean = w.clone()
    clean[:4, 4:] = 0
    assert torch.equal(m[4:], nm_mask_2d(clean)[4:]) and torch.equal(m[:4, :4], nm_mask_2d(clean)[:4, :4])


def test_nm_mask_2d_many_errors_name_the_parameter():
    with pytest.raises(CorrtoolsError, match=r"fc2\.weight.*\(6, 8\)"):
        nm_mask_2d_many([torch.randn(8, 8), torch.randn(6, 8)], names=["fc1.weight", "fc2.weight"])
    with pytest.raises(CorrtoolsError, match="2 weights but 1 names"):
        nm_mask_2d_many([torch.randn(8, 8), torch.randn(8, 8)], names=["a"])


def test_nm_mask_2d_misfit():
    with pytest.raises(CorrtoolsError, match=r"head\.weight.*\(6, 8\)"):
        nm_mask_2d(torch.randn(6, 8), name="head.weight")


# ---------------------------------------------------------------- blocks
def _block_reference(w: torch.Tensor, density: float, b: int) -> torch.Tensor:
    a = np.abs(_chan_view(w).numpy())
    R, C = a.shape[0] // b, a.shape[1] // b
    scores = [(a[i * b : (i + 1) * b, j * b : (j + 1) * b].max(), i * C + j) for i in range(R) for j in range(C)]
    k = kept_count(density, R * C)
    chosen = {idx for _, idx in sorted(scores, key=lambda t: (-t[0], t[1]))[:k]}
    keep = np.zeros(a.shape, dtype=bool)
    for idx in chosen:
        i, j = divmod(idx, C)
        keep[i * b : (i + 1) * b, j * b : (j + 1) * b] = True
    return _from_chan_view(torch.from_numpy(keep), tuple(w.shape))


@pytest.mark.parametrize("b", [1, 2, 4, 8])
@pytest.mark.parametrize("density", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("make", [_ints, _normal])
def test_block_mask_brute_force(b, density, make):
    w = make((16, 32))
    m = block_mask(w, density, b)
    assert torch.equal(m, _block_reference(w, density, b))
    n_blocks = (16 // b) * (32 // b)
    assert int(m.sum()) == kept_count(density, n_blocks) * b * b


def test_block_mask_conv_and_errors():
    """On convs a block is b output x b consecutive input channels at one kernel position."""
    w = _normal((8, 4, 2, 2), seed=1)
    m = block_mask(w, 0.5, 4)
    assert torch.equal(m, _block_reference(w, 0.5, 4))
    for k0 in (0, 4):  # each (4 filters, 4 channels, position) block is all kept or all dropped
        block = m[k0 : k0 + 4]
        assert ((block.sum(dim=(0, 1)) == 0) | (block.sum(dim=(0, 1)) == 16)).all()
    with pytest.raises(CorrtoolsError, match="input channels"):
        block_mask(_normal((8, 2, 2, 2)), 0.5, 4)
    with pytest.raises(CorrtoolsError, match=r"fc\.weight.*\(12, 20\)"):
        block_mask(torch.randn(12, 20), 0.5, 8, name="fc.weight")
    with pytest.raises(CorrtoolsError, match="Block size"):
        block_mask(torch.randn(12, 12), 0.5, 3)


def test_masks_do_not_record_autograd():
    w = torch.randn(8, 8, requires_grad=True)
    for m in (topk_mask(w, 0.5), nm_mask(w), nm_mask_2d(w), block_mask(w, 0.5, 2)):
        assert not m.requires_grad and m.grad_fn is None


def test_block_mask_of_a_single_block_is_writable():
    # a (32, 32) weight in 32x32 blocks is one block: its mask was a stride-0 view of one bool
    # that the Sparsifier's in-place rewiring could not copy into
    from torch import nn

    from corrtools.sparse import Sparsifier

    m = block_mask(torch.randn(32, 32), 1.0, 32)
    assert m.is_contiguous() and m.all()
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 64), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = Sparsifier(model, opt, density=0.5, structure="block:32")
    model(torch.randn(2, 32)).sum().backward(); opt.step(); sp.step()
    assert sum(int(m.sum()) for m in sp.masks.values()) == 2 * 32 * 32  # 2 of the 3 blocks

# ---------------------------------------------------------------- non-finite weights (NaN ranks lowest)
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("cpu_select", [True, False])
def test_topk_mask_nonfinite_keeps_exactly_k(monkeypatch, cpu_select):
    import corrtools.sparse.masks as masks

    monkeypatch.setattr(masks, "_CPU_SELECT", cpu_select)
    w = torch.tensor([NAN, 0.5, NAN, -INF, 0.1, NAN, 2.0, NAN])
    assert topk_mask(w, 0.25).tolist() == [False, False, False, True, False, False, True, False]
    # threshold among the NaNs: keep every number, then the NaNs of lowest index
    assert topk_mask(w, 6 / 8).tolist() == [True, True, True, True, True, False, True, False]
    assert int(topk_mask(torch.full((10,), NAN), 0.3).sum()) == 3


def test_nm_mask_nonfinite_keeps_exactly_n():
    w = torch.tensor([[NAN, 1.0, 2.0, 3.0, INF, NAN, -INF, 0.0, NAN, NAN, NAN, 5.0]])
    assert nm_mask(w).int().tolist() == [[0, 0, 1, 1, 1, 0, 1, 0, 1, 0, 0, 1]]


def test_nm_mask_2d_nonfinite_keeps_inf_and_drops_nan():
    w = _normal((8, 8), seed=3)
    w[0, 1], w[5, 6] = INF, -INF
    w[2, 2] = NAN
    m = nm_mask_2d(w)
    _assert_2d_valid(m)
    assert m[0, 1] and m[5, 6] and not m[2, 2]
    big = torch.finfo(torch.float64).max
    w2 = torch.full((4, 4), big, dtype=torch.float64)
    w2[0, 0] = INF
    m2 = nm_mask_2d(w2)  # huge finite sums stay finite: still a valid pattern keeping the inf
    _assert_2d_valid(m2)
    assert m2[0, 0]


def test_block_mask_nonfinite():
    w = _normal((8, 8), seed=4)
    w[0, 0] = NAN  # its block ranks by its other values, never by NaN
    w[4, 4] = INF
    m = block_mask(w, 0.25, 4)
    assert int(m.sum()) == 16 and bool(m[4, 4])
