"""The kNN head's Keras form (``CosineKNNHead.to_keras``) against its own search: the same
votes on random and on feature-like rows, with and without the PCA projection and the
mirrors, ties broken towards the lower index, k larger than the index, built-in Keras only.

Offline and small (at most a few thousand rows); Keras is imported by the tests."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.heads import HEADS, CosineKNNHead


def _feature_like(n, D=320, K=10, seed=0):
    """Non-negative, correlated, class-clustered rows (as pooled ReLU features are)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(K, D)).astype(np.float32)
    A = (rng.standard_normal((D, D)) * np.logspace(0, -2, D)[:, None]).astype(np.float32)
    y = rng.integers(0, K, n)
    X = np.maximum(0.7 * centres[y] + rng.standard_normal((n, D)).astype(np.float32) @ A, 0)
    return X.astype(np.float32), y


def _random(n, D=48, K=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, D)).astype(np.float32), rng.integers(0, K, n)


def _keras_proba(model, X):
    return np.asarray(model.predict(X, batch_size=512, verbose=0))


def _check_agreement(head, X):
    """The Keras form's probabilities are the head's to 1e-5 on every row without a near
    tie at the k-th neighbour, its classes agree on >= 99.5% of all rows."""
    want = head.predict_proba(X)
    got = _keras_proba(head.to_keras(), X)
    assert got.shape == want.shape
    tied = head.near_ties(X)
    assert tied.mean() < 0.05, tied.mean()   # the check below covers most rows
    np.testing.assert_allclose(got[~tied], want[~tied], atol=1e-5)
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.995
    return want, got


@pytest.mark.parametrize("rows,params", [
    ("random", {"k": 10, "dim": 32}),
    ("random", {"k": 5, "dim": None}),
    ("feature_like", {"k": 20}),                     # PCA-256, whitened (the registry's head)
    ("feature_like", {"k": 50, "whiten": False}),
])
@pytest.mark.parametrize("mirrors", [False, True])
def test_keras_form_takes_the_same_votes(rows, params, mirrors):
    make = {"random": _random, "feature_like": _feature_like}[rows]
    X, y = make(3000, seed=1)
    Xq, _ = make(2000, seed=2)
    Xf = X + 0.1 * np.random.default_rng(3).normal(size=X.shape).astype(np.float32)
    head = CosineKNNHead(**params).fit(X, y, Xf if mirrors else None)
    assert (head.projection_ is None) is (params.get("dim", 256) is None)
    want, got = _check_agreement(head, Xq)
    # the shares are votes: multiples of 1/k that sum to 1
    k = head.k
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(got * k, np.round(got * k), atol=1e-4)
    assert len(np.unique(want.argmax(1))) > 1


def test_exact_ties_take_the_lower_index_as_the_search_does():
    """Duplicated index rows with other labels: the first of the duplicates votes, in both."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 8)).astype(np.float32)
    X = np.concatenate([base, base])                 # row i and row 40 + i are the same
    y = np.concatenate([np.zeros(40, int), np.ones(40, int)])
    head = CosineKNNHead(k=1, dim=None).fit(X, y)
    want = head.predict_proba(base)
    np.testing.assert_array_equal(want[:, 0], 1.0)   # numpy's search: the lower index
    np.testing.assert_array_equal(_keras_proba(head.to_keras(), base), want)


def test_k_larger_than_the_index_votes_like_the_head():
    X, y = _random(12, D=6, K=3, seed=4)
    head = CosineKNNHead(k=20, dim=None).fit(X, y)
    Xq, _ = _random(30, D=6, seed=5)
    want = head.predict_proba(Xq)
    np.testing.assert_allclose(want.sum(1), 12 / 20, atol=1e-6)   # every row, 1/20 each
    np.testing.assert_allclose(_keras_proba(head.to_keras(), Xq), want, atol=1e-6)


def test_knn_is_exportable_with_built_in_keras_only():
    """The registry says knn has a Keras form; every layer of it is Keras's own (no featcache
    class, no Lambda), and it holds the index as one float32 (dim, n_index) kernel."""
    import keras

    assert HEADS["knn"].keras
    X, y = _feature_like(500, D=300, seed=6)
    head = HEADS["knn"].make(k=5).fit(X, y, X[:, ::-1].copy())
    model = head.to_keras()
    classes = {type(layer) for layer in model.layers}
    assert all(c.__module__.startswith("keras.") for c in classes), classes
    assert keras.layers.Lambda not in classes
    sims = model.get_layer("similarities").get_weights()
    assert [w.shape for w in sims] == [(head.dim_, 1000)] and sims[0].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(sims[0], axis=0), 1.0, atol=1e-5)


def test_saved_keras_form_loads_in_safe_mode(tmp_path):
    import keras

    X, y = _random(400, D=16, K=4, seed=7)
    head = CosineKNNHead(k=7, dim=8).fit(X, y)
    model = head.to_keras()
    model.save(tmp_path / "knn.keras")
    again = keras.saving.load_model(tmp_path / "knn.keras", safe_mode=True)
    Xq, _ = _random(100, D=16, seed=8)
    np.testing.assert_array_equal(_keras_proba(again, Xq), _keras_proba(model, Xq))
    assert np.mean(_keras_proba(again, Xq).argmax(1) == head.predict(Xq)) >= 0.99


def test_near_ties_scale_with_rows_too_short_to_normalise():
    """Rows shorter than 1e-12 (a random-weight backbone's features) are not scaled to unit
    length, so their similarities are tiny: near ties are judged relative to that scale, and
    the Keras form still takes the same votes. A zero query ties everywhere."""
    X, y = _random(300, D=24, K=3, seed=9)
    Xq, _ = _random(200, D=24, seed=10)
    head = CosineKNNHead(k=5, dim=None).fit(X * 1e-17, y)
    assert not head.near_ties(Xq * 1e-17).all()
    _check_agreement(head, Xq * 1e-17)
    unit = CosineKNNHead(k=5, dim=None).fit(X, y)
    np.testing.assert_array_equal(head.near_ties(Xq * 1e-17), unit.near_ties(Xq))
    assert head.near_ties(np.zeros((1, 24), np.float32)).all()
