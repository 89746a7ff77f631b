"""The head registry: name -> estimator factory, default flag and hyper-parameter grid.

Reads and writes only what :func:`save_head`/:func:`load_head` are given (joblib files;
``.keras`` + ``.json`` for the dense head). Takes arrays, never feature files, and never
imports stage one (extract/backbones/datasets).

Every head follows the scikit-learn estimator contract: ``fit(X, y)`` returns self,
learned state ends in ``_``, ``random_state``, ``predict``, ``predict_proba``,
``classes_``, ``get_params``/``set_params``. Inputs are float32 (N, D) and are never copied
to float64. ``fit``/``predict_proba`` also take ``X_flip`` (features of mirrored images):
in ``fit`` it is train-time augmentation, in ``predict_proba`` test-time averaging.

Heads that are Keras-expressible implement ``to_keras() -> keras.Model`` mapping float32
features (None, D) to class probabilities, scaler included (the export contract); ``knn``
raises ``NotImplementedError``.

Adding a head is one decorated factory::

    @register_head("my_head", default=False, grid=[{"C": 1.0}, {"C": 10.0}])
    def my_head(random_state=0, **params):
        return MyEstimator(random_state=random_state, **params)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from .atomic import replacing, write_text
from .errors import ConfigError
from .linear import Scaler, decision, fit_linear, folded, softmax

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class HeadSpec:
    """One registry entry. ``grid`` is the list of parameter dicts tried on validation."""

    name: str
    factory: Callable[..., BaseEstimator]
    default: bool = True
    grid: tuple[dict, ...] = ()
    summary: str = ""
    keras: bool = True             # implements to_keras (export contract)
    fixed: dict = field(default_factory=dict)
    cost: float = 1.0              # relative seconds per training row (job order, ETA)
    tensorflow: bool = False       # fitting imports TensorFlow: such rows share one worker
    refit: bool = True             # --search fast: refit the chosen point on all rows
    fast_select: dict = field(default_factory=dict)  # --search fast: params while selecting

    def make(self, random_state: int = 0, **params) -> BaseEstimator:
        return self.factory(random_state=random_state, **{**self.fixed, **params})


HEADS: dict[str, HeadSpec] = {}


def register_head(name: str, *, default: bool = True, grid=(), summary: str = "",
                  keras: bool = True, cost: float = 1.0, tensorflow: bool = False,
                  refit: bool = True, fast_select: dict | None = None, **fixed):
    """Register ``factory(random_state=..., **params) -> estimator`` under ``name``.

    ``grid`` is tried in order; a grid over one numeric parameter is a path (ordered, the
    linear heads warm-start along it) that ``--search fast`` stops once validation
    accuracy falls below its best. ``cost`` (relative seconds per training row) orders the
    jobs and the ETA; ``tensorflow=True`` puts the head's rows in one worker (one
    TensorFlow import); ``refit=False`` keeps, under ``--search fast``, the model selected
    on the fit rows instead of refitting it on all training rows; ``fast_select`` are
    parameters used only while scoring the grid under ``--search fast`` (e.g. a looser
    solver tolerance; the refit uses the head's own)."""
    def deco(factory):
        doc = summary or (factory.__doc__ or "").strip().splitlines()[0]
        HEADS[name] = HeadSpec(name, factory, default, tuple(dict(g) for g in grid), doc,
                               keras, dict(fixed), float(cost), bool(tensorflow), bool(refit),
                               dict(fast_select or {}))
        return factory
    return deco


def default_heads() -> list[str]:
    return [n for n, s in HEADS.items() if s.default]


def resolve_heads(names) -> list[str]:
    """Names (a list or a comma-separated string) -> validated list; empty: the defaults."""
    if isinstance(names, str):
        names = [n for n in names.replace(" ", "").split(",") if n]
    names = list(names or [])
    if not names:
        return default_heads()
    unknown = [n for n in names if n not in HEADS]
    if unknown:
        raise ConfigError(f"unknown head {', '.join(map(repr, unknown))}; choose from "
                          f"{', '.join(HEADS)}")
    return list(dict.fromkeys(names))


def get_head(name: str) -> HeadSpec:
    return HEADS[resolve_heads([name])[0]]


# --------------------------------------------------------------------------- base

class _Head(ClassifierMixin, BaseEstimator):
    """Shared plumbing: label encoding, probability averaging over mirrored features."""

    def _encode(self, y) -> np.ndarray:
        self.classes_, yi = np.unique(np.asarray(y), return_inverse=True)
        return yi.astype(np.int64)

    def predict_proba(self, X, X_flip=None) -> np.ndarray:
        P = self._proba(_f32(X))
        if X_flip is not None:
            P = (P + self._proba(_f32(X_flip))) / 2
        return P

    def predict(self, X, X_flip=None) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X, X_flip), axis=1)]

    def to_keras(self):
        raise NotImplementedError(f"{type(self).__name__} is not expressible as a Keras model")


