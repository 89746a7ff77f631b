"""The approximate RBF-kernel SVM head ``rbf_svm``: :class:`RFFSVMHead`, and
:func:`cosine_block` (``cos`` from built-in Keras layers, for its Keras form).

Reads and writes nothing. Fits with :func:`featcache.heads.solver.fit_linear` on random Fourier
features (float32); Keras comes from :func:`featcache.heads.dense.keras_module`.
"""

from __future__ import annotations

import numpy as np

from featcache.heads.base import Head, data_key
from featcache.heads.registry import register_head
from featcache.heads.solver import Scaler, covariance, fit_linear, folded, softmax


class RFFSVMHead(Head):
    """Approximate RBF-kernel SVM: standardize -> PCA to ``n_pca`` dims -> random Fourier
    features (``n_components`` cosines, Rahimi & Recht) -> one-vs-rest linear SVM (squared
    hinge), all in float32. ``gamma`` is relative to scikit-learn's ``"scale"``
    (``1 / (n_pca * var)`` of the projected rows). Memory: one (n, n_components) float32
    matrix of random features during ``fit``.
    """

    def __init__(self, C=0.3, gamma=0.25, n_components=2048, n_pca=256, max_iter=300,
                 tol=1e-4, warm_start=False, random_state=0):
        self.C, self.gamma, self.n_components, self.n_pca = C, gamma, n_components, n_pca
        self.max_iter, self.tol, self.warm_start = max_iter, tol, warm_start
        self.random_state = random_state

    _transient = Head._transient + ("_Z", "_init")

    def _fit_projection(self, blocks):
        self.scaler_ = Scaler.fit(blocks)
        D = blocks[0].shape[1]
        evals, evecs = np.linalg.eigh(covariance(blocks, self.scaler_.mean, self.scaler_.scale))
        p = min(self.n_pca, D)
        V = evecs[:, ::-1][:, :p].astype(np.float32)
        self.proj_, self.proj_bias_ = folded(self.scaler_, V, np.zeros(p, np.float32))
        self.explained_variance_ratio_ = float(evals[::-1][:p].sum() / evals.sum())
        # Standardized features have variance ~1 along the kept directions; (near-)constant
        # features (e.g. a random-weight backbone) leave ~0, which would scale the Fourier
        # frequencies by ~1e17 and make cos() of the projections numerical noise.
        var = float(evals[::-1][:p].mean())
        self.proj_var_ = var if var > 1e-6 else 1.0
        self._proj_key = data_key(blocks)

    def _random_features(self, X) -> np.ndarray:
        M = self.omega_.shape[1]
        Z = np.empty((len(X), M), np.float32)
        s = np.float32(np.sqrt(2.0 / M))
        for i in range(0, len(X), 4096):
            P = X[i:i + 4096] @ self.proj_ + self.proj_bias_
            np.cos(P @ self.omega_ + self.phase_, out=Z[i:i + 4096])
            Z[i:i + 4096] *= s
        return Z

    def fit(self, X, y, X_flip=None):
        blocks, yi = self._validate_fit(X, y, X_flip)
        K = len(self.classes_)
        key = data_key(blocks)
        reuse = self.warm_start and getattr(self, "_proj_key", None) == key
        if not reuse:
            self._fit_projection(blocks)
        gamma = self.gamma / self.proj_var_ / self.proj_.shape[1]
        if not (reuse and getattr(self, "_gamma_used", None) == gamma
                and self.omega_.shape[1] == self.n_components):
            rng = np.random.default_rng(self.random_state)
            p = self.proj_.shape[1]
            self.omega_ = (rng.standard_normal((p, self.n_components)) *
                           np.sqrt(2 * gamma)).astype(np.float32)
            self.phase_ = rng.uniform(0, 2 * np.pi, self.n_components).astype(np.float32)
            self._Z = [self._random_features(b) for b in blocks]
            self._gamma_used = gamma
            self._init = None
        ident = Scaler.identity(self.n_components)
        W, b, self.n_iter_ = fit_linear(self._Z, yi, K, scaler=ident, C=self.C,
                                        loss="squared_hinge", init=self._init,
                                        max_iter=self.max_iter, tol=self.tol)
        self._init = (W, b) if self.warm_start else None
        if not self.warm_start:
            del self._Z
        self.coef_, self.intercept_ = W, b
        return self

    def _scores(self, X) -> np.ndarray:
        out = np.empty((len(X), len(self.classes_)), np.float32)
        for i in range(0, len(X), 4096):
            out[i:i + 4096] = self._random_features(X[i:i + 4096]) @ self.coef_
        return out + self.intercept_

    def decision_function(self, X) -> np.ndarray:
        """Per-class scores (n, K); for two classes scikit-learn's (n,) ``s1 - s0``."""
        S = self._scores(self._validate(X))
        return S[:, 1] - S[:, 0] if S.shape[1] == 2 else S

    def _proba(self, X):
        return softmax(self._scores(X))

    def to_keras(self):
        from featcache.heads.dense import keras_module

        keras = keras_module()
        M = self.n_components
        inp = keras.Input((self.n_features_in_,), dtype="float32", name="features")
        pca = keras.layers.Dense(self.proj_.shape[1], name="standardize_pca")
        rff = keras.layers.Dense(M, name="fourier")
        lin = keras.layers.Dense(len(self.classes_), name="linear")
        x = lin(cosine_block(rff(pca(inp))))
        out = keras.layers.Softmax(name="proba")(x)
        pca.set_weights([self.proj_, self.proj_bias_])
        rff.set_weights([self.omega_, self.phase_])
        lin.set_weights([self.coef_ * np.float32(np.sqrt(2.0 / M)), self.intercept_])
        return keras.Model(inp, out, name="featcache_rbf_svm_head")


