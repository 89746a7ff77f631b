"""Stage two's protocol for one row: the validation split, grid selection, the refit and
the single test score.

Reads the feature file it is given (:func:`load_data`, through :mod:`featcache.cache.writer`) and
writes only a fitted head, when ``run_row`` is given a ``report_dir``
(``report_dir/heads/<row>.joblib|.keras``, :meth:`featcache.heads.Head.save`), carrying the
identity of the feature file it was fitted on. Every head
goes through :func:`featcache.heads.as_head`, so a plain scikit-learn classifier runs
like featcache's own heads; this module calls only the heads' public methods
(``score_grid``, ``refit_from``, ``set_grid_point``, ``predict``, ``save``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.compare.selection import (
    EXTEND_STEPS,
    Plan,
    best_point,
    extension,
    holdout_split,
    kfold_splits,
    merged_params,
    plan_for,
    pooled,
    search_note,
    splits_for,
)
from featcache.compare.stats import (
    confusion,
    json_floats,
    macro_f1,
    per_class_accuracy,
    wilson,
)
from featcache.config import FLIP_MODES, HeadsConfig
from featcache.errors import ConfigError, DataError
from featcache.heads import HEADS, as_head, record_fitted_on
from featcache.heads.registry import fmt_params

log = logging.getLogger(__name__)



def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows) of the single split
    (:func:`featcache.compare.selection.holdout_split`)."""
    return holdout_split(y, fraction, seed)


class SplitData:
    """The training rows, their validation plan, optional mirrored features, and the test
    split. With ``shared`` (:class:`featcache.compare.workers.SharedArrays`) the float32
    arrays are read-only memmaps that worker processes map instead of copying.

    ``splits`` are the plan's (fit rows, validation rows) pairs, indices into ``X``: under
    the single split (``plan`` None or ``"holdout"``) the training rows are reordered as
    [fit rows | validation rows] and the pair is two slices (views, no copies); under
    k-fold ``X`` keeps the file's order and each pair is two index arrays (a fold's rows
    are copied while it is scored: k-fold runs only on small data). ``order`` and
    ``feature_file`` (set by :func:`split_data`) let a ``file_rows`` head find the same
    rows in the file."""

    feature_file: str | None = None

    def __init__(self, X, y, Xf, X_test, y_test, Xf_test, fraction: float, seed: int,
                 shared=None, plan: Plan | None = None):
        self.plan = plan or Plan("holdout", float(fraction))
        if self.plan.kind == "holdout":
            fit, val = holdout_split(y, fraction, seed)
            order = np.concatenate([fit, val])
            self.splits = [(slice(None, len(fit)), slice(len(fit), None))]
            self.n_fit = len(fit)
        else:
            order = np.arange(len(y))
            self.splits = kfold_splits(y, self.plan.folds, self.plan.repeats, seed)
            self.n_fit = int(round(np.mean([len(f) for f, _ in self.splits])))

        def rows(name, A, o):
            return _f32_rows(A, o) if shared is None else shared.put(name, A, o)

        self.order = order
        self.X, self.y = rows("X", X, order), y[order]
        self.Xf = None if Xf is None else rows("X_flip", Xf, order)
        self.X_test, self.y_test = rows("X_test", X_test, None), y_test
        self.Xf_test = None if Xf_test is None else rows("X_test_flip", Xf_test, None)

    def rows(self, idx, flip: bool):
        """(features, labels, mirrored features or None) of training rows ``idx``."""
        return take_rows(self, idx, flip)

    def part(self, which: str, flip: bool):
        """The single split's ``"fit"`` or ``"val"`` part (views)."""
        if self.plan.kind != "holdout":
            raise ValueError("part() is the single split's; under k-fold use splits")
        return self.rows(self.splits[0][0 if which == "fit" else 1], flip)


def take_rows(data, idx, flip: bool):
    """``data``'s training rows ``idx`` (a slice: views; an index array: copies)."""
    return data.X[idx], data.y[idx], (data.Xf[idx] if flip else None)


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


@dataclass
class Selection:
    """What :func:`select` found: the chosen ``params``, its pooled validation accuracy and
    spread, every scored point (``scores``: [(params, accuracy, spread)…], in path order),
    the points not scored (``skipped``), the estimator fitted on the fit rows at the
    chosen point (the single split; None under k-fold), and what the search covered
    (``note``)."""

    params: dict
    val_accuracy: float
    val_std: float
    scores: list
    skipped: list
    est: object
    n_val: int
    note: str = ""


