"""Activations at a cut, stored in the feature file beside the pooled features.

Reads and writes, in a feature file made with ``--cut`` (see :mod:`featcache.cache.writer` for the
rest of the layout)::

    /<split>/acts          (N, H, W, C) float16, chunked by rows (~1 MiB chunks)
    /<split>/acts_flip     with --flip: the same for the mirrored images
    root attrs             cut, cut_layer, cut_shape (H, W, C)

Writing (:class:`ActivationWriter`) extends :class:`~featcache.cache.writer.FeatureWriter`: the
schema-2 file (features, labels, ids) is created by the store's own ``_create`` under a
staging name, the activation datasets are added there with every chunk preallocated, and
the whole is renamed into place (:func:`featcache._util.atomic.replace`), so a ``.partial`` file
always has its full layout. Each batch writes its activations *before* the pooled
features, whose write bumps ``rows_done`` and flushes. A killed run therefore resumes
exactly like one without a cut: from ``rows_done``, rewriting at most the batch in flight.

Reading (:class:`ActivationReader`) never loads a split: stage two streams contiguous row
blocks (:meth:`ActivationReader.blocks`), so memory stays flat in the number of rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from featcache._util import atomic
from featcache.cache.reader import CHUNK_BYTES, check_schema, open_h5
from featcache.cache.writer import (
    FeatureWriter,
    building,
    open_owned,
    preallocated,
    require_free,
    writing,
)
from featcache.errors import CacheError, ConfigError, IncompleteFeatureFile

ACT_DTYPE = "float16"


def act_chunk_rows(shape) -> int:
    """Rows per chunk of an activation dataset (about ``CHUNK_BYTES``)."""
    per_row = int(np.prod(shape)) * np.dtype(ACT_DTYPE).itemsize
    return max(1, CHUNK_BYTES // max(1, per_row))


class ActivationWriter(FeatureWriter):
    """A :class:`FeatureWriter` that also stores the activations at a cut.

    Use :meth:`for_shape` to get the class for one activation shape, then its ``open`` like
    :class:`FeatureWriter`'s; ``write`` takes ``acts`` (and ``acts_flip`` with flip)."""

    act_shape: tuple[int, int, int] = ()

    @classmethod
    def for_shape(cls, shape) -> type["ActivationWriter"]:
        return type(cls.__name__, (cls,), {"act_shape": tuple(int(d) for d in shape)})

    @classmethod
    def _create(cls, path: Path, *, attrs, classes, specs, dim, dtype, flip) -> None:
        shape = cls.act_shape
        per_row = int(np.prod(shape)) * np.dtype(ACT_DTYPE).itemsize * (2 if flip else 1)
        need = sum(s.rows for s in specs.values()) * per_row
        require_free(path, need, subject=f"{path}: the activations at the cut need",
                      advice="free some space, write elsewhere (--out-dir) or choose a "
                             "smaller cut")
        staging = atomic.temp_name(path, ".acts")
        with building(staging, path):
            FeatureWriter._create(staging, attrs=attrs, classes=classes, specs=specs, dim=dim,
                                  dtype=dtype, flip=flip)
            with open_owned(staging) as f:
                rows = act_chunk_rows(shape)
                for name, spec in specs.items():
                    for key in ("acts", "acts_flip") if flip else ("acts",):
                        preallocated(f[name], key, (spec.rows, *shape), ACT_DTYPE,
                                      (min(rows, max(spec.rows, 1)), *shape))
                f.attrs["cut_shape"] = list(shape)

    def write(self, split: str, features: np.ndarray, labels: np.ndarray,
              features_flip: np.ndarray | None = None, *, acts: np.ndarray | None = None,
              acts_flip: np.ndarray | None = None) -> int:
        if acts is None or (self.flip and acts_flip is None):
            raise CacheError(f"{self.path} stores activations at a cut; pass them")
        start = self.rows_done(split)
        stop = start + len(features)
        if stop > self.rows(split):
            raise CacheError(f"{self.path}: {split} would exceed its {self.rows(split)} rows")
        g = self._f[split]
        with writing(self.path, lambda: f"{start} {split} rows"):
            g["acts"][start:stop] = acts.astype(ACT_DTYPE, copy=False)
            if self.flip:
                g["acts_flip"][start:stop] = acts_flip.astype(ACT_DTYPE, copy=False)
        return super().write(split, features, labels, features_flip)


# ---------------------------------------------------------------------------- reading

class ActivationReader:
    """Streams the activations of a complete feature file made with ``--cut``.

    Holds the HDF5 file open; use as a context manager. Nothing is read until asked."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = open_h5(self.path, "r")
        attrs = self._f.attrs
        try:
            check_schema(self.path, attrs)
        except BaseException:
            self._f.close()
            raise
        if "cut" not in attrs or attrs["cut"] in ("", "none"):
            self._f.close()
            raise ConfigError(f"{self.path} has no activations at a cut; make one with "
                              f"`featcache features --cut BLOCK` (make features CUT=BLOCK, "
                              f"and the same CUT= for make heads and make export; "
                              f"`featcache cuts BACKBONE` lists them)")
        if not attrs.get("complete"):
            self._f.close()
            raise IncompleteFeatureFile(f"{self.path} is incomplete; finish it with the same "
                                        f"`featcache features` command before training")
        self.cut = str(attrs["cut"])
        self.shape = tuple(int(d) for d in attrs["cut_shape"])
        self.flip = bool(attrs.get("flip", False))

    def rows(self, split: str) -> int:
        return int(self._f[split]["labels"].shape[0])

    def labels(self, split: str) -> np.ndarray:
        return self._f[split]["labels"][()]

    def chunk_rows(self, split: str) -> int:
        return int(self._f[split]["acts"].chunks[0])

    def read(self, split: str, start: int, stop: int, *, flip: bool = False,
             what: str = "acts") -> np.ndarray:
        """Rows ``start:stop`` of ``split``'s activations (float16; ``what="features"``: the
        pooled features), the mirrored ones with ``flip``."""
        if flip and not self.flip:
            raise ConfigError(f"{self.path} stores no mirrored activations (made without --flip)")
        return self._f[split][f"{what}_flip" if flip else what][start:stop]

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
