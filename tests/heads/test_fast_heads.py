"""Stage two's shortcuts that must not change the answer: the preconditioned L-BFGS of
the linear heads reaches the same optimum as the plain one (in fewer iterations on
correlated features), and the kNN head's whitened PCA space is the one numpy computes."""

from __future__ import annotations

import numpy as np
import pytest
from stage_two_util import blobs

from featcache.heads import CosineKNNHead, LinearHead
from featcache.heads.solver import Preconditioner, Scaler, fit_linear, objective


def _correlated(n=3000, d=60, k=3, seed=0):
    """Features with a wide spectrum (strongly correlated columns) and a noisy linear
    signal: not separable, like real features."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((d, d)) * np.logspace(0, -2.5, d)[:, None]
    X = (rng.standard_normal((n, d)) @ A + 3.0).astype(np.float32)
    s = X @ rng.standard_normal((d, k))
    s = (s - s.mean(0)) / s.std(0)
    return X, (s + rng.standard_normal(s.shape)).argmax(1)


@pytest.mark.parametrize("loss,C", [("softmax", 0.1), ("squared_hinge", 0.1)])
def test_preconditioned_lbfgs_reaches_the_same_optimum_in_fewer_iterations(loss, C):
    X, y = _correlated()
    sc = Scaler.fit([X])
    pre = Preconditioner.fit([X], sc)
    plain = fit_linear([X], y, 3, scaler=sc, C=C, loss=loss, tol=1e-7, max_iter=3000)
    fast = fit_linear([X], y, 3, scaler=sc, C=C, loss=loss, tol=1e-7, max_iter=3000,
                      precondition=pre)
    fun = objective([X], y, 3, scaler=sc, C=C, loss=loss)

    def value(W, b):
        return fun(np.concatenate([W.ravel(), b]).astype(np.float64))[0]

    f_plain, f_fast = value(*plain[:2]), value(*fast[:2])
    assert f_fast <= f_plain * (1 + 1e-6) + 1e-9
    assert abs(f_fast - f_plain) <= 1e-5 * abs(f_plain)
    assert fast[2] * 2 < plain[2], (fast[2], plain[2])        # iterations


def test_preconditioned_warm_start_starts_at_the_solution():
    X, y = _correlated(seed=1)
    sc = Scaler.fit([X])
    pre = Preconditioner.fit([X], sc)
    W, b, _ = fit_linear([X], y, 3, scaler=sc, C=1.0, loss="softmax", tol=1e-6,
                         precondition=pre)
    W2, b2, nit = fit_linear([X], y, 3, scaler=sc, C=1.0, loss="softmax", tol=1e-5,
                             precondition=pre, init=(W, b))
    assert nit <= 1 and np.allclose(W2, W, atol=1e-4)


def test_linear_head_with_and_without_preconditioner_predict_alike():
    X, y = _correlated(seed=2)
    a = LinearHead(C=0.1, tol=1e-6, max_iter=3000, precondition=False).fit(X, y)
    b = LinearHead(C=0.1, tol=1e-6, max_iter=3000, precondition=True).fit(X, y)
    assert np.mean(a.predict(X) == b.predict(X)) > 0.99
    assert b.n_iter_ < a.n_iter_


def _brute_neighbours(Q, I, k):
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    In = I / np.linalg.norm(I, axis=1, keepdims=True)
    S = Qn.astype(np.float64) @ In.T.astype(np.float64)
    return np.argsort(-S, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("whiten", [True, False])
def test_knn_searches_the_training_rows_pca_space(whiten):
    rng = np.random.default_rng(3)
    X = (rng.standard_normal((400, 24)) @ rng.standard_normal((24, 24))).astype(np.float32)
    Xf = X + rng.normal(0, 0.1, X.shape).astype(np.float32)
    y = rng.integers(0, 4, len(X))
    Q = (rng.standard_normal((50, 24)) @ rng.standard_normal((24, 24))).astype(np.float32)
    head = CosineKNNHead(k=5, dim=6, whiten=whiten).fit(X, y, Xf)
    # the same space from numpy: mean and covariance of plain + mirrored rows, top 6
    rows = np.concatenate([X, Xf]).astype(np.float64)
    w, U = np.linalg.eigh(np.cov(rows, rowvar=False, bias=True))
    w, U = w[::-1][:6], U[:, ::-1][:, :6]
    M = U / np.sqrt(w) if whiten else U
    Z = (rows - rows.mean(0)) @ M
    Zq = (Q - rows.mean(0)) @ M
    assert head.index_[0].shape == (400, 6)
    got = head.neighbours(Q, 5)
    want = _brute_neighbours(Zq, Z, 5)
    assert np.mean(got == want) > 0.98      # float32 vs float64: rare near-ties may swap


def test_knn_without_projection_keeps_the_rows_as_given():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((100, 8)).astype(np.float32)
    head = CosineKNNHead(dim=None).fit(X, rng.integers(0, 3, 100))
    assert np.shares_memory(head.index_[0], X)
    wide = CosineKNNHead(dim=256).fit(X, rng.integers(0, 3, 100))   # dim >= D: no PCA
    assert wide.projection_ is None and np.shares_memory(wide.index_[0], X)


def test_heads_study_prints_both_parts(tmp_path, capsys):
    """``python -m benchmarks.studies.heads`` (the docs' validation studies) runs end to end."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from stage_two_util import make_feature_file

    from benchmarks.studies import heads as heads_study

    path = make_feature_file(tmp_path / "f.h5", n_train=300, flip=True)
    heads_study.main([str(path), "--parts", "linear,knn", "--dims", "4"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    lin = [x for x in lines if x["part"] == "linear"]
    assert len(lin) == 2 * 2 * 2 * 3                 # losses x flip x preconditioner x C
    assert all(0 <= x["val_accuracy"] <= 1 and x["iterations"] >= 1 for x in lin)
    kn = [x for x in lines if x["part"] == "knn"]
    assert {(x["dim"], x["whiten"]) for x in kn} == {(None, False), (4, False), (4, True)}


def test_auto_preconditioning_starts_at_the_row_threshold(monkeypatch):
    import featcache.heads.linear as linear

    X, y, Xf = blobs(300, dim=12, k=3)
    assert LinearHead(C=0.1).fit(X, y)._precond is None           # small data: plain
    monkeypatch.setattr(linear, "PRECOND_MIN_ROWS", 600)
    assert LinearHead(C=0.1).fit(X, y)._precond is None            # 300 rows
    assert LinearHead(C=0.1).fit(X, y, Xf)._precond is not None    # 600 with mirrors
    assert LinearHead(C=0.1, precondition=False).fit(X, y, Xf)._precond is None


def test_knn_caps_its_components_on_small_data():
    from featcache.heads.knn import ROWS_PER_COMPONENT

    X, y, Xf = blobs(400, dim=300, k=4)
    small = CosineKNNHead(k=5, dim=256).fit(X[:100], y[:100], Xf[:100])
    assert small.dim_ == 100 // ROWS_PER_COMPONENT == small.projection_.shape[1]
    big = CosineKNNHead(k=5, dim=64).fit(X, y)
    assert big.dim_ == 64 == big.projection_.shape[1]
    assert CosineKNNHead(k=5, dim=None).fit(X[:100], y[:100]).projection_ is None