def budget_params(spec, budget_s: float | None) -> dict:
    """``{"budget_s": budget_s}`` for a head that takes a time budget (``HeadSpec.budget``)
    when one is given (``--budget``), else nothing."""
    return {"budget_s": float(budget_s)} if spec.budget and budget_s is not None else {}


def select(spec, data: SplitData, *, train_flip: bool, tta: bool, seed: int, label: str,
           search: str = "exhaustive", budget_s: float | None = None) -> Selection:
    """Score the head's grid on the plan's splits (:meth:`featcache.heads.Head.score_grid`
    per split, pooled), extending a path past its edge while that improves
    (:func:`featcache.compare.selection.extension`).

    Under the single split and ``search="fast"`` a path (:func:`is_path`) stops at the
    first point whose validation accuracy is below the best so far (the points after it
    are ``skipped``), with the head's ``fast_select`` parameters; the estimator it leaves
    is fitted at the chosen point and holds its solution, from which a refit on all
    training rows warm-starts. Under k-fold every point is scored on every fold with the
    head's own parameters."""
    data = spec.data_for(data)   # a file_rows head (finetune) takes file rows
    splits = splits_for(data.splits, data.plan.folds, spec.cost)
    kfold = len(splits) > 1
    fast = search == "fast" and not kfold
    over = {**(spec.fast_select if fast else {}), **budget_params(spec, budget_s)}
    grid = [dict(g) for g in (spec.grid or ({},))]

    def score(points):
        """[(per-fold [(params, correct, n)…] per point)], the last split's estimator."""
        per_point: list[list] = [[] for _ in points]
        est = None
        for fit, val in splits:
            X_fit, y_fit, Xf_fit = data.rows(fit, train_flip)
            X_val, y_val, Xf_val = data.rows(val, tta)
            est = as_head(spec.make(random_state=seed, **over))
            got = est.score_grid(points, X_fit, y_fit, X_val, y_val, Xf_fit, Xf_val,
                                 stop_early=fast, label=label)
            n = len(y_val)
            for i, (p, acc) in enumerate(got):
                per_point[i].append((p, int(round(acc * n)), n))
        return [r for r in per_point if len(r) == len(splits)], est

    # path: entries [grid params, per-fold results, estimator], simplest first
    scored, est = score(grid)
    path = [[g, r, est] for g, r in zip(grid, scored)]
    skipped = grid[len(scored):]
    n_min_fit = min(len(np.arange(len(data.y))[f]) for f, _ in splits)
    added, stopped = [], ""
    while True:
        acc = [a for a, _ in pooled([[(c, n) for _, c, n in e[1]] for e in path])]
        b = best_point(acc)
        whole = [e[0] for e in path] if not skipped else [e[0] for e in path] + skipped
        nxt = extension(whole, b if b == 0 or not skipped else -1, max_int=n_min_fit)
        if nxt is None:
            stopped = stopped or "a bound of the parameter"
            break
        if len(added) >= EXTEND_STEPS:
            stopped = f"{EXTEND_STEPS} points added, the score still rising"
            break
        r, e = score([nxt])
        entry = [nxt, r[0], e]
        path.insert(0, entry) if b == 0 else path.append(entry)
        added.append(nxt)
        new_acc = pooled([[(c, n) for _, c, n in entry[1]]])[0][0]
        if new_acc <= acc[b]:
            stopped = "the score stopped improving"
            break
        stopped = ""
    stats = pooled([[(c, n) for _, c, n in e[1]] for e in path])
    b = best_point([a for a, _ in stats])
    params = merged_params([p for p, _, _ in path[b][1]])
    scores = [(merged_params([p for p, _, _ in e[1]]), a, s) for e, (a, s) in zip(path, stats)]
    return Selection(params, stats[b][0], stats[b][1], scores, skipped,
                     None if kfold else path[b][2], sum(len(data.y[v]) for _, v in splits),
                     search_note(grid, added, params, stopped) if added else "")


def row_label(name: str, train_flip: bool, tta: bool) -> str:
    return name + ("+flip" if train_flip and tta else "+fliptrain" if train_flip
                   else "+tta" if tta else "")


