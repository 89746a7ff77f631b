"""Small statistics for comparing heads on one shared test set. Reads and writes nothing.

- :func:`wilson` — 95% Wilson score interval of an accuracy.
- :func:`mcnemar` — exact (binomial) McNemar test on two heads' per-row correctness.
- :func:`holm` — Holm–Bonferroni adjusted p-values for the pairwise tests.
- :func:`pairwise_mcnemar` — all pairs, Holm-adjusted, significant at ``alpha``.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np


def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for ``correct`` successes in ``n`` trials."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar(right_a: np.ndarray, right_b: np.ndarray) -> dict:
    """Exact two-sided McNemar test: ``b`` = only A right, ``c`` = only B right."""
    from scipy.stats import binom

    b = int(np.sum(right_a & ~right_b))
    c = int(np.sum(~right_a & right_b))
    p = 1.0 if b + c == 0 else min(1.0, 2.0 * float(binom.cdf(min(b, c), b + c, 0.5)))
    return {"only_a": b, "only_b": c, "p": p}


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
    f1 = []
    for c in range(n_classes):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        f1.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    m = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m
