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
3. The winner is refit on *all* training rows and scored on the test split exactly once
   (``--search fast``: heads registered with ``refit=False`` keep the model selected on
   the fit rows instead).

Rows are independent jobs run by :mod:`pipeline.workers` (``HeadsConfig.workers``
processes, one thread each, the feature arrays memory-mapped once and shared); results,
choices and predictions do not depend on the number of workers. ``--search fast`` (the
default) stops a grid that is a path (one numeric parameter, in order) once validation
accuracy has fallen below its best; ``--search exhaustive`` scores every grid point and
refits every head (the protocol before issue 12, kept for ``make bench``).

With mirrored features in the file, each head can also run as ``<head>+flip``: trained on
plain and mirrored rows, predicting the average of both probabilities — its own row, with
its own selection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from .config import SEARCH_MODES, HeadsConfig
from .errors import ConfigError, DataError
from .heads import HEADS, resolve_heads, save_head
from .stats import confusion, macro_f1, pairwise_mcnemar, per_class_accuracy, wilson

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
    optional mirrored features, and the test split. With ``shared``
    (:class:`pipeline.workers.SharedArrays`) the float32 arrays are read-only memmaps
    that worker processes map instead of copying."""

    def __init__(self, X, y, Xf, X_test, y_test, Xf_test, fraction: float, seed: int,
                 shared=None):
        fit, val = stratified_split(y, fraction, seed)
        order = np.concatenate([fit, val])

        def rows(name, A, o):
            return _f32_rows(A, o) if shared is None else shared.put(name, A, o)

        self.n_fit = len(fit)
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


def is_path(grid) -> bool:
    """A grid over one numeric parameter in strictly monotone order (a regularisation
    path): validation accuracy along it rises to a peak and falls, so it can stop early."""
    if len(grid) < 3:
        return False
    varying = [k for k in grid[0] if len({repr(g.get(k)) for g in grid}) > 1]
    if len(varying) != 1 or any(set(g) != set(grid[0]) for g in grid):
        return False
    v = [g[varying[0]] for g in grid]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return False
    d = np.diff(np.asarray(v, dtype=np.float64))
    return bool(np.all(d > 0) or np.all(d < 0))


def select(spec, data: _Data, *, train_flip: bool, tta: bool, seed: int, label: str,
           search: str = "exhaustive"):
    """Score the grid on validation. Returns (best params, [(params, val accuracy)…],
    warm start, estimator, skipped params): the warm start is the best grid point's
    solution (linear heads), from which the refit on all training rows starts; the
    estimator is left fitted on the fit rows (for score_grid heads: as the best point).
    ``search="fast"`` stops a path (:func:`is_path`) at the first point whose validation
    accuracy is below the best so far; the points after it are returned as skipped."""
    X_fit, y_fit, Xf_fit = data.part("fit", train_flip)
    X_val, y_val, Xf_val = data.part("val", tta)
    grid = list(spec.grid) or [{}]
    est = spec.make(random_state=seed, **(spec.fast_select if search == "fast" else {}))
    warm, skipped = None, []
    if hasattr(est, "score_grid"):
        scores = est.score_grid(grid, X_fit, y_fit, X_val, y_val, Xf_fit, Xf_val)
    else:
        if "warm_start" in est.get_params():
            est.set_params(warm_start=True)
        early = search == "fast" and is_path(grid)
        scores = []
        for j, params in enumerate(grid):
            t = time.perf_counter()
            est.set_params(**params).fit(X_fit, y_fit, Xf_fit)
            acc = float(np.mean(est.predict(X_val, Xf_val) == y_val))
            log.debug("  %s %s: validation %.4f (%.1f s)", label, _fmt(params), acc,
                      time.perf_counter() - t)
            best_so_far = max((s for _, s in scores), default=-1.0)
            if hasattr(est, "coef_std_") and acc > best_so_far:
                warm = (est.coef_std_.copy(), est.intercept_std_.copy())
            scores.append((dict(params), acc))
            if early and acc < best_so_far:
                skipped = [dict(g) for g in grid[j + 1:]]
                break
    best = max(range(len(scores)), key=lambda i: (scores[i][1], -i))
    numeric = [k for k, v in grid[0].items() if isinstance(v, (int, float))]
    if len(grid) > 2 and numeric and best in (0, len(grid) - 1):
        log.warning("  %s: the best value (%s) is at the edge of the grid; a wider grid "
                    "might do better", label, _fmt(scores[best][0]))
    return scores[best][0], scores, warm, est, skipped


def _fmt(params: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in params.items()) or "defaults"


def row_label(name: str, train_flip: bool, tta: bool) -> str:
    return name + ("+flip" if train_flip and tta else "+fliptrain" if train_flip
                   else "+tta" if tta else "")


def run_row(name: str, data: _Data, *, train_flip: bool, tta: bool, seed: int,
            n_classes: int, report_dir=None,
            search: str = "exhaustive") -> tuple[dict, np.ndarray, object]:
    """Select, refit on all training rows (unless ``search="fast"`` and the head is
    registered with ``refit=False``), test once. Returns (row, test predictions, head)."""
    spec = HEADS[name]
    label = row_label(name, train_flip, tta)
    t0 = time.perf_counter()
    params, scores, warm, est, skipped = select(spec, data, train_flip=train_flip, tta=tta,
                                                seed=seed, label=label, search=search)
    select_s = time.perf_counter() - t0
    t = time.perf_counter()
    refit = spec.refit or search != "fast"
    if refit:
        head = spec.make(random_state=seed, **params)
        if warm is not None:   # start from the best validation solution (fit rows only)
            head.set_params(warm_start=True)
            head.coef_std_, head.intercept_std_ = warm
        head.fit(data.X, data.y, data.Xf if train_flip else None)
        if warm is not None:
            head.set_params(warm_start=False)
    else:                      # the model selected on the fit rows is the final one
        head = est
        head.set_params(**params)
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
        "per_class_accuracy": per_class_accuracy(y, pred, n_classes).tolist(),
        "confusion": cm.tolist(),
        "skipped": skipped, "refit": refit,
        "select_s": select_s, "fit_s": fit_s, "predict_s": predict_s,
        "predict_s_per_1000": predict_s / len(y) * 1000,
        "n_fit": data.n_fit, "n_val": len(data.y) - data.n_fit,
        "n_train": (len(data.y) if refit else data.n_fit) * (2 if train_flip else 1),
        "n_test": len(y),
    }
    if report_dir is not None:
        path = save_head(head, report_dir / "heads", label.replace("+", "_"))
        row["saved"] = str(path.relative_to(report_dir))
    log.debug("%-16s test %.4f [%.4f, %.4f]  %s  select %.1f s, fit %.1f s", label,
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


def _split_data(fs, cfg: HeadsConfig, shared=None) -> tuple[_Data, bool]:
    """The protocol's arrays; the feature set's own arrays are released (no second copy)."""
    tr, te = fs["train"], fs["test"]
    data = _Data(tr.features, tr.labels, tr.features_flip, te.features, te.labels,
                 te.features_flip, cfg.val_fraction, cfg.seed, shared=shared)
    has_flip = fs.has_flip
    fs.splits.clear()
    return data, has_flip


@dataclass
class HeadsProgress:
    """Reported while the comparison runs (the CLI draws a bar from it)."""

    split: str          # "heads"
    done: int           # rows finished
    total: int          # rows to do
    elapsed_s: float
    eta_s: float        # inf until the first row is done
    message: str = ""   # set once per finished row: its one-line summary


@dataclass(frozen=True)
class _Job:
    """Rows run one after another in one worker (a TensorFlow head's rows share one)."""

    rows: tuple[tuple[str, bool, bool], ...]     # (head, train_flip, tta)
    seed: int
    n_classes: int
    out_dir: str | None
    search: str
    in_worker: bool
    log_level: int


def _jobs(rows, **ctx) -> list[_Job]:
    """One job per row, except that every row of a TensorFlow head goes into one job: one
    worker imports TensorFlow (~0.5 GB) whatever the worker count."""
    tf_rows = tuple(r for r in rows if HEADS[r[0]].tensorflow)
    jobs = [_Job((r,), **ctx) for r in rows if not HEADS[r[0]].tensorflow]
    if tf_rows:
        jobs.insert(0, _Job(tf_rows, **ctx))
    return jobs


def _cost(row, data: _Data) -> float:
    name, train_flip, tta = row
    return HEADS[name].cost * len(data.y) * (2 if train_flip else 1) * (1.25 if tta else 1)


def _run_job(job: _Job, data: _Data) -> list[tuple[dict, np.ndarray]]:
    """Worker side: run the job's rows; returns [(row, test predictions)…]."""
    if job.in_worker:
        _worker_logging(job.log_level)
    out = []
    for name, train_flip, tta in job.rows:
        if job.in_worker and HEADS[name].tensorflow:
            from .workers import tensorflow_single_threaded

            tensorflow_single_threaded()
        row, pred, _ = run_row(name, data, train_flip=train_flip, tta=tta, seed=job.seed,
                               n_classes=job.n_classes, search=job.search,
                               report_dir=Path(job.out_dir) if job.out_dir else None)
        row["worker_pid"] = os.getpid()
        out.append((row, pred))
    return out


def _worker_logging(level: int) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.WARNING, datefmt="%H:%M:%S",
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(level)


def compare_heads(cfg: HeadsConfig, *, write: bool = True, progress=None) -> dict:
    """Run the protocol for every selected head (and its +flip row) and write the report.

    ``progress(HeadsProgress)`` is called about once a second and whenever a row is done.
    Returns the results dict that is written to ``results.json``.
    """
    from . import report
    from .workers import SharedArrays, Ticker, run_jobs

    t0 = time.perf_counter()
    names = resolve_heads(cfg.heads)
    if cfg.search not in SEARCH_MODES:
        raise ConfigError(f"--search must be one of {', '.join(SEARCH_MODES)}, not "
                          f"{cfg.search!r}")
    n_workers = cfg.n_workers
    fs = _load(cfg)
    extra = _flip_rows(cfg.flip, fs.has_flip)
    # Fitted heads go to a staging folder while the comparison runs and are moved into
    # place only at the end, just before results.json: an interrupted run leaves the previous
    # report and the heads it names untouched.
    staging = cfg.report_dir / ".staging" if write else None
    if staging is not None and staging.exists():
        shutil.rmtree(staging)
    n_classes = len(fs.classes)
    with contextlib.ExitStack() as stack:
        shared = stack.enter_context(SharedArrays()) if n_workers > 0 else None
        data, has_flip = _split_data(fs, cfg, shared)
        specs = [(name, tf, tta) for name in names for tf, tta in [(False, False), *extra]]
        log.info("%s: %d train rows (%d fit + %d validation), %d test, %d features, heads: "
                 "%s%s; %s search, %s", cfg.feature_file, len(data.y), data.n_fit,
                 len(data.y) - data.n_fit, len(data.y_test), data.X.shape[1],
                 ", ".join(names), " (+flip rows)" if extra else "", cfg.search,
                 f"{n_workers} worker{'s' if n_workers != 1 else ''}" if n_workers
                 else "in this process")
        jobs = _jobs(specs, seed=cfg.seed, n_classes=n_classes,
                     out_dir=str(staging) if staging is not None else None,
                     search=cfg.search, in_worker=n_workers > 0,
                     log_level=logging.getLogger("pipeline").getEffectiveLevel())
        costs = [sum(_cost(r, data) for r in job.rows) for job in jobs]
        state = {"rows": 0, "cost": 0.0, "eta": float("inf"), "at": time.monotonic()}
        start = time.monotonic()

        def report_progress(message=""):
            now = time.monotonic()
            eta = max(0.0, state["eta"] - (now - state["at"]))
            progress(HeadsProgress("heads", state["rows"], len(specs), now - start, eta,
                                   message))

        ticker = stack.enter_context(Ticker(report_progress if progress else None))

        def done(i, result):
            now = time.monotonic()
            state["rows"] += len(result)
            state["cost"] += costs[i]
            left = sum(costs) - state["cost"]
            state["eta"] = (now - start) * left / state["cost"] if state["cost"] else 0.0
            state["at"] = now
            for row, _ in result:
                line = (f"{row['name']:<16} test {row['test_accuracy']:.4f} "
                        f"[{row['ci95'][0]:.4f}, {row['ci95'][1]:.4f}]  val "
                        f"{row['val_accuracy']:.4f}  {_fmt(row['params'])}  select "
                        f"{row['select_s']:.1f} s, fit {row['fit_s']:.1f} s, predict "
                        f"{row['predict_s']:.1f} s")
                if progress is None:
                    log.info("%s", line)
                else:
                    with ticker.lock:
                        report_progress(line)
            ticker()

        ticker()
        outputs = run_jobs(_run_job, jobs, (data,), workers=n_workers, costs=costs,
                           on_done=done)
        y_test = np.asarray(data.y_test)
        del data
    by_name = {row["name"]: (row, pred) for out in outputs for row, pred in out}
    rows = [by_name[row_label(*r)][0] for r in specs]
    preds = {r["name"]: by_name[r["name"]][1] for r in rows}
    best = max(range(len(rows)), key=lambda i: (rows[i]["val_accuracy"], -i))
    results = {
        "feature_file": str(cfg.feature_file),
        "provenance": fs.provenance,
        "config": {**cfg.to_dict(), "workers": n_workers},
        "classes": fs.classes,
        "protocol": {"val_fraction": cfg.val_fraction, "seed": cfg.seed,
                     "search": cfg.search,
                     "selection": "stratified validation split of the training rows; "
                                  "refit on all training rows; test scored once",
                     "best": "the row with the highest validation accuracy (ties: the "
                             "first in row order)",
                     "interval": "Wilson score, 95%",
                     "significance": "exact McNemar, Holm-adjusted over all pairs, p<0.05"},
        "rows": rows,
        "best_row": rows[best]["name"],
        "mcnemar": pairwise_mcnemar({k: v == y_test for k, v in preds.items()}),
    }
    if any(not r["refit"] for r in rows):
        results["protocol"]["selection"] = (
            "stratified validation split of the training rows; refit on all training rows "
            "(rows with refit=false: the model selected on the fit rows); test scored once")
    results["wall_s"] = time.perf_counter() - t0
    if write:
        _publish_heads(staging, cfg.report_dir)
        report.write_report(results, preds, y_test, cfg.report_dir)
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
                                n_classes=len(fs.classes), search=cfg.search)
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
