"""Stage two's protocol for one row: the validation split, grid selection, the refit and
the single test score.

Reads the feature file it is given (:func:`load_data`, through :mod:`featcache.cache.writer`) and
writes only a fitted head, when ``run_row`` is given a ``report_dir``
(``report_dir/heads/<row>.joblib|.keras``, :meth:`featcache.heads.Head.save`). Every head
goes through :func:`featcache.heads.as_head`, so a plain scikit-learn classifier runs
like featcache's own heads; this module calls only the heads' public methods
(``score_grid``, ``refit_from``, ``set_grid_point``, ``predict``, ``save``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from featcache.compare.stats import confusion, macro_f1, per_class_accuracy, wilson
from featcache.config import FLIP_MODES, HeadsConfig
from featcache.errors import ConfigError, DataError
from featcache.heads import HEADS, as_head
from featcache.heads.registry import fmt_params

log = logging.getLogger(__name__)



def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows): ``fraction`` of every class (at least one row of each
    class with two or more rows) goes to validation. Seeded; uses only ``y``."""
    if not 0 < fraction < 1:
        raise ConfigError(f"--val-fraction must be between 0 and 1, not {fraction}")
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        rng.shuffle(rows)
        n_val = min(len(rows) - 1, max(1, int(round(fraction * len(rows)))))
        val.append(rows[:n_val])
        fit.append(rows[n_val:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


class SplitData:
    """Training rows reordered as [fit rows | validation rows] (views, no copies later),
    optional mirrored features, and the test split. With ``shared``
    (:class:`featcache.compare.workers.SharedArrays`) the float32 arrays are read-only memmaps
    that worker processes map instead of copying. ``order`` and ``feature_file`` (set by
    :func:`split_data`) let a ``file_rows`` head find the same rows in the file."""

    feature_file: str | None = None

    def __init__(self, X, y, Xf, X_test, y_test, Xf_test, fraction: float, seed: int,
                 shared=None):
        fit, val = stratified_split(y, fraction, seed)
        order = np.concatenate([fit, val])

        def rows(name, A, o):
            return _f32_rows(A, o) if shared is None else shared.put(name, A, o)

        self.n_fit, self.order = len(fit), order
        self.X, self.y = rows("X", X, order), y[order]
        self.Xf = None if Xf is None else rows("X_flip", Xf, order)
        self.X_test, self.y_test = rows("X_test", X_test, None), y_test
        self.Xf_test = None if Xf_test is None else rows("X_test_flip", Xf_test, None)

    def part(self, which: str, flip: bool):
        s = slice(None, self.n_fit) if which == "fit" else slice(self.n_fit, None)
        return self.X[s], self.y[s], (self.Xf[s] if flip else None)


def _f32_rows(X, order):
    X = X if order is None else X[order]
    return X if X.dtype == np.float32 else X.astype(np.float32)


def flip_rows(mode: str, has_flip: bool) -> list[tuple[bool, bool]]:
    """(train with mirrored rows, average over mirrored test rows) per extra row."""
    if mode not in FLIP_MODES:
        raise ConfigError(f"--flip must be one of {', '.join(FLIP_MODES)}, not {mode!r}")
    if mode in ("off",) or (mode == "auto" and not has_flip):
        return []
    if not has_flip:
        raise ConfigError(f"--flip {mode} needs a feature file with mirrored features; "
                          f"re-extract with `make features FLIP=1` (--flip) or use --flip off")
    return [{"auto": (True, True), "both": (True, True), "train": (True, False),
             "tta": (False, True)}[mode]]


def select(spec, data: SplitData, *, train_flip: bool, tta: bool, seed: int, label: str,
           search: str = "exhaustive"):
    """Score the grid on validation (:meth:`featcache.heads.Head.score_grid`). Returns
    (best params, [(params, val accuracy)…], head, skipped params): the head is left
    fitted on the fit rows and holds the best grid point's solution, from which the refit
    on all training rows warm-starts (:meth:`~featcache.heads.Head.refit_from`).
    ``search="fast"`` stops a path (:func:`is_path`) at the first point whose validation
    accuracy is below the best so far; the points after it are returned as skipped."""
    data = spec.data_for(data)   # a file_rows head (finetune) takes file rows
    X_fit, y_fit, Xf_fit = data.part("fit", train_flip)
    X_val, y_val, Xf_val = data.part("val", tta)
    grid = list(spec.grid) or [{}]
    est = as_head(spec.make(random_state=seed,
                            **(spec.fast_select if search == "fast" else {})))
    scores = est.score_grid(grid, X_fit, y_fit, X_val, y_val, Xf_fit, Xf_val,
                            stop_early=search == "fast", label=label)
    skipped = [dict(g) for g in grid[len(scores):]]
    best = max(range(len(scores)), key=lambda i: (scores[i][1], -i))
    numeric = [k for k, v in grid[0].items() if isinstance(v, (int, float))]
    if len(grid) > 2 and numeric and best in (0, len(grid) - 1):
        log.warning("  %s: the best value (%s) is at the edge of the grid; a wider grid "
                    "might do better", label, fmt_params(scores[best][0]))
    return scores[best][0], scores, est, skipped


def row_label(name: str, train_flip: bool, tta: bool) -> str:
    return name + ("+flip" if train_flip and tta else "+fliptrain" if train_flip
                   else "+tta" if tta else "")


def run_row(name: str, data: SplitData, *, train_flip: bool, tta: bool, seed: int,
            n_classes: int, report_dir=None,
            search: str = "exhaustive") -> tuple[dict, np.ndarray, np.ndarray | None, object]:
    """Select, refit on all training rows (``search="exhaustive"``; under ``"fast"`` the
    model selected on the fit rows is the final one), test once. Returns (row, test
    predictions, test probabilities or None, head)."""
    if name not in HEADS:      # a worker process that was not told how to import it
        raise ConfigError(f"head {name!r} is not registered in this process; register it "
                          f"in an importable module and pass --heads module:{name}, or run "
                          f"with --workers 0")
    spec = HEADS[name]
    data = spec.data_for(data)
    label = row_label(name, train_flip, tta)
    t0 = time.perf_counter()
    params, scores, est, skipped = select(spec, data, train_flip=train_flip, tta=tta,
                                          seed=seed, label=label, search=search)
    select_s = time.perf_counter() - t0
    t = time.perf_counter()
    refit = search != "fast"
    if refit:                  # from the best validation solution (fit rows) where it can
        head = as_head(spec.make(random_state=seed, **params)).refit_from(
            est, data.X, data.y, data.Xf if train_flip else None)
    else:                      # the model selected on the fit rows is the final one
        head = est.set_grid_point(params)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    pred, proba = _test_predictions(head, data.X_test, data.Xf_test if tta else None)
    predict_s = time.perf_counter() - t
    y = data.y_test
    correct = int(np.sum(pred == y))
    lo, hi = wilson(correct, len(y))
    cm = confusion(y, pred, n_classes)
    row = {
        "name": label, "head": name, "train_flip": train_flip, "tta": tta,
        "params": params, "val_accuracy": next(s for p, s in scores if p == params),
        "selection": [{"params": p, "val_accuracy": s} for p, s in scores],
        "test_accuracy": correct / len(y), "ci95": [lo, hi],
        "macro_f1": macro_f1(y, pred, n_classes),
        "per_class_accuracy": per_class_accuracy(y, pred, n_classes).tolist(),
        "confusion": cm.tolist(),
        "skipped": skipped, "refit": refit,
        "fast_select": {} if refit else dict(spec.fast_select),   # also in force under fast
        "select_s": select_s, "fit_s": fit_s, "predict_s": predict_s,
        "predict_s_per_1000": predict_s / len(y) * 1000,
        "n_fit": data.n_fit, "n_val": len(data.y) - data.n_fit,
        "n_train": (len(data.y) if refit else data.n_fit) * (2 if train_flip else 1),
        "n_test": len(y),
    }
    if report_dir is not None:
        path = head.save(report_dir / "heads", label.replace("+", "_"))
        row["saved"] = str(path.relative_to(report_dir))
    log.debug("%-16s test %.4f [%.4f, %.4f]  %s  select %.1f s, fit %.1f s", label,
              row["test_accuracy"], lo, hi, fmt_params(params), select_s, fit_s)
    return row, pred, proba, head


def _test_predictions(head, X, X_flip):
    """(predictions, probabilities): one pass for featcache's own heads, whose ``predict``
    is the argmax of ``predict_proba``; other estimators predict (probabilities None)."""
    from featcache.heads import Head, SklearnHead

    if isinstance(head, Head) and not isinstance(head, SklearnHead):
        P = np.asarray(head.predict_proba(X, X_flip), dtype=np.float32)
        return head.classes_[np.argmax(P, axis=1)], P
    return np.asarray(head.predict(X, X_flip)), None


def load_data(cfg: HeadsConfig, *, flip: bool = True):
    """The feature set, checked for train/test splits and labels in range."""
    from featcache.cache.reader import load_features

    fs = load_features(cfg.feature_file, flip=flip)
    for split in ("train", "test"):
        if split not in fs.splits:
            raise DataError(f"{cfg.feature_file} has no {split!r} split (it has "
                            f"{', '.join(fs.splits)}); stage two needs train and test")
    tr, te = fs["train"], fs["test"]
    n_classes = len(fs.classes)
    for split, part in (("train", tr), ("test", te)):
        if not len(part):
            raise DataError(f"{cfg.feature_file} has no {split} rows; stage two needs both "
                            f"splits: re-extract from a data set with more images")
    if tr.labels.min() < 0 or max(tr.labels.max(), te.labels.max()) >= n_classes:
        raise DataError(f"{cfg.feature_file}: labels outside 0..{n_classes - 1}; re-extract")
    check_classes(tr.labels, fs.classes, cfg.feature_file)
    return fs


def check_classes(y: np.ndarray, classes: list[str], where) -> None:
    """Refuse training labels with fewer than two classes, or a class with fewer than two
    rows (it would get no validation row): every head would look perfect, or untested."""
    counts = np.bincount(y, minlength=len(classes))
    present = [i for i in np.flatnonzero(counts)]
    if len(present) < 2:
        names = ", ".join(str(classes[i]) for i in present) or "none"
        raise DataError(f"{where}: the training rows hold {len(present)} class ({names}); "
                        f"a classifier needs at least two: extract a data set with two or "
                        f"more classes")
    few = [f"{classes[i]} ({counts[i]})" for i in present if counts[i] < 2]
    if few:
        raise DataError(f"{where}: too few training rows for class {', '.join(few)}; every "
                        f"class needs at least 2 (one to fit, one to validate): re-extract "
                        f"with more images of it (or a larger --limit)")


def split_data(fs, cfg: HeadsConfig, shared=None) -> tuple[SplitData, bool]:
    """The protocol's arrays; the feature set's own arrays are released (no second copy)."""
    tr, te = fs["train"], fs["test"]
    data = SplitData(tr.features, tr.labels, tr.features_flip, te.features, te.labels,
                 te.features_flip, cfg.val_fraction, cfg.seed, shared=shared)
    # absolute: worker processes outlive the caller's working directory (a notebook's chdir)
    data.feature_file = str(Path(cfg.feature_file).resolve())
    has_flip = fs.has_flip
    fs.splits.clear()
    return data, has_flip
