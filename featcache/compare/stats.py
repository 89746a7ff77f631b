"""Small statistics for comparing heads on one shared test set, via the libraries that
already implement them (scipy, scikit-learn). Reads and writes nothing.

- :func:`wilson` — 95% Wilson score interval of an accuracy
  (``scipy.stats.binomtest(...).proportion_ci(method="wilson")``).
- :func:`mcnemar` — exact (binomial) McNemar test on two heads' per-row correctness
  (``scipy.stats.binomtest`` on the discordant pairs).
- :func:`holm` — Holm–Bonferroni adjusted p-values for the pairwise tests (scipy has only
  Benjamini–Hochberg; statsmodels' ``multipletests`` would be a new dependency).
- :func:`pairwise_mcnemar` — all pairs, Holm-adjusted, significant at ``alpha``.
- :func:`macro_f1`, :func:`confusion`, :func:`per_class_accuracy` — ``sklearn.metrics``
  over the classes ``0..n_classes-1``; a class without test rows has no accuracy
  (``None``) and is left out of the macro-F1 (a class never predicted counts as 0).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np


def wilson(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``correct`` successes in ``n`` trials ((0, 1) for n=0)."""
    from scipy.stats import binomtest

    if n == 0:
        return 0.0, 1.0
    ci = binomtest(int(correct), int(n)).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar(right_a: np.ndarray, right_b: np.ndarray) -> dict:
    """Exact two-sided McNemar test: ``b`` = only A right, ``c`` = only B right; the p-value
    is the two-sided binomial test of ``b`` successes in ``b + c`` trials at 1/2."""
    from scipy.stats import binomtest

    right_a, right_b = np.asarray(right_a, bool), np.asarray(right_b, bool)
    b = int(np.sum(right_a & ~right_b))
    c = int(np.sum(~right_a & right_b))
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return {"only_a": b, "only_b": c, "p": min(1.0, p)}


def holm(pvalues: list[float]) -> list[float]:
    """Holm–Bonferroni step-down adjusted p-values (same order as given)."""
    m = len(pvalues)
    order = np.argsort(pvalues, kind="stable")
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def pairwise_mcnemar(correct: dict[str, np.ndarray], alpha: float = 0.05) -> list[dict]:
    """McNemar for every pair of rows, Holm-adjusted over all pairs."""
    pairs = []
    for a, b in combinations(correct, 2):
        pairs.append({"a": a, "b": b, **mcnemar(correct[a], correct[b])})
    for pair, adj in zip(pairs, holm([p["p"] for p in pairs])):
        pair["p_holm"] = adj
        pair["significant"] = bool(adj < alpha)
        if pair["significant"]:
            pair["better"] = pair["a"] if pair["only_a"] > pair["only_b"] else pair["b"]
    return pairs


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of the per-class F1 over the classes with test rows (a class absent
    from the test split has no F1; averaging a 0 for it would understate every row)."""
    from sklearn.metrics import f1_score

    present = np.unique(np.asarray(y_true))
    present = present[(present >= 0) & (present < n_classes)]
    return float(f1_score(y_true, y_pred, labels=present, average="macro",
                          zero_division=0.0))


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts: rows = true class, columns = predicted."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, y_pred, labels=np.arange(n_classes)).astype(np.int64)


def per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes,) share of each true class predicted right (its recall); NaN for a class
    with no test rows."""
    from sklearn.metrics import recall_score

    out = np.asarray(recall_score(y_true, y_pred, labels=np.arange(n_classes), average=None,
                                  zero_division=0.0), dtype=np.float64)
    out[np.bincount(np.asarray(y_true), minlength=n_classes)[:n_classes] == 0] = np.nan
    return out


def json_floats(values) -> list:
    """``values`` as a JSON-safe list: NaN as None."""
    return [None if v != v else float(v) for v in values]
