"""Writing the HDF5 feature file: create, resume, append, complete.

Writes ``features/<dataset>_<backbone>_<size>[_<variant>].h5`` (layout and reading:
:mod:`featcache.cache.reader`; the lock and the ``.partial`` name: :mod:`featcache.cache.lock`).

Crash safety: while it is written, a feature file lives at ``<file>.partial``; only a
complete one is renamed to its final name, so a file at the final path (the Makefile's
target) is always complete. The partial file is itself built under a temporary name with
every chunk allocated and filled (and the per-row ids written), then renamed
(:mod:`featcache._util.atomic`), so it always has its full layout and a disk-full error happens
before any work is done. During a run only raw chunk bytes and the fixed-size
``rows_done`` attribute change, each batch followed by a flush: a killed run loses at
most the batch in flight and never leaves a file that claims to be complete.
``complete`` is set last.

The names other modules import from here (``load_features``, ``read_attrs``,
``FileLock``…) are re-exported from :mod:`featcache.cache.reader` and :mod:`featcache.cache.lock`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import h5py
import numpy as np

from featcache._util import atomic
from featcache.cache.lock import FileLock, check_output, partial_path
from featcache.cache.reader import (
    SCHEMA_VERSION,
    attrs_dict,
    chunk_rows,
    json_safe,
    legacy_defaults,
)
from featcache.config import FEATURE_DTYPES, cache_key_fields
from featcache.errors import CacheError, CorruptFeatureFile, DiskFullError, StaleCacheError

log = logging.getLogger(__name__)


def require_free(path: Path, need: int, *, subject: str | None = None,
                  advice: str = "free some space or write elsewhere (--out-dir)") -> None:
    """Refuse before any work when ``path``'s folder has less than ``need`` bytes free."""
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if need > free:
        raise DiskFullError(f"{subject or f'{path} needs'} {need / 2**20:.0f} MiB but only "
                            f"{free / 2**20:.0f} MiB are free on {path.parent}; {advice}")


#: seconds between tries of :func:`open_owned` (about 4 s in all)
OWNED_RETRY_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


def open_owned(path: Path, mode: str = "r+") -> h5py.File:
    """``path`` opened by the writer that holds its ``<file>.lock`` (or that just built it
    under a temporary name). HDF5 locks an open file with ``flock``; a child process that
    another thread forked while this process had the file open (a subprocess between fork
    and exec, say) holds an inherited copy of that lock until it execs, so an open right
    after a close can find the file briefly "locked" by nobody else. Retry for a few
    seconds before giving up: no other featcache process can hold it."""
    for delay in OWNED_RETRY_S:
        try:
            return h5py.File(path, mode)
        except BlockingIOError:
            time.sleep(delay)
    return h5py.File(path, mode)


@contextmanager
def building(tmp: Path, path: Path):
    """The body builds ``tmp``, which is then renamed to ``path``; on any failure ``tmp``
    is removed, and a full disk is a one-line :class:`DiskFullError`."""
    try:
        yield
        atomic.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if not isinstance(exc, DiskFullError) and atomic.is_disk_full(exc):
            raise DiskFullError(f"disk full while creating {path}; free some space or "
                                f"write elsewhere (--out-dir)") from None
        raise


@contextmanager
def writing(path: Path, safe: Callable[[], str]):
    """A full disk while writing into ``path`` is a one-line :class:`DiskFullError` saying
    what is safe (``safe()``, e.g. ``"320 train rows"``) and how to resume."""
    try:
        yield
    except (OSError, ValueError, RuntimeError) as exc:
        if atomic.is_disk_full(exc):
            raise atomic.disk_full(path, f"{safe()} are safe: free some space and run the "
                                         f"same command again to resume") from None
        raise


# --------------------------------------------------------------------------- writing

@dataclass
class SplitSpec:
    """What a writer preallocates for one split: row count, for shard parts the offset,
    and the rows' ids (default: their index in the split, ``row_start`` on; a folder
    passes its relative paths) and, for a folder, its files' sha256. Both are written when
    the file is created."""

    rows: int
    row_start: int = 0
    ids: Sequence | np.ndarray | None = None
    sha256: Sequence | np.ndarray | None = None   # image folders: each row's file's sha256

    def sha256_array(self) -> np.ndarray | None:
        """The files' sha256 as stored (64 ASCII hex bytes each), or None."""
        if self.sha256 is None:
            return None
        if len(self.sha256) != self.rows:
            raise CacheError(f"{len(self.sha256)} file hashes for {self.rows} rows; give one "
                             f"per row")
        return np.array([str(v) for v in np.asarray(self.sha256).tolist()], dtype="S64")

    def id_array(self) -> np.ndarray:
        """The ids as stored: int64 indices, or an object array of ``str`` paths."""
        if self.ids is None:
            return np.arange(self.row_start, self.row_start + self.rows, dtype=np.int64)
        ids = np.asarray(self.ids)
        if len(ids) != self.rows:
            raise CacheError(f"{len(ids)} ids for {self.rows} rows; give one id per row")
        if ids.dtype.kind in "iu":
            return ids.astype(np.int64)
        return np.array([str(v) for v in ids.tolist()], dtype=object)


