"""The HDF5 feature file: create, resume, validate, read. The only module that uses h5py.

Reads and writes ``features/<dataset>_<backbone>_<size>[_<variant>].h5`` (the contract
between the stages, see ``DESIGN.md``) and a sidecar ``<file>.lock`` that serialises
writers.

Layout::

    /classes                      UTF-8 strings
    /<split>/features             (N, D) float32|float16, chunked by rows (~1 MiB chunks)
    /<split>/features_flip        optional, same shape: features of mirrored images
    /<split>/labels               (N,) int64
    root attrs                    provenance (see PROVENANCE_KEYS), ``complete``,
                                  ``splits`` and ``rows_done`` (one count per split)

Crash safety: while it is written, a feature file lives at ``<file>.partial``; only a
complete one is renamed to its final name, so a file at the final path (the Makefile's
target) is always complete. The partial file is itself built under a temporary name with
every chunk allocated and filled, then renamed, so it always has its full layout and a
disk-full error happens before any work is done. During a run only raw chunk bytes
and the fixed-size ``rows_done`` attribute change, each batch followed by a flush: a
killed run loses at most the batch in flight and never leaves a file that claims to be
complete. ``complete`` is set last.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import h5py
import numpy as np

from .errors import (
    CacheError,
    CorruptFeatureFile,
    DiskFullError,
    IncompleteFeatureFile,
    LockedError,
    StaleCacheError,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CHUNK_BYTES = 1 << 20
FEATURE_DTYPES = ("float32", "float16")

#: Root attributes every feature file carries (DESIGN.md); copied into every results file.
PROVENANCE_KEYS = (
    "schema_version", "complete", "splits", "rows_done", "dataset", "dataset_sha256",
    "backbone", "weights", "weights_sha256", "image_size", "preprocess", "pooling", "dtype",
    "precision", "runtime", "runtime_version", "flip", "batch_size", "tensorflow_version",
    "keras_version", "created_utc", "config_sha256",
)


def _legacy_defaults(attrs: dict) -> dict:
    """Files written before runtimes were recorded were all computed by TensorFlow."""
    if "runtime" not in attrs:
        attrs["runtime"] = "tensorflow"
        attrs["runtime_version"] = attrs.get("tensorflow_version")
    return attrs


def chunk_rows(dim: int, itemsize: int) -> int:
    """Rows per chunk so that one chunk of a (N, dim) dataset is about 1 MiB."""
    return max(1, CHUNK_BYTES // max(1, dim * itemsize))


def partial_path(path: Path) -> Path:
    """Where a feature file lives until it is complete (then it is renamed to ``path``)."""
    return path.with_name(path.name + ".partial")


def _json_safe(value):
    if isinstance(value, np.ndarray):
        return [_json_safe(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def _attrs_dict(attrs) -> dict:
    return {k: _json_safe(v) for k, v in attrs.items()}


def _is_disk_full(exc: BaseException | None) -> bool:
    # h5py reports a failed write as OSError, ValueError or (from close) RuntimeError,
    # with the errno only in the text; look along the chain of exceptions too.
    for _ in range(8):
        if exc is None:
            return False
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return True
        text = str(exc).lower()
        if "no space" in text or "file too large" in text or "quota" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# --------------------------------------------------------------------------- locking

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


# --------------------------------------------------------------------------- opening

def _open_h5(path: Path, mode: str) -> h5py.File:
    """Open an existing feature file, turning h5py's errors into one-line project errors."""
    try:
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise CacheError(f"{path} does not exist; run `make features` (or `featcache "
                         f"features`) first") from None
    except (OSError, ValueError) as exc:
        text = str(exc)
        if isinstance(exc, BlockingIOError) or "unable to lock file" in text:
            raise LockedError(f"{path} is open for writing by another process; wait for "
                              f"it to finish") from None
        raise CorruptFeatureFile(
            f"{path} is truncated or not an HDF5 feature file ({text.splitlines()[0]}); "
            f"delete it, or re-run stage one with --force") from None


