"""Section 1: the tutorial's recipe vs featcache — same images, same input size, same head.

The tutorial this project grew from froze an ImageNet backbone *inside* a Keras model
(``backbone.trainable = False``; backbone -> Dense(1024) -> Dense(10)) and trained it with
``model.fit`` on images, so every epoch runs every image through the backbone again.
featcache runs the backbone once into the feature file, then trains the same head on the
cache. Both here: the same first ``n_train``/``n_test`` images, the same input size and
preprocessing, the same head, optimiser, epochs, batch size and seed. Then the tutorial's
own input (32 px, ``/255``) vs the correct one, all through featcache (a 2x2 grid).

Reads the dataset and weights given by :class:`~benchmarks.env.Settings`; writes feature
files ``<work_dir>/s1_*.h5`` (deleted and rebuilt each run, never a cache hit).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .env import Settings, open_subset
from .stage2 import fit_predict_logreg

log = logging.getLogger(__name__)


def arrays(ds, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All images (uint8, small: the subset at its stored 32 px) and labels of ``split``."""
    xs, ys = zip(*ds.batches(split, 0, ds.splits[split], 1024))
    return np.concatenate(xs), np.concatenate(ys)


def dense_head(n_classes: int, hidden: int, seed: int):
    """The tutorial's head: Dense(hidden, relu) -> Dense(n_classes, softmax), seeded."""
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.layers.Dense(hidden, activation="relu"),
                             keras.layers.Dense(n_classes, activation="softmax")], name="head")


def _compile(model) -> None:
    import keras

    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def tutorial_model(s: Settings, n_classes: int, *, size: int, mode: str):
    """Images (uint8, any size) -> resize -> preprocess -> frozen backbone -> head: the
    tutorial's model, with the resize in the model so no upsampled copy is ever held."""
    import keras
    import tensorflow as tf

    from featcache.backbones.registry import build_backbone, get_backbone, preprocess

    backbone = build_backbone(get_backbone(s.backbone), weights=s.weights, seed=s.seed)
    backbone.trainable = False
    head = dense_head(n_classes, s.hidden, s.seed)

    class Tutorial(keras.Model):
        def __init__(self):
            super().__init__(name="tutorial")
            self.backbone, self.head = backbone, head

        def call(self, images, training=False):
            x = tf.cast(images, tf.float32)
            if x.shape[1] != size or x.shape[2] != size:
                x = tf.image.resize(x, (size, size), method="bilinear")
            x = preprocess(x, mode)
            return self.head(self.backbone(x, training=False), training=training)

    model = Tutorial()
    _compile(model)
    return model


def fit_predict_dense(s: Settings, xtr, ytr, xte, n_classes: int) -> dict:
    """The same head trained on cached features: fit and predict seconds, predictions."""
    import keras

    head = dense_head(n_classes, s.hidden, s.seed)
    head.build((None, xtr.shape[1]))
    _compile(head)
    keras.utils.set_random_seed(s.seed)
    t0 = time.perf_counter()
    head.fit(xtr, ytr, epochs=s.epochs, batch_size=s.batch, shuffle=True, verbose=0)
    t1 = time.perf_counter()
    pred = head.predict(xte, batch_size=1024, verbose=0).argmax(1)
    return {"fit_s": t1 - t0, "predict_s": time.perf_counter() - t1, "pred": pred}


