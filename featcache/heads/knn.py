"""The cosine k-nearest-neighbours head ``knn``: :class:`CosineKNNHead` and its blocked
float32 search :func:`top_k`.

Reads and writes nothing (a saved kNN head holds its training rows, projected: the model
is the data). ``to_keras`` builds a Keras model (built-in layers and ``keras.ops.top_k``)
through :func:`featcache.heads.dense.keras_module`.
"""

from __future__ import annotations

import numpy as np

from featcache.heads.base import Head
from featcache.heads.registry import register_head
from featcache.heads.solver import PRECOND_ROWS, covariance

#: At most one principal component per this many training rows. On real MobileNetV2
#: features (CIFAR-10 subsets, accuracy on other training rows, 3 seeds), 2 classes x 50
#: rows: knn / knn+flip 93.0 / 91.4% with 256 whitened components, 95.6 / 96.2% with 25;
#: 10 classes x 50: 65.8 / 69.9% vs 67.8 / 70.2%; 10 x 300 rows keeps 256 components
#: (docs/stage-two.md, "kNN on small data").
ROWS_PER_COMPONENT = 4


class CosineKNNHead(Head):
    """Cosine k-nearest-neighbours: the zero-training baseline. ``predict_proba`` is the
    share of the k votes per class.

    With ``dim`` (default 256) the rows are first projected on the training rows' top
    ``dim`` principal components, scaled to unit variance when ``whiten`` (PCA fitted on an
    evenly strided sample of at most 20,000 training rows, mirrors included): on real
    MobileNetV2 features this scored 1.0-1.5 points *higher* on validation than cosine on
    the raw 1,280 dimensions, at a fifth of the search's cost (docs/stage-two.md, "kNN in a
    whitened PCA space"). On small data the components are capped at one per
    :data:`ROWS_PER_COMPONENT` training rows (``dim_``, mirrors not counted): whitening
    the last components of a few hundred rows scales their noise (and, with mirrors, the
    plain-vs-mirrored differences) up to the size of the signal, which made ``knn+flip``
    worse than ``knn`` on a 100-image folder. The head keeps the projected training rows
    (``dim / D`` of the data: 20% at D = 1,280) and their labels; ``dim=None`` (or
    ``dim >= D``) keeps the rows as given, without any copy. Similarities are scaled by
    each row's inverse norm (no normalised copy).

    The search (:func:`top_k`) is a float32 blocked matrix product, a tile of queries
    against a tile of training rows at a time, keeping a running top-k per query: a tile
    only goes through a selection for the entries above the current k-th best, so after
    the first tile the cost is the product itself.

    ``to_keras`` is the same search as one Keras model (see there); it holds the index as
    a float32 weight, so an exported kNN is as large as its index.
    """

    def __init__(self, k=10, dim=256, whiten=True, random_state=0):
        self.k, self.dim, self.whiten, self.random_state = k, dim, whiten, random_state

    def fit(self, X, y, X_flip=None):
        blocks, yi = self._validate_fit(X, y, X_flip)
        D = blocks[0].shape[1]
        self.projection_ = self.offset_ = None
        n_dim = min(int(self.dim), max(1, len(blocks[0]) // ROWS_PER_COMPONENT)) \
            if self.dim else D
        self.dim_ = n_dim
        if n_dim < D:
            mean = (sum(b.sum(0, dtype=np.float64) for b in blocks)
                    / sum(len(b) for b in blocks)).astype(np.float32)
            w, U = np.linalg.eigh(covariance(blocks, mean, max_rows=PRECOND_ROWS))
            w, U = w[::-1][:n_dim], U[:, ::-1][:, :n_dim]
            if self.whiten:
                U = U / np.sqrt(np.maximum(w, 1e-6 * max(float(w.max()), 1e-30)))
            self.projection_ = U.astype(np.float32)
            self.offset_ = (mean @ self.projection_).astype(np.float32)
            blocks = [self._project(b) for b in blocks]
        self.index_ = blocks
        self.index_inv_norm_ = np.concatenate([inv_norms(b) for b in blocks])
        self.index_labels_ = np.tile(yi, len(blocks))
        return self

    def _project(self, X) -> np.ndarray:
        """Rows in the head's search space (the PCA projection, or as given)."""
        if self.projection_ is None:
            return X
        out = np.empty((len(X), self.projection_.shape[1]), np.float32)
        for i in range(0, len(X), 8192):
            np.matmul(X[i:i + 8192], self.projection_, out=out[i:i + 8192])
        out -= self.offset_
        return out

    def neighbours(self, X, k: int) -> np.ndarray:
        """Indices into the index of the ``k`` most similar rows, most similar first."""
        return top_k(self._project(self._validate(X)), self.index_, self.index_inv_norm_,
                     k)[1]

    def _votes(self, nbrs: np.ndarray, k: int) -> np.ndarray:
        K = len(self.classes_)
        lab = self.index_labels_[nbrs[:, :k]]
        P = np.zeros((len(nbrs), K), np.float32)
        for c in range(K):
            P[:, c] = (lab == c).sum(1)
        return P / k

    def _proba(self, X):
        return self._votes(top_k(self._project(X), self.index_, self.index_inv_norm_,
                                 self.k)[1], self.k)

    def near_ties(self, X, tol: float = 1e-5) -> np.ndarray:
        """(len(X),) bool: rows whose k-th and (k+1)-th most similar index rows are within
        ``tol`` in cosine similarity (relative to the rows' scaled lengths: 1, but for rows
        shorter than 1e-12, which are not scaled up to unit length). Only there can another
        float32 computation of the similarities (``to_keras``, another BLAS; they differ by
        ~1e-6) pick other neighbours, and so other votes; elsewhere both take the same k
        neighbours."""
        X = self._validate(X)
        n = len(self.index_labels_)
        k = max(1, min(int(self.k), n))
        if k >= n:
            return np.zeros(len(X), bool)
        Q = self._project(X)
        s = top_k(Q, self.index_, self.index_inv_norm_, k + 1)[0]
        longest, offset = 0.0, 0
        for block in self.index_:
            for i in range(0, len(block), 8192):
                b = np.asarray(block[i:i + 8192], np.float32)
                at = offset + i
                length = np.sqrt(np.einsum("ij,ij->i", b, b)) * self.index_inv_norm_[at:at + len(b)]
                longest = max(longest, float(length.max(initial=0.0)))
            offset += len(block)
        scale = np.sqrt(np.einsum("ij,ij->i", Q, Q)) * inv_norms(Q) * longest
        return (s[:, k - 1] - s[:, k]) <= tol * scale

    def to_keras(self):
        """A Keras model, features (None, D) -> the share of the k votes per class, made of
        built-in layers and one ``keras.ops.top_k`` (so a saved model loads in plain Keras,
        safe mode, and converts to TFLite's builtin TOPK_V2):

        ``Dense`` (the PCA projection: ``x @ projection_ - offset_``; none with ``dim=None``)
        -> ``UnitNormalization`` -> ``Dense`` without bias whose kernel is the index rows,
        pre-normalised, transposed (cosine similarities, float32) -> ``top_k`` -> an
        ``Embedding`` holding each row's label -> ``CategoryEncoding`` (one-hot) ->
        ``GlobalAveragePooling1D`` (P[:, c] = the share of the k votes, as
        :meth:`predict_proba`).

        Equal similarities: ``top_k`` puts the lower index first, as :func:`top_k` does, but
        the two compute the similarities in a different float32 order, so where the k-th and
        (k+1)-th similarity are within rounding (:meth:`near_ties`) the model may take the
        other neighbour and its votes differ by 1/k per class; elsewhere the probabilities
        are the same to float32 rounding.

        Memory: the kernel is n_index x dim float32 (n_index = training rows, twice that
        with mirrors; dim = the PCA ``dim``, or D), plus one float32 label per row: a
        50,000-row CIFAR-10 index at dim 256 is ~51 MB, ~102 MB with mirrors, in memory and
        in the saved model; each call also holds a batch x n_index similarity matrix."""
        from featcache.heads.dense import keras_module

        keras = keras_module()
        L = keras.layers
        n = len(self.index_labels_)
        d = self.index_[0].shape[1]
        K = len(self.classes_)
        k = max(1, min(int(self.k), n))
        rows = np.empty((d, n), np.float32)   # the index, unit rows, as columns
        offset = 0
        for block in self.index_:
            for i in range(0, len(block), 8192):
                b = np.asarray(block[i:i + 8192], np.float32)
                at = offset + i
                rows[:, at:at + len(b)] = (b * self.index_inv_norm_[at:at + len(b), None]).T
            offset += len(block)
        inp = keras.Input((self.n_features_in_,), dtype="float32", name="features")
        x = inp
        if self.projection_ is not None:
            pca = L.Dense(d, trainable=False, name="pca")
            x = pca(x)
            pca.set_weights([self.projection_, -self.offset_])
        x = L.UnitNormalization(name="unit_norm")(x)
        sim = L.Dense(n, use_bias=False, trainable=False, name="similarities")
        s = sim(x)
        sim.set_weights([rows])
        del rows
        _, nbrs = keras.ops.top_k(s, k, sorted=True)
        labels = L.Embedding(n, 1, trainable=False, name="labels")
        votes = L.CategoryEncoding(K, output_mode="one_hot", name="votes")(labels(nbrs))
        labels.set_weights([self.index_labels_.astype(np.float32)[:, None]])
        out = L.GlobalAveragePooling1D(name="proba" if k == int(self.k) else "share")(votes)
        if k != int(self.k):   # k > n_index: all rows vote, each 1 / self.k, as _votes
            out = L.Rescaling(k / int(self.k), name="proba")(out)
        return keras.Model(inp, out, name="featcache_knn_head")

    def score_grid(self, grid, X_fit, y_fit, X_val, y_val, X_fit_flip=None, X_val_flip=None,
                   *, stop_early: bool = False, label: str = ""):
        """Validation accuracy of every ``k`` from one neighbour search (all of them:
        scoring another k costs nothing, so ``stop_early`` is not needed)."""
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
        state = super().__getstate__()
        if "index_" in state:   # a saved head holds its rows, not views of a shared file
            state["index_"] = [np.ascontiguousarray(b) for b in state["index_"]]
        return state


def inv_norms(X: np.ndarray) -> np.ndarray:
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
        q = q * inv_norms(q)[:, None]
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


@register_head("knn", grid=[{"k": k} for k in (100, 50, 20, 10, 5, 1)], keras=True, cost=1.6)
def knn(random_state=0, **params):
    """Cosine k-nearest-neighbours in the whitened PCA-256 space (k chosen on validation): the
    zero-training baseline."""
    return CosineKNNHead(random_state=random_state, **params)
