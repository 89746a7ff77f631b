"""The validation study behind the ``finetune`` head's defaults (docs/fine-tuning.md):
one fit of :class:`featcache.heads.finetune.head.FinetuneHead` with the given settings on the
comparison's own fit rows, early-stopped on its validation rows, with every epoch's loss,
validation accuracy and seconds. The test split is read only with ``--test``: then the
fitted head scores it once, for the depth study (the defaults were chosen on validation
alone).

Reads a feature file made with ``--cut``; writes JSON lines to stdout (one per epoch, then
the result); logs go to stderr. Uses both cores (run it alone).

    python -m benchmarks.studies.finetune FILE '{"trainable_blocks": 4, "backbone_lr": 1e-4}'
    python -m benchmarks.studies.finetune FILE '{"trainable_blocks": 2}' --test
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np


def fit_rows(path: str):
    """``(fit rows, labels, mirrored rows), (validation rows, labels, mirrored rows)`` as
    ``featcache heads`` splits them with its default ``--val-fraction`` and ``--seed``
    (:class:`featcache.config.HeadsConfig`, :func:`featcache.compare.protocol.stratified_split`)."""
    import h5py

    from featcache.compare.protocol import stratified_split
    from featcache.config import HeadsConfig
    from featcache.heads.finetune.data import ActRows

    cfg = HeadsConfig(str(path))
    with h5py.File(path, "r") as f:
        y = f["train/labels"][:]
    fit, val = stratified_split(y, cfg.val_fraction, cfg.seed)

    def rows(r, flip=False):
        return ActRows(str(path), "train", r, flip)

    return (rows(fit), y[fit], rows(fit, True)), (rows(val), y[val], rows(val, True))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("feature_file")
    ap.add_argument("params", nargs="?", default="{}",
                    help="FinetuneHead settings as JSON (default: the head's defaults)")
    ap.add_argument("--test", action="store_true",
                    help="score the test split once with the fitted head (plain + mirror)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    from featcache.heads.finetune.head import FinetuneHead

    params = json.loads(args.params)
    (X, y, Xf), (V, yv, Vf) = fit_rows(args.feature_file)
    t0 = time.perf_counter()
    head = FinetuneHead(**params).fit(X, y, Xf, validation_data=(V, yv, Vf))
    for entry in head.history_:
        print(json.dumps(entry), flush=True)
    best = max((e.get("val_accuracy", -1.0) for e in head.history_), default=None)
    fit_s = time.perf_counter() - t0
    test = {}
    if args.test:
        import h5py

        from featcache.heads.finetune.data import file_test_rows

        with h5py.File(args.feature_file, "r") as f:
            y_test = f["test/labels"][:]
        T, Tf = file_test_rows(args.feature_file, len(y_test), True)
        t1 = time.perf_counter()
        test = {"test_accuracy": float(np.mean(head.predict(T, Tf) == y_test)),
                "test_predict_s": round(time.perf_counter() - t1, 1)}
    print(json.dumps({"params": params, "trainable_blocks": head.trainable_blocks_,
                      "best_val_accuracy": best, "warmup_epochs": head.warmup_epochs_,
                      "epochs": head.best_epochs_,
                      "fit_s": round(fit_s, 1), **test,
                      "fit_rows": int(len(X)), "val_rows": int(len(V)),
                      "classes": int(len(np.unique(y)))}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
