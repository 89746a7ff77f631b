"""Section 4: stage two on cached features — the wall time of the full default comparison
(``featcache heads FILE``) side by side with the exhaustive protocol on the same file,
each row's selection, fit and predict seconds, and the peak memory of the whole process
tree with one and with several workers.

Reads a feature file (the real full-CIFAR-10 one when it exists, else section 1's) in
child processes (``python -m featcache heads``); writes their reports into
``<work_dir>/s4_heads/{new,new_1worker,old}/``. Like stage two itself, imports nothing of
stage one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: The heads benchmarks/baseline_heads.py re-registers with plain solvers. That module is
#: imported only by the baseline's child process (through ``--heads module:attr``): importing
#: it replaces the registry's entries of these names in the importing process.
BASELINE_HEADS = ("logreg", "linear_svm", "knn")
#: the ``--heads`` value of the baseline run (the default head set, these three replaced)
HEADS_ARG = ",".join([f"benchmarks.baseline_heads:{n}" for n in BASELINE_HEADS] + ["dense"])


def _logreg(seed: int):
    """The registry's logistic regression with its default parameters."""
    from featcache.heads import get_head

    est = get_head("logreg", random_state=seed)
    return est, f"featcache logreg, C={est.get_params().get('C')}"


def fit_predict_logreg(Xtr, ytr, Xte, *, seed: int = 0) -> dict:
    """Fit logistic regression on ``Xtr`` and predict ``Xte``; seconds and predictions."""
    est, name = _logreg(seed)
    t0 = time.perf_counter()
    est.fit(Xtr, ytr)
    t1 = time.perf_counter()
    pred = est.predict(Xte)
    return {"fit_s": t1 - t0, "predict_s": time.perf_counter() - t1, "pred": pred, "name": name}


#: The runs of section 4, each ``featcache heads FILE`` in its own process tree:
#: (key, extra arguments, what it is). ``new`` is the default a user gets; ``new_1worker``
#: the same with one worker (memory must not grow with the worker count); ``old`` the
#: exhaustive protocol — every grid point, every head refit, every row one after another in
#: one process with the libraries' own threading (``--workers 0 --search exhaustive``) and
#: plain solvers — measured side by side.
RUNS = (("new", [], "default: --workers = cores, --search fast"),
        ("new_1worker", ["--workers", "1"], "--workers 1 (memory check)"),
        ("old", ["--workers", "0", "--search", "exhaustive", "--heads", HEADS_ARG],
         "--workers 0 --search exhaustive, plain solvers (benchmarks/baseline_heads.py): "
         "the exhaustive protocol"))


def tree_memory(pid: int) -> tuple[float, float]:
    """(PSS, RSS) in MiB summed over ``pid`` and all its descendants. PSS splits every
    shared page (the memory-mapped features, shared libraries) among the processes that
    map it, so the sum counts each page once: the whole tree's real footprint."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0.0, 0.0
    pss = rss = 0
    for p in procs:
        try:
            m = p.memory_full_info()
            pss += getattr(m, "pss", m.rss)
            rss += m.rss
        except psutil.Error:
            pass
    return pss / 2**20, rss / 2**20


def run_heads(path: str | Path, out_dir: Path, extra: list[str], *, seed: int,
              interval: float = 0.25) -> dict:
    """``python -m featcache heads FILE --out-dir OUT EXTRA`` in a child process: its wall
    time (start-up included, as a user sees it), the peak PSS/RSS of its whole process
    tree (sampled every ``interval`` s), and its results.json."""
    import json
    import shutil
    import subprocess
    import sys

    from .env import ROOT

    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "featcache", "heads", str(path), "--out-dir", str(out_dir),
           "--seed", str(seed), "-q", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    peak_pss = peak_rss = 0.0
    while proc.poll() is None:
        pss, rss = tree_memory(proc.pid)
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(interval)
    seconds = time.perf_counter() - t0
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode}:\n{output[-3000:]}")
    result = json.loads((out_dir / "results.json").read_text())
    return {"cmd": cmd[1:], "seconds": seconds, "wall_s": result["wall_s"],
            "peak_pss_mib": peak_pss, "peak_rss_mib": peak_rss, "result": result}


def _rows(result: dict) -> list[dict]:
    rows = []
    for row in result["rows"]:
        n_test = int(row.get("n_test", 0))
        rows.append({"name": row["name"], "head": row["head"], "params": row["params"],
                     "select_s": row["select_s"], "fit_s": row["fit_s"],
                     "predict_s": row.get("predict_s",
                                          row["predict_s_per_1000"] * n_test / 1000),
                     "acc": row["test_accuracy"], "val_acc": row["val_accuracy"],
                     "refit": row.get("refit", True), "n_train": row.get("n_train"),
                     "n_test": n_test, "tried": len(row["selection"])})
    return rows


def time_comparison(path: str | Path, out_dir: Path, *, seed: int, runs=RUNS) -> dict:
    """Section 4: the default comparison (``featcache heads FILE``), the same with one
    worker, and the exhaustive protocol, side by side on the same file; per row of
    each, selection, refit and predict seconds; peak memory of each process tree."""
    res = {"file": str(path), "runs": {}}
    for key, extra, what in runs:
        run = run_heads(path, out_dir / key, extra, seed=seed)
        res["runs"][key] = {"what": what, "args": extra, "seconds": run["seconds"],
                            "wall_s": run["wall_s"], "peak_pss_mib": run["peak_pss_mib"],
                            "peak_rss_mib": run["peak_rss_mib"],
                            "workers": run["result"]["config"]["workers"],
                            "best": run["result"]["best_row"],
                            "rows": _rows(run["result"])}
        log.info("stage two %-12s %.1f s, peak PSS %.0f MiB (tree), best %s", key,
                 run["seconds"], run["peak_pss_mib"], run["result"]["best_row"])
    new = res["runs"]["new"]
    res.update({"seconds": new["seconds"], "rows": new["rows"], "best": new["best"],
                "report_dir": str(out_dir / "new"),
                "n_train": max((r["n_train"] or 0) for r in new["rows"]) if new["rows"] else None,
                "n_test": new["rows"][0]["n_test"] if new["rows"] else None})
    if "old" in res["runs"]:
        res["speedup"] = res["runs"]["old"]["seconds"] / new["seconds"]
    if "new_1worker" in res["runs"]:
        one = res["runs"]["new_1worker"]
        res["memory_ratio"] = new["peak_pss_mib"] / one["peak_pss_mib"]
        res["identical_choices"] = [(r["name"], r["params"], r["acc"]) for r in one["rows"]] \
            == [(r["name"], r["params"], r["acc"]) for r in new["rows"]]
    return res


def run(feature_file: str | Path, *, seed: int, work: Path) -> dict:
    """Section 4 (reported as missing where the stage-two modules are not there)."""
    try:
        return time_comparison(feature_file, work / "s4_heads", seed=seed)
    except ImportError as exc:
        return {"file": str(feature_file),
                "missing": f"featcache.compare.comparison not available ({exc})"}
