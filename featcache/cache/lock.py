"""Who may write a feature file, and where: the writer's lock and its ``.partial`` name.

Writes (and truncates) a sidecar ``<file>.lock`` holding the writer's pid, serialising the
processes that write one feature file (stage one, merge, upgrade; stage two locks its
report folder the same way). :func:`check_output` probes the output folder with a
temporary file it removes at once. Reads nothing else; imports only the standard library.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from pathlib import Path

from featcache.errors import CacheError, LockedError

log = logging.getLogger(__name__)


def partial_path(path: Path) -> Path:
    """Where a feature file lives until it is complete (then it is renamed to ``path``)."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


class FileLock:
    """An exclusive advisory lock on ``<path>.lock`` (fcntl), held while a writer runs.

    ``wait=False`` refuses at once with :class:`LockedError` naming the holder's pid;
    ``wait=True`` blocks until the other writer finishes.
    """

    def __init__(self, path: Path, *, wait: bool = False):
        self.path = Path(str(path) + ".lock")
        self.wait = wait
        self._fd: int | None = None

    def acquire(self) -> "FileLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CacheError(f"cannot create the lock file {self.path} ({exc.strerror or exc}); "
                             f"featcache needs a writable folder there, even for a no-op: "
                             f"choose another folder (--out-dir/--output)") from None
        try:
            flags = fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB
            if self.wait:
                log.info("waiting for the lock on %s", self.path)
            fcntl.flock(fd, flags)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(
                f"{self.path.with_suffix('')} is being written by another featcache process "
                f"(pid {holder}); wait for it to finish, or pass --wait to queue behind it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def check_output(path: str | os.PathLike) -> Path:
    """Refuse at once, before any work, an output path that cannot be written: a folder
    at the path (or at its ``.partial``), or a folder that does not exist and cannot be
    made, is not a folder, or cannot be written (read-only, no permission). Creates the
    output folder if needed; leaves nothing else behind."""
    path = Path(path)
    for p in (path, partial_path(path)):
        if p.is_dir():
            raise CacheError(f"the output path {p} is a folder, not a feature file; give "
                             f"--output a file name ending in .h5 (or --out-dir for the folder)")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".featcache-write-test-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CacheError(f"cannot write to the output folder {parent} "
                         f"({exc.strerror or exc}); stage one needs a writable folder, even "
                         f"to find a file up to date (it takes a lock): choose another "
                         f"--out-dir/--output") from None
    return path
