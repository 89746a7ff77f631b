"""Section 4: stage two on cached features — fit and predict seconds of each default head,
and the wall time of the full default comparison (``featcache heads``).

Reads a feature file through :mod:`pipeline.store` (the real full-CIFAR-10 one when it
exists, else section 1's); writes the comparison's report into ``<work_dir>/s4_heads/``.
Like stage two itself, imports nothing of stage one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _logreg(seed: int):
    """The registry's logistic regression at its default C, or scikit-learn's when the
    registry is not there (an older checkout)."""
    try:
        from pipeline.heads import get_head
    except ImportError:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return (make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
                "sklearn LogisticRegression (C=1)")
    est = get_head("logreg").make(random_state=seed)
    return est, f"featcache logreg (C={est.get_params().get('C')})"


def fit_predict_logreg(Xtr, ytr, Xte, *, seed: int = 0) -> dict:
    """Fit logistic regression on ``Xtr`` and predict ``Xte``; seconds and predictions."""
    est, name = _logreg(seed)
    t0 = time.perf_counter()
    est.fit(Xtr, ytr)
    t1 = time.perf_counter()
    pred = est.predict(Xte)
    return {"fit_s": t1 - t0, "predict_s": time.perf_counter() - t1, "pred": pred, "name": name}


def _subset(X: np.ndarray, y: np.ndarray, rows: int | None, seed: int):
    """At most ``rows`` rows, stratified-ish by a seeded permutation (views, then one copy)."""
    if rows is None or rows >= len(y):
        return X, y
    idx = np.sort(np.random.default_rng(seed).permutation(len(y))[:rows])
    return X[idx], y[idx]


def time_heads(path: str | Path, *, rows: int | None, seed: int) -> dict:
    """Fit and predict each default head (its default parameters) on ``path``'s
    train/test features (no flip); ``rows`` caps the training rows."""
    from pipeline.heads import HEADS, default_heads
    from pipeline.store import load_features

    t0 = time.perf_counter()
    fs = load_features(path, flip=False)
    load_s = time.perf_counter() - t0
    Xtr, ytr = _subset(fs["train"].features, fs["train"].labels, rows, seed)
    Xte, yte = fs["test"].features, fs["test"].labels
    out = []
    for name in default_heads():
        est = HEADS[name].make(random_state=seed)
        t1 = time.perf_counter()
        est.fit(Xtr, ytr)
        t2 = time.perf_counter()
        pred = est.predict(Xte)
        t3 = time.perf_counter()
        row = {"head": name, "fit_s": t2 - t1, "predict_s": t3 - t2,
               "acc": float((np.asarray(pred) == yte).mean()),
               "params": {k: v for k, v in est.get_params().items()
                          if isinstance(v, (int, float, str, bool)) or v is None}}
        log.info("stage two %s: fit %.2f s, predict %.2f s, acc %.4f", name, row["fit_s"],
                 row["predict_s"], row["acc"])
        out.append(row)
    return {"file": str(path), "load_s": load_s, "n_train": int(len(ytr)),
            "n_test": int(len(yte)), "dim": int(Xtr.shape[1]), "heads": out}


def time_comparison(path: str | Path, out_dir: Path, *, seed: int) -> dict:
    """Wall time of the full default comparison, as ``featcache heads FILE`` runs it."""
    import shutil

    from pipeline.compare import compare_heads
    from pipeline.config import HeadsConfig

    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = HeadsConfig(feature_file=str(path), out_dir=str(out_dir), seed=seed)
    t0 = time.perf_counter()
    result = compare_heads(cfg)
    seconds = time.perf_counter() - t0
    summary = {"seconds": seconds, "report_dir": str(out_dir), "config": cfg.to_dict()}
    best = _best(result)
    if best:
        summary["best"] = best
    return summary


def _best(result) -> dict | None:
    """Best head and its test accuracy from whatever compare_heads returns (best effort)."""
    try:
        rows = result["heads"] if isinstance(result, dict) else getattr(result, "heads", None)
        if isinstance(rows, dict):
            rows = [{"head": k, **v} for k, v in rows.items()]
        acc = lambda r: r.get("test_accuracy", r.get("accuracy", -1))  # noqa: E731
        top = max(rows, key=acc)
        return {"head": top.get("head", top.get("name")), "acc": float(acc(top))}
    except Exception:  # noqa: BLE001 - the summary is optional
        return None


def run(feature_file: str | Path, *, rows: int | None, seed: int, work: Path) -> dict:
    """Section 4; parts whose modules are not there yet are reported as missing."""
    out: dict = {"file": str(feature_file)}
    try:
        out.update(time_heads(feature_file, rows=rows, seed=seed))
    except ImportError as exc:
        out["heads_missing"] = f"pipeline.heads not available ({exc})"
    try:
        out["comparison"] = time_comparison(feature_file, work / "s4_heads", seed=seed)
    except ImportError as exc:
        out["comparison_missing"] = f"pipeline.compare not available ({exc})"
    return out
