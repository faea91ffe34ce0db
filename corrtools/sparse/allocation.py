"""How one overall density is spread over layers: ERK densities (a pure function of the shapes).

``"uniform"`` gives every layer the density d; ``"global"`` uses one magnitude threshold over all
layers at every rewiring (:func:`corrtools.sparse.masks.topk_mask_many`); ``"erk"`` gives fixed
per-layer densities from the layers' shapes (:func:`erk_densities`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from corrtools.errors import CorrtoolsError

__all__ = ["ALLOCATIONS", "erk_densities"]

ALLOCATIONS = ("global", "uniform", "erk")


def erk_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """Erdős–Rényi-Kernel densities (Evci et al. 2020, RigL): layer l gets
    ``min(1, ε · sum(shape_l) / prod(shape_l))`` with ε chosen so that the kept weights add up to
    ``density`` of all weights; the layer that would most exceed 1 is made dense and ε is solved
    again for the rest, until none exceeds 1.

    ``shapes``: each weight's shape, ``(out, in)`` or ``(out, in, *kernel)``. Returns one density per
    shape, in order. Counts are not rounded here (each layer then keeps ``kept_count(d_l, numel)``).
    """
    if not 0 < density <= 1:
        raise CorrtoolsError(f"density={density!r} must be a fraction in (0, 1].")
    numels = [math.prod(s) for s in shapes]
    raw = [sum(s) / n for s, n in zip(shapes, numels)]
    target = density * sum(numels)
    dense: set[int] = set()
    while True:
        free = [i for i in range(len(shapes)) if i not in dense]
        if not free:
            return [1.0] * len(shapes)
        budget = target - sum(numels[i] for i in dense)
        eps = budget / sum(raw[i] * numels[i] for i in free)
        top = max(free, key=lambda i: raw[i])
        if eps * raw[top] <= 1:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense.add(top)  # one at a time, as RigL (eps only grows as layers turn dense)
