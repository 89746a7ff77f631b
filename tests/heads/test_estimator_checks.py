"""scikit-learn's own estimator checks (``sklearn.utils.estimator_checks``) on featcache's
heads, plus what those checks do not cover: pickling a fitted dense head keeps its Keras
model, and the scaler's statistics are numerically stable.

Expected failures: none for the numpy heads; the (slow) dense head runs a subset, see
``DENSE_CHECKS``. Skipped by scikit-learn itself here: the
pandas check (pandas is not installed) and the array-API check (``SCIPY_ARRAY_API``
unset). Small settings (few random features, tiny networks) keep every check fast; they do
not change what is checked.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from featcache.heads import CosineKNNHead, DenseHead, LinearHead, RFFSVMHead
from featcache.heads.solver import Scaler


@parametrize_with_checks([LinearHead(), LinearHead(loss="squared_hinge"),
                          RFFSVMHead(n_components=128, n_pca=8), CosineKNNHead()])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# DenseHead: the whole suite takes minutes of Keras fits, so a subset of the contract
# (cloning, params, fitted-state checks, input validation, pickling with its model);
# not scikit-learn's accuracy bar (check_classifiers_train), which two epochs of an 8-unit
# network do not reach, nor the row-order check, which float32 Keras inference misses by
# ~1e-7 (BLAS blocking) against its rtol=1e-7 (both measured with the full suite).
DENSE_CHECKS = ("check_estimator_cloneable", "check_get_params_invariance",
                "check_set_params", "check_estimators_unfitted", "check_fit_check_is_fitted",
                "check_n_features_in", "check_fit2d_predict1d", "check_estimators_pickle")


@pytest.mark.slow
def test_sklearn_estimator_checks_dense():
    import sklearn.utils.estimator_checks as checks

    for name in DENSE_CHECKS:
        getattr(checks, name)("DenseHead", DenseHead(hidden=8, epochs=2, batch_size=32))


def test_dense_head_pickles_with_its_model():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 6)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int) + 2 * (X[:, 1] > 0)
    head = DenseHead(hidden=8, epochs=2, batch_size=32).fit(X, y)
    again = pickle.loads(pickle.dumps(head))
    assert again.model_ is not head.model_
    np.testing.assert_allclose(again.predict_proba(X), head.predict_proba(X), atol=1e-6)
    np.testing.assert_array_equal(again.predict(X), head.predict(X))
    assert again.best_epochs_ == head.best_epochs_ and list(again.classes_) == [0, 1, 2, 3]


@pytest.mark.parametrize("offset,spread", [(1e4, 1e-2), (1e6, 1.0)])
def test_scaler_is_stable_with_a_large_offset(offset, spread):
    """E[x^2] - E[x]^2 loses ~1e-3 of the spread at these offsets (float64 accumulators);
    the blockwise mean/M2 merge agrees with numpy's two-pass variance to float32 rounding."""
    rng = np.random.default_rng(0)
    X = (offset + spread * rng.standard_normal((20000, 8))).astype(np.float32)
    X64 = X.astype(np.float64)
    sc = Scaler.fit([X[:7000], X[7000:]])       # uneven blocks across two arrays
    np.testing.assert_allclose(sc.scale, np.std(X64, axis=0), rtol=1e-6)
    np.testing.assert_allclose(sc.mean, X64.mean(0), rtol=1e-6)
    naive = np.sqrt(np.maximum((X64 ** 2).mean(0) - X64.mean(0) ** 2, 0))
    assert np.max(np.abs(naive / np.std(X64, axis=0) - 1)) > 1e-5  # the probe can fail
