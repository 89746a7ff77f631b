"""The HDF5 feature file: layout, schema and reading (writing: :mod:`featcache.cache.writer`).

Reads ``features/<dataset>_<backbone>_<size>[_<variant>].h5`` (the contract between the
stages, see ``docs/architecture.md``); writes nothing. The only modules that open feature
files with h5py are this one, :mod:`featcache.cache.writer`, :mod:`featcache.cache.merge`,
:mod:`featcache.cache.progress` and :mod:`featcache.cache.upgrade`.

Layout (schema 2)::

    /classes                      UTF-8 strings
    /<split>/features             (N, D) float32|float16, chunked by rows (~1 MiB chunks)
    /<split>/features_flip        optional, same shape: features of mirrored images
    /<split>/labels               (N,) int64
    /<split>/ids                  (N,) the row's identity: int64 index in the split
                                  (CIFAR-10, registry datasets) or UTF-8 relative path
                                  (image folders); ``attrs["id_kind"]`` "index" | "path"
    /<split>/sha256               image folders (optional: not in older files): (N,) the
                                  sha256 (64 ASCII hex bytes) of each row's file as stage
                                  one read it, so stage two can tell a changed file
    root attrs                    provenance (see PROVENANCE_KEYS), ``complete``,
                                  ``splits`` and ``rows_done`` (one count per split)

Schema 1 files (no ids) are refused with a message naming ``featcache upgrade FILE``
(:mod:`featcache.cache.upgrade`), which migrates them in place.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from featcache._util.settings import optional_key_fields
from featcache.config import ExtractConfig, cache_key_fields
from featcache.errors import (
    CacheError,
    CorruptFeatureFile,
    IncompleteFeatureFile,
    LockedError,
    OldSchemaError,
)

log = logging.getLogger(__name__)

#: 2: per-row ``ids`` in every split (1: none; ``featcache upgrade`` migrates)
SCHEMA_VERSION = 2
CHUNK_BYTES = 1 << 20

#: Root attributes every complete feature file has (docs/architecture.md), copied into every
#: results file: the layout's own, the cache key's (from the settings table,
#: :func:`featcache.config.cache_key_fields`; a ``key_if_set`` one such as ``cut`` only in
#: the files made with it) and the run's.
PROVENANCE_KEYS = ("schema_version", "complete", "splits", "rows_done",
                   *(k for k in cache_key_fields() if k not in optional_key_fields(ExtractConfig)),
                   "batch_size", "tensorflow_version", "keras_version", "created_utc",
                   "config_sha256")


def legacy_defaults(attrs: dict) -> dict:
    """Files written before runtimes were recorded were all computed by TensorFlow."""
    if "runtime" not in attrs:
        attrs["runtime"] = "tensorflow"
        attrs["runtime_version"] = attrs.get("tensorflow_version")
    return attrs


def chunk_rows(dim: int, itemsize: int) -> int:
    """Rows per chunk so that one chunk of a (N, dim) dataset is about 1 MiB."""
    return max(1, CHUNK_BYTES // max(1, dim * itemsize))


def json_safe(value):
    if isinstance(value, np.ndarray):
        return [json_safe(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def attrs_dict(attrs) -> dict:
    return {k: json_safe(v) for k, v in attrs.items()}


# --------------------------------------------------------------------------- opening

def open_h5(path: Path, mode: str) -> h5py.File:
    """Open an existing feature file, turning h5py's errors into one-line project errors."""
    if Path(path).is_dir():
        raise CacheError(f"{path} is a folder, not a feature file; give the .h5 file (a "
                         f"report folder sits beside the .h5 of the same name)")
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


def check_schema(path: Path, attrs) -> None:
    version = attrs.get("schema_version")
    if version is None:
        raise CorruptFeatureFile(f"{path} has no schema_version: not a featcache feature "
                                 f"file; delete it, or re-run stage one with --force")
    if int(version) > SCHEMA_VERSION:
        raise CorruptFeatureFile(
            f"{path} was written by a newer featcache (schema {int(version)}, this one "
            f"reads up to {SCHEMA_VERSION}); upgrade featcache to read it")
    if int(version) < SCHEMA_VERSION:
        raise OldSchemaError(
            f"{path} has feature-file schema {int(version)} (no per-row ids; this featcache "
            f"reads schema {SCHEMA_VERSION}); run `featcache upgrade {path}` to migrate it in "
            f"place, or re-run stage one with --force")


def read_attrs(path: str | os.PathLike) -> dict:
    """The root attributes of a feature file as a JSON-safe dict (checks the schema)."""
    path = Path(path)
    with open_h5(path, "r") as f:
        check_schema(path, f.attrs)
        return legacy_defaults(attrs_dict(f.attrs))


def file_identity(source) -> dict:
    """What a fitted head records of the feature file it was fitted on, and what it is
    checked against when it is used with one (:func:`featcache.heads.check_fitted_on`):
    ``feature_file`` (the path, for messages), ``config_sha256``, ``classes`` (the names,
    in label order) and ``n_features`` (the width of the features). ``source``: a loaded
    :class:`FeatureSet` (the width from a split it holds) or a path (read without its
    arrays)."""
    if isinstance(source, FeatureSet) and source.splits:
        split = next(iter(source.splits.values()))
        path, attrs, classes = source.path, source.attrs, source.classes
        width = int(split.features.shape[1])
    else:
        path = Path(getattr(source, "path", source))
        with open_h5(path, "r") as f:
            check_schema(path, f.attrs)
            attrs = attrs_dict(f.attrs)
            try:
                classes = [c.decode() if isinstance(c, bytes) else str(c)
                           for c in f["classes"][()]]
                first = [str(s) for s in attrs.get("splits", [])][:1]
                width = int(f[first[0]]["features"].shape[1]) if first else None
            except (OSError, KeyError, IndexError) as exc:
                raise CorruptFeatureFile(f"{path} is damaged ({exc}); re-run stage one with "
                                         f"--force") from None
    return {"feature_file": str(path), "config_sha256": attrs.get("config_sha256"),
            "classes": list(classes), "n_features": width}


