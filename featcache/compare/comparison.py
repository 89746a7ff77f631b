"""Stage two: select every head's hyper-parameters on validation, refit, test once, report.

Reads one complete feature file through :mod:`featcache.cache.writer` (never stage one's modules).
Writes, under ``HeadsConfig.report_dir`` (``features/<stem>/`` beside the file), through
:mod:`featcache.compare.report`: ``heads/<row>.joblib|.keras``, ``predictions.npz``,
``results.csv``, ``report.md``, plots, and ``results.json`` last — all into a staging folder
beside it (``features/.<stem>.tmp/``) that replaces the report folder in one step at the end
(:func:`_compare`); for the label-efficiency curve ``curve.json|csv|md|png``, each replaced
in the report folder itself.

The protocol (the test labels influence no choice):

1. The validation plan comes from the training rows only
   (:mod:`featcache.compare.selection`): a stratified, seeded split (``val_fraction``) or,
   when that split would be small (``cv_below``), repeated stratified k-fold.
2. Each head's grid is scored on it (fit on the rest, accuracy on validation, pooled over
   folds); a path that peaks at its edge extends itself; the best grid point wins (ties:
   the first, i.e. the simplest, in grid order). The best row is chosen by
   :func:`featcache.compare.selection.best_index` (ties: the steadier, then the cheaper).
3. The winner is scored on the test split exactly once: under ``--search fast`` (the
   default) on the single split the model selected on the fit rows, otherwise the winner
   refit on *all* training rows.

One row's protocol lives in :mod:`featcache.compare.protocol`, the rows' grouping into jobs and
the worker side in :mod:`featcache.compare.jobs`; this module orchestrates them and writes the
report. Rows are independent jobs run by :mod:`featcache.compare.workers` (``HeadsConfig.workers``
processes, one thread each, the feature arrays memory-mapped once and shared); results,
choices and predictions do not depend on the number of workers. ``--search fast`` (the
default) stops a grid that is a path (one numeric parameter, in order) once validation
accuracy has fallen below its best, uses each head's ``fast_select`` parameters (a looser
solver tolerance; dense: 4 cosine epochs) and does not refit; ``--search exhaustive``
scores every grid point and refits every head (the exhaustive protocol, ``make bench``
section 4's baseline).

With mirrored features in the file, each head can also run as ``<head>+flip``: trained on
plain and mirrored rows, predicting the average of both probabilities — its own row, with
its own selection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache._util.atomic import disk_full_is_one_line, recover, replacing, temp_name
from featcache.cache.lock import FileLock
from featcache.cache.reader import file_identity
from featcache.compare.jobs import job_cost, make_jobs, run_job

# the protocol's parts, importable from here as before the split
from featcache.compare.protocol import (
    SplitData,
    flip_rows,
    load_data,
    plan_of,
    row_label,
    run_row,
    split_data,
)
from featcache.compare.result import Comparison
from featcache.compare.selection import best_index, best_row_rule
from featcache.compare.stats import pairwise_mcnemar
from featcache.config import SEARCH_MODES, HeadsConfig, default_workers, with_settings
from featcache.errors import ConfigError
from featcache.heads import HEADS, resolve_heads
from featcache.heads.registry import fmt_params
from featcache.heads.user import absolute_entry

log = logging.getLogger(__name__)

CURVE_SIZES = (10, 50, 100, 500, None)


@dataclass
class HeadsProgress:
    """Reported while the comparison runs (the CLI draws a bar from it)."""

    split: str          # "heads"
    done: int           # rows finished
    total: int          # rows to do
    elapsed_s: float
    eta_s: float        # inf until the first row is done
    message: str = ""   # set once per finished row: its one-line summary


def heads_config(features, **settings) -> HeadsConfig:
    """A :class:`HeadsConfig` from a feature file's path, a loaded feature set
    (:func:`featcache.load_features`) or a config, with ``settings`` (its field names:
    ``heads``, ``val_fraction``, ``workers``, ``search`` …) on top."""
    if isinstance(features, HeadsConfig):
        return with_settings(features, **settings)
    path = getattr(features, "path", features)   # a FeatureSet knows its file
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"compare_heads takes a feature file's path, a loaded feature set "
                          f"or a HeadsConfig, not {type(features).__name__}")
    return with_settings(HeadsConfig(str(path)), **settings)


def compare_heads(features, /, *, write: bool = True, progress=None, wait: bool = False,
                  **settings) -> Comparison:
    """Run the protocol for every selected head (and its +flip row) and write the report.

    ``features``: a feature file's path, a loaded feature set or a :class:`HeadsConfig`;
    ``settings`` override its fields (``heads="logreg,knn"``, ``workers=0`` …). The report
    folder is locked while the comparison runs (``<report dir>.lock``): a second comparison
    on the same report, from any process, refuses with :class:`~featcache.errors.LockedError`
    or, with ``wait=True``, waits for the first. ``progress(HeadsProgress)`` is called about
    once a second and whenever a row is done. Returns a :class:`Comparison` (the
    ``results.json`` dict, with ``table``, ``best``, ``head()``).
    """
    cfg = heads_config(features, **settings)
    with _report_lock(cfg, write=write, wait=wait), _disk_full(cfg):
        return Comparison(_compare(cfg, write=write, progress=progress),
                          cfg.report_dir if write else None)


def _report_lock(cfg: HeadsConfig, *, write: bool, wait: bool):
    """The report folder's lock while a comparison or curve writes it; nothing otherwise."""
    return FileLock(cfg.report_dir, wait=wait) if write else contextlib.nullcontext()


