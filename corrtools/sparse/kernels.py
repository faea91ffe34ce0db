"""The hardware path: finalized 2:4 Linear weights as ``torch.sparse`` semi-structured tensors.

Sparse Tensor Cores (NVIDIA compute capability 8.0+, e.g. A100, H100) have twice the peak rate
of dense ones on a 2:4 sparse fp16/bf16 matrix; whether a layer runs faster depends on torch's
kernels and the shapes (benchmarks/semi_structured.py measures it). On an H200 with torch 2.11
the cuSPARSELt kernel itself beat dense (1.1-1.5x) but each eager call also spent ~0.5 ms of host
time in ``torch._cslt_sparse_mm``, so eager layers were slower unless very large; CUDA graphs
(e.g. ``torch.compile(mode="reduce-overhead")``) remove that cost. :func:`to_semi_structured_`
converts, in place and for inference, every ``nn.Linear`` whose weight is already 2:4 along its
input features (as ``Sparsifier(structure="2:4" or "2:4-2d")`` followed by ``finalize()`` leaves
it) and whose shape torch's kernels accept. Bias and inputs stay dense; inputs must be CUDA
fp16/bf16 tensors of the weight's dtype.

torch has two backends: cuSPARSELt (used when ``torch.backends.cusparselt.is_available()``) and
CUTLASS, whose 2:4 kernels run only on compute capability 8.x (A100, A10, RTX 30/40): on a
Hopper GPU (9.0) conversion needs cuSPARSELt.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from corrtools.errors import CorrtoolsError

__all__ = ["is_2to4", "semi_structured_candidates", "to_semi_structured_"]

_DTYPES = (torch.float16, torch.bfloat16)
# Fallback multiples for (rows, cols) when torch's private constraint table cannot be read: the
# stricter CUTLASS fp16/bf16 ones (cuSPARSELt needs (16, 16)).
_FALLBACK_MULTIPLES = (32, 64)


def _is_converted(w: Tensor) -> bool:
    """Whether ``w`` is already a semi-structured sparse tensor (:func:`to_semi_structured_` ran)."""
    return isinstance(w, torch.sparse.SparseSemiStructuredTensor)


def is_2to4(w: Tensor) -> bool:
    """Whether 2D ``w`` has at most 2 non-zeros in every group of 4 consecutive entries of each row.

    True for a semi-structured sparse tensor (2:4 by construction)."""
    if _is_converted(w):
        return True
    if w.ndim != 2 or w.shape[1] % 4:
        return False
    return bool(((w.detach().reshape(-1, 4) != 0).sum(1) <= 2).all())


def _backend() -> type:
    """The class ``torch.sparse.to_sparse_semi_structured`` would use (cuSPARSELt unless forced/absent)."""
    sparse = torch.sparse
    backend = getattr(torch.backends, "cusparselt", None)
    cusparselt_ok = backend is not None and backend.is_available()
    if sparse.SparseSemiStructuredTensor._FORCE_CUTLASS or not cusparselt_ok:
        return sparse.SparseSemiStructuredTensorCUTLASS
    return sparse.SparseSemiStructuredTensorCUSPARSELT


def _shape_multiples(dtype: torch.dtype) -> tuple[int, int]:
    try:
        c = _backend()._DTYPE_SHAPE_CONSTRAINTS[dtype]
        return int(c.sparse_min_rows), int(c.sparse_min_cols)
    except (AttributeError, KeyError):
        return _FALLBACK_MULTIPLES


def semi_structured_candidates(model: nn.Module, dtype: torch.dtype = torch.float16) -> list[str]:
    """Names of the Linear modules :func:`to_semi_structured_` would convert, checked on any device.

    A Linear qualifies when its weight is 2:4 (:func:`is_2to4`) and its shape ``(out, in)`` is a
    multiple of what torch's semi-structured kernels need for ``dtype``. Layers already converted
    are not listed.
    """
    rows, cols = _shape_multiples(dtype)
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        w = module.weight
        if _is_converted(w):
            continue
        if w.shape[0] % rows == 0 and w.shape[1] % cols == 0 and is_2to4(w):
            out.append(name)
    return out


def _conversion_targets(model: nn.Module) -> list[str]:
    """Names of the Linear modules :func:`to_semi_structured_` converts: 2:4 weights in fp16/bf16
    with a supported shape, not converted yet. Other parameters (LayerNorm, biases, dense layers)
    may have any dtype; a 2:4 Linear weight in another dtype is an error naming it. Empty when
    every such layer is already converted; an error when there is none at all."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    converted = [n for n, m in linears if _is_converted(m.weight)]
    sparse = [(n, m) for n, m in linears if not _is_converted(m.weight) and is_2to4(m.weight)]
    wrong = [f"{n!r} ({m.weight.dtype})" for n, m in sparse if m.weight.dtype not in _DTYPES]
    if wrong:
        raise CorrtoolsError(
            f"2:4 semi-structured kernels need fp16 or bf16 weights; the 2:4 Linear layers {', '.join(wrong)} "
            "are not: convert them with .half() or .bfloat16() (LayerNorm and other layers may stay fp32)."
        )
    names = []
    for name, module in sparse:
        rows, cols = _shape_multiples(module.weight.dtype)
        if module.weight.shape[0] % rows == 0 and module.weight.shape[1] % cols == 0:
            names.append(name)
    if not names and not converted:
        raise CorrtoolsError(
            "No Linear weight is 2:4 with a supported shape; train with "
            'Sparsifier(structure="2:4" or "2:4-2d") and call finalize() first.'
        )
    return names


