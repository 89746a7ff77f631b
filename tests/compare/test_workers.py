"""Stage two's parallel execution and its shortcuts: worker count does not change any
result, arrays reach workers as shared memmaps, ``--search fast`` stops only where the
validation curve has turned, the kNN search and the scipy solver agree with references."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from stage_two_util import blobs, make_feature_file

from featcache.compare.comparison import compare_heads
from featcache.compare.workers import SharedArrays, run_jobs
from featcache.config import HeadsConfig, default_workers
from featcache.heads import HEADS, inv_norms, top_k
from featcache.heads.registry import is_path

ROOT = Path(__file__).resolve().parents[2]


def _run(path, out, workers, heads=("logreg", "linear_svm", "knn"), **kw):
    results = compare_heads(HeadsConfig(str(path), heads=heads, out_dir=str(out),
                                        workers=workers, **kw))
    return results, np.load(out / "predictions.npz")


def _choices(results):
    return [(r["name"], r["params"], r["selection"], r["skipped"], r["val_accuracy"],
             r["test_accuracy"], r["confusion"]) for r in results["rows"]]


def test_one_and_two_workers_give_identical_results(tmp_path):
    """Same seed -> same choices, same scores, same predictions, whatever the worker
    count (every job runs single-threaded; jobs share nothing but read-only inputs)."""
    path = make_feature_file(tmp_path / "f.h5", n_train=600, n_test=300, dim=24, seed=3)
    r1, p1 = _run(path, tmp_path / "w1", 1)
    r2, p2 = _run(path, tmp_path / "w2", 2)
    assert _choices(r1) == _choices(r2)
    assert r1["best_row"] == r2["best_row"]
    assert sorted(p1.files) == sorted(p2.files) and len(p1.files) == 7   # y_test + 6 rows
    for key in p1.files:
        np.testing.assert_array_equal(p1[key], p2[key])
    assert r1["config"]["workers"] == 1 and r2["config"]["workers"] == 2
    assert len({r["worker_pid"] for r in r1["rows"]}) == 1


@pytest.mark.slow
def test_dense_rows_identical_with_one_and_two_workers(tmp_path):
    """The TensorFlow head too: its rows run in their own workers, single-threaded."""
    path = make_feature_file(tmp_path / "f.h5", n_train=200, n_test=60, dim=8, seed=4)
    # the single split (cv_below=0): what --search fast keeps is the fit rows' model
    r1, p1 = _run(path, tmp_path / "w1", 1, heads=("dense", "logreg"), cv_below=0)
    r2, p2 = _run(path, tmp_path / "w2", 2, heads=("dense", "logreg"), cv_below=0)
    assert _choices(r1) == _choices(r2)
    for key in p1.files:
        np.testing.assert_array_equal(p1[key], p2[key])
    dense = [r for r in r2["rows"] if r["head"] == "dense"]
    # --search fast keeps the dense model trained on the fit rows (4 cosine epochs, no refit)
    assert all(r["params"]["epochs"] == 4 and r["fast_select"]["schedule"] == "cosine"
               for r in dense)
    assert all(not r["refit"] for r in dense)
    assert all(r["n_train"] == r["n_fit"] * (2 if r["train_flip"] else 1) for r in dense)


def _describe(arr):
    return type(arr).__name__, str(getattr(arr, "filename", "")), float(arr[3].sum())


def test_workers_get_memmaps_of_the_shared_file_not_copies(tmp_path):
    X = np.random.default_rng(0).normal(size=(50_000, 8)).astype(np.float32)  # 1.6 MB
    with SharedArrays(str(tmp_path)) as shared:
        mm = shared.put("X", X, rows=np.arange(len(X))[::-1])
        assert isinstance(mm, np.memmap) and not mm.flags.writeable
        np.testing.assert_array_equal(mm, X[::-1])
        out = run_jobs(_describe, [mm, mm], workers=2)
    assert out[0] == out[1] == ("memmap", str(mm.filename), float(X[::-1][3].sum()))
    assert not list(tmp_path.iterdir())                       # the folder is removed


def test_default_workers_is_the_affinity_count():
    import os

    assert default_workers() == len(os.sched_getaffinity(0))
    assert HeadsConfig("f.h5").n_workers == default_workers()
    assert HeadsConfig("f.h5", workers=0).n_workers == 0


def test_fast_search_stops_a_path_only_after_its_peak(tmp_path):
    assert is_path([{"C": 0.1}, {"C": 0.3}, {"C": 1.0}])
    assert not is_path([{"C": 0.1}, {"C": 1.0}])                       # too short to turn
    assert not is_path([{"C": 0.1}, {"C": 1.0}, {"C": 0.3}])           # not ordered
    assert not is_path([{"k": 1, "C": 1}, {"k": 2, "C": 2}, {"k": 3, "C": 3}])
    assert not is_path([{"dropout": 0.5}])
    path = make_feature_file(tmp_path / "f.h5", n_train=500, seed=2)
    full = compare_heads(HeadsConfig(str(path), heads=("logreg", "linear_svm"), flip="off",
                                     search="exhaustive", workers=0, cv_below=0), write=False)
    fast = compare_heads(HeadsConfig(str(path), heads=("logreg", "linear_svm"), flip="off",
                                     workers=0, cv_below=0), write=False)
    for a, b in zip(full["rows"], fast["rows"]):
        grid = list(HEADS[a["head"]].grid)
        # points a grid added past its edge are outside it (and named in the row's note)
        assert [s["params"] for s in a["selection"] if s["params"] in grid] == grid
        assert a["skipped"] == [] and bool(a["search_note"]) == (len(a["selection"]) > 3)
        tried = [s["params"] for s in b["selection"] if s["params"] in grid]
        assert tried + b["skipped"] == grid
        scores = [s["val_accuracy"] for s in b["selection"]]
        if b["skipped"]:            # it stopped at the first fall below the best so far
            assert scores[-1] < max(scores[:-1])
            assert all(x >= max(scores[:j], default=-1) for j, x in enumerate(scores[:-1]))
        assert b["params"] == max(b["selection"], key=lambda s: s["val_accuracy"])["params"]


def test_progress_reports_rows_done_to_the_end(tmp_path):
    path = make_feature_file(tmp_path / "f.h5", n_train=300)
    seen = []
    compare_heads(HeadsConfig(str(path), heads=("logreg", "knn"), workers=2), write=False,
                  progress=seen.append)
    assert seen and seen[-1].done == seen[-1].total == 4
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert all(p.elapsed_s >= 0 for p in seen)


def _brute_top_k(Q, index, k):
    I = np.concatenate(index).astype(np.float64)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    S = Qn @ (I / np.linalg.norm(I, axis=1, keepdims=True)).T
    order = np.lexsort((np.broadcast_to(np.arange(S.shape[1]), S.shape), -S), axis=1)
    return order[:, :k]


@pytest.mark.parametrize("n,k", [(3000, 10), (37, 50), (9000, 1)])
def test_knn_search_matches_brute_force(n, k):
    X, _, Xf = blobs(n, dim=20, k=4, sep=1.0, seed=5)
    Q = blobs(700, dim=20, k=4, sep=1.0, seed=6)[0]
    index = [X, Xf]
    inv = np.concatenate([inv_norms(b) for b in index])
    sims, got = top_k(Q, index, inv, k, q_block=256, i_block=1000)
    want = _brute_top_k(Q, index, min(k, 2 * n))
    assert got.shape == want.shape
    assert np.mean(got == want) > 0.999          # float32 vs float64 near-ties only
    assert np.all(np.diff(sims, axis=1) <= 0)    # most similar first


def test_knn_ties_go_to_the_lower_index():
    row = np.ones((1, 4), np.float32)
    index = [np.repeat(row, 6, axis=0)]
    _, idx = top_k(row, index, inv_norms(index[0]), 3, i_block=2)
    assert idx.tolist() == [[0, 1, 2]]


def test_scipy_and_handwritten_lbfgs_reach_the_same_optimum():
    from featcache.heads.solver import Scaler, fit_linear, objective

    X, y, _ = blobs(2000, dim=12, k=3, sep=0.6, seed=1)
    sc = Scaler.fit([X])
    fun = objective([X], y, 3, scaler=sc, C=0.1, loss="softmax")
    vals = {}
    for solver in ("lbfgs", "scipy"):
        W, b, nit = fit_linear([X], y, 3, scaler=sc, C=0.1, loss="softmax", tol=1e-6,
                               max_iter=500, solver=solver)
        vals[solver] = fun(np.concatenate([W.ravel(), b]).astype(np.float64))[0]
        assert nit > 1
    assert vals["lbfgs"] == pytest.approx(vals["scipy"], rel=1e-5)
    with pytest.raises(ValueError, match="solver"):
        fit_linear([X], y, 3, scaler=sc, C=0.1, loss="softmax", solver="newton")


def test_results_json_names_the_settings(tmp_path):
    path = make_feature_file(tmp_path / "f.h5", n_train=200)
    compare_heads(HeadsConfig(str(path), heads=("logreg",), flip="off", workers=1,
                              search="exhaustive"))
    saved = json.loads((tmp_path / "f" / "results.json").read_text())
    assert saved["config"]["workers"] == 1 and saved["protocol"]["search"] == "exhaustive"
    with pytest.raises(Exception, match="--search"):
        compare_heads(HeadsConfig(str(path), search="quick"), write=False)


def test_more_workers_than_rows_or_cores_are_capped_with_a_warning(tmp_path, caplog):
    import logging

    path = make_feature_file(tmp_path / "f.h5", n_train=200)
    with caplog.at_level(logging.WARNING, logger="featcache"):
        r = compare_heads(HeadsConfig(str(path), heads=("logreg",), flip="off", workers=64),
                          write=False)
    assert r["config"]["workers"] == 1                 # one row: one worker is all it uses
    assert "--workers 64: running 1 (1 rows" in caplog.text


SLOW_HEAD = textwrap.dedent("""
    import os, time
    from sklearn.linear_model import LogisticRegression

    class Slow(LogisticRegression):
        # a fit that takes a minute, after writing its worker's pid into SLOW_MARKERS
        def fit(self, X, y, *args, **kwargs):
            open(os.path.join(os.environ["SLOW_MARKERS"], str(os.getpid())), "w").close()
            time.sleep(60)
            return super().fit(X, y)