def _f32(X) -> np.ndarray:
    X = np.asarray(X)
    return X if X.dtype == np.float32 else X.astype(np.float32)


def _blocks(X, X_flip) -> list:
    return [_f32(X)] if X_flip is None else [_f32(X), _f32(X_flip)]


class LinearHead(_Head):
    """Standardize (fitted on training rows) then a linear model, fitted in float32.

    ``loss='softmax'``: multinomial logistic regression; ``'squared_hinge'``: one-vs-rest
    linear SVM. ``predict_proba`` is the softmax of the scores (for the SVM: uncalibrated,
    but its argmax is ``predict``). ``warm_start=True`` starts from the previous solution
    (used along the C path during selection).
    """

    def __init__(self, C=0.003, loss="softmax", max_iter=300, tol=1e-4, warm_start=False,
                 random_state=0):
        self.C, self.loss, self.max_iter, self.tol = C, loss, max_iter, tol
        self.warm_start, self.random_state = warm_start, random_state

    def fit(self, X, y, X_flip=None):
        blocks = _blocks(X, X_flip)
        yi = self._encode(y)
        K = len(self.classes_)
        init = None
        if self.warm_start and getattr(self, "coef_std_", None) is not None \
                and self.coef_std_.shape == (blocks[0].shape[1], K):
            init = (self.coef_std_, self.intercept_std_)
        key = (id(blocks[0]), blocks[0].shape, len(blocks))
        if not (self.warm_start and getattr(self, "_scaler_key", None) == key):
            self.scaler_ = Scaler.fit(blocks)   # along a warm-started path: same rows, once
            self._scaler_key = key
        W, b, self.n_iter_ = fit_linear(blocks, yi, K, scaler=self.scaler_, C=self.C,
                                        loss=self.loss, init=init, max_iter=self.max_iter,
                                        tol=self.tol)
        self.coef_std_, self.intercept_std_ = W, b
        self.coef_, self.intercept_ = folded(self.scaler_, W, b)
        self.n_features_in_ = blocks[0].shape[1]
        return self

    def decision_function(self, X) -> np.ndarray:
        return decision(_f32(X), self.coef_, self.intercept_)

    def _proba(self, X):
        return softmax(self.decision_function(X))

    def to_keras(self):
        import keras

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
    """Multinomial logistic regression on standardized features (float32 L-BFGS)."""
    return LinearHead(loss="softmax", random_state=random_state, **params)


@register_head("linear_svm", grid=[{"C": c} for c in (0.0001, 0.0003, 0.001)], cost=1.5,
               fast_select=FAST_PATH)
def linear_svm(random_state=0, **params):
    """One-vs-rest linear SVM (squared hinge) on standardized features (float32 L-BFGS)."""
    return LinearHead(loss="squared_hinge", random_state=random_state, **params)


# --------------------------------------------------------------------------- rbf_svm

