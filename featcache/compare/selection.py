"""How stage two chooses, on training rows only: the validation plan for the data's size,
the grid search over it, grids that extend themselves past an edge, and the rule that
picks the best row.

Reads and writes nothing.

- **The plan** (:func:`plan_for`). With ``val_fraction`` of every class held out, a
  class's validation rows are ``round(val_fraction * rows)``. When the smallest class
  would get at least ``cv_below`` validation rows the plan is that single stratified
  split (the fast path for large data); below it, repeated stratified k-fold
  (``cv_folds`` folds, ``cv_repeats`` repeats: by default :data:`CHEAP_REPEATS` when the
  training rows are fewer than :data:`CHEAP_ROWS`, else one). Under k-fold every
  training row is validated once per repeat, so a 100-image folder scores each grid
  point on 300 predictions instead of 10. Repeats are for the cheap heads (registry cost
  at most :data:`CHEAP_COST`: the linear heads and kNN); a dearer head (dense,
  finetune) runs the first repeat's folds only (:func:`splits_for`).
- **Scores** are pooled: correct validation predictions over all folds divided by their
  count; the spread is the standard deviation of the per-fold accuracies.
- **Grids extend themselves** (:func:`extension`): when a grid over one numeric parameter
  (a path, :func:`featcache.heads.registry.is_path`) peaks at its first or last point,
  the next point past that edge is scored (the path's own ratio, e.g. C / 3), and so on
  until the score stops improving, :data:`EXTEND_STEPS` points were added, or a bound is
  hit (an integer parameter such as kNN's ``k`` stays within 1 .. the fit rows). What
  was searched is recorded in the row (``search_note``), not warned about.
- **Ties** (:func:`best_index`): within a grid the earlier point wins (grids are ordered
  simplest first: the strongest regularisation, the most neighbours); between rows, the
  highest pooled validation accuracy, then the smaller spread over folds, then the
  cheaper row (the registry's cost, doubled for training on mirrored rows), then row
  order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from featcache.errors import ConfigError
from featcache.heads.registry import fmt_params, is_path

#: Under k-fold, repeat the folds ``CHEAP_REPEATS`` times when there are fewer than
#: ``CHEAP_ROWS`` training rows (each repeat is another shuffle into folds).
CHEAP_ROWS = 1000
CHEAP_REPEATS = 3
#: Heads whose registry cost is above this run one repeat of the folds.
CHEAP_COST = 2.0
#: At most this many points added past a grid's edge.
EXTEND_STEPS = 4


@dataclass(frozen=True)
class Plan:
    """The validation plan: ``kind`` is ``"holdout"`` (one stratified split of
    ``val_fraction``) or ``"kfold"`` (``folds`` x ``repeats`` stratified folds)."""

    kind: str
    val_fraction: float
    folds: int = 1
    repeats: int = 1
    reason: str = ""

    @property
    def n_splits(self) -> int:
        return 1 if self.kind == "holdout" else self.folds * self.repeats

    def describe(self) -> str:
        if self.kind == "holdout":
            return (f"one stratified validation split of the training rows "
                    f"({self.val_fraction:g} of every class)")
        rep = f", repeated {self.repeats}x for the cheap heads" if self.repeats > 1 else ""
        return f"stratified {self.folds}-fold cross-validation of the training rows{rep}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "val_fraction": self.val_fraction, "folds": self.folds,
                "repeats": self.repeats, "reason": self.reason,
                "description": self.describe()}


def holdout_rows(n_class_rows: int, fraction: float) -> int:
    """Validation rows a class of ``n_class_rows`` gets from the single split (at least one
    of a class with two or more rows, never all of them)."""
    return min(n_class_rows - 1, max(1, int(round(fraction * n_class_rows))))


def plan_for(y: np.ndarray, *, val_fraction: float, cv_below: int, cv_folds: int,
             cv_repeats: int | None) -> Plan:
    """The plan for training labels ``y`` (see the module docstring)."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"--val-fraction must be between 0 and 1, not {val_fraction}")
    if int(cv_below) < 0:
        raise ConfigError(f"--cv-below must be 0 (never k-fold) or more, not {cv_below}")
    if int(cv_folds) < 2:
        raise ConfigError(f"--cv-folds must be 2 or more, not {cv_folds}")
    if cv_repeats is not None and int(cv_repeats) < 1:
        raise ConfigError(f"--cv-repeats must be 1 or more, not {cv_repeats}")
    counts = np.bincount(np.asarray(y))
    smallest = int(counts[counts > 0].min())
    n_val = holdout_rows(smallest, val_fraction)
    if n_val >= int(cv_below):
        return Plan("holdout", float(val_fraction),
                    reason=f"the validation split holds {n_val} rows of the smallest "
                           f"class (--cv-below {cv_below})")
    repeats = int(cv_repeats) if cv_repeats is not None else \
        (CHEAP_REPEATS if len(y) < CHEAP_ROWS else 1)
    return Plan("kfold", float(val_fraction), int(cv_folds), repeats,
                reason=f"a single split would hold {n_val} validation rows of the smallest "
                       f"class, fewer than --cv-below {cv_below}")


