"""Section 4: stage two on cached features — the wall time of the full default comparison
(``featcache heads FILE``) and, from it, each head's selection, fit and predict seconds.

Reads a feature file through :mod:`pipeline.store` (the real full-CIFAR-10 one when it
exists, else section 1's); writes the comparison's report into ``<work_dir>/s4_heads/``.
Like stage two itself, imports nothing of stage one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _logreg(seed: int):
    """The registry's logistic regression with its default parameters."""
    from pipeline.heads import get_head

    est = get_head("logreg").make(random_state=seed)
    return est, f"featcache logreg, C={est.get_params().get('C')}"


def fit_predict_logreg(Xtr, ytr, Xte, *, seed: int = 0) -> dict:
    """Fit logistic regression on ``Xtr`` and predict ``Xte``; seconds and predictions."""
    est, name = _logreg(seed)
    t0 = time.perf_counter()
    est.fit(Xtr, ytr)
    t1 = time.perf_counter()
    pred = est.predict(Xte)
    return {"fit_s": t1 - t0, "predict_s": time.perf_counter() - t1, "pred": pred, "name": name}


def time_comparison(path: str | Path, out_dir: Path, *, seed: int) -> dict:
    """Wall time of the full default comparison, as ``featcache heads FILE`` runs it
    (default heads, grids, validation split and flip rows), and each row's own seconds:
    selection on validation, refit on all training rows, test predictions."""
    import shutil

    from pipeline.compare import compare_heads
    from pipeline.config import HeadsConfig

    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = HeadsConfig(feature_file=str(path), out_dir=str(out_dir), seed=seed)
    t0 = time.perf_counter()
    result = compare_heads(cfg)
    seconds = time.perf_counter() - t0
    rows = []
    for row in result["rows"]:
        n_test = int(row.get("n_test", 0))
        rows.append({"name": row["name"], "head": row["head"], "params": row["params"],
                     "select_s": row["select_s"], "fit_s": row["fit_s"],
                     "predict_s": row["predict_s_per_1000"] * n_test / 1000,
                     "acc": row["test_accuracy"], "n_train": row.get("n_train"),
                     "n_test": n_test})
        log.info("stage two %-16s select %.1f s, fit %.2f s, predict %.3f s, test %.4f",
                 row["name"], row["select_s"], row["fit_s"], rows[-1]["predict_s"],
                 row["test_accuracy"])
    return {"file": str(path), "seconds": seconds, "report_dir": str(out_dir),
            "config": cfg.to_dict(), "rows": rows, "best": result.get("best_row"),
            "n_train": rows[0]["n_train"] if rows else None,
            "n_test": rows[0]["n_test"] if rows else None,
            "flip": result.get("provenance", {}).get("flip")}


def run(feature_file: str | Path, *, seed: int, work: Path) -> dict:
    """Section 4 (reported as missing where the stage-two modules are not there)."""
    try:
        return time_comparison(feature_file, work / "s4_heads", seed=seed)
    except ImportError as exc:
        return {"file": str(feature_file), "missing": f"pipeline.compare not available ({exc})"}
