"""Head registry and estimator contract, parametrized over every registered head."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from stage_two_util import blobs

from featcache.errors import ConfigError
from featcache.heads import HEADS, default_heads, load_head, register_head, resolve_heads, save_head

# Smaller settings so every head fits in about a second (the grid is not under test here).
FAST = {"dense": {"hidden": 32, "epochs": 10, "batch_size": 32},
        "rbf_svm": {"n_components": 256, "n_pca": 8}}


#: Heads that take feature arrays (``finetune`` takes file rows: tests/heads/test_finetune.py).
ARRAY_HEADS = [n for n, s in HEADS.items() if s.file_rows is None]


def _make(name, **kw):
    return HEADS[name].make(random_state=0, **{**FAST.get(name, {}), **kw})


@pytest.fixture(scope="module")
def data():
    X, y, Xf = blobs(400, dim=16, k=4, sep=3.0, seed=1)
    Xt, yt, Xtf = blobs(200, dim=16, k=4, sep=3.0, seed=1)  # same centres (same seed)
    return X[:300], y[:300], Xf[:300], X[300:], y[300:], Xf[300:]


@pytest.fixture(scope="module")
def fitted(data):
    X, y, *_ = data
    return {name: _make(name).fit(X, y) for name in ARRAY_HEADS}


@pytest.mark.parametrize("name", ARRAY_HEADS)
def test_contract(name, data, fitted):
    X, y, _, Xt, yt, _ = data
    est = fitted[name]
    assert isinstance(_make(name).fit(X, y), type(est))          # fit returns self
    assert list(est.classes_) == [0, 1, 2, 3]
    assert "random_state" in est.get_params()
    clone(est)                                                    # sklearn-clonable params
    P = est.predict_proba(Xt)
    assert P.shape == (len(Xt), 4)
    np.testing.assert_allclose(P.sum(1), 1.0, atol=1e-5)
    pred = est.predict(Xt)
    np.testing.assert_array_equal(pred, est.classes_[P.argmax(1)])
    assert np.mean(pred == yt) > 0.9, "separable blobs must be learned"
    # learned state ends in "_"; nothing else public appears after fit
    params = set(est.get_params())
    extra = [k for k in vars(est) if k not in params and not k.startswith("_")]
    assert all(k.endswith("_") for k in extra), extra


@pytest.mark.parametrize("name", ARRAY_HEADS)
def test_string_labels_and_flip(name, data):
    X, y, Xf, Xt, yt, Xtf = data
    names = np.array(["a", "b", "c", "d"])
    est = _make(name).fit(X, names[y], X_flip=Xf)
    assert list(est.classes_) == list(names)
    pred = est.predict(Xt, X_flip=Xtf)
    assert np.mean(pred == names[yt]) > 0.9
    P = (est.predict_proba(Xt) + est.predict_proba(Xtf)) / 2
    np.testing.assert_allclose(est.predict_proba(Xt, X_flip=Xtf), P, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in ARRAY_HEADS if HEADS[n].keras])
def test_to_keras_matches_predict_proba(name, fitted, data):
    X, y, _, Xt, *_ = data
    est = fitted[name]
    model = est.to_keras()
    assert model.input_shape == (None, X.shape[1])
    out = np.asarray(model.predict(Xt, verbose=0))
    np.testing.assert_allclose(out, est.predict_proba(Xt), atol=1e-5)
    np.testing.assert_array_equal(est.classes_[out.argmax(1)], est.predict(Xt))


@pytest.mark.parametrize("name", ARRAY_HEADS)
def test_save_and_load(name, fitted, data, tmp_path):
    Xt = data[3]
    path = save_head(fitted[name], tmp_path / "heads", name)
    assert path.is_file()
    again = load_head(path)
    np.testing.assert_allclose(again.predict_proba(Xt), fitted[name].predict_proba(Xt),
                               atol=1e-6)


def test_load_head_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no saved head"):
        load_head(tmp_path / "nope.joblib")


def _peak_bytes(fn) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", ["logreg", "linear_svm"])
def test_no_float64_copy_of_features(name):
    """Peak extra memory of fit stays well below one float64 copy of the (N, D) matrix;
    scikit-learn's own pipeline (the control) does make one, so the probe can see it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y, _ = blobs(20000, dim=64, k=4, sep=1.0, seed=2)
    f64 = X.size * 8
    control = _peak_bytes(lambda: make_pipeline(StandardScaler(), LogisticRegression(
        max_iter=5)).fit(X, y))
    assert control > f64, "the probe must see scikit-learn's float64 copy"
    ours = _peak_bytes(lambda: _make(name, max_iter=5).fit(X, y))
    assert ours < 0.5 * f64, f"{name} peak {ours / 2**20:.1f} MiB"


