"""File rows for the ``finetune`` head: which rows of a feature file with activations at
a cut it trains and predicts on, and streaming them in row blocks.

Reads a feature file made with ``--cut`` (its ``/<split>/acts``, ``acts_flip`` and pooled
``features``, through :class:`featcache.cache.activations.ActivationReader`); writes nothing.

How the head plugs into stage two (:mod:`featcache.compare.protocol`): the comparison hands every
head its rows as arrays of pooled features; a head registered with ``file_rows`` (the
``finetune`` head, :mod:`featcache.heads.finetune.head`) gets :class:`ActRows` instead — the
feature file, the split and the row numbers — from :func:`activation_data`, which wraps
the comparison's data with the same fit/validation/test rows. Everything else (selection
on validation, test once, the interval, McNemar, the report) is the comparison's own.

Streaming: contiguous row blocks (``READ_ROWS``) read in a shuffled block order and mixed
``BUFFER_BLOCKS`` at a time in a shuffle buffer; with mirrored activations each sample is
plain or mirrored at random per epoch, and with ``shift`` each activation map is moved by
up to ``shift`` cells in each direction (edge cells repeated; :func:`shift_maps`). A
reader thread keeps two batches ready. Memory: a few row blocks — flat in the number of
rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featcache._util.prefetch import prefetch
from featcache.errors import ConfigError

#: Rows per contiguous read from the file (x ~31 KiB per row for a 7x7x320 float16 cut).
READ_ROWS = 512
#: Blocks mixed in the shuffle buffer.
BUFFER_BLOCKS = 4


@dataclass(frozen=True)
class ActRows:
    """Rows of one split of a feature file with activations, in a given order (what a
    ``reads_activations`` head gets as ``X``). ``flip``: the mirrored activations."""

    path: str
    split: str
    rows: np.ndarray          # file row numbers, in the caller's order
    flip: bool = False

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, s):
        """The rows at a slice or at an array of positions (a fold's rows)."""
        if not isinstance(s, (slice, np.ndarray)):
            raise TypeError("ActRows takes a slice or an index array")
        return ActRows(self.path, self.split, self.rows[s], self.flip)

    @property
    def shape(self):
        return (len(self.rows),)


class _ActData:
    """The comparison's data (``featcache.compare.protocol.SplitData``) with :class:`ActRows` in
    place of the feature arrays: same fit/validation/test rows, same labels."""

    def __init__(self, data):
        path = getattr(data, "feature_file", None)
        if path is None:
            raise ConfigError("the finetune head reads the feature file's rows: run it "
                              "through `featcache heads FILE` (not on arrays, nor in "
                              "`featcache curve`)")
        self.n_fit, self.y, self.y_test = data.n_fit, data.y, data.y_test
        self.plan, self.splits = data.plan, data.splits
        order = np.asarray(data.order)
        self.X = ActRows(path, "train", order)
        self.Xf = ActRows(path, "train", order, True) if data.Xf is not None else None
        n_test = len(data.y_test)
        self.X_test = ActRows(path, "test", np.arange(n_test))
        self.Xf_test = ActRows(path, "test", np.arange(n_test), True) \
            if data.Xf_test is not None else None

    def rows(self, idx, flip: bool):
        """(file rows, labels, mirrored file rows or None) of training rows ``idx`` (one
        of ``splits``' slices or index arrays)."""
        return self.X[idx], self.y[idx], (self.Xf[idx] if flip else None)


def activation_data(data):
    """``data`` for a head that reads activations (see the module docstring)."""
    return data if isinstance(data, _ActData) else _ActData(data)


def file_test_rows(path, n: int, flip: bool):
    """(the first ``n`` test rows, their mirrors or None) of the file at ``path``."""
    rows = np.arange(n)
    return ActRows(str(path), "test", rows), (ActRows(str(path), "test", rows, True)
                                              if flip else None)


# ---------------------------------------------------------------------------- streaming

def _blocks_of(rows: np.ndarray, n_file: int, read_rows: int):
    """Contiguous file blocks ``[lo, hi)`` holding any of ``rows``, and each block's rows."""
    rows = np.sort(np.asarray(rows))
    out = []
    for lo in range(0, n_file, read_rows):
        a, b = np.searchsorted(rows, [lo, lo + read_rows])
        if b > a:
            out.append((lo, min(n_file, lo + read_rows), rows[a:b]))
    return out


def shift_maps(x: np.ndarray, shift: int, rng) -> np.ndarray:
    """``x`` (N, H, W, C) with each map translated by a random (dy, dx) in
    ``[-shift, shift]``^2, the edge rows/columns repeated into the cells left empty: the
    activation-map form of the random-crop augmentation (a cell of a 7x7 map at 224 px is
    32 input pixels, 4.6 of a 32 px CIFAR image). ``shift`` 0 returns ``x``."""
    if not shift:
        return x
    s = int(shift)
    h, w = x.shape[1], x.shape[2]
    pad = np.pad(x, ((0, 0), (s, s), (s, s), (0, 0)), mode="edge")
    dy = rng.integers(-s, s + 1, len(x))
    dx = rng.integers(-s, s + 1, len(x))
    out = np.empty_like(x)
    for a in range(-s, s + 1):
        for b in range(-s, s + 1):
            sel = np.flatnonzero((dy == a) & (dx == b))
            if len(sel):
                out[sel] = pad[sel, s + a:s + a + h, s + b:s + b + w]
    return out


def train_batches(reader, X: ActRows, labels_by_row, batch: int, rng, *,
                  mirror: bool, read_rows: int = READ_ROWS, buffer_blocks: int = BUFFER_BLOCKS,
                  what: str = "acts", shift: int = 0):
    """One epoch of shuffled ``(x float32, y)`` batches over ``X``'s rows: blocks in random
    order, mixed ``buffer_blocks`` at a time; with ``mirror`` each sample is plain or
    mirrored at random; with ``shift`` (activations only) each map is translated at random
    (:func:`shift_maps`)."""
    blocks = _blocks_of(X.rows, reader.rows(X.split), read_rows)
    order = rng.permutation(len(blocks))

    def gen():
        for k in range(0, len(order), buffer_blocks):
            xs, ys = [], []
            for j in order[k:k + buffer_blocks]:
                lo, hi, rows = blocks[j]
                plain = reader.read(X.split, lo, hi, what=what)[rows - lo]
                if mirror:
                    pick = rng.integers(0, 2, len(rows)).astype(bool)
                    if pick.any():
                        plain[pick] = reader.read(X.split, lo, hi, flip=True,
                                                  what=what)[rows[pick] - lo]
                xs.append(plain)
                ys.append(labels_by_row[rows])
            x, y = np.concatenate(xs), np.concatenate(ys)
            perm = rng.permutation(len(y))
            for i in range(0, len(y), batch):
                sel = perm[i:i + batch]
                xb = x[sel].astype(np.float32)
                yield (shift_maps(xb, shift, rng) if what == "acts" else xb), y[sel]

    return prefetch(gen(), 2, name="featcache-act-reader")


def predict_blocks(reader, X: ActRows, *, read_rows: int = READ_ROWS, what: str = "acts"):
    """``(positions in X, activations float32)`` for all of ``X``'s rows, in file order."""
    pos = np.empty(reader.rows(X.split), np.int64)
    pos[X.rows] = np.arange(len(X.rows))
    blocks = _blocks_of(X.rows, reader.rows(X.split), read_rows)

    def gen():
        for lo, hi, rows in blocks:
            yield pos[rows], reader.read(X.split, lo, hi, flip=X.flip,
                                         what=what)[rows - lo].astype(np.float32)

    return prefetch(gen(), 2, name="featcache-act-reader")



def pooled_stats(X: ActRows):
    """Mean and variance of the stored pooled features over ``X``'s rows (what the top
    outputs before training), read in blocks."""
    from featcache.cache.activations import ActivationReader

    with ActivationReader(X.path) as r:
        s = s2 = 0.0
        for lo, hi, rows in _blocks_of(X.rows, r.rows(X.split), 8192):
            a = r.read(X.split, lo, hi, what="features")[rows - lo].astype(np.float64)
            s = s + a.sum(0)
            s2 = s2 + (a * a).sum(0)
    return feature_stats(s, s2, len(X.rows))


def feature_stats(s, s2, n: int):
    """Mean and variance (float32) from the sums ``s`` and ``s2`` (float64) of ``n`` rows of
    pooled features and of their squares, each feature's scale floored (below)."""
    n = max(1, int(n))
    mean = s / n
    sd = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
    # near-constant features would be amplified without bound once the top trains: floor
    # their scale (constant ones, as the frozen heads' Scaler does, are left as they are)
    top = float(sd.max()) if sd.size else 1.0
    sd[sd < 1e-6 * max(1.0, top)] = 1.0
    sd = np.maximum(sd, 0.01 * top)
    return mean.astype(np.float32), (sd ** 2).astype(np.float32)
