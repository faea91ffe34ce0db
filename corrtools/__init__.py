"""corrtools: which weights learn, for how long they remember, and sparse training from it.

Public names are imported lazily, so ``import corrtools`` stays light (no torch, zarr or
matplotlib until a name that needs them is used).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "Recorder": "corrtools.record.recorder",
    "open_run": "corrtools.record.store",
    "lagged_pearson": "corrtools.analysis.correlation",
    "decorrelation_time": "corrtools.analysis.correlation",
    "delta_by_magnitude": "corrtools.analysis.delta",
    "Sparsifier": "corrtools.sparse.sparsifier",
    "Fix": "corrtools.sparse.exploit",
    "Reset": "corrtools.sparse.exploit",
    "Regularize": "corrtools.sparse.exploit",
    "AutoZ": "corrtools.sparse.autoz",
    "suggest_z": "corrtools.analysis.suggest",
    "CorrtoolsError": "corrtools.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'corrtools' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
