"""Atomic, durable replacement of files and folders: the one helper every writer uses.

A writer builds its output under a temporary name beside the target (``.<name>.tmp…``),
then :func:`replace` fsyncs it (a folder: every file and folder in it), renames it over the
target and fsyncs the containing folder: a reader (or a crash) sees the old output or the
new one, never half of either, and the new one survives a power cut once we return. A
folder target (a SavedModel) that exists is moved aside first and removed afterwards.
Used by stage two's reports and heads (:mod:`featcache.compare.report`, :mod:`featcache.heads`),
export (:mod:`featcache.ship.export`), and the feature file's writer, merge and upgrade
(:mod:`featcache.cache.writer`, :mod:`featcache.cache.upgrade`). Reads nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


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


def replace(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Make the finished ``tmp`` (file or folder) durable, then atomically put it at ``path``."""
    tmp, path = Path(tmp), Path(path)
    fsync_tree(tmp)
    if tmp.is_dir() and path.is_dir():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    _fsync_path(path.parent if str(path.parent) else Path("."), directory=True)
    return path


@contextlib.contextmanager
def replacing(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """``with replacing(out, ".keras") as tmp: save(tmp)``: ``out`` appears only once the
    block succeeded (via :func:`replace`); on an error the temporary file or folder goes."""
    path = Path(path)
    tmp = temp_name(path, suffix)
    _remove(tmp)
    try:
        yield tmp
        replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


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
