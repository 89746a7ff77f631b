"""Stage two: select every head's hyper-parameters on validation, refit, test once, report.

Reads one complete feature file through :mod:`pipeline.store` (never stage one's modules).
Writes, under ``HeadsConfig.report_dir`` (``features/<stem>/`` beside the file), through
:mod:`pipeline.report`: ``heads/<row>.joblib|.keras``, ``predictions.npz``,
``results.csv``, ``report.md``, plots, and ``results.json`` last; for the label-efficiency
curve ``curve.json|csv|md|png``.

The protocol (the test labels influence no choice):

1. A stratified, seeded validation split (``val_fraction``) is carved from the training
   rows only.
2. Each head's grid is scored on it (fit on the rest, accuracy on validation); the best
   grid point wins (ties: the first, i.e. the simplest, in grid order).
3. The winner is refit on *all* training rows and scored on the test split exactly once.

With mirrored features in the file, each head can also run as ``<head>+flip``: trained on
plain and mirrored rows, predicting the average of both probabilities — its own row, with
its own selection.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
import numpy as np

from .config import HeadsConfig
from .errors import ConfigError, DataError
from .heads import HEADS, resolve_heads, save_head
from .stats import confusion, macro_f1, pairwise_mcnemar, wilson

log = logging.getLogger(__name__)

FLIP_MODES = ("auto", "off", "train", "tta", "both")
CURVE_SIZES = (10, 50, 100, 500, None)


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


class _Data:
    """Training rows reordered as [fit rows | validation rows] (views, no copies later),
    optional mirrored features, and the test split."""

    def __init__(self, X, y, Xf, X_test, y_test, Xf_test, fraction: float, seed: int):
        fit, val = stratified_split(y, fraction, seed)
        order = np.concatenate([fit, val])
        self.n_fit = len(fit)
        self.X, self.y = _f32_rows(X, order), y[order]
        self.Xf = None if Xf is None else _f32_rows(Xf, order)
        self.X_test, self.y_test = _f32_rows(X_test, None), y_test
        self.Xf_test = None if Xf_test is None else _f32_rows(Xf_test, None)

    def part(self, which: str, flip: bool):
        s = slice(None, self.n_fit) if which == "fit" else slice(self.n_fit, None)
        return self.X[s], self.y[s], (self.Xf[s] if flip else None)


def _f32_rows(X, order):
    X = X if order is None else X[order]
    return X if X.dtype == np.float32 else X.astype(np.float32)


def _flip_rows(mode: str, has_flip: bool) -> list[tuple[bool, bool]]:
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


def select(spec, data: _Data, *, train_flip: bool, tta: bool, seed: int, label: str):
    """Score the grid on validation. Returns (best params, [(params, val accuracy)…],
    warm start): the last is the best grid point's solution (linear heads), from which the
    refit on all training rows starts."""
    X_fit, y_fit, Xf_fit = data.part("fit", train_flip)
    X_val, y_val, Xf_val = data.part("val", tta)
    grid = list(spec.grid) or [{}]
    est = spec.make(random_state=seed)
    warm = None
    if hasattr(est, "score_grid"):
        scores = est.score_grid(grid, X_fit, y_fit, X_val, y_val, Xf_fit, Xf_val)
    else:
        if "warm_start" in est.get_params():
            est.set_params(warm_start=True)
        scores = []
        for params in grid:
            t = time.perf_counter()
            est.set_params(**params).fit(X_fit, y_fit, Xf_fit)
            acc = float(np.mean(est.predict(X_val, Xf_val) == y_val))
            log.info("  %s %s: validation %.4f (%.1f s)", label, _fmt(params), acc,
                     time.perf_counter() - t)
            if hasattr(est, "coef_std_") and acc > max((s for _, s in scores), default=-1):
                warm = (est.coef_std_.copy(), est.intercept_std_.copy())
            scores.append((dict(params), acc))
    best = max(range(len(scores)), key=lambda i: (scores[i][1], -i))
    numeric = [k for k, v in grid[0].items() if isinstance(v, (int, float))]
    if len(grid) > 2 and numeric and best in (0, len(grid) - 1):
        log.warning("  %s: the best value (%s) is at the edge of the grid; a wider grid "
                    "might do better", label, _fmt(scores[best][0]))
    return scores[best][0], scores, warm


def _fmt(params: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in params.items()) or "defaults"


def run_row(name: str, data: _Data, *, train_flip: bool, tta: bool, seed: int,
            n_classes: int, report_dir=None) -> tuple[dict, np.ndarray, object]:
    """Select, refit on all training rows, test once. Returns (row, test predictions, head)."""
    spec = HEADS[name]
    label = name + ("+flip" if train_flip and tta else "+fliptrain" if train_flip
                    else "+tta" if tta else "")
    t0 = time.perf_counter()
    params, scores, warm = select(spec, data, train_flip=train_flip, tta=tta, seed=seed,
                                  label=label)
    select_s = time.perf_counter() - t0
    t = time.perf_counter()
    head = spec.make(random_state=seed, **params)
    if warm is not None:   # start from the best validation solution (fit rows only)
        head.set_params(warm_start=True)
        head.coef_std_, head.intercept_std_ = warm
    head.fit(data.X, data.y, data.Xf if train_flip else None)
    if warm is not None:
        head.set_params(warm_start=False)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    pred = head.predict(data.X_test, data.Xf_test if tta else None)
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
        "per_class_accuracy": (np.diag(cm) / np.maximum(cm.sum(1), 1)).tolist(),
        "confusion": cm.tolist(),
        "select_s": select_s, "fit_s": fit_s,
        "predict_s_per_1000": predict_s / len(y) * 1000,
        "n_fit": data.n_fit, "n_val": len(data.y) - data.n_fit,
        "n_train": len(data.y) * (2 if train_flip else 1), "n_test": len(y),
    }
    if report_dir is not None:
        path = save_head(head, report_dir / "heads", label.replace("+", "_"))
        row["saved"] = str(path.relative_to(report_dir))
    log.info("%-16s test %.4f [%.4f, %.4f]  %s  select %.1f s, fit %.1f s", label,
             row["test_accuracy"], lo, hi, _fmt(params), select_s, fit_s)
    return row, pred, head


def _load(cfg: HeadsConfig, *, flip: bool = True):
    """The feature set, checked for train/test splits and labels in range."""
    from .store import load_features

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


def _split_data(fs, cfg: HeadsConfig) -> tuple[_Data, bool]:
    """The protocol's arrays; the feature set's own arrays are released (no second copy)."""
    tr, te = fs["train"], fs["test"]
    data = _Data(tr.features, tr.labels, tr.features_flip, te.features, te.labels,
                 te.features_flip, cfg.val_fraction, cfg.seed)
    has_flip = fs.has_flip
    fs.splits.clear()
    return data, has_flip


def compare_heads(cfg: HeadsConfig, *, write: bool = True) -> dict:
    """Run the protocol for every selected head (and its +flip row) and write the report.

    Returns the results dict that is written to ``results.json``.
    """
    from . import report

    t0 = time.perf_counter()
    names = resolve_heads(cfg.heads)
    fs = _load(cfg)
    data, has_flip = _split_data(fs, cfg)
    extra = _flip_rows(cfg.flip, has_flip)
    # Fitted heads go to a staging folder while the comparison runs and are moved into
    # place only at the end, just before results.json: an interrupted run leaves the previous
    # report and the heads it names untouched.
    staging = cfg.report_dir / ".staging" if write else None
    if staging is not None and staging.exists():
        shutil.rmtree(staging)
    out_dir = staging
    log.info("%s: %d train rows (%d fit + %d validation), %d test, %d features, heads: %s%s",
             cfg.feature_file, len(data.y), data.n_fit, len(data.y) - data.n_fit,
             len(data.y_test), data.X.shape[1], ", ".join(names),
             " (+flip rows)" if extra else "")
    rows, preds = [], {}
    for i, name in enumerate(names, 1):
        for train_flip, tta in [(False, False), *extra]:
            log.info("[%d/%d] %s%s", i, len(names), name, "+flip" if train_flip or tta else "")
            row, pred, _ = run_row(name, data, train_flip=train_flip, tta=tta, seed=cfg.seed,
                                   n_classes=len(fs.classes), report_dir=out_dir)
            rows.append(row)
            preds[row["name"]] = pred
    plain = [r for r in rows if not (r["train_flip"] or r["tta"])]
    results = {
        "feature_file": str(cfg.feature_file),
        "provenance": fs.provenance,
        "config": cfg.to_dict(),
        "classes": fs.classes,
        "protocol": {"val_fraction": cfg.val_fraction, "seed": cfg.seed,
                     "selection": "stratified validation split of the training rows; "
                                  "refit on all training rows; test scored once",
                     "interval": "Wilson score, 95%",
                     "significance": "exact McNemar, Holm-adjusted over all pairs, p<0.05"},
        "rows": rows,
        "best_head": max(plain, key=lambda r: r["test_accuracy"])["name"],
        "best_row": max(rows, key=lambda r: r["test_accuracy"])["name"],
        "best_val_head": max(plain, key=lambda r: r["val_accuracy"])["name"],
        "mcnemar": pairwise_mcnemar({k: v == data.y_test for k, v in preds.items()}),
    }
    results["wall_s"] = time.perf_counter() - t0
    if write:
        _publish_heads(staging, cfg.report_dir)
        report.write_report(results, preds, data.y_test, cfg.report_dir)
    return results


def _publish_heads(staging: Path, report_dir: Path) -> None:
    """Move the staged fitted heads into ``report_dir/heads`` (each an atomic rename)."""
    src = staging / "heads"
    dst = report_dir / "heads"
    dst.mkdir(parents=True, exist_ok=True)
    if src.exists():
        for f in sorted(src.iterdir()):
            os.replace(f, dst / f.name)
    shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- curve

def per_class_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Seeded rows with at most ``n`` of every class (sorted)."""
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(y == c))[:n] for c in np.unique(y)]
    return np.sort(np.concatenate(keep))