""")


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.skipif(default_workers() < 2, reason="needs two cores for two worker processes")
def test_workers_die_with_a_killed_parent(tmp_path):
    """``kill -9`` of a running ``featcache heads --workers 2``: its worker processes, the
    one busy in a minute-long fit and the idle one, are gone within seconds (they used to
    run the fit to its end, then wait out loky's 300-s idle timeout)."""
    import psutil

    path = make_feature_file(tmp_path / "f.h5", n_train=80, n_test=20, flip=False)
    (tmp_path / "slowhead.py").write_text(SLOW_HEAD)
    markers = tmp_path / "markers"
    markers.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "featcache", "heads", str(path), "--heads",
         f"{tmp_path / 'slowhead.py'}:Slow,logreg", "--workers", "2", "--flip", "off", "-q"],
        cwd=ROOT, env=dict(os.environ, SLOW_MARKERS=str(markers)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kids: list = []
    try:
        deadline = time.monotonic() + 120
        while not list(markers.iterdir()):          # the slow fit has started in a worker
            assert proc.poll() is None and time.monotonic() < deadline, "no worker started"
            time.sleep(0.1)
        busy = int(next(markers.iterdir()).name)
        while True:                                 # and the logreg row is done: one idle
            kids = psutil.Process(proc.pid).children(recursive=True)
            if len(kids) >= 2 and busy in {k.pid for k in kids}:
                break
            assert time.monotonic() < deadline, f"workers of {proc.pid}: {kids}"
            time.sleep(0.1)
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(k.pid) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [k.pid for k in kids if _alive(k.pid)]
        assert not left, f"worker processes {left} outlived their killed parent {proc.pid}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for k in kids:
            if _alive(k.pid):
                os.kill(k.pid, signal.SIGKILL)
