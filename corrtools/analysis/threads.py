"""How many threads the analysis runs on: the one place that decides it.

``threads=None`` (the default everywhere: ``delta_by_magnitude``, ``delta_per_weight``,
``rho_by_magnitude``, the kernels, ``corrtools delta/rho --threads``) means the cores this process may
use: ``len(os.sched_getaffinity(0))`` where the platform has it (it honours ``taskset``, cgroup cpusets
and batch schedulers that pin a job to some cores), else ``os.cpu_count()``. Inside a dask.distributed
worker it means 1, since dask already runs one task per worker thread and a pool inside each task
would oversubscribe the worker; the dask path of ``delta_per_weight`` runs its kernel on one thread
for the same reason. An explicit positive integer is used as given.
"""
from __future__ import annotations

import operator
import os
import sys

from corrtools.errors import CorrtoolsError

__all__ = ["available_cores", "resolve_threads"]


def available_cores() -> int:
    """The number of CPU cores this process may run on (≥ 1)."""
    if hasattr(os, "sched_getaffinity"):
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except OSError:  # pragma: no cover - e.g. a sandbox that forbids the call
            pass
    return max(1, os.cpu_count() or 1)


def _in_dask_worker() -> bool:
    """Whether this code runs as a task on a dask.distributed worker (never imports distributed)."""
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return False
    try:
        distributed.get_worker()
    except (ValueError, AttributeError):
        return False
    return True


def resolve_threads(threads: int | None = None) -> int:
    """The thread count to use: ``threads`` if given (a positive integer), else 1 inside a
    dask.distributed worker, else ``available_cores()``.

    >>> resolve_threads(3)
    3
    >>> resolve_threads() == available_cores()
    True
    """
    if threads is None:
        return 1 if _in_dask_worker() else available_cores()
    try:
        n = operator.index(threads)
    except TypeError:
        n = None
    if n is None or isinstance(threads, bool):
        raise CorrtoolsError(f"threads={threads!r} is not a whole number; pass a positive integer or None for all cores.")
    if n < 1:
        raise CorrtoolsError(f"threads={threads} must be at least 1; pass a positive integer or None for all cores.")
    return n