def test_logreg_matches_scikit_learn(data):
    """Same objective as scikit-learn's multinomial LogisticRegression on standardized rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y, _ = blobs(600, dim=16, k=4, sep=0.7, seed=3)
    ours = _make("logreg", C=0.1, tol=1e-6, max_iter=1000).fit(X, y)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, tol=1e-8, max_iter=2000))
    ref.fit(X.astype(np.float64), y)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=2e-3)


def test_registry_resolution():
    assert resolve_heads("") == default_heads()
    assert resolve_heads("logreg, knn") == ["logreg", "knn"]
    with pytest.raises(ConfigError) as err:
        resolve_heads(["logreg", "svm"])
    for name in HEADS:
        assert name in str(err.value)


def test_adding_a_head_is_one_decorated_function(data):
    from sklearn.dummy import DummyClassifier

    @register_head("dummy_test_head", default=False, grid=[{"strategy": "prior"}], keras=False)
    def dummy(random_state=0, **params):
        """Majority class."""
        return DummyClassifier(random_state=random_state, **params)

    try:
        assert "dummy_test_head" in resolve_heads("dummy_test_head")
        assert "dummy_test_head" not in default_heads()
        assert HEADS["dummy_test_head"].summary == "Majority class."
        est = HEADS["dummy_test_head"].make(strategy="prior").fit(data[0], data[1])
        assert est.predict(data[3]).shape == (len(data[3]),)
    finally:
        del HEADS["dummy_test_head"]


@pytest.mark.parametrize("name", ["logreg", "rbf_svm"])
def test_warm_start_reaches_the_cold_solution(name):
    """Selection walks C with warm starts: each step must really optimise (a regression:
    a warm start once stopped after one tiny step and kept the previous C's solution)."""
    X, y, _ = blobs(3000, dim=32, k=4, sep=0.5, seed=0)
    kw = {"n_components": 2048, "n_pca": 16} if name == "rbf_svm" else {}
    warm = _make(name, warm_start=True, **kw)
    for C in (0.3, 1.0):
        warm.set_params(C=C).fit(X, y)
    cold = _make(name, C=1.0, **kw).fit(X, y)
    assert warm.n_iter_ > 1
    assert np.mean(warm.predict(X) == cold.predict(X)) > 0.99
    np.testing.assert_allclose(warm.predict_proba(X), cold.predict_proba(X), atol=0.02)


def test_dense_ensemble_is_one_keras_model_that_saves_and_reloads(tmp_path):
    """``dense_ens`` trains several seeded members and averages them inside one Keras model:
    its probabilities are the members' mean, and it saves/loads/exports like ``dense``."""
    from featcache.heads import HEADS, load_head, save_head

    rng = np.random.default_rng(0)
    X = rng.normal(size=(240, 12)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int) + 2 * (X[:, 1] > 0)
    ens = HEADS["dense_ens"].make(random_state=0, epochs=3, hidden=16).fit(X, y)
    assert ens.members == 3
    singles = [HEADS["dense"].make(random_state=s, epochs=3, hidden=16).fit(X, y) for s in range(3)]
    mean = np.mean([h.predict_proba(X) for h in singles], axis=0)
    np.testing.assert_allclose(ens.predict_proba(X), mean, atol=1e-5)
    assert not np.allclose(singles[0].predict_proba(X), mean, atol=1e-3)  # members differ
    again = load_head(save_head(ens, tmp_path, "dense_ens"))
    np.testing.assert_allclose(again.predict_proba(X), ens.predict_proba(X), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ens.to_keras()(X)), ens.predict_proba(X), atol=1e-6)


def test_dense_cosine_schedule_runs_its_epochs_without_early_stopping():
    """--search fast's dense: exactly ``epochs`` epochs, the rate decaying to 0 (no early
    stop even when validation accuracy stalls); the constant schedule early-stops."""
    X, y, Xf = blobs(300, dim=12, k=3, sep=4.0)
    Xv, yv, _ = blobs(90, dim=12, k=3, sep=4.0, seed=1)
    fast = HEADS["dense"].make(random_state=0, hidden=16, **HEADS["dense"].fast_select)
    assert fast.schedule == "cosine" and fast.epochs == 4
    fast.fit(X, y, Xf, validation_data=(Xv, yv))
    assert fast.best_epochs_ == 4
    assert float(fast.model_.optimizer.learning_rate) < 1e-6   # decayed to ~0 at the end
    slow = HEADS["dense"].make(random_state=0, hidden=16, epochs=40, patience=1)
    slow.fit(X, y, validation_data=(Xv[:, ::-1].copy(), yv))    # useless validation rows
    assert slow.best_epochs_ < 40 and slow.schedule == "constant"
    with pytest.raises(ValueError, match="schedule"):
        HEADS["dense"].make(schedule="linear", hidden=4, epochs=1).fit(X, y)


def test_the_registry_order_is_the_documented_one():
    """The registry's order is the comparison's row order, the default heads' order and the
    tie-break between equal validation scores: importing featcache.heads fixes it."""
    from featcache.heads import HEADS, default_heads

    assert list(HEADS)[:7] == ["logreg", "linear_svm", "rbf_svm", "knn", "dense", "dense_ens",
                               "finetune"]
    assert default_heads() == ["logreg", "linear_svm", "knn", "dense"]
