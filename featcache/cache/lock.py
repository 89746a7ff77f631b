"""Who may write a feature file, and where: the writer's lock and its ``.partial`` name.

Writes a sidecar ``<file>.lock`` holding the writer's pid while it runs, serialising the
processes that write one feature file (stage one, merge, upgrade; stage two locks its
report folder the same way), and removes it when the writer ends: a finished run leaves no
lock file beside its output. :func:`check_output` probes the output folder with a
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
    ``wait=True`` blocks until the other writer finishes. ``release`` removes the lock file
    while still holding it; a process that was waiting on the removed file finds that the
    path no longer names the file it locked and locks the one there now (so two writers
    never both hold "the" lock). A killed writer leaves its file behind, unlocked: the
    next writer takes it over and removes it in turn.
    """

    def __init__(self, path: Path, *, wait: bool = False):
        self.path = Path(str(path) + ".lock")
        self.wait = wait
        self._fd: int | None = None

    def acquire(self) -> "FileLock":
        while True:
            fd = self._open()
            try:
                flags = fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB
                if self.wait:
                    log.info("waiting for the lock on %s", self.path)
                fcntl.flock(fd, flags)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise LockedError(
                    f"{self.path.with_suffix('')} is being written by another featcache "
                    f"process (pid {holder}); wait for it to finish, or pass --wait to queue "
                    f"behind it") from None
            if self._still_there(fd):
                break
            os.close(fd)   # the holder removed it while we waited: lock the one there now
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CacheError(f"cannot create the lock file {self.path} ({exc.strerror or exc}); "
                             f"featcache needs a writable folder there, even for a no-op: "
                             f"choose another folder (--out-dir/--output)") from None

    def _still_there(self, fd: int) -> bool:
        """Whether ``self.path`` still names the file open as ``fd``."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self) -> None:
        if self._fd is not None:
            try:
                self.path.unlink(missing_ok=True)   # while held: nobody else has it
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