class RFFSVMHead(_Head):
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

    def _fit_projection(self, blocks):
        self.scaler_ = Scaler.fit(blocks)
        D = blocks[0].shape[1]
        cov = np.zeros((D, D), np.float64)
        n = 0
        for X in blocks:
            for i in range(0, len(X), 8192):
                b = (X[i:i + 8192] - self.scaler_.mean) / self.scaler_.scale
                cov += b.T @ b
                n += len(b)
        evals, evecs = np.linalg.eigh(cov / n)
        p = min(self.n_pca, D)
        V = evecs[:, ::-1][:, :p].astype(np.float32)
        self.proj_, self.proj_bias_ = folded(self.scaler_, V, np.zeros(p, np.float32))
        self.explained_variance_ratio_ = float(evals[::-1][:p].sum() / evals.sum())
        # Standardized features have variance ~1 along the kept directions; (near-)constant
        # features (e.g. a random-weight backbone) leave ~0, which would scale the Fourier
        # frequencies by ~1e17 and make cos() of the projections numerical noise.
        var = float(evals[::-1][:p].mean())
        self.proj_var_ = var if var > 1e-6 else 1.0
        self._proj_key = (id(blocks[0]), blocks[0].shape, len(blocks))

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
        blocks = _blocks(X, X_flip)
        yi = self._encode(y)
        K = len(self.classes_)
        key = (id(blocks[0]), blocks[0].shape, len(blocks))
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
        self.n_features_in_ = blocks[0].shape[1]
        return self

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_Z", "_init")}

    def decision_function(self, X) -> np.ndarray:
        X = _f32(X)
        out = np.empty((len(X), len(self.classes_)), np.float32)
        for i in range(0, len(X), 4096):
            out[i:i + 4096] = self._random_features(X[i:i + 4096]) @ self.coef_
        return out + self.intercept_

    def _proba(self, X):
        return softmax(self.decision_function(X))

    def to_keras(self):
        import keras

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

    import keras

    L = keras.layers
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


# --------------------------------------------------------------------------- knn

class CosineKNNHead(_Head):
    """Cosine k-nearest-neighbours: the zero-training baseline. Keeps the training rows as
    given (no normalised copy: each similarity is scaled by the row's inverse norm) and
    their labels; ``predict_proba`` is the share of the k votes per class.

    The search (:func:`top_k`) is a float32 blocked matrix product, a tile of queries
    against a tile of training rows at a time, keeping a running top-k per query: a tile
    only goes through a selection for the entries above the current k-th best, so after
    the first tile the cost is the product itself.
    """

    def __init__(self, k=10, random_state=0):
        self.k, self.random_state = k, random_state

    def fit(self, X, y, X_flip=None):
        yi = self._encode(y)
        blocks = _blocks(X, X_flip)
        self.index_ = blocks
        self.index_inv_norm_ = np.concatenate([_inv_norms(b) for b in blocks])
        self.index_labels_ = np.tile(yi, len(blocks))
        self.n_features_in_ = blocks[0].shape[1]
        return self

    def neighbours(self, X, k: int) -> np.ndarray:
        """Indices into the index of the ``k`` most similar rows, most similar first."""
        return top_k(_f32(X), self.index_, self.index_inv_norm_, k)[1]

    def _votes(self, nbrs: np.ndarray, k: int) -> np.ndarray:
        K = len(self.classes_)
        lab = self.index_labels_[nbrs[:, :k]]
        P = np.zeros((len(nbrs), K), np.float32)
        for c in range(K):
            P[:, c] = (lab == c).sum(1)
        return P / k

    def _proba(self, X):
        return self._votes(self.neighbours(X, self.k), self.k)

    def score_grid(self, grid, X_fit, y_fit, X_val, y_val, X_fit_flip=None, X_val_flip=None):
        """Validation accuracy of every ``k`` from one neighbour search."""
        self.fit(X_fit, y_fit, X_fit_flip)
        kmax = max(g["k"] for g in grid)
        nb = self.neighbours(X_val, kmax)
        nb_f = self.neighbours(X_val_flip, kmax) if X_val_flip is not None else None
        out = []
        for g in grid:
            P = self._votes(nb, g["k"])
            if nb_f is not None:
                P = (P + self._votes(nb_f, g["k"])) / 2
            out.append((dict(g), float(np.mean(self.classes_[P.argmax(1)] == y_val))))
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        if "index_" in state:   # a saved head holds its rows, not views of a shared file
            state["index_"] = [np.ascontiguousarray(b) for b in state["index_"]]
        return state