# --------------------------------------------------------------------------- reading

@dataclass
class SplitFeatures:
    """One split's arrays (float32 features unless the file stores float16).

    ``ids``: each row's identity, int64 indices in the split (registry datasets) or
    ``str`` paths relative to the image folder (object array); ``sha256``: for an image
    folder, each row's file's content hash when the file was read (None in older files)."""

    features: np.ndarray
    labels: np.ndarray
    features_flip: np.ndarray | None = None
    ids: np.ndarray | None = None
    sha256: np.ndarray | None = None   # image folders: each row's file's sha256 (hex str)

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
    with open_h5(path, "r") as f:
        check_schema(path, f.attrs)
        attrs = legacy_defaults(attrs_dict(f.attrs))
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
                check_rows(path, name, g, attrs)
                n = int(attrs["rows_done"][attrs["splits"].index(name)]) \
                    if not require_complete else g["labels"].shape[0]
                n = n if max_rows is None else min(n, int(max_rows))
                feats = g["features"][:n]
                flipped = g["features_flip"][:n] if flip and "features_flip" in g else None
                labels = g["labels"][:n]
                out[name] = SplitFeatures(feats, labels, flipped, read_ids(g, n),
                                          read_sha256(g, n))
        except (OSError, KeyError) as exc:
            raise CorruptFeatureFile(f"{path} is damaged ({exc}); re-run stage one with "
                                     f"--force") from None
    widths = {name: s.features.shape[1] if s.features.ndim == 2 else None
              for name, s in out.items()}
    if len(set(widths.values())) > 1 or None in widths.values():
        raise CorruptFeatureFile(f"{path} is damaged: its splits' features have different "
                                 f"widths ({widths}); re-run stage one with --force")
    if check_finite:
        for name, s in out.items():
            for arr in (s.features, s.features_flip):
                if arr is not None and not _all_finite(arr):
                    raise CorruptFeatureFile(
                        f"{path}: {name} features contain NaN or Inf (a numerically broken "
                        f"backbone run, e.g. float16 overflow); re-extract with --force, "
                        f"--precision float32")
                big = _max_abs(arr) if arr is not None else 0.0
                if big > MAX_FEATURE:
                    raise CorruptFeatureFile(
                        f"{path}: {name} features hold values up to {big:.3g}, beyond any "
                        f"backbone's (|x| <= {MAX_FEATURE:g}; their squares overflow "
                        f"float32); re-extract with --force, --precision float32")
    return FeatureSet(path=path, attrs=attrs, classes=classes, splits=out)


def check_rows(path, name: str, group, attrs: dict) -> None:
    """Refuse a split whose datasets disagree on their row count (features, labels, ids,
    mirrored features), or, in a complete file, with ``rows_done``: heads would train on
    rows paired with the wrong labels, or silently on fewer rows."""
    counts = {k: int(group[k].shape[0]) for k in ("features", "labels", "ids",
                                                  "features_flip", "sha256") if k in group}
    done = attrs.get("rows_done")
    if attrs.get("complete") and done is not None and name in list(attrs.get("splits", [])):
        counts["rows_done"] = int(done[list(attrs["splits"]).index(name)])
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise CorruptFeatureFile(f"{path} is damaged: its {name} split's row counts disagree "
                                 f"({shown}); re-run stage one with --force")


def read_ids(group, n: int | None = None) -> np.ndarray:
    """The first ``n`` (default: all) ids of an open split group: int64, or ``str`` objects."""
    ds = group["ids"]
    raw = ds[:n] if n is not None else ds[()]
    if h5py.check_string_dtype(ds.dtype) is not None:
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in raw],
                        dtype=object)
    return np.asarray(raw, dtype=np.int64)


def read_sha256(group, n: int | None = None) -> np.ndarray | None:
    """The first ``n`` (default: all) file hashes of an open split group as ``str`` (hex),
    None when the file has none (a registry data set, or a file written before them)."""
    if "sha256" not in group:
        return None
    raw = group["sha256"][:n] if n is not None else group["sha256"][()]
    return np.array([v.decode("ascii") if isinstance(v, bytes) else str(v) for v in raw],
                    dtype=object)


#: Larger pooled features than this are damage, not activations: squared, they overflow
#: the float32 similarities and norms the heads compute (a kNN search then fails).
MAX_FEATURE = 1e15


def _max_abs(arr: np.ndarray, block: int = 8192) -> float:
    return max((float(np.abs(arr[i:i + block]).max(initial=0.0))
                for i in range(0, len(arr), block)), default=0.0)


def _all_finite(arr: np.ndarray, block: int = 8192) -> bool:
    # Blockwise so the boolean temporary stays small whatever N is.
    return all(np.isfinite(arr[i:i + block]).all() for i in range(0, len(arr), block))
