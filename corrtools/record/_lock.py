"""An exclusive writer lock on a file: ``flock`` while held, released by the kernel if the process
dies (so a killed run needs no manual cleanup). Used by `store.RunWriter`; knows nothing of Zarr."""
from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

from corrtools.errors import CorrtoolsError

__all__ = ["WriterLock"]


class WriterLock:
    """Lock file ``path`` guarding ``what`` (named in the error when someone else holds it)."""

    def __init__(self, path: Path, what: str):
        self.path = path
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise CorrtoolsError naming the holder ("pid N since T")."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: an exclusive create is the best we have
            try:
                self._fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR)
            except FileExistsError:
                raise self.busy(self.path.read_text(errors="replace")) from None
            os.write(self._fd, self._who())
            return
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                raise self.busy(holder) from None
            # the previous holder may have unlinked the file between our open and our flock
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

    def release(self) -> None:
        """Remove the lock file and drop the lock; a no-op when not held."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def holder(self) -> str | None:
        """Who holds the lock now ("pid N since T"), or None when no live process holds it."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover
            return self.path.read_text(errors="replace") if self.path.exists() else None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return os.read(fd, 4096).decode(errors="replace").strip() or "another process"
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
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