def _inv_norms(X: np.ndarray) -> np.ndarray:
    out = np.empty(len(X), np.float32)
    for i in range(0, len(X), 8192):
        b = X[i:i + 8192]
        out[i:i + 8192] = 1.0 / np.maximum(np.sqrt(np.einsum("ij,ij->i", b, b)), 1e-12)
    return out


def top_k(Q: np.ndarray, index, inv_norm: np.ndarray, k: int, *, q_block: int = 1024,
          i_block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices), each (len(Q), k), of the ``k`` rows of ``index`` (a list of
    float32 (n_i, D) blocks, indexed as if concatenated) with the largest cosine
    similarity to each query row, most similar first (equal similarities: lower index
    first). Deterministic: the same inputs give the same answer in any process.

    Tiles of ``q_block`` queries x ``i_block`` rows: ``S = q @ rows.T`` (float32 BLAS),
    scaled by the rows' inverse norms; only entries above the query's current k-th best
    are merged into its running top-k (``np.argpartition`` over k + the survivors)."""
    n = sum(len(b) for b in index)
    k = max(1, min(int(k), n))
    out_s = np.empty((len(Q), k), np.float32)
    out_i = np.empty((len(Q), k), np.int64)
    for q0 in range(0, len(Q), q_block):
        q = np.asarray(Q[q0:q0 + q_block], dtype=np.float32)
        q = q * _inv_norms(q)[:, None]
        nq = len(q)
        best_s = np.full((nq, k), -np.inf, np.float32)
        best_i = np.full((nq, k), n, np.int64)
        thr = np.full(nq, -np.inf, np.float32)
        offset = 0
        for block in index:
            for i0 in range(0, len(block), i_block):
                S = q @ np.asarray(block[i0:i0 + i_block]).T
                S *= inv_norm[offset + i0:offset + i0 + S.shape[1]]
                if offset + i0 == 0 and S.shape[1] >= k:   # first tile: select directly
                    keep = np.argpartition(-S, k - 1, axis=1)[:, :k]
                    best_s = np.take_along_axis(S, keep, 1)
                    best_i = keep.astype(np.int64)
                    thr = best_s.min(axis=1)
                    continue
                rows, cols = np.nonzero(S > thr[:, None])
                if len(rows) == 0:
                    continue
                counts = np.bincount(rows, minlength=nq)
                pos = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]
                m = int(counts.max())
                cand_s = np.full((nq, m), -np.inf, np.float32)
                cand_i = np.full((nq, m), n, np.int64)
                cand_s[rows, pos] = S[rows, cols]
                cand_i[rows, pos] = cols + (offset + i0)
                all_s = np.concatenate([best_s, cand_s], axis=1)
                all_i = np.concatenate([best_i, cand_i], axis=1)
                # k largest, ties broken towards the lower index: sort key (-s, index)
                keep = np.argpartition(-all_s, k - 1, axis=1)[:, :k] if all_s.shape[1] > k \
                    else np.broadcast_to(np.arange(k), (nq, k))
                best_s = np.take_along_axis(all_s, keep, 1)
                best_i = np.take_along_axis(all_i, keep, 1)
                thr = best_s.min(axis=1)
            offset += len(block)
        order = np.lexsort((best_i, -best_s), axis=1)
        out_s[q0:q0 + nq] = np.take_along_axis(best_s, order, 1)
        out_i[q0:q0 + nq] = np.take_along_axis(best_i, order, 1)
    return out_s, out_i


@register_head("knn", grid=[{"k": k} for k in (1, 5, 10, 20, 50)], keras=False, cost=1.0)
def knn(random_state=0, **params):
    """Cosine k-nearest-neighbours (k chosen on validation): the zero-training baseline."""
    return CosineKNNHead(random_state=random_state, **params)


# --------------------------------------------------------------------------- dense (Keras)

class DenseHead(_Head):
    """The tutorial's head: Normalization -> Dense(hidden, relu) -> [Dropout] ->
    Dense(n_classes, softmax), Adam. With validation data (selection) it early-stops on
    validation accuracy, restores the best epoch's weights and records that epoch count in
    ``best_epochs_``; a refit on all training rows (``--search exhaustive``) then runs
    exactly ``epochs``, while ``--search fast`` keeps the early-stopped model. With ``X_flip`` every sample is drawn
    plain or mirrored at random each epoch (augmentation at no extra cost per epoch).

    ``members > 1`` trains that many such networks (seeds ``random_state + i``) and
    averages their probabilities inside one Keras model (``model_``), so the ensemble
    saves, loads and exports like a single dense head; ``best_epochs_`` is then the
    members' mean best epoch.
    """

    def __init__(self, hidden=1024, dropout=0.5, learning_rate=1e-3, batch_size=512,
                 epochs=30, patience=3, members=1, random_state=0):
        self.hidden, self.dropout, self.learning_rate = hidden, dropout, learning_rate
        self.batch_size, self.epochs, self.patience = batch_size, epochs, patience
        self.members = members
        self.random_state = random_state

    def _build(self, dim: int, n_classes: int, mean, var, name="featcache_dense_head"):
        import keras

        inp = keras.Input((dim,), dtype="float32", name="features")
        x = keras.layers.Normalization(mean=mean, variance=var, name="standardize")(inp)
        x = keras.layers.Dense(self.hidden, activation="relu", name="hidden")(x)
        if self.dropout:
            x = keras.layers.Dropout(self.dropout, name="dropout")(x)
        out = keras.layers.Dense(n_classes, activation="softmax", name="proba")(x)
        model = keras.Model(inp, out, name=name)
        model.compile(optimizer=keras.optimizers.Adam(self.learning_rate),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    def fit(self, X, y, X_flip=None, validation_data=None):
        import keras

        blocks = _blocks(X, X_flip)
        yi = self._encode(y)
        scaler = Scaler.fit(blocks)
        models, epochs = [], []
        for i in range(max(1, int(self.members))):
            seed = int(self.random_state) + i
            name = "featcache_dense_head" if self.members <= 1 else f"member_{i}"
            model, best = self._fit_one(blocks, yi, scaler, seed, validation_data, name)
            models.append(model)
            epochs.append(best)
        if len(models) == 1:
            self.model_ = models[0]
        else:
            inp = keras.Input((blocks[0].shape[1],), dtype="float32", name="features")
            outs = [m(inp) for m in models]
            self.model_ = keras.Model(inp, keras.layers.Average(name="proba")(outs),
                                      name="featcache_dense_ensemble")
        self.best_epochs_ = int(round(float(np.mean(epochs))))
        self.n_features_in_ = blocks[0].shape[1]
        return self

    def _fit_one(self, blocks, yi, scaler, seed, validation_data, name):
        import keras

        keras.utils.set_random_seed(seed)
        model = self._build(blocks[0].shape[1], len(self.classes_), scaler.mean,
                            scaler.scale ** 2, name)
        data = _Batches(blocks, yi, self.batch_size, seed)
        callbacks, val = [], None
        if validation_data is not None:
            Xv, yv = validation_data[:2]
            yv = np.searchsorted(self.classes_, yv)
            val = _Batches([_f32(Xv)], yv, 4096, shuffle=False)
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor="val_accuracy", patience=self.patience, restore_best_weights=True))
        hist = model.fit(data, epochs=self.epochs, validation_data=val,
                         callbacks=callbacks, verbose=0)
        acc = hist.history.get("val_accuracy")
        return model, (int(np.argmax(acc)) + 1 if acc else int(self.epochs))

    def _proba(self, X):
        out = np.empty((len(X), len(self.classes_)), np.float32)
        for i in range(0, len(X), 4096):
            out[i:i + 4096] = np.asarray(self.model_(X[i:i + 4096], training=False))
        return out

    def score_grid(self, grid, X_fit, y_fit, X_val, y_val, X_fit_flip=None, X_val_flip=None):
        """Per grid point: early-stopped fit; the chosen ``epochs`` is the best epoch.
        Leaves this estimator fitted as the best grid point (first of equals)."""
        out, best = [], None
        for g in grid:
            self.set_params(**g).fit(X_fit, y_fit, X_fit_flip, validation_data=(X_val, y_val))
            acc = float(np.mean(self.predict(X_val, X_val_flip) == y_val))
            out.append(({**g, "epochs": self.best_epochs_}, acc))
            if best is None or acc > best[0]:
                best = (acc, dict(g), self.model_, self.best_epochs_)
        if best is not None and len(grid) > 1:
            self.set_params(**best[1])
            self.model_, self.best_epochs_ = best[2], best[3]
        return out

    def to_keras(self):
        return self.model_

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("model_", None)
        return state


class _Batches:
    """Keras ``PyDataset`` factory: shuffled mini-batches that pick, per sample and epoch,
    one of the given feature blocks (plain or mirrored) without concatenating them."""

    def __new__(cls, blocks, y, batch_size, seed=0, shuffle=True):
        import keras

        class Batches(keras.utils.PyDataset):
            def __init__(self):
                super().__init__()
                self.rng = np.random.default_rng(seed)
                self.order = np.arange(len(y))
                self.choice = np.zeros(len(y), np.int64)
                self.on_epoch_end()

            def __len__(self):
                return -(-len(y) // batch_size)

            def __getitem__(self, i):
                idx = np.sort(self.order[i * batch_size:(i + 1) * batch_size])
                x = blocks[0][idx]
                if len(blocks) > 1:
                    pick = self.choice[idx] == 1
                    x[pick] = blocks[1][idx[pick]]
                return x, y[idx]

            def on_epoch_end(self):
                if shuffle:
                    self.rng.shuffle(self.order)
                    self.choice = self.rng.integers(0, len(blocks), len(y))

        return Batches()


@register_head("dense", grid=[{"dropout": 0.5}], cost=1.5, tensorflow=True, refit=False)
def dense(random_state=0, **params):
    """Keras Dense(1024, relu) -> Dense(n_classes, softmax), Adam, early-stopped epochs."""
    return DenseHead(random_state=random_state, **params)


@register_head("dense_ens", default=False, grid=[{"dropout": 0.5}], cost=4.5, tensorflow=True,
               refit=False, members=3)
def dense_ens(random_state=0, **params):
    """Three `dense` heads (seeds differ), probabilities averaged in one Keras model; 3x the time."""
    return DenseHead(random_state=random_state, **params)


# --------------------------------------------------------------------------- save / load

def save_head(estimator, directory, name: str) -> Path:
    """Write a fitted head to ``directory/<name>.joblib`` (dense: ``<name>.keras`` and
    ``<name>.json``), atomically; return the main file's path."""
    import joblib

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(estimator, DenseHead):
        path = directory / f"{name}.keras"
        with replacing(path, ".keras") as tmp:
            estimator.model_.save(tmp)
        meta = {"class": "DenseHead", "params": estimator.get_params(),
                "classes": estimator.classes_.tolist(), "best_epochs": estimator.best_epochs_,
                "n_features_in": estimator.n_features_in_}
        write_text(directory / f"{name}.json", json.dumps(meta, indent=2))
        return path
    path = directory / f"{name}.joblib"
    with replacing(path, ".joblib") as tmp:
        joblib.dump(estimator, tmp)
    return path


def load_head(path):
    """A fitted head saved by :func:`save_head` (``.joblib``, or ``.keras`` + ``.json``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no saved head at {path}; run `featcache heads` first")
    if path.suffix == ".keras":
        import keras

        meta = json.loads(path.with_suffix(".json").read_text())
        head = DenseHead(**meta["params"])
        head.model_ = keras.models.load_model(path)
        head.classes_ = np.asarray(meta["classes"])
        head.best_epochs_ = meta["best_epochs"]
        head.n_features_in_ = meta["n_features_in"]
        return head
    import joblib

    return joblib.load(path)
