"""An exclusive writer lock on a file, released by the kernel if the process dies (so a killed run
needs no manual cleanup). Used by `store.RunWriter`; knows nothing of Zarr.

On Linux the lock is an open-file-description lock (``F_OFD_SETLK``), and `holder` asks the kernel
who holds it (``F_OFD_GETLK``) without taking any lock itself, so reading a store never makes a
writer that starts at the same moment fail. Elsewhere it is a ``flock``; `holder` then takes a
shared lock for a moment, and `acquire` retries for up to `_RETRY_S` seconds so that such a probe
does not refuse a writer.
"""
from __future__ import annotations

import datetime as _dt
import os
import struct
import time
from pathlib import Path

from corrtools.errors import CorrtoolsError

__all__ = ["WriterLock"]

_RETRY_S = 1.0  # flock fallback only: how long a writer retries while a reader probes the lock


def _fcntl():  # type: ignore[no-untyped-def]
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    return fcntl


def _ofd(fcntl) -> bool:  # type: ignore[no-untyped-def]
    return fcntl is not None and hasattr(fcntl, "F_OFD_SETLK")


def _flock_struct(fcntl, kind: int) -> bytes:  # type: ignore[no-untyped-def]
    # struct flock {short l_type, l_whence; off_t l_start, l_len; pid_t l_pid;}: whole file, pid 0
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)


class WriterLock:
    """Lock file ``path`` guarding ``what`` (named in the error when someone else holds it)."""

    def __init__(self, path: Path, what: str):
        self.path = path
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise CorrtoolsError naming the holder ("pid N since T")."""
        fcntl = _fcntl()
        if fcntl is None:  # pragma: no cover - Windows: an exclusive create is the best we have
            try:
                self._fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR)
            except FileExistsError:
                raise self.busy(self.path.read_text(errors="replace")) from None
            os.write(self._fd, self._who())
            return
        deadline = time.monotonic() + (0.0 if _ofd(fcntl) else _RETRY_S)
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                self._lock_fd(fcntl, fd)
            except OSError:
                holder = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                if time.monotonic() < deadline:  # flock: perhaps only a reader's probe
                    time.sleep(0.002)
                    continue
                raise self.busy(holder) from None
            # the previous holder may have unlinked the file between our open and our lock
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, self._who())
        self._fd = fd

    @staticmethod
    def _lock_fd(fcntl, fd: int) -> None:  # type: ignore[no-untyped-def]
        if _ofd(fcntl):
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock_struct(fcntl, fcntl.F_WRLCK))
        else:  # pragma: no cover - not Linux
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def moved_to(self, path: Path) -> None:
        """The lock file now lives at ``path`` (its folder was renamed); the lock stays held."""
        self.path = path

    def release(self) -> None:
        """Remove the lock file and drop the lock; a no-op when not held."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def holder(self) -> str | None:
        """Who holds the lock now ("pid N since T"), or None when no live process holds it.
        On Linux this takes no lock (see the module docstring)."""
        fcntl = _fcntl()
        if fcntl is None:  # pragma: no cover
            return self.path.read_text(errors="replace") if self.path.exists() else None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            if _ofd(fcntl):
                got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock_struct(fcntl, fcntl.F_RDLCK))
                if struct.unpack("hhqqi4x", got)[0] == fcntl.F_UNLCK:
                    return None
            else:  # pragma: no cover - not Linux
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except OSError:
                    pass
                else:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    return None
            return os.read(fd, 4096).decode(errors="replace").strip() or "another process"
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def busy(self, holder: str) -> CorrtoolsError:
        holder = holder.strip() or "another process"
        return CorrtoolsError(
            f"{self.what} is being recorded by {holder}; close that recorder first or record into "
            "another path"
        )

    @staticmethod
    def _who() -> bytes:
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        return f"pid {os.getpid()} since {now}".encode()