def holdout_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows), sorted: ``fraction`` of every class (at least one row of
    each class with two or more rows) goes to validation. Seeded; uses only ``y``."""
    if not 0 < fraction < 1:
        raise ConfigError(f"--val-fraction must be between 0 and 1, not {fraction}")
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        rng.shuffle(rows)
        n_val = holdout_rows(len(rows), fraction)
        val.append(rows[:n_val])
        fit.append(rows[n_val:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


def kfold_splits(y: np.ndarray, folds: int, repeats: int,
                 seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``folds * repeats`` (fit rows, validation rows) pairs, sorted: every repeat shuffles
    each class and deals its rows round-robin into the folds (starting at a random fold, so
    small classes do not all land in the first folds); every row is validated once per
    repeat, and a class with two or more rows keeps one in every fit part."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(int(repeats)):
        fold_of = np.empty(len(y), np.int64)
        for c in np.unique(y):
            rows = np.flatnonzero(y == c)
            rng.shuffle(rows)
            fold_of[rows] = (np.arange(len(rows)) + rng.integers(folds)) % folds
        for f in range(int(folds)):
            val = np.flatnonzero(fold_of == f)
            if len(val):
                out.append((np.flatnonzero(fold_of != f), val))
    return out


def splits_for(splits: list, folds: int, cost: float) -> list:
    """The splits a head of registry ``cost`` is scored on: all of them (every repeat) for
    a cheap head, the first repeat's ``folds`` for a dear one (the single split: itself)."""
    return splits if cost <= CHEAP_COST else splits[:folds]


# ------------------------------------------------------------------ pooled scores, ties

def pooled(points: list[list[tuple[int, int]]]) -> list[tuple[float, float]]:
    """Per grid point, (pooled accuracy, std of the per-fold accuracies) from that point's
    ``[(correct, count)…]``, one pair per fold."""
    out = []
    for pairs in points:
        acc = sum(c for c, _ in pairs) / max(1, sum(n for _, n in pairs))
        per = [c / n for c, n in pairs if n]
        out.append((acc, round(float(np.std(per)), 12) if len(per) > 1 else 0.0))
    return out


def best_point(scores: list[float]) -> int:
    """Index of the best grid point: the highest score, the earliest of equals."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def merged_params(per_fold: list[dict]) -> dict:
    """One grid point's parameters as each fold reported them, merged: values the folds
    agree on as they are; numbers a head chose per fold (dense's early-stopped ``epochs``)
    as their median, an integer where they were integers."""
    out = dict(per_fold[0])
    for k, v in per_fold[0].items():
        vals = [p.get(k) for p in per_fold]
        if all(x == v for x in vals):
            continue
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
            m = float(np.median(vals))
            out[k] = int(round(m)) if all(isinstance(x, int) for x in vals) else m
    return out


def best_row_rule() -> str:
    """The rule :func:`best_index` applies, as the report states it."""
    return ("the row with the highest validation accuracy; ties: the smaller spread over "
            "folds, then the cheaper row (the registry's cost; training on mirrored rows "
            "doubles it), then row order")


def best_index(rows: list[dict], costs: list[float]) -> int:
    """The best of ``rows`` (their ``val_accuracy`` and ``val_std``) by
    :func:`best_row_rule`; ``costs`` are the rows' relative costs."""
    return min(range(len(rows)), key=lambda i: (-rows[i]["val_accuracy"],
                                                rows[i].get("val_std") or 0.0, costs[i], i))


# ------------------------------------------------------------------ grid extension

def extension(grid: list[dict], best: int, *, max_int: int) -> dict | None:
    """The next point past the edge the best point ``best`` sits on, or None: ``grid`` is
    not a path of three or more points, the best is inside it, or the next value would
    leave the bounds (integers within 1 .. ``max_int``; floats positive and finite)."""
    if not is_path(grid) or best not in (0, len(grid) - 1):
        return None
    key = next(k for k in grid[0] if len({repr(g[k]) for g in grid}) > 1)
    edge, inner = (grid[0][key], grid[1][key]) if best == 0 else \
        (grid[-1][key], grid[-2][key])
    if isinstance(edge, int):
        if edge <= 0 or inner <= 0:
            return None
        nxt = int(round(edge * edge / inner))
        if nxt == edge:
            nxt = edge + (1 if edge > inner else -1)
        if not 1 <= nxt <= max_int or (nxt - edge) * (edge - inner) <= 0:
            return None
    else:
        if edge <= 0 or inner <= 0:
            return None
        nxt = edge * edge / inner
        if not (math.isfinite(nxt) and nxt > 0):
            return None
        nxt = float(f"{nxt:.3g}")
    return {**grid[0 if best == 0 else -1], key: nxt}


def search_note(grid: list[dict], added: list[dict], best: dict, stopped: str) -> str:
    """What a row's grid search covered, for the report: the grid, the points added past
    its edge and why the extension stopped."""
    if not added:
        return ""
    pts = ", ".join(fmt_params(p) for p in added)
    return (f"the best of the grid was at its edge; added {pts} ({stopped}); chosen "
            f"{fmt_params(best)}")
