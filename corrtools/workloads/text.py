"""Training text made on the machine: the Python standard library's own ``.py`` files.

No download: every Python installation carries these files. The vocabulary is fixed (printable ASCII,
newline, tab, and one "other" symbol), so token ids do not depend on which Python version made the text.
"""
from __future__ import annotations

import string
import sysconfig
from pathlib import Path

import numpy as np

__all__ = ["VOCAB", "VOCAB_SIZE", "stdlib_text", "encode", "decode"]

# index 0 is "other": any character outside printable ASCII
VOCAB: str = "\x00" + string.printable.replace("\x0b", "").replace("\x0c", "").replace("\r", "")
VOCAB_SIZE: int = len(VOCAB)
_LOOKUP = np.zeros(0x110000, dtype=np.uint8)  # code point -> token id (0 = other)
_LOOKUP[[ord(c) for c in VOCAB]] = np.arange(VOCAB_SIZE, dtype=np.uint8)


def stdlib_text(max_bytes: int = 2_000_000) -> str:
    """Concatenated source of the stdlib's top-level ``.py`` files, sorted by name, up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            chunk = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        parts.append(chunk)
        total += len(chunk)
        if total >= max_bytes:
            break
    text = "".join(parts)[:max_bytes]
    if len(text) < 10_000:
        raise RuntimeError(f"found only {len(text)} characters of Python source under {root}")
    return text


def encode(text: str) -> np.ndarray:
    """Text -> token ids, (len(text),) uint8."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return _LOOKUP[np.minimum(codes, 0x10FFFF)]


def decode(ids: np.ndarray) -> str:
    """Token ids -> text (the "other" symbol shown as '?')."""
    return "".join("?" if i == 0 else VOCAB[i] for i in np.asarray(ids).tolist())
