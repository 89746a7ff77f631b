"""``python -m benchmarks.stage2_parts FILE [--parts solvers,knn,refit]``: the measurements
behind stage two's design choices (docs/stage-two.md, "Why it is fast"), on one feature
file, with the comparison's own split (validation fraction 0.1, seed 0), one thread:

- ``solvers``: the hand-written L-BFGS (``featcache.heads.solver.lbfgs``) vs
  ``scipy.optimize.minimize(method="L-BFGS-B")`` on the same float32 objective and rows
  (logreg and linear_svm at their chosen C, fit rows, tol 1e-4, max_iter 300): seconds,
  iterations, function evaluations, final objective, validation accuracy.
- ``knn``: the tiled top-k search (``featcache.heads.top_k``) vs the search it replaced
  (normalised copy of the index, one full (1,024 x n) similarity block per step,
  ``argpartition`` of its negation), on test queries against all training rows and their
  mirrors: seconds per 1,000 queries, and whether the neighbours agree.
- ``refit``: is refitting the dense head on all training rows worth its time? Decided on
  validation only: the fit rows are split again (inner fit / inner validation, 90/10); A =
  early-stopped on the inner split (what ``--search fast`` keeps), B = A's epochs refit on
  all fit rows (what the refit does); both scored on the comparison's validation rows.
- ``tol``: the linear heads' selection path at gradient tolerances 1e-4 (the default),
  3e-4 and 1e-3: validation accuracy per C, iterations, seconds.

Reads the file; writes nothing but its output (markdown tables on stdout).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _data(path: str):
    from featcache.cache.reader import load_features
    from featcache.compare.protocol import SplitData

    fs = load_features(path)
    tr, te = fs["train"], fs["test"]
    return SplitData(tr.features, tr.labels, tr.features_flip, te.features, te.labels,
                 te.features_flip, 0.1, 0)


def solvers(data, rows: int | None) -> list[str]:
    from threadpoolctl import threadpool_limits

    from featcache.heads import LinearHead
    from featcache.heads.solver import Scaler, fit_linear, objective

    X, y, _ = data.part("fit", False)
    Xv, yv, _ = data.part("val", False)
    if rows:
        X, y = X[:rows], y[:rows]
    X = np.ascontiguousarray(X)
    out = ["| loss | C | solver | seconds | iterations | evaluations | objective | val acc |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    sc = Scaler.fit([X])
    for loss, C in (("softmax", 0.003), ("squared_hinge", 0.0003)):
        fun = objective([X], y, 10, scaler=sc, C=C, loss=loss)
        for solver in ("lbfgs", "scipy"):
            calls = [0]

            def counted(theta, _f=fun):
                calls[0] += 1
                return _f(theta)

            import featcache.heads.solver as lin

            orig = lin.objective
            lin.objective = lambda *a, **k: counted   # count this fit's evaluations
            try:
                t = time.perf_counter()
                W, b, nit = fit_linear([X], y, 10, scaler=sc, C=C, loss=loss, tol=1e-4,
                                       max_iter=300, solver=solver)
                dt = time.perf_counter() - t
            finally:
                lin.objective = orig
            with threadpool_limits(1):
                value = fun(np.concatenate([W.ravel(), b]).astype(np.float64))[0]
            head = LinearHead(C=C, loss=loss)
            head.classes_ = np.arange(10)
            from featcache.heads.solver import folded

            head.coef_, head.intercept_ = folded(sc, W, b)
            acc = float(np.mean(head.predict(Xv) == yv))
            out.append(f"| {loss} | {C:g} | {solver} | {dt:.1f} | {nit} | {calls[0]} | "
                       f"{value:.6f} | {100 * acc:.2f}% |")
            print(out[-1], flush=True)
    return out


def _old_neighbours(X, index, k):
    """Cosine kNN on the raw features (no projection), for the comparison."""
    def nz(A):
        return A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-12)

    X, I = nz(X), np.concatenate([nz(b) for b in index])
    out = np.empty((len(X), k), np.int64)
    for i in range(0, len(X), 1024):
        S = X[i:i + 1024] @ I.T
        top = np.argpartition(-S, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(S, top, 1), axis=1, kind="stable")
        out[i:i + 1024] = np.take_along_axis(top, order, 1)
    return out


def knn(data, queries: int) -> list[str]:
    from threadpoolctl import threadpool_limits

    from featcache.heads import inv_norms, top_k

    index = [np.asarray(data.X), np.asarray(data.Xf)]
    Q = np.concatenate([data.X_test[:queries], data.Xf_test[:queries]])
    inv = np.concatenate([inv_norms(b) for b in index])
    with threadpool_limits(1):
        t = time.perf_counter()
        old = _old_neighbours(Q, index, 50)
        t_old = time.perf_counter() - t
        t = time.perf_counter()
        _, new = top_k(Q, index, inv, 50)
        t_new = time.perf_counter() - t
    same = float(np.mean([len(set(a) & set(b)) / 50 for a, b in zip(old, new)]))
    n = len(Q)
    lines = ["| search | queries x index rows | seconds | s per 1,000 queries | speedup |",
             "| --- | --- | --- | --- | --- |",
             f"| before (full block, argpartition of -S) | {n:,} x {sum(map(len, index)):,} | "
             f"{t_old:.1f} | {1000 * t_old / n:.2f} | 1 |",
             f"| tiled top-k (`top_k`) | {n:,} x {sum(map(len, index)):,} | {t_new:.1f} | "
             f"{1000 * t_new / n:.2f} | **{t_old / t_new:.2f}x** |",
             "", f"Same 50 neighbours: {100 * same:.3f}% of them (one thread)."]
    print("\n".join(lines), flush=True)
    return lines


def refit(data, flip: bool) -> list[str]:
    from featcache.compare.protocol import stratified_split
    from featcache.compare.workers import single_threaded, tensorflow_single_threaded
    from featcache.heads import DenseHead

    X, y, Xf = data.part("fit", flip)
    Xv, yv, Xfv = data.part("val", flip)
    inner_fit, inner_val = stratified_split(y, 0.1, 1)
    X, Xf = np.asarray(X), (np.asarray(Xf) if Xf is not None else None)
    sub = lambda A, r: None if A is None else A[r]  # noqa: E731
    with single_threaded():
        tensorflow_single_threaded()
        t = time.perf_counter()
        a = DenseHead(random_state=0).fit(X[inner_fit], y[inner_fit], sub(Xf, inner_fit),
                                          validation_data=(X[inner_val], y[inner_val]))
        t_a = time.perf_counter() - t
        acc_a = float(np.mean(a.predict(Xv, Xfv) == yv))
        t = time.perf_counter()
        b = DenseHead(random_state=0, epochs=a.best_epochs_).fit(X, y, Xf)
        t_b = time.perf_counter() - t
        acc_b = float(np.mean(b.predict(Xv, Xfv) == yv))
    pa, pb = a.predict(Xv, Xfv) == yv, b.predict(Xv, Xfv) == yv
    from featcache.compare.stats import mcnemar

    m = mcnemar(pb, pa)
    name = "dense+flip" if flip else "dense"
    lines = [f"| {name} | rows | epochs | seconds | accuracy on the comparison's validation rows |",
             "| --- | --- | --- | --- | --- |",
             f"| A: early-stopped on an inner split (kept by --search fast) | {len(inner_fit):,} "
             f"| {a.best_epochs_} (+{a.patience} patience) | {t_a:.1f} | {100 * acc_a:.2f}% |",
             f"| B: A's epochs refit on all fit rows (the refit) | {len(y):,} | "
             f"{a.best_epochs_} | {t_b:.1f} | {100 * acc_b:.2f}% |",
             "", f"B - A: {100 * (acc_b - acc_a):+.2f} points on {len(yv):,} validation rows "
             f"(only B right {m['only_a']}, only A right {m['only_b']}, exact McNemar "
             f"p = {m['p']:.3g}); the refit costs {t_b:.0f} s."]
    print("\n".join(lines), flush=True)
    return lines


def tolerance(data, flip: bool) -> list[str]:
    """The linear heads' selection path (warm starts, the registry's grid) at several
    gradient tolerances: validation accuracy per C, and seconds."""
    from threadpoolctl import threadpool_limits

    from featcache.heads import HEADS

    X, y, Xf = data.part("fit", flip)
    Xv, yv, Xfv = data.part("val", flip)
    lines = ["| head | tol | val accuracy along the grid | iterations | seconds |",
             "| --- | --- | --- | --- | --- |"]
    for name in ("logreg", "linear_svm"):
        for tol in (1e-4, 3e-4, 1e-3):
            est = HEADS[name].make(random_state=0, tol=tol, warm_start=True)
            accs, its = [], []
            t = time.perf_counter()
            with threadpool_limits(1):
                for g in HEADS[name].grid:
                    est.set_params(**g).fit(X, y, Xf)
                    accs.append(float(np.mean(est.predict(Xv, Xfv) == yv)))
                    its.append(est.n_iter_)
            dt = time.perf_counter() - t
            grid = ", ".join(f"C={g['C']:g}: {100 * a:.2f}%"
                             for g, a in zip(HEADS[name].grid, accs))
            lines.append(f"| {name}{'+flip' if flip else ''} | {tol:g} | {grid} | "
                         f"{'/'.join(map(str, its))} | {dt:.1f} |")
            print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stage2_parts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("feature_file")
    p.add_argument("--parts", default="solvers,knn,refit")
    p.add_argument("--rows", type=int, default=None, help="solvers: at most this many rows")
    p.add_argument("--queries", type=int, default=1000, help="knn: test images (x2 mirrors)")
    p.add_argument("--flip", action="store_true", help="refit: the +flip row")
    args = p.parse_args(argv)
    data = _data(args.feature_file)
    for part in args.parts.split(","):
        print(f"\n### {part}\n", flush=True)
        if part == "solvers":
            solvers(data, args.rows)
        elif part == "knn":
            knn(data, args.queries)
        elif part == "refit":
            refit(data, args.flip)
        elif part == "tol":
            tolerance(data, args.flip)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