#: cosine_block is exact (to float32 rounding) for |t| < 2 pi * _COS_PERIODS
_COS_PERIODS = 64
#: 2 pi in two float32 parts (Cody-Waite): k * _TWO_PI_HI is exact for |k| <= 2**10
_TWO_PI_HI = 51472.0 / 8192.0
_TWO_PI_LO = float(np.float32(2 * np.pi - _TWO_PI_HI))
_COS_TERMS = 10  # Taylor terms in r**2: error < 1e-10 on [-pi, pi], below float32 rounding


def cosine_block(x, name: str = "cosine"):
    """Elementwise ``cos(x)`` from built-in Keras layers only, so a saved model needs no
    featcache code to load (Keras has no cosine layer or activation).

    ``k = round(x / 2 pi)`` is a bucket index (``Discretization``, exact for
    ``|x| < 2 pi * 64``; random-Fourier-feature arguments are about N(phase, 0.5), so that is
    hundreds of standard deviations); ``r = x - 2 pi k`` in [-pi, pi] with 2 pi split in two
    float32 parts; ``cos r`` by Horner on its Taylor series in ``r**2`` (``Multiply`` and
    ``Rescaling``). Agrees with ``np.cos`` to ~1e-6; beyond the buckets ``r`` is clamped
    (finite, not exact). TFLite converts it to builtin ops."""
    import math

    from featcache.heads.dense import keras_module

    L = keras_module().layers
    M = _COS_PERIODS
    bounds = [2 * math.pi * (k - 0.5) for k in range(-M + 1, M + 1)]
    idx = L.Discretization(bin_boundaries=bounds, name=f"{name}_period")(x)  # round(x/2pi)+M
    k = L.Rescaling(1.0, offset=-float(M), name=f"{name}_k")(idx)
    r = L.Add(name=f"{name}_r_hi")([x, L.Rescaling(-_TWO_PI_HI, name=f"{name}_hi")(k)])
    r = L.Add(name=f"{name}_r_lo")([r, L.Rescaling(-_TWO_PI_LO, name=f"{name}_lo")(k)])
    # |x| beyond the buckets: clamp r to [-pi, pi] so the polynomial stays finite
    r = L.ReLU(max_value=2 * math.pi, name=f"{name}_clamp")(
        L.Rescaling(1.0, offset=math.pi, name=f"{name}_shift")(r))
    r = L.Rescaling(1.0, offset=-math.pi, name=f"{name}_r")(r)
    u = L.Multiply(name=f"{name}_r2")([r, r])
    c = [(-1) ** j / math.factorial(2 * j) for j in range(_COS_TERMS)]
    p = L.Rescaling(c[-1], offset=c[-2], name=f"{name}_h{_COS_TERMS - 2}")(u)
    for j in range(_COS_TERMS - 3, -1, -1):
        p = L.Multiply(name=f"{name}_m{j}")([p, u])
        p = L.Rescaling(1.0, offset=c[j], name=f"{name}_h{j}")(p)
    return p


@register_head("rbf_svm", default=False, grid=[{"gamma": 0.25, "C": c} for c in (0.3, 1.0)],
               cost=2.5)
def rbf_svm(random_state=0, **params):
    """Approximate RBF SVM: PCA-256 + 2048 random Fourier features + linear SVM."""
    return RFFSVMHead(random_state=random_state, **params)