def _check_capability(backend: type, capability: tuple[int, int], device_name: str) -> None:
    """CorrtoolsError unless ``backend``'s 2:4 kernels run on a GPU of this compute capability:
    8.0+ for cuSPARSELt, 8.x only for torch's CUTLASS kernels (they refuse Hopper, 9.0, at the
    first matmul, after conversion has succeeded)."""
    major, minor = capability
    if major < 8:
        raise CorrtoolsError(
            f"2:4 semi-structured kernels need compute capability 8.0+ (Sparse Tensor Cores); "
            f"{device_name} has {major}.{minor}."
        )
    if major != 8 and backend is torch.sparse.SparseSemiStructuredTensorCUTLASS:
        why = (
            "torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS is set"
            if torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS
            else "this torch build has no cuSPARSELt (torch.backends.cusparselt.is_available() is False)"
        )
        raise CorrtoolsError(
            f"torch's CUTLASS 2:4 kernels run only on compute capability 8.x and {device_name} has "
            f"{major}.{minor}; they would be used because {why}. Use a torch build with cuSPARSELt."
        )


def to_semi_structured_(model: nn.Module) -> None:
    """Swap each 2:4 Linear weight of a finalized model for a semi-structured sparse one, in place.

    Needs those Linear layers on a CUDA GPU with Sparse Tensor Cores (compute capability 8.0+) in
    fp16 or bf16 (``model.half().cuda()``); other parameters, such as LayerNorm kept in fp32 for
    mixed precision, are left as they are. Raises CorrtoolsError otherwise, or when no Linear
    qualifies (see :func:`semi_structured_candidates`). The converted weights are frozen (inference
    only: no gradient flows through them, and torch cannot deep-copy them, so copy the model before
    converting if a dense copy is needed). Layers already converted are left as they are, so a
    second call does nothing.
    """
    names = set(_conversion_targets(model))
    if not names:  # every 2:4 Linear is converted already
        return
    weights = [m.weight for n, m in model.named_modules() if n in names]
    devices = {w.device for w in weights}
    if any(d.type != "cuda" for d in devices) or not torch.cuda.is_available():
        raise CorrtoolsError(
            f"2:4 semi-structured kernels need the model on a CUDA GPU with Sparse Tensor Cores "
            f"(compute capability 8.0+) in fp16/bf16; it is on {sorted(str(d) for d in devices)}: "
            "move it with model.half().cuda()."
        )
    backend = _backend()
    for device in devices:
        _check_capability(backend, torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device))
    for name, module in model.named_modules():
        if name in names:
            dense = module.weight.detach().contiguous()
            module.weight = nn.Parameter(backend.from_dense(dense), requires_grad=False)
