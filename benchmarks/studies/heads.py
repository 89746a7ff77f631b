"""The validation studies behind two of stage two's shortcuts (docs/stage-two.md):

- ``--parts linear``: the linear heads' C paths with and without the preconditioner
  (:class:`featcache.heads.solver.Preconditioner`) at a gradient tolerance: L-BFGS iterations,
  seconds, the objective reached and validation accuracy per C (warm-started along the path,
  as stage two walks it);
- ``--parts knn``: cosine kNN on the raw features against a PCA projection of ``--dims``
  dimensions, whitened or not: validation accuracy per k and seconds (projection + search).

Reads a feature file; writes JSON lines to stdout. Uses the comparison's own split (the fit
and validation rows of ``featcache heads``); the test split is never read. One thread.

    python -m benchmarks.studies.heads FILE --parts linear,knn [--tol 3e-4] [--dims 128,256,384]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _data(path):
    from featcache.compare.protocol import load_data, split_data
    from featcache.config import HeadsConfig

    cfg = HeadsConfig(str(path), cv_below=0)   # the single split: part() below
    data, _ = split_data(load_data(cfg), cfg)
    return data.part("fit", True), data.part("val", True)


def linear(fit, val, tol: float):
    from featcache.heads.solver import (
        Preconditioner,
        Scaler,
        decision,
        fit_linear,
        folded,
        objective,
    )

    (X, y, Xf), (V, yv, Vf) = fit, val
    K = int(max(y.max(), yv.max())) + 1
    for loss, Cs in (("softmax", (0.001, 0.003, 0.01)),
                     ("squared_hinge", (0.0001, 0.0003, 0.001))):
        for flip in (False, True):
            blocks = [X, Xf] if flip else [X]
            sc = Scaler.fit(blocks)
            for pre in (False, True):
                t = time.perf_counter()
                P = Preconditioner.fit(blocks, sc) if pre else None
                setup = time.perf_counter() - t
                init = None
                for C in Cs:
                    t = time.perf_counter()
                    W, b, nit = fit_linear(blocks, y, K, scaler=sc, C=C, loss=loss, init=init,
                                           tol=tol, precondition=P)
                    s = time.perf_counter() - t
                    init = (W, b)
                    f = objective(blocks, y, K, scaler=sc, C=C, loss=loss)(
                        np.concatenate([W.ravel(), b]).astype(np.float64))[0]
                    We, be = folded(sc, W, b)
                    S = decision(V, We, be) + (decision(Vf, We, be) if flip else 0)
                    print(json.dumps({"part": "linear", "loss": loss, "flip": flip,
                                      "precondition": pre, "tol": tol, "C": C, "iterations": nit,
                                      "seconds": round(s, 2), "setup_s": round(setup, 2),
                                      "objective": round(float(f), 6),
                                      "val_accuracy": float(np.mean(S.argmax(1) == yv))}),
                          flush=True)


def knn(fit, val, dims):
    from featcache.heads import CosineKNNHead

    (X, y, Xf), (V, yv, Vf) = fit, val
    for flip in (False, True):
        for dim, white in [(None, False)] + [(d, w) for d in dims for w in (False, True)]:
            t = time.perf_counter()
            head = CosineKNNHead(dim=dim, whiten=white).fit(X, y, Xf if flip else None)
            nbs = [head.neighbours(q, 100) for q in ([V, Vf] if flip else [V])]
            s = time.perf_counter() - t
            acc = {}
            for k in (1, 5, 10, 20, 50, 100):
                P = sum(head._votes(nb, k) for nb in nbs)
                acc[k] = float(np.mean(head.classes_[P.argmax(1)] == yv))
            print(json.dumps({"part": "knn", "flip": flip, "dim": dim, "whiten": white,
                              "seconds": round(s, 2), "val_accuracy": acc}), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.heads",
                                description=__doc__.splitlines()[0])
    p.add_argument("feature_file")
    p.add_argument("--parts", default="linear,knn")
    p.add_argument("--tol", type=float, default=3e-4)
    p.add_argument("--dims", default="128,256,384")
    a = p.parse_args(argv)
    from threadpoolctl import threadpool_limits

    fit, val = _data(a.feature_file)
    with threadpool_limits(limits=1):
        parts = a.parts.split(",")
        if "linear" in parts:
            linear(fit, val, a.tol)
        if "knn" in parts:
            knn(fit, val, [int(d) for d in a.dims.split(",")])


if __name__ == "__main__":
    main()