def _disk_full(cfg: HeadsConfig, last: str = "results.json"):
    """A full disk anywhere in a comparison (or curve) is one line: each report file and
    saved head is written atomically (:mod:`featcache._util.atomic`, which names the file);
    whatever else meets a full disk is named as the report folder. ``last``: the file
    written last, so still the previous run's."""
    return disk_full_is_one_line(cfg.report_dir, f"its {last} is unchanged: free some space "
                                                 f"and run the same command again")


def _compare(cfg: HeadsConfig, *, write: bool, progress) -> dict:
    """Run the comparison; with ``write``, build the whole new report — fitted heads,
    plots, ``results.json`` — in a staging folder beside the report folder
    (``features/.<stem>.tmp/``), link into it what the old folder holds that the comparison
    does not write (:func:`featcache.compare.report.carry_over`: curve files, exported
    models), and swap it in for the old folder in one step
    (:func:`featcache._util.atomic.replacing`): a reader sees the whole old report or the
    whole new one, never new heads beside old results. A staging folder (or a previous
    version) that a killed run left is cleaned up first."""
    from featcache.compare import report

    if not write:
        return _run(cfg, None, progress)[0]
    with replacing(cfg.report_dir) as staging:
        staging.mkdir(parents=True)
        results, preds, y_test, probas = _run(cfg, staging, progress)
        report.write_report(results, preds, y_test, staging, probabilities=probas)
        report.carry_over(cfg.report_dir, staging)
    return results