def _check_schema(path: Path, attrs) -> None:
    version = attrs.get("schema_version")
    if version is None:
        raise CorruptFeatureFile(f"{path} has no schema_version: not a featcache feature "
                                 f"file; delete it, or re-run stage one with --force")
    if int(version) > SCHEMA_VERSION:
        raise CorruptFeatureFile(
            f"{path} was written by a newer featcache (schema {int(version)}, this one "
            f"reads up to {SCHEMA_VERSION}); upgrade featcache to read it")


def read_attrs(path: str | os.PathLike) -> dict:
    """The root attributes of a feature file as a JSON-safe dict (checks the schema)."""
    path = Path(path)
    with _open_h5(path, "r") as f:
        _check_schema(path, f.attrs)
        return _legacy_defaults(_attrs_dict(f.attrs))


# --------------------------------------------------------------------------- writing

@dataclass
class SplitSpec:
    """What a writer preallocates for one split: row count and, for shard parts, offset."""

    rows: int
    row_start: int = 0


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
        self._splits = [str(s) for s in _json_safe(h5.attrs["splits"])]
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
                    h5 = h5py.File(existing, "r" if existing == path else "r+")
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
            return cls(path, h5py.File(partial, "r+"), lock, flip)
        except BaseException:
            lock.release()
            raise

    @staticmethod
    def _reusable(path: Path, attrs: Mapping,
                  accept: Callable[[dict], bool] | None = None) -> str | None:
        """None if the file at ``path`` was made with the same config, else why not."""
        try:
            with h5py.File(path, "r") as f:
                old = _attrs_dict(f.attrs)
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
            return f"has schema {old['schema_version']} (this featcache writes {SCHEMA_VERSION})"
        if old.get("config_sha256") != attrs["config_sha256"] and not (accept and accept(old)):
            _legacy_defaults(old)
            changed = [k for k in ("dataset", "dataset_sha256", "backbone", "weights",
                                   "weights_sha256", "image_size", "preprocess", "pooling",
                                   "dtype", "precision", "runtime", "runtime_version", "flip",
                                   "shard")
                       if k in attrs and _json_safe(old.get(k)) != _json_safe(attrs[k])]
            what = ", ".join(changed) if changed else "settings"
            return f"was made with a different configuration ({what} differ)"
        return None

    @staticmethod
    def _create(path: Path, *, attrs, classes, specs, dim, dtype, flip) -> None:
        itemsize = np.dtype(dtype).itemsize
        need = sum(s.rows * (dim * itemsize * (2 if flip else 1) + 8) for s in specs.values())
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
        if need > free:
            raise DiskFullError(
                f"{path} needs {need / 2**20:.0f} MiB but only {free / 2**20:.0f} MiB are free "
                f"on {path.parent}; free some space or write elsewhere (--out-dir)")
        tmp = path.with_name(path.name + ".tmp")
        try:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("classes", data=np.array(classes, dtype=object),
                                 dtype=h5py.string_dtype("utf-8"))
                for name, spec in specs.items():
                    g = f.create_group(name)
                    g.attrs["row_start"] = int(spec.row_start)
                    rows = max(1, chunk_rows(dim, itemsize))
                    for key in ("features", "features_flip") if flip else ("features",):
                        _preallocated(g, key, (spec.rows, dim), dtype, (min(rows, max(spec.rows, 1)), dim))
                    _preallocated(g, "labels", (spec.rows,), "int64",
                                  (min(1 << 17, max(spec.rows, 1)),))
                for key, value in attrs.items():
                    f.attrs[key] = "none" if value is None else value
                f.attrs["schema_version"] = SCHEMA_VERSION
                f.attrs["splits"] = list(specs)
                f.attrs["rows_done"] = np.zeros(len(specs), dtype=np.int64)
                f.attrs["complete"] = False
                f.attrs["flip"] = bool(flip)
                f.attrs["dtype"] = dtype
            os.replace(tmp, path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if _is_disk_full(exc):
                raise DiskFullError(f"disk full while creating {path}; free some space or "
                                    f"write elsewhere (--out-dir)") from None
            raise

    # -- state --------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self._f.attrs["complete"])

    @property
    def attrs(self) -> dict:
        return _attrs_dict(self._f.attrs)

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
        try:
            g["features"][start:stop] = features
            if self.flip:
                if features_flip is None:
                    raise CacheError("this feature file stores flipped features; pass them")
                g["features_flip"][start:stop] = features_flip
            g["labels"][start:stop] = labels
            self._rows[i] = stop
            self._f.attrs["rows_done"] = self._rows
            self._f.flush()
        except (OSError, ValueError, RuntimeError) as exc:
            if _is_disk_full(exc):
                raise DiskFullError(
                    f"disk full while writing {self.path}; {self.rows_done(split)} {split} rows "
                    f"are safe: free some space and run the same command again to resume") from None
            raise
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
            os.replace(current, self.path)
        self._f = h5py.File(self.path, "r+")

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


def _preallocated(group, name, shape, dtype, chunks):
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


# --------------------------------------------------------------------------- reading

@dataclass
class SplitFeatures:
    """One split's arrays (float32 features unless the file stores float16)."""

    features: np.ndarray
    labels: np.ndarray
    features_flip: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FeatureSet:
    """What stage two gets from a feature file: arrays, class names and provenance."""

    path: Path
    attrs: dict
    classes: list[str]
    splits: dict[str, SplitFeatures] = field(default_factory=dict)

    def __getitem__(self, split: str) -> SplitFeatures:
        return self.splits[split]

    @property
    def provenance(self) -> dict:
        """Root attributes plus the file's path and size, JSON-safe."""
        out = dict(self.attrs)
        out["feature_file"] = str(self.path)
        return out

    @property
    def has_flip(self) -> bool:
        return all(s.features_flip is not None for s in self.splits.values())


def load_features(path: str | os.PathLike, splits: Iterable[str] | None = None, *,
                  require_complete: bool = True, check_finite: bool = True,
                  flip: bool = True, max_rows: int | None = None) -> FeatureSet:
    """Read a feature file for stage two (``max_rows``: only the first rows of each split).

    Refuses (with a message naming the fix) a missing, truncated, newer-schema, incomplete
    (unless ``require_complete=False``) or non-finite file. Features come back in the
    stored dtype (float32 by default) — never widened to float64.
    """
    path = Path(path)
    with _open_h5(path, "r") as f:
        _check_schema(path, f.attrs)
        attrs = _legacy_defaults(_attrs_dict(f.attrs))
        if require_complete and not attrs.get("complete"):
            done = dict(zip(attrs.get("splits", []), attrs.get("rows_done", [])))
            raise IncompleteFeatureFile(
                f"{path} is incomplete (rows done: {done}); finish it with `make features` "
                f"(the same command resumes) before training heads")
        names = list(splits) if splits is not None else [str(s) for s in attrs["splits"]]
        try:
            classes = [c.decode() if isinstance(c, bytes) else str(c) for c in f["classes"][()]]
            out = {}
            for name in names:
                if name not in f:
                    raise CorruptFeatureFile(f"{path} has no split {name!r}; it has "
                                             f"{attrs.get('splits')}")
                g = f[name]
                n = int(attrs["rows_done"][attrs["splits"].index(name)]) \
                    if not require_complete else g["labels"].shape[0]
                n = n if max_rows is None else min(n, int(max_rows))
                feats = g["features"][:n]
                flipped = g["features_flip"][:n] if flip and "features_flip" in g else None
                labels = g["labels"][:n]
                out[name] = SplitFeatures(feats, labels, flipped)
        except (OSError, KeyError) as exc:
            raise CorruptFeatureFile(f"{path} is damaged ({exc}); re-run stage one with "
                                     f"--force") from None
    if check_finite:
        for name, s in out.items():
            for arr in (s.features, s.features_flip):
                if arr is not None and not _all_finite(arr):
                    raise CorruptFeatureFile(
                        f"{path}: {name} features contain NaN or Inf (a numerically broken "
                        f"backbone run, e.g. float16 overflow); re-extract with --force, "
                        f"--precision float32")
    return FeatureSet(path=path, attrs=attrs, classes=classes, splits=out)


def _all_finite(arr: np.ndarray, block: int = 8192) -> bool:
    # Blockwise so the boolean temporary stays small whatever N is.
    return all(np.isfinite(arr[i:i + block]).all() for i in range(0, len(arr), block))



# --------------------------------------------------------------------------- shards and progress (issue #5)
#
# ``read_progress`` lets a monitor (or a test) poll a file a writer has open; ``merge_parts``
# joins the part files of ``featcache features --shard i/n`` into one feature file.

MERGE_BLOCK_BYTES = 16 << 20


def read_progress(path: str | os.PathLike) -> dict:
    """``{"complete": bool, "rows_done": {split: rows}}`` of a feature or ``.partial`` file.

    Opens without HDF5 file locking, so it works while a writer holds the file; the
    counts may be one batch behind. For progress displays and tests, not for reading data.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r", locking=False) as f:
            a = f.attrs
            splits = [str(s) for s in _json_safe(a["splits"])]
            done = [int(r) for r in np.asarray(a["rows_done"]).tolist()]
            return {"complete": bool(a["complete"]), "rows_done": dict(zip(splits, done))}
    except FileNotFoundError:
        raise CacheError(f"{path} does not exist") from None
    except (OSError, KeyError, ValueError) as exc:
        raise CorruptFeatureFile(f"{path} is not a readable featcache file ({exc}); "
                                 f"delete it, or re-run stage one with --force") from None


@dataclass
class _Part:
    path: Path
    attrs: dict
    index: int
    count: int
    classes: list
    dim: int
    starts: dict      # split -> row_start
    rows: dict        # split -> rows in this part


#: Root attributes that describe one part, not the merged file.
_PART_ONLY_ATTRS = ("shard", "total_rows", "complete", "rows_done", "splits",
                    "schema_version")
#: Attributes that must agree across the parts of one merge (config_sha256 covers the rest).
_MERGE_MUST_AGREE = ("config_sha256", "batch_size", "dtype", "flip", "splits", "total_rows")


def _read_part(path: Path) -> _Part:
    with _open_h5(path, "r") as f:
        _check_schema(path, f.attrs)
        attrs = _attrs_dict(f.attrs)
        shard = attrs.get("shard")
        if not shard:
            raise CacheError(f"{path} is not a shard part file (no 'shard' attribute); merge "
                             f"only the .partIofN.h5 files of `featcache features --shard I/N`")
        if not attrs.get("complete"):
            done = dict(zip(attrs.get("splits", []), attrs.get("rows_done", [])))
            raise IncompleteFeatureFile(
                f"part {path} is incomplete (rows done: {done}); finish it with the same "
                f"`featcache features --shard {shard}` command, then merge again")
        i, n = (int(p) for p in str(shard).split("/"))
        splits = [str(s) for s in attrs["splits"]]
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in f["classes"][()]]
        starts = {s: int(f[s].attrs.get("row_start", 0)) for s in splits}
        rows = {s: int(f[s]["labels"].shape[0]) for s in splits}
        dim = int(f[splits[0]]["features"].shape[1])
    return _Part(path, attrs, i, n, classes, dim, starts, rows)


def _check_parts(parts: list[_Part]) -> None:
    """Refuse (one line, naming the fix) missing, duplicate, mismatched or gapped parts."""
    first = parts[0]
    n = first.count
    counts = sorted({p.count for p in parts})
    if len(counts) > 1:
        raise CacheError(f"the parts come from different shard counts ({counts}); merge the "
                         f"parts of one --shard I/N run only")
    seen: dict[int, Path] = {}
    for p in parts:
        if p.index in seen:
            raise CacheError(f"{seen[p.index]} and {p.path} are both part {p.index}/{n}; "
                             f"keep one of them")
        seen[p.index] = p.path
    missing = [i for i in range(n) if i not in seen]
    if missing:
        names = ", ".join(f"{i}/{n}" for i in missing)
        raise CacheError(f"missing part(s) {names}; run `featcache features --shard I/{n}` "
                         f"with the same settings for each, then merge again")
    for p in parts[1:]:
        bad = [k for k in _MERGE_MUST_AGREE if p.attrs.get(k) != first.attrs.get(k)]
        if p.classes != first.classes:
            bad.append("classes")
        if p.dim != first.dim:
            bad.append("feature dimension")
        if bad:
            detail = ""
            if "config_sha256" in bad:
                changed = [k for k in ("dataset", "dataset_sha256", "backbone", "weights",
                                       "weights_sha256", "image_size", "preprocess", "pooling",
                                       "dtype", "precision", "runtime", "runtime_version",
                                       "flip", "limit", "seed")
                           if p.attrs.get(k) != first.attrs.get(k)]
                detail = f" ({', '.join(changed)} differ)" if changed else ""
            raise CacheError(
                f"part {p.path} does not match {first.path}: {', '.join(bad)}{detail}; "
                f"re-extract it with the same settings (--force) before merging")
    splits = [str(s) for s in first.attrs["splits"]]
    totals = dict(zip(splits, [int(t) for t in first.attrs["total_rows"]]))
    for split in splits:
        expect = 0
        for p in sorted(parts, key=lambda q: q.index):
            if p.starts[split] != expect:
                raise CacheError(
                    f"{p.path}: {split} rows start at {p.starts[split]}, expected {expect}; "
                    f"the parts do not tile the dataset, re-extract them with one --batch")
            expect += p.rows[split]
        if expect != totals[split]:
            raise CacheError(f"the parts hold {expect} {split} rows, the dataset has "
                             f"{totals[split]}; re-extract the parts with the same settings")


def merge_parts(parts: Iterable[str | os.PathLike], out: str | os.PathLike, *,
                force: bool = False, wait: bool = False) -> Path:
    """Join complete shard part files into one feature file at ``out``; return its path.

    The result has the layout, chunking, attributes (less ``shard``/``total_rows``, plus
    ``merged_from``) and array bytes a single-process run of the same settings writes, so
    it is an up-to-date cache for that configuration. Rows are copied block by block
    (``MERGE_BLOCK_BYTES``) through :class:`FeatureWriter`: the output is locked while it
    is built, lives at ``<out>.partial`` until complete, and an interrupted merge resumes.
    Missing, incomplete, duplicate or mismatched parts are refused before anything is written.
    """
    out = Path(out)
    read = [_read_part(Path(p)) for p in parts]
    if not read:
        raise CacheError(f"no part files to merge into {out}; run `featcache features "
                         f"--shard I/N` first")
    read.sort(key=lambda q: q.index)
    _check_parts(read)
    first = read[0]
    splits = [str(s) for s in first.attrs["splits"]]
    totals = dict(zip(splits, [int(t) for t in first.attrs["total_rows"]]))
    attrs = {k: v for k, v in first.attrs.items() if k not in _PART_ONLY_ATTRS}
    attrs["merged_from"] = int(first.count)
    flip = bool(first.attrs.get("flip", False))
    dtype = str(first.attrs.get("dtype", "float32"))
    block = max(1, MERGE_BLOCK_BYTES // max(1, first.dim * np.dtype(dtype).itemsize))
    with FeatureWriter.open(out, attrs=attrs, classes=first.classes,
                            splits={s: totals[s] for s in splits}, dim=first.dim, dtype=dtype,
                            flip=flip, force=force, wait=wait) as writer:
        if writer.complete:
            log.info("%s is already complete (same configuration); nothing to merge", out)
            return writer.path
        for split in splits:
            for p in read:
                lo = max(0, writer.rows_done(split) - p.starts[split])
                if lo >= p.rows[split]:
                    continue
                with _open_h5(p.path, "r") as f:
                    g = f[split]
                    for a in range(lo, p.rows[split], block):
                        b = min(a + block, p.rows[split])
                        writer.write(split, g["features"][a:b], g["labels"][a:b],
                                     g["features_flip"][a:b] if flip else None)
        writer.mark_complete()
        log.info("merged %d parts into %s", len(read), writer.path)
        return writer.path
