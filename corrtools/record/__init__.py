"""corrtools.record: stream sampled per-weight trajectories into a run store.

``sampling`` chooses the weights, ``recorder`` hooks the optimizer and writes from a background
thread, ``store`` is the only module that knows the Zarr layout. Names are imported lazily so that
``import corrtools.record`` stays light.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "Recorder": "corrtools.record.recorder",
    "RunWriter": "corrtools.record.store",
    "open_run": "corrtools.record.store",
    "read_group": "corrtools.record.store",
    "run_info": "corrtools.record.store",
    "truncate_run": "corrtools.record.store",
    "write_group": "corrtools.record.store",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'corrtools.record' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
