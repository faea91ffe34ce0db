"""Where a run store lives: a local folder, or an fsspec URL (``s3://bucket/run.zarr``,
``memory://run.zarr``, ``gs://...``). Knows files and objects, nothing of Zarr; used by `store`.

Object stores have no ``flock``. There the writer lock is an object created with a conditional
write (``pipe_file(mode="create")``: S3's ``If-None-Match: *``), so of two writers starting at once
exactly one gets it; it is deleted when the writer closes. A writer that is killed cannot delete it:
the store then stays locked until someone who knows that process is gone deletes the lock object
(the error names it). Credentials and endpoints come from fsspec's configuration (environment
variables such as ``AWS_PROFILE`` / ``AWS_ENDPOINT_URL``, or ``fsspec.config.conf``).
"""
from __future__ import annotations

import datetime as _dt
import os
import socket
from pathlib import Path
from typing import Any

from corrtools.errors import CorrtoolsError
from corrtools.record._lock import WriterLock

__all__ = ["Location", "is_url", "store_path"]


def is_url(path: Any) -> bool:
    """True for ``protocol://...`` strings other than ``file://``."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def store_path(path: Any) -> Path | str:
    """A local path as a `Path`, a URL as the string (``Path`` would fold its ``//``)."""
    if is_url(path):
        return path.rstrip("/")
    if isinstance(path, str) and path.startswith("file://"):
        path = path[len("file://"):]
    return Path(path)


def _filesystem(url: str) -> tuple[Any, str]:
    try:
        import fsspec

        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(
            url.split("://")[0], "fsspec"
        )
        raise CorrtoolsError(
            f"the store {url!r} needs {package}, which is not installed; pip install {package} "
            "(or corrtools[s3] for s3:// URLs)"
        ) from err


class Location:
    """A store's folder (``local``) or URL, with the few file operations the store needs."""

    def __init__(self, path: Any):
        where = store_path(path)
        self.local: Path | None = where if isinstance(where, Path) else None
        self.url = str(where)
        self._fs: Any = None
        self._root = ""

    def __str__(self) -> str:
        return self.url

    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs, self._root = _filesystem(self.url)
        return self._fs

    def _key(self, *parts: str) -> str:
        self.fs  # noqa: B018 - resolves _root
        return "/".join([self._root.rstrip("/"), *parts])

    def join(self, *parts: str) -> Location:
        if self.local is not None:
            return Location(self.local.joinpath(*parts))
        return Location("/".join([self.url, *parts]))

    def exists(self, *parts: str) -> bool:
        if self.local is not None:
            return self.local.joinpath(*parts).exists()
        return bool(self.fs.exists(self._key(*parts)))

    def is_file(self, *parts: str) -> bool:
        if self.local is not None:
            return self.local.joinpath(*parts).is_file()
        return bool(self.fs.isfile(self._key(*parts)))

    def remove(self) -> None:
        """Delete the folder or prefix and everything under it."""
        if self.local is not None:
            import shutil

            if self.local.is_dir():
                shutil.rmtree(self.local)
            else:
                self.local.unlink()
        else:
            self.fs.rm(self._key(), recursive=True)

    def mtime(self, *parts: str) -> float | None:
        """Modification time (POSIX seconds) of the file at `parts`, or None if absent or unknown."""
        if self.local is not None:
            try:
                return self.local.joinpath(*parts).stat().st_mtime
            except FileNotFoundError:
                return None
        try:
            return float(self.fs.modified(self._key(*parts)).timestamp())
        except Exception:  # absent, or a filesystem that does not keep times
            return None

    def size(self, skip: str) -> int:
        """Bytes under the store, not counting files named `skip`."""
        if self.local is not None:
            return sum(f.stat().st_size for f in self.local.rglob("*") if f.is_file() and f.name != skip)
        sizes = self.fs.du(self._key(), total=False)
        return int(sum(v for k, v in sizes.items() if not k.endswith("/" + skip)))

    def lock(self, *parts: str, what: str) -> WriterLock | ObjectLock:
        """The writer lock at `parts` under the store (a flock'ed file, or a lock object)."""
        if self.local is not None:
            return WriterLock(self.local.joinpath(*parts), what)
        return ObjectLock(self.fs, self._key(*parts), f"{self.url}/{'/'.join(parts)}", what)


class ObjectLock:
    """A writer lock on an object store: an object created only if absent (see module docstring)."""

    def __init__(self, fs: Any, key: str, url: str, what: str):
        self._fs, self._key, self._url, self.what = fs, key, url, what
        self._held = False

    def acquire(self) -> None:
        who = f"pid {os.getpid()} on {socket.gethostname()} since " + _dt.datetime.now(_dt.timezone.utc).isoformat(
            timespec="seconds"
        )
        try:
            self._fs.pipe_file(self._key, who.encode(), mode="create")
        except FileExistsError:
            raise self.busy(self.holder() or "another process") from None
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._fs.rm_file(self._key)

    def holder(self) -> str | None:
        """Who wrote the lock object (it may be a process that was killed), or None."""
        try:
            return self._fs.cat_file(self._key).decode(errors="replace").strip() or "another process"
        except FileNotFoundError:
            return None

    @property
    def held(self) -> bool:
        return self._held

    def busy(self, holder: str) -> CorrtoolsError:
        return CorrtoolsError(
            f"{self.what} is being recorded by {holder.strip() or 'another process'}; close that "
            f"recorder first, or if that process was killed, delete {self._url} and try again"
        )