def run_row(name: str, data: SplitData, *, train_flip: bool, tta: bool, seed: int,
            n_classes: int, report_dir=None, search: str = "exhaustive",
            fitted_on: dict | None = None, budget_s: float | None = None
            ) -> tuple[dict, np.ndarray, np.ndarray | None, object]:
    """Select (:func:`select`), refit on all training rows (``search="exhaustive"``, and
    always under k-fold; under ``"fast"`` on the single split the model selected on the fit
    rows is the final one), test once. Returns (row, test predictions, test probabilities
    or None, head). ``fitted_on``: the feature file's identity
    (:func:`featcache.cache.reader.file_identity`), recorded on the head it saves.
    ``budget_s``: the time budget of each fit of a head that takes one; what it bought
    (the head's ``budget_``) is the row's ``budget``."""
    if name not in HEADS:      # a worker process that was not told how to import it
        raise ConfigError(f"head {name!r} is not registered in this process; register it "
                          f"in an importable module and pass --heads module:{name}, or run "
                          f"with --workers 0")
    spec = HEADS[name]
    data = spec.data_for(data)
    label = row_label(name, train_flip, tta)
    t0 = time.perf_counter()
    sel = select(spec, data, train_flip=train_flip, tta=tta, seed=seed, label=label,
                 search=search, budget_s=budget_s)
    budget = budget_params(spec, budget_s)
    params = sel.params
    select_s = time.perf_counter() - t0
    t = time.perf_counter()
    refit = search != "fast" or sel.est is None
    Xf_train = data.Xf if train_flip else None
    if sel.est is None:        # k-fold: no single fitted model to start from
        head = as_head(spec.make(random_state=seed, **params, **budget)).fit(
            data.X, data.y, Xf_train)
    elif refit:                # from the best validation solution (fit rows) where it can
        head = as_head(spec.make(random_state=seed, **params, **budget)).refit_from(
            sel.est, data.X, data.y, Xf_train)
    else:                      # the model selected on the fit rows is the final one
        head = sel.est.set_grid_point(params)
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
        "params": params, "val_accuracy": sel.val_accuracy, "val_std": sel.val_std,
        "selection": [{"params": p, "val_accuracy": a, "val_std": sd}
                      for p, a, sd in sel.scores],
        "search_note": sel.note, "plan": data.plan.kind,
        "test_accuracy": correct / len(y), "ci95": [lo, hi],
        "macro_f1": macro_f1(y, pred, n_classes),
        "per_class_accuracy": json_floats(per_class_accuracy(y, pred, n_classes)),
        "confusion": cm.tolist(),
        "skipped": sel.skipped, "refit": refit,
        "fast_select": {} if refit else dict(spec.fast_select),   # also in force under fast
        "select_s": select_s, "fit_s": fit_s, "predict_s": predict_s,
        "predict_s_per_1000": predict_s / len(y) * 1000,
        "n_fit": data.n_fit, "n_val": sel.n_val,
        "n_train": (len(data.y) if refit else data.n_fit) * (2 if train_flip else 1),
        "n_test": len(y),
    }
    if getattr(head, "budget_", None) is not None:   # what a time budget bought
        row["budget"] = {k: float(v) if isinstance(v, (int, float, np.number))
                         and not isinstance(v, bool) else v for k, v in head.budget_.items()}
    if report_dir is not None:
        if fitted_on is not None:
            record_fitted_on(head, fitted_on)
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


def plan_of(y: np.ndarray, cfg: HeadsConfig) -> Plan:
    """The validation plan for training labels ``y`` under ``cfg``
    (:func:`featcache.compare.selection.plan_for`)."""
    return plan_for(y, val_fraction=cfg.val_fraction, cv_below=cfg.cv_below,
                    cv_folds=cfg.cv_folds, cv_repeats=cfg.cv_repeats)


def split_data(fs, cfg: HeadsConfig, shared=None) -> tuple[SplitData, bool]:
    """The protocol's arrays; the feature set's own arrays are released (no second copy)."""
    tr, te = fs["train"], fs["test"]
    data = SplitData(tr.features, tr.labels, tr.features_flip, te.features, te.labels,
                     te.features_flip, cfg.val_fraction, cfg.seed, shared=shared,
                     plan=plan_of(tr.labels, cfg))
    # absolute: worker processes outlive the caller's working directory (a notebook's chdir)
    data.feature_file = str(Path(cfg.feature_file).resolve())
    has_flip = fs.has_flip
    fs.splits.clear()
    return data, has_flip
