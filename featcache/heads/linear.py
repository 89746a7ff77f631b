"""The linear heads ``logreg`` and ``linear_svm``: :class:`LinearHead`.

Reads and writes nothing. Fits with :func:`featcache.heads.solver.fit_linear` (float32 L-BFGS,
no copy of the feature matrix); ``to_keras`` builds a Keras model through
:func:`featcache.heads.dense.keras_module`.
"""

from __future__ import annotations

import numpy as np

from featcache.heads.base import Head, data_key
from featcache.heads.registry import register_head
from featcache.heads.solver import (
    PRECOND_MIN_ROWS,
    Preconditioner,
    Scaler,
    decision,
    fit_linear,
    folded,
    softmax,
)


class LinearHead(Head):
    """Standardize (fitted on training rows) then a linear model, fitted in float32.

    ``loss='softmax'``: multinomial logistic regression; ``'squared_hinge'``: one-vs-rest
    linear SVM. ``predict_proba`` is the softmax of the scores (for the SVM: uncalibrated,
    but its argmax is ``predict``). ``warm_start=True`` starts from the previous solution
    (used along the C path during selection, and for the refit from the best grid point).
    ``precondition=True`` runs L-BFGS in whitened coordinates
    (:class:`featcache.heads.solver.Preconditioner`): the same optimum in 4-5x fewer
    iterations, for a fixed cost of seconds; ``"auto"`` (the default) does so from
    :data:`~featcache.heads.solver.PRECOND_MIN_ROWS` training rows on. ``tol`` bounds the
    gradient in the coordinates used.
    """

    _transient = Head._transient + ("_precond",)

    def __init__(self, C=0.003, loss="softmax", max_iter=300, tol=1e-4, warm_start=False,
                 precondition="auto", random_state=0):
        self.C, self.loss, self.max_iter, self.tol = C, loss, max_iter, tol
        self.warm_start, self.precondition = warm_start, precondition
        self.random_state = random_state

    def fit(self, X, y, X_flip=None):
        blocks, yi = self._validate_fit(X, y, X_flip)
        K = len(self.classes_)
        init = None
        if self.warm_start and getattr(self, "coef_std_", None) is not None \
                and self.coef_std_.shape == (blocks[0].shape[1], K):
            init = (self.coef_std_, self.intercept_std_)
        key = data_key(blocks)
        if not (self.warm_start and getattr(self, "_scaler_key", None) == key):
            self.scaler_ = Scaler.fit(blocks)   # along a warm-started path: same rows, once
            self._precond = None
            self._scaler_key = key
        use = self.precondition if self.precondition != "auto" else \
            sum(len(b) for b in blocks) >= PRECOND_MIN_ROWS
        if use and getattr(self, "_precond", None) is None:
            self._precond = Preconditioner.fit(blocks, self.scaler_)
        W, b, self.n_iter_ = fit_linear(
            blocks, yi, K, scaler=self.scaler_, C=self.C, loss=self.loss, init=init,
            max_iter=self.max_iter, tol=self.tol,
            precondition=self._precond if use else None)
        self.coef_std_, self.intercept_std_ = W, b
        self.coef_, self.intercept_ = folded(self.scaler_, W, b)
        return self

    def _scores(self, X) -> np.ndarray:
        return decision(X, self.coef_, self.intercept_)

    def decision_function(self, X) -> np.ndarray:
        """Per-class scores (n, K); for two classes scikit-learn's (n,) ``s1 - s0``."""
        S = self._scores(self._validate(X))
        return S[:, 1] - S[:, 0] if S.shape[1] == 2 else S

    def _proba(self, X):
        return softmax(self._scores(X))

    def _warm_state(self):
        return self.coef_std_.copy(), self.intercept_std_.copy()

    def _set_warm_state(self, state) -> None:
        self.coef_std_, self.intercept_std_ = state
        if getattr(self, "scaler_", None) is not None:   # predicts with it until refit
            self.coef_, self.intercept_ = folded(self.scaler_, *state)

    def to_keras(self):
        from featcache.heads.dense import keras_module

        keras = keras_module()
        K = len(self.classes_)
        inp = keras.Input((self.n_features_in_,), dtype="float32", name="features")
        dense = keras.layers.Dense(K, name="linear")
        out = keras.layers.Softmax(name="proba")(dense(inp))
        dense.set_weights([self.coef_, self.intercept_])
        return keras.Model(inp, out, name=f"featcache_{self.loss}_head")


# --search fast scores the C path at gradient tolerance 3e-4 (the refit keeps 1e-4): on real
# MobileNetV2 features it chose the same C for both heads with 33% / 21% fewer iterations
# (benchmarks/stage2_parts.py --parts tol; docs/stage-two.md).
FAST_PATH = {"tol": 3e-4}


@register_head("logreg", grid=[{"C": c} for c in (0.001, 0.003, 0.01)], cost=1.0,
               fast_select=FAST_PATH)
def logreg(random_state=0, **params):
    """Multinomial logistic regression on standardized features (float32 preconditioned L-BFGS)."""
    return LinearHead(loss="softmax", random_state=random_state, **params)


@register_head("linear_svm", grid=[{"C": c} for c in (0.0001, 0.0003, 0.001)], cost=1.5,
               fast_select=FAST_PATH)
def linear_svm(random_state=0, **params):
    """One-vs-rest linear SVM (squared hinge) on standardized features (float32 preconditioned
    L-BFGS)."""
    return LinearHead(loss="squared_hinge", random_state=random_state, **params)