def run_featcache(s: Settings, ds, *, size: int, mode: str, work: Path,
                  logreg: bool = True) -> dict:
    """Stage one into a fresh file, then the dense head (and logreg) on the cache."""
    from featcache.cache.lock import partial_path
    from featcache.cache.reader import load_features
    from featcache.config import ExtractConfig
    from featcache.extract.run import extract_features

    out = work / f"s1_{size}_{mode}.h5"
    for p in (out, partial_path(out)):
        p.unlink(missing_ok=True)
    cfg = ExtractConfig(dataset=ds.name, data_dir=s.data_dir, backbone=s.backbone, size=size,
                        batch=s.batch, weights=s.weights, preprocess=mode, seed=s.seed,
                        output=str(out), download=False, flip=False)
    t0 = time.perf_counter()
    res = extract_features(cfg, dataset=ds)
    fs = load_features(res.path)
    t1 = time.perf_counter()
    tr, te = fs["train"], fs["test"]
    dense = fit_predict_dense(s, tr.features, tr.labels, te.features, len(fs.classes))
    row = {"size": size, "preprocess": mode, "path": str(res.path),
           "extract_s": t1 - t0, "images": res.images,
           "dense_fit_s": dense["fit_s"], "dense_predict_s": dense["predict_s"],
           "dense_acc": float((dense["pred"] == te.labels).mean())}
    row["dense_total_s"] = row["extract_s"] + row["dense_fit_s"] + row["dense_predict_s"]
    if logreg:
        lr = fit_predict_logreg(tr.features, tr.labels, te.features, seed=s.seed)
        row.update(logreg_fit_s=lr["fit_s"], logreg_predict_s=lr["predict_s"],
                   logreg_acc=float((lr["pred"] == te.labels).mean()), logreg_name=lr["name"])
    log.info("featcache %d px %s: %s", size, mode,
             {k: round(v, 3) for k, v in row.items() if isinstance(v, float)})
    return row


def run(s: Settings) -> dict:
    """Section 1. Returns the timings, accuracies and ratios (JSON-safe)."""
    from featcache.backbones.registry import get_backbone

    work = Path(s.work_dir)
    own = get_backbone(s.backbone).preprocess
    ds = open_subset(s, {"train": s.n_train, "test": s.n_test})
    n_classes = len(ds.classes)

    # featcache: backbone once into the cache, then the same head on it (+ logreg)
    fc = run_featcache(s, ds, size=s.size, mode=own, work=work)

    # the tutorial: backbone inside the model, 10 epochs through it
    xtr, ytr = arrays(ds, "train")
    xte, yte = arrays(ds, "test")
    t0 = time.perf_counter()
    model = tutorial_model(s, n_classes, size=s.size, mode=own)
    import keras
    keras.utils.set_random_seed(s.seed)
    t1 = time.perf_counter()
    model.fit(xtr, ytr, epochs=s.epochs, batch_size=s.batch, shuffle=True, verbose=0)
    t2 = time.perf_counter()
    pred = model.predict(xte, batch_size=s.batch, verbose=0).argmax(1)
    t3 = time.perf_counter()
    tut = {"build_s": t1 - t0, "fit_s": t2 - t1, "predict_s": t3 - t2, "total_s": t3 - t0,
           "acc": float((pred == yte).mean()), "size": s.size, "preprocess": own}
    del model
    log.info("tutorial through the backbone: %s", tut)

    # the tutorial's own input (32 px, /255) vs the correct one, all through featcache
    grid = [fc]
    for size in sorted({s.tutorial_size, s.size}):
        for mode in ("scale01", own):
            if (size, mode) != (s.size, own):
                grid.append(run_featcache(s, ds, size=size, mode=mode, work=work))
    cell = {(g["size"], g["preprocess"]): g for g in grid}
    worst = cell[(s.tutorial_size, "scale01")]
    return {
        "dataset": ds.name, "n_train": ds.splits["train"], "n_test": ds.splits["test"],
        "n_classes": n_classes, "tutorial": tut, "featcache": fc, "grid": grid,
        "speedup_dense": tut["total_s"] / fc["dense_total_s"],
        # a further experiment once the cache exists: the tutorial pays everything again
        "speedup_rerun": tut["total_s"] / (fc["dense_fit_s"] + fc["dense_predict_s"]),
        "acc_gap_dense": fc["dense_acc"] - worst["dense_acc"],
        "acc_gap_logreg": (fc.get("logreg_acc", float("nan"))
                           - worst.get("logreg_acc", float("nan"))),
        "tutorial_own": {"size": s.tutorial_size, "preprocess": "scale01"},
    }
