"""Checks on the files a command will write, made before its work so that a bad path fails in a
second instead of after the analysis: one-line `CorrtoolsError`s naming the option and the fix."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from corrtools.errors import CorrtoolsError

__all__ = ["check_output_file", "check_writable_folder", "make_folder"]


def make_folder(folder: str | os.PathLike[str]) -> None:
    """Create ``folder`` (and its parents) if missing; a CorrtoolsError if that is impossible."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CorrtoolsError(
            f"cannot create the folder {str(folder)!r} ({err.strerror}); choose a path in a writable folder"
        ) from None


def check_writable_folder(folder: str | os.PathLike[str], what: str) -> None:
    """CorrtoolsError unless a file can be created in ``folder`` (tried with a temporary file)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".corrtools-probe-"):
            pass
    except OSError as err:
        raise CorrtoolsError(
            f"{what}: cannot write into the folder {str(folder)!r} ({err.strerror}); choose a writable path"
        ) from None


def check_output_file(path: str | os.PathLike[str], option: str) -> None:
    """CorrtoolsError unless the file named by ``option`` (e.g. "-o") can be written: not a folder,
    in an existing writable folder, and writable if it exists. Leaves no file behind."""
    p = Path(path)
    if p.is_dir():
        raise CorrtoolsError(f"{option} {str(p)!r} is a folder; name a file, e.g. {str(p / ('out' + p.suffix))!r}")
    parent = p.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise CorrtoolsError(f"the folder {str(parent)!r} for {option} {str(p)!r} {what}; create it first")
    if p.exists():
        try:
            with open(p, "ab"):  # opening to append changes nothing
                pass
        except OSError as err:
            raise CorrtoolsError(f"{option} {str(p)!r} cannot be written ({err.strerror}); choose another path") from None
    else:
        check_writable_folder(parent, f"{option} {str(p)!r}")