def label_curve(cfg: HeadsConfig, sizes=CURVE_SIZES, *, write: bool = True) -> dict:
    """Test accuracy against labelled examples per class, for every selected head.

    At each size the head sees only that seeded subset of the training rows: its
    validation split is carved from the subset (stratified, at least one row per class),
    so no extra labels are used for selection. ``None`` in ``sizes`` means all rows.
    Plain rows only (no mirrored features).
    """
    from . import report

    t0 = time.perf_counter()
    names = resolve_heads(cfg.heads)
    fs = _load(cfg, flip=False)
    tr, te = fs["train"], fs["test"]
    points = []
    for size in sizes:
        idx = np.arange(len(tr.labels)) if size is None else \
            per_class_subset(tr.labels, int(size), cfg.seed)
        per_class = int(np.bincount(tr.labels[idx]).min())
        frac = cfg.val_fraction if per_class * cfg.val_fraction >= 1 else 1.0 / per_class
        frac = min(frac, 0.5)
        data = _Data(tr.features[idx], tr.labels[idx], None, te.features, te.labels, None,
                     frac, cfg.seed)
        for name in names:
            log.info("curve: %s with %s labelled rows per class", name, size or "all")
            row, _, _ = run_row(name, data, train_flip=False, tta=False, seed=cfg.seed,
                                n_classes=len(fs.classes))
            points.append({"head": name, "per_class": size or "all",
                           "n_train": len(idx), "test_accuracy": row["test_accuracy"],
                           "ci95": row["ci95"], "params": row["params"],
                           "fit_s": row["fit_s"]})
    results = {"feature_file": str(cfg.feature_file), "provenance": fs.provenance,
               "config": cfg.to_dict(), "sizes": [s or "all" for s in sizes],
               "n_classes": len(fs.classes),
               "points": points, "wall_s": time.perf_counter() - t0}
    if write:
        report.write_curve(results, cfg.report_dir)
    return results