def _run(cfg: HeadsConfig, staging: Path | None, progress):
    """The comparison itself, fitted heads saved under ``staging/heads`` (None: not saved):
    (results, test predictions by row, test labels, test probabilities by row)."""
    from featcache.compare.workers import SharedArrays, Ticker, run_jobs

    t0 = time.perf_counter()
    names = resolve_heads(cfg.heads)
    entries = cfg.heads.split(",") if isinstance(cfg.heads, str) else cfg.heads or ()
    # workers import them again, from their own working directory
    user_heads = tuple(absolute_entry(h.strip()) for h in entries if ":" in h)
    if cfg.search not in SEARCH_MODES:
        raise ConfigError(f"--search must be one of {', '.join(SEARCH_MODES)}, not "
                          f"{cfg.search!r}")
    n_workers = cfg.n_workers
    own_cores = [n for n in names if HEADS[n].in_process]
    if own_cores and cfg.workers is None:   # such a head wants every core itself
        log.info("%s runs its own threads on every core: the comparison runs in this "
                 "process (--workers N overrides)", ", ".join(own_cores))
        n_workers = 0
    if cfg.budget is not None and not any(HEADS[n].budget for n in names):
        log.warning("--budget %.0f s: none of %s takes a time budget; it is ignored",
                    cfg.budget, ", ".join(names))
    fs = load_data(cfg)
    identity = file_identity(fs)   # what the saved heads record of the file they fit
    extra = flip_rows(cfg.flip, fs.has_flip)
    n_classes = len(fs.classes)
    with contextlib.ExitStack() as stack:
        shared = stack.enter_context(SharedArrays()) if n_workers > 0 else None
        data, has_flip = split_data(fs, cfg, shared)
        specs = [(name, tf, tta) for name in names for tf, tta in HEADS[name].flip_rows(extra)]
        useful = min(len(specs), default_workers())
        if n_workers > useful:      # more processes than rows or cores only slow the machine
            log.warning("--workers %d: running %d (%d rows, %d cores)", n_workers, useful,
                        len(specs), default_workers())
            n_workers = useful
        plan = data.plan
        absent = [fs.classes[c] for c in np.flatnonzero(
            np.bincount(np.asarray(data.y_test), minlength=n_classes) == 0)]
        if absent:
            log.warning("the test split has no rows of class %s: its per-class accuracy is "
                        "n/a and macro-F1 is over the %d classes present; accuracy says "
                        "nothing about it", ", ".join(map(str, absent)),
                        n_classes - len(absent))
        row_costs = [job_cost(r, data) for r in specs]
        log.info("%s: %d train rows (selection: %s), %d test, %d features, heads: "
                 "%s%s; %s search, %s", cfg.feature_file, len(data.y), plan.describe(),
                 len(data.y_test), data.X.shape[1],
                 ", ".join(names), " (+flip rows)" if extra else "", cfg.search,
                 f"{n_workers} worker{'s' if n_workers != 1 else ''}" if n_workers
                 else "in this process")
        jobs = make_jobs(specs, seed=cfg.seed, n_classes=n_classes,
                     out_dir=str(staging.resolve()) if staging is not None else None,
                     search=cfg.search, in_worker=n_workers > 0,
                     log_level=logging.getLogger("featcache").getEffectiveLevel(),
                     user_heads=user_heads, fitted_on=identity, budget_s=cfg.budget)
        costs = [sum(job_cost(r, data) for r in job.rows) for job in jobs]
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
            for row, *_ in result:
                line = (f"{row['name']:<16} test {row['test_accuracy']:.4f} "
                        f"[{row['ci95'][0]:.4f}, {row['ci95'][1]:.4f}]  val "
                        f"{row['val_accuracy']:.4f}  {fmt_params(row['params'])}  select "
                        f"{row['select_s']:.1f} s, fit {row['fit_s']:.1f} s, predict "
                        f"{row['predict_s']:.1f} s")
                if progress is None:
                    log.info("%s", line)
                else:
                    with ticker.lock:
                        report_progress(line)
            ticker()

        ticker()
        outputs = run_jobs(run_job, jobs, (data,), workers=n_workers, costs=costs,
                           on_done=done)
        y_test = np.asarray(data.y_test)
        del data
    by_name = {row["name"]: (row, pred, proba) for out in outputs for row, pred, proba in out}
    rows = [by_name[row_label(*r)][0] for r in specs]
    preds = {r["name"]: by_name[r["name"]][1] for r in rows}
    probas = {r["name"]: by_name[r["name"]][2] for r in rows}
    best = best_index(rows, row_costs)
    results = {
        "feature_file": str(cfg.feature_file),
        "provenance": fs.provenance,
        "config": {**cfg.to_dict(), "workers": n_workers},
        "classes": fs.classes,
        "protocol": {"val_fraction": cfg.val_fraction, "seed": cfg.seed,
                     "search": cfg.search, "plan": plan.to_dict(),
                     "selection": plan.describe() + "; " + (
                         "the model selected on the fit rows is final (--search fast, no "
                         "refit)" if cfg.search == "fast" and plan.kind == "holdout" else
                         "refit on all training rows") + "; test scored once",
                     "best": best_row_rule(),
                     "interval": "Wilson score, 95%",
                     "significance": "exact McNemar, Holm-adjusted over all pairs, p<0.05"},
        "rows": rows,
        "best_row": rows[best]["name"],
        "mcnemar": pairwise_mcnemar({k: v == y_test for k, v in preds.items()}),
    }
    results["wall_s"] = time.perf_counter() - t0
    return results, preds, y_test, probas


