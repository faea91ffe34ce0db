"""The one exception type for mistakes a user can fix.

A ``CorrtoolsError`` message is one sentence that names the input and the fix. The CLI prints it
without a traceback and exits with status 2; tracebacks are kept for bugs.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["CorrtoolsError", "close_matches"]


class CorrtoolsError(ValueError):
    """A user-facing error: bad input, a missing store, an unknown name."""


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """Return ``" (did you mean 'a', 'b'?)"`` for the names closest to ``name``, or ``""``."""
    matches = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.4)
    if not matches:
        return ""
    return " (did you mean " + ", ".join(repr(m) for m in matches) + "?)"
