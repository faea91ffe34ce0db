"""The store's expected values from an independent copy of the weights (the callbacks' tests)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np


def expected_values(ds, at: Mapping[int, Mapping[str, np.ndarray]], steps: Iterable[int]) -> np.ndarray:
    """(steps, weights) float32: each column's parameter in the copy ``at[step]``, at its flat index."""
    params, index = ds["param"].values, ds["index"].values
    return np.stack([
        np.array([at[int(s)][p].reshape(-1)[i] for p, i in zip(params, index)], dtype=np.float32)
        for s in steps
    ])