# --------------------------------------------------------------------------- curve

def per_class_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Seeded rows with at most ``n`` of every class (sorted)."""
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(y == c))[:n] for c in np.unique(y)]
    return np.sort(np.concatenate(keep))


def label_curve(features, sizes=CURVE_SIZES, *, write: bool = True, wait: bool = False,
                **settings) -> dict:
    """Test accuracy against labelled examples per class, for every selected head.

    ``features`` and ``settings`` as for :func:`compare_heads`; the report folder is locked
    the same way while the curve is written.

    At each size the head sees only that seeded subset of the training rows: its
    selection runs on the subset, with the plan the subset's size calls for (k-fold on
    small subsets, :func:`featcache.compare.selection.plan_for`), so no extra labels are
    used for selection. ``None`` in ``sizes`` means all rows.
    Plain rows only (no mirrored features).
    """
    cfg = heads_config(features, **settings)
    with _report_lock(cfg, write=write, wait=wait), _disk_full(cfg, "curve.json"):
        return _curve(cfg, sizes, write=write)


def _curve(cfg: HeadsConfig, sizes, *, write: bool) -> dict:
    from featcache.compare import report

    t0 = time.perf_counter()
    names = resolve_heads(cfg.heads)
    fs = load_data(cfg, flip=False)
    tr, te = fs["train"], fs["test"]
    smallest = int(np.bincount(tr.labels)[np.bincount(tr.labels) > 0].min())
    if sizes is CURVE_SIZES:   # the defaults: those this data set has rows for
        sizes = [s for s in sizes if s is None or 2 <= int(s) < smallest] + \
            ([None] if None not in sizes else [])
    bad = [s for s in sizes if s is not None and not 2 <= int(s) <= smallest]
    if bad:
        raise ConfigError(f"--sizes {','.join(map(str, bad))}: each size must be between 2 "
                          f"(one row to fit, one to validate) and {smallest} (the training "
                          f"rows of the smallest class), or all")
    points = []
    for size in sizes:
        idx = np.arange(len(tr.labels)) if size is None else \
            per_class_subset(tr.labels, int(size), cfg.seed)
        per_class = int(np.bincount(tr.labels[idx]).min())
        frac = cfg.val_fraction if per_class * cfg.val_fraction >= 1 else 1.0 / per_class
        frac = min(frac, 0.5)
        data = SplitData(tr.features[idx], tr.labels[idx], None, te.features, te.labels, None,
                         frac, cfg.seed, plan=plan_of(tr.labels[idx], cfg))
        for name in names:
            log.info("curve: %s with %s labelled rows per class", name, size or "all")
            row, *_ = run_row(name, data, train_flip=False, tta=False, seed=cfg.seed,
                              n_classes=len(fs.classes), search=cfg.search)
            points.append({"head": name, "per_class": size or "all",
                           "n_train": len(idx), "test_accuracy": row["test_accuracy"],
                           "ci95": row["ci95"], "params": row["params"],
                           "plan": data.plan.kind, "fit_s": row["fit_s"]})
    results = {"feature_file": str(cfg.feature_file), "provenance": fs.provenance,
               "config": cfg.to_dict(), "sizes": [s or "all" for s in sizes],
               "n_classes": len(fs.classes),
               "points": points, "wall_s": time.perf_counter() - t0}
    if write:   # a heads run killed while swapping its report in leaves it repaired first
        recover(temp_name(cfg.report_dir), cfg.report_dir)
        report.write_curve(results, cfg.report_dir)
    return results
