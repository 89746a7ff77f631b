"""Atomic, durable replacement of files and folders: the one helper every writer uses.

A writer builds its output under a temporary name beside the target (``.<name>.tmp…``),
then :func:`replace` fsyncs it (a folder: every file and folder in it), renames it over the
target and fsyncs the containing folder: a reader (or a crash) sees the old output or the
new one, never half of either, and the new one survives a power cut once we return. A
folder target (a SavedModel, stage two's whole report folder) that exists is swapped with
the new one in one atomic exchange where the filesystem has it (else moved aside first),
and removed afterwards; what a kill leaves of that is cleaned by the next writer
(:func:`recover`). :func:`carry` hard-links what a rebuilt folder keeps of the old one.
Used by stage two's reports and heads (:mod:`featcache.compare.report`, :mod:`featcache.heads`),
export (:mod:`featcache.ship.export`), and the feature file's writer, merge and upgrade
(:mod:`featcache.cache.writer`, :mod:`featcache.cache.upgrade`). Reads nothing but what
:func:`carry` copies where it cannot link.

A full disk is one line everywhere: :func:`is_disk_full` recognises it (``ENOSPC``, ``EFBIG``
— a file-size limit —, ``EDQUOT``, also when a library wraps it), :func:`replacing` turns it
into a :class:`~featcache.errors.DiskFullError` naming the file (whose previous version is
still there, untouched), and :func:`disk_full_is_one_line` does the same around any block.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

from featcache.errors import DiskFullError

#: what the message of a full disk tells the user to do, unless a caller knows better
RETRY = "free some space and run the same command again"


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception along its chain) is a full disk or a file-size limit.

    h5py reports a failed write as OSError, ValueError or (from close) RuntimeError, and
    TensorFlow as its own errors, with the errno only in the text: the text counts too."""
    for _ in range(8):
        if exc is None:
            return False
        if isinstance(exc, DiskFullError):
            return True
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return True
        text = str(exc).lower()
        if "no space" in text or "file too large" in text or "quota" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full(path, advice: str = RETRY) -> DiskFullError:
    """The one-line error of a full disk while writing ``path``."""
    return DiskFullError(f"disk full while writing {path}; {advice}")


@contextlib.contextmanager
def disk_full_is_one_line(path, advice: str = RETRY) -> Iterator[None]:
    """A full disk inside the block (see :func:`is_disk_full`) becomes :func:`disk_full`'s
    one-line error about ``path``; a :class:`DiskFullError` from below passes as it is."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if is_disk_full(exc):
            raise disk_full(path, advice) from None
        raise


def is_temporary(name: str) -> bool:
    """True for the names this module's writers use while they work (``.<name>.tmp…``,
    ``.<name>.old``) and export's ``.<name>.write-test``: what a killed writer leaves."""
    return name.startswith(".") and (".tmp" in name or name.endswith((".old", ".write-test")))


def temp_name(path: str | os.PathLike, suffix: str = "") -> Path:
    """The temporary name :func:`replacing` builds ``path`` under (same folder, hidden)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{suffix}")


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems cannot fsync a folder
        if not directory:
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync a file, or every file and folder under a folder (the folder itself last)."""
    path = Path(path)
    if not path.is_dir():
        _fsync_path(path)
        return
    for dirpath, _, filenames in os.walk(path):
        for n in filenames:
            p = Path(dirpath) / n
            if p.is_file() and not p.is_symlink():
                _fsync_path(p)
        _fsync_path(Path(dirpath), directory=True)


def old_name(path: str | os.PathLike) -> Path:
    """Where :func:`replace` moves a folder's previous version while it swaps in the new one
    without an atomic exchange (same folder, hidden)."""
    path = Path(path)
    return path.with_name(f".{path.name}.old")


#: ``renameat2`` flag: swap two names atomically (Linux 3.15+, most local filesystems)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one atomic step (``renameat2(RENAME_EXCHANGE)``);
    False where the system or the filesystem cannot (nothing changed then)."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):   # not glibc / not Linux
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False                     # e.g. a filesystem without exchange (NFS)
    raise OSError(err, os.strerror(err), str(b))


def replace(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Make the finished ``tmp`` (file or folder) durable, then atomically put it at ``path``.

    A folder over a folder: both names are swapped in one atomic exchange where the
    filesystem has it (Linux), so a reader sees the whole old folder or the whole new one,
    never neither; elsewhere the old one is renamed to :func:`old_name` and the new one into
    place (an instant without ``path``, which :func:`recover` repairs after a kill). The
    previous version is then removed."""
    tmp, path = Path(tmp), Path(path)
    fsync_tree(tmp)
    parent = path.parent if str(path.parent) else Path(".")
    if tmp.is_dir() and path.is_dir() and not path.is_symlink():
        old = old_name(path)
        _remove(old)
        if _exchange(tmp, path):
            _fsync_path(parent, directory=True)
            _remove(tmp)                 # now the previous version
            return path
        os.replace(path, old)
        os.replace(tmp, path)
        _fsync_path(parent, directory=True)
        _remove(old)
        return path
    os.replace(tmp, path)
    _fsync_path(parent, directory=True)
    return path


def recover(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Repair what a kill inside :func:`replace` of a folder can leave: ``path`` missing
    between the two renames, its previous version at :func:`old_name` — then the finished
    ``tmp`` goes into place (it is whole: the renames start only once it is), or without it
    the previous version goes back; and the previous version's remains (a kill while it was
    removed) go. Nothing to do, nothing done."""
    tmp, path = Path(tmp), Path(path)
    old = old_name(path)
    if not old.exists():
        return
    if not path.exists() and not path.is_symlink():
        os.replace(tmp if tmp.is_dir() else old, path)
    _remove(old)


@contextlib.contextmanager
def replacing(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """``with replacing(out, ".keras") as tmp: save(tmp)``: ``out`` appears only once the
    block succeeded (via :func:`replace`); on an error the temporary file or folder goes,
    and a full disk is a one-line :class:`DiskFullError` (``out`` is as it was). What a
    killed earlier replacement left (its temporary, a folder's previous version) is
    cleaned up first (:func:`recover`)."""
    path = Path(path)
    tmp = temp_name(path, suffix)
    recover(tmp, path)
    _remove(tmp)
    try:
        yield tmp
        replace(tmp, path)
    except BaseException as exc:
        _remove(tmp)
        recover(tmp, path)               # interrupted between the renames: the old one back
        if isinstance(exc, Exception) and not isinstance(exc, DiskFullError) \
                and is_disk_full(exc):
            raise disk_full(path, f"the file there, if any, is unchanged: {RETRY}") from None
        raise


def carry(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Put ``src`` (a file, a link or a folder tree) at ``dst`` as well, without copying
    bytes where the filesystem allows: hard links (a copy where it cannot), links as links.
    For a folder being rebuilt beside the old one: what it should keep of the old."""
    src, dst = Path(src), Path(dst)
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:                      # another filesystem, or no hard links on this one
        shutil.copy2(src, dst)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))
