"""The dense head's learning-rate schedules on a real feature file, scored on stage two's
validation rows only (docs/stage-two.md, "Dense: a short cosine schedule").

Reads FILE (a complete feature file with mirrored features); writes one JSON line to
stdout: the settings, validation accuracy after every epoch, the best, the final, seconds.
One thread (as in a stage-two worker). Example::

    python -m benchmarks.studies.dense_schedule FILE --epochs 4 --schedule cosine --lr 2e-3
    python -m benchmarks.studies.dense_schedule FILE --epochs 30 --schedule constant   # before
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--schedule", default="constant", choices=("constant", "cosine"))
    p.add_argument("--patience", type=int, default=3, help="constant schedule: early stop")
    p.add_argument("--flip", type=int, default=1, help="train on mirrors, TTA on validation")
    a = p.parse_args(argv)

    from featcache.compare.workers import tensorflow_single_threaded
    tensorflow_single_threaded()
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)
    import keras

    from featcache.compare.protocol import load_data, split_data
    from featcache.config import HeadsConfig
    from featcache.heads.dense import Batches
    from featcache.heads.solver import Scaler

    cfg = HeadsConfig(a.file, cv_below=0)   # the single split: part() below
    data, _ = split_data(load_data(cfg), cfg)
    X, y, Xf = data.part("fit", bool(a.flip))
    Xv, yv, Xvf = data.part("val", bool(a.flip))
    keras.utils.set_random_seed(0)
    blocks = [X] + ([Xf] if Xf is not None else [])
    sc = Scaler.fit(blocks)
    batches = Batches(blocks, y, a.batch, 0)
    lr = a.lr if a.schedule == "constant" else keras.optimizers.schedules.CosineDecay(
        a.lr, len(batches) * a.epochs)
    inp = keras.Input((X.shape[1],))
    h = keras.layers.Normalization(mean=sc.mean, variance=sc.scale ** 2)(inp)
    h = keras.layers.Dropout(0.5)(keras.layers.Dense(1024, activation="relu")(h))
    model = keras.Model(inp, keras.layers.Dense(int(y.max()) + 1, activation="softmax")(h))
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy")

    def val_acc():
        pr = np.asarray(model.predict(Xv, batch_size=4096, verbose=0))
        if Xvf is not None:
            pr = (pr + np.asarray(model.predict(Xvf, batch_size=4096, verbose=0))) / 2
        return float(np.mean(pr.argmax(1) == yv))

    t0, hist, best, bad = time.perf_counter(), [], (-1.0, 0), 0
    for ep in range(a.epochs):
        model.fit(batches, epochs=1, verbose=0)
        hist.append(round(val_acc(), 4))
        if hist[-1] > best[0]:
            best, bad = (hist[-1], ep + 1), 0
        else:
            bad += 1
            if a.schedule == "constant" and bad >= a.patience:
                break
    out = dict(vars(a), val_history=hist, best=best, final=hist[-1],
               seconds=round(time.perf_counter() - t0, 1))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
