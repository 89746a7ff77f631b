"""Tiny feature files for the stage-two tests (written with the real FeatureWriter)."""

from __future__ import annotations

import numpy as np

from featcache.cache.writer import FeatureWriter


def blobs(n: int, dim: int = 16, k: int = 4, *, sep: float = 3.0, seed: int = 0):
    """Gaussian blobs: float32 (n, dim) features, int64 labels, and a 'mirrored' copy."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * sep
    y = np.arange(n) % k
    rng.shuffle(y)
    X = (centres[y] + rng.normal(size=(n, dim))).astype(np.float32)
    X_flip = (X + 0.3 * rng.normal(size=X.shape)).astype(np.float32)
    return X, y.astype(np.int64), X_flip


def make_feature_file(path, *, n_train=400, n_test=200, dim=16, k=4, sep=0.6, flip=True,
                      complete=True, seed=0, test_labels=None):
    """A feature file of overlapping blobs (so heads and grid points really differ)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)).astype(np.float32) * sep
    attrs = {"config_sha256": f"{seed:064d}", "dataset": "toy", "backbone": "toy",
             "image_size": 32, "weights": "none"}
    splits = {"train": n_train, "test": n_test}
    with FeatureWriter.open(path, attrs=attrs, classes=[f"class{i}" for i in range(k)],
                            splits=splits, dim=dim, flip=flip) as w:
        for split, n in splits.items():
            y = rng.integers(0, k, n).astype(np.int64)
            X = (centres[y] + rng.normal(size=(n, dim))).astype(np.float32)
            Xf = (X + 0.3 * rng.normal(size=X.shape)).astype(np.float32)
            if split == "test" and test_labels is not None:
                y = test_labels(y)
            w.write(split, X, y, Xf if flip else None)
        if complete:
            w.mark_complete()
    return path