def write_sha256(group, hashes: np.ndarray | None) -> None:
    """Store a split's per-row file hashes (``/<split>/sha256``) in an open (new) group."""
    if hashes is not None:
        group.create_dataset("sha256", data=np.asarray(hashes, dtype="S64"))


def write_ids(group, ids: np.ndarray) -> None:
    """Store a split's ids in an open (new) group: ``ids`` int64 or UTF-8 strings."""
    if ids.dtype == object:
        group.create_dataset("ids", data=ids, dtype=h5py.string_dtype("utf-8"))
        group["ids"].attrs["id_kind"] = "path"
    else:
        group.create_dataset("ids", data=ids.astype(np.int64), dtype="int64")
        group["ids"].attrs["id_kind"] = "index"


class FeatureWriter:
    """Creates or resumes a feature file and appends batches to it, in order.

    Use :meth:`open`; then, per split, write from ``rows_done(split)`` on; then
    :meth:`mark_complete`. Always used as a context manager (it holds the lock).
    """

    def __init__(self, path: Path, h5: h5py.File, lock: FileLock, flip: bool):
        self.path = path
        self._f = h5
        self._lock = lock
        self.flip = flip
        self._splits = [str(s) for s in json_safe(h5.attrs["splits"])]
        self._rows = np.asarray(h5.attrs["rows_done"], dtype=np.int64).copy()

    # -- construction -------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, attrs: Mapping, classes: Iterable[str],
             splits: Mapping[str, SplitSpec | int], dim: int, dtype: str = "float32",
             flip: bool = False, force: bool = False, wait: bool = False,
             accept: Callable[[dict], bool] | None = None) -> "FeatureWriter":
        """Open ``path`` for writing under ``attrs['config_sha256']``.

        - no file: create it (preallocated) and start from row 0;
        - same config hash, or ``accept(its attrs)`` true (an older file of the same
          configuration): reuse it (``complete`` tells whether anything is left to do);
        - another hash, or an unreadable file: refuse, unless ``force`` (then rebuild).
        """
        path = Path(path)
        if dtype not in FEATURE_DTYPES:
            raise CacheError(f"feature dtype must be one of {FEATURE_DTYPES}, not {dtype!r}")
        specs = {k: v if isinstance(v, SplitSpec) else SplitSpec(int(v))
                 for k, v in splits.items()}
        check_output(path)
        lock = FileLock(path, wait=wait).acquire()
        partial = partial_path(path)
        try:
            for existing in (path, partial):
                if not existing.exists():
                    continue
                reason = cls._reusable(existing, attrs, accept)
                if reason is None:
                    # a complete file is only read: a no-op must not touch it (make, mtimes)
                    h5 = open_owned(existing, "r" if existing == path else "r+")
                    log.info("%s: same configuration, %s", existing,
                             "complete" if h5.attrs["complete"] else "resuming")
                    return cls(path, h5, lock, bool(h5.attrs.get("flip", False)))
                if not force:
                    raise StaleCacheError(
                        f"{existing} {reason}; pass --force to rebuild it, or choose another "
                        f"output name (VARIANT=… / --variant)")
                log.warning("%s %s; rebuilding it (--force)", existing, reason)
                if existing == partial:
                    partial.unlink()
                break  # a stale complete file stays until its replacement is complete
            cls._create(partial, attrs=attrs, classes=list(classes), specs=specs, dim=dim,
                        dtype=dtype, flip=flip)
            return cls(path, open_owned(partial), lock, flip)
        except BaseException:
            lock.release()
            raise

    @staticmethod
    def _reusable(path: Path, attrs: Mapping,
                  accept: Callable[[dict], bool] | None = None) -> str | None:
        """None if the file at ``path`` was made with the same config, else why not."""
        try:
            with h5py.File(path, "r") as f:
                old = attrs_dict(f.attrs)
        except (OSError, ValueError):
            return "is truncated or unreadable"
        if old.get("schema_version") is None:
            return "is not a featcache feature file"
        if int(old["schema_version"]) > SCHEMA_VERSION:
            # never suggest --force here: that would destroy a newer featcache's work
            raise CorruptFeatureFile(
                f"{path} was written by a newer featcache (schema {old['schema_version']}, this "
                f"one writes {SCHEMA_VERSION}); upgrade featcache, or choose another output name")
        if int(old["schema_version"]) != SCHEMA_VERSION:
            return (f"has schema {old['schema_version']} (this featcache writes "
                    f"{SCHEMA_VERSION}): run `featcache upgrade {path}` to keep its features")
        if old.get("config_sha256") != attrs["config_sha256"] and not (accept and accept(old)):
            legacy_defaults(old)
            changed = [k for k in (*cache_key_fields(), "shard")
                       if k in attrs and json_safe(old.get(k)) != json_safe(attrs[k])]
            what = ", ".join(changed) if changed else "settings"
            return f"was made with a different configuration ({what} differ)"
        return None

    @staticmethod
    def _create(path: Path, *, attrs, classes, specs, dim, dtype, flip) -> None:
        itemsize = np.dtype(dtype).itemsize
        need = sum(s.rows * (dim * itemsize * (2 if flip else 1) + 8) for s in specs.values())
        require_free(path, need)
        tmp = path.with_name(path.name + ".tmp")
        with building(tmp, path):
            with h5py.File(tmp, "w") as f:
                f.create_dataset("classes", data=np.array(classes, dtype=object),
                                 dtype=h5py.string_dtype("utf-8"))
                for name, spec in specs.items():
                    g = f.create_group(name)
                    g.attrs["row_start"] = int(spec.row_start)
                    rows = max(1, chunk_rows(dim, itemsize))
                    for key in ("features", "features_flip") if flip else ("features",):
                        preallocated(g, key, (spec.rows, dim), dtype,
                                     (min(rows, max(spec.rows, 1)), dim))
                    preallocated(g, "labels", (spec.rows,), "int64",
                                  (min(1 << 17, max(spec.rows, 1)),))
                    write_ids(g, spec.id_array())
                    write_sha256(g, spec.sha256_array())
                for key, value in attrs.items():
                    f.attrs[key] = "none" if value is None else value
                f.attrs["schema_version"] = SCHEMA_VERSION
                f.attrs["splits"] = list(specs)
                f.attrs["rows_done"] = np.zeros(len(specs), dtype=np.int64)
                f.attrs["complete"] = False
                f.attrs["flip"] = bool(flip)
                f.attrs["dtype"] = dtype

    # -- state --------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self._f.attrs["complete"])

    @property
    def attrs(self) -> dict:
        return attrs_dict(self._f.attrs)

    def rows(self, split: str) -> int:
        """Rows preallocated for ``split``."""
        return int(self._f[split]["labels"].shape[0])

    def rows_done(self, split: str) -> int:
        return int(self._rows[self._splits.index(split)])

    # -- writing ------------------------------------------------------------------------
    def write(self, split: str, features: np.ndarray, labels: np.ndarray,
              features_flip: np.ndarray | None = None) -> int:
        """Append one batch to ``split`` after ``rows_done``; flush; return the new count."""
        i = self._splits.index(split)
        start = int(self._rows[i])
        stop = start + len(features)
        if stop > self.rows(split):
            raise CacheError(f"{self.path}: {split} would exceed its {self.rows(split)} rows")
        g = self._f[split]
        with writing(self.path, lambda: f"{self.rows_done(split)} {split} rows"):
            g["features"][start:stop] = features
            if self.flip:
                if features_flip is None:
                    raise CacheError("this feature file stores flipped features; pass them")
                g["features_flip"][start:stop] = features_flip
            g["labels"][start:stop] = labels
            self._rows[i] = stop
            self._f.attrs["rows_done"] = self._rows
            self._f.flush()
        return stop

    def mark_complete(self) -> None:
        for split in self._splits:
            if self.rows_done(split) != self.rows(split):
                raise CacheError(f"{self.path}: {split} has {self.rows_done(split)} of "
                                 f"{self.rows(split)} rows; cannot mark it complete")
        self._f.attrs["complete"] = True
        self._f.flush()
        current = Path(self._f.filename)
        self._f.close()
        if current != self.path:
            atomic.replace(current, self.path)
        self._f = open_owned(self.path)

    def close(self) -> None:
        try:
            if self._f.id.valid:
                self._f.close()
        finally:
            self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def preallocated(group, name, shape, dtype, chunks):
    """A chunked dataset whose every chunk is allocated (and filled) now, so later writes
    touch only raw data, never the file's metadata."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk(tuple(int(c) for c in chunks))
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
    dcpl.set_fill_value(np.zeros((), dtype=dtype))
    space = h5py.h5s.create_simple(tuple(int(s) for s in shape))
    tid = h5py.h5t.py_create(np.dtype(dtype), logical=True)
    h5py.h5d.create(group.id, name.encode(), tid, space, dcpl=dcpl)
