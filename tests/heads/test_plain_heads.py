"""Any scikit-learn classifier as a head: through ``compare_heads`` (registered with
``register_head``, as docs/stage-two.md shows) and through ``featcache heads --heads
module:attr`` (the documented way for the CLI and ``make heads``), mirrored features
included: extra training rows for ``train_flip``, averaged predictions for ``tta``."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from stage_two_util import blobs, make_feature_file

from featcache.cli.main import main
from featcache.compare.comparison import compare_heads
from featcache.config import HeadsConfig
from featcache.errors import ConfigError
from featcache.heads import HEADS, SklearnHead, load_head, register_head, resolve_heads


@pytest.fixture
def registered():
    """The docs' RidgeClassifier example and a LogisticRegression, registered for one test."""
    @register_head("ridge", default=False, grid=[{"alpha": a} for a in (1.0, 10.0)],
                   keras=False)
    def ridge(random_state=0, **params):
        """Ridge classifier."""
        return RidgeClassifier(**params)

    @register_head("sk_logreg", default=False, grid=[{"C": c} for c in (0.1, 1.0)],
                   keras=False)
    def sk_logreg(random_state=0, **params):
        """scikit-learn's logistic regression."""
        return LogisticRegression(random_state=random_state, max_iter=200, **params)

    yield
    for name in ("ridge", "sk_logreg"):
        HEADS.pop(name, None)


def test_plain_sklearn_classifiers_run_through_compare_heads(tmp_path, registered):
    path = make_feature_file(tmp_path / "f.h5", n_train=400, n_test=200)
    res = compare_heads(HeadsConfig(str(path), heads=("ridge", "sk_logreg"), flip="both",
                                    out_dir=str(tmp_path / "out"), workers=0))
    rows = {r["name"]: r for r in res["rows"]}
    assert set(rows) == {"ridge", "ridge+flip", "sk_logreg", "sk_logreg+flip"}
    for r in rows.values():
        assert r["test_accuracy"] > 0.4, r["name"]          # 4 overlapping blobs: chance 0.25
        assert [s["params"] for s in r["selection"]] == list(HEADS[r["head"]].grid)
    assert rows["ridge+flip"]["n_train"] == 2 * rows["ridge"]["n_train"]
    # the saved head is the user's own estimator, fitted on plain + mirrored rows
    again = load_head(tmp_path / "out" / rows["ridge+flip"]["saved"])
    assert isinstance(again, RidgeClassifier)
    assert again.alpha == rows["ridge+flip"]["params"]["alpha"]


def _data():
    X, y, Xf = blobs(300, dim=8, k=3, sep=1.0, seed=4)
    return X[:200], y[:200], Xf[:200], X[200:], Xf[200:]


def test_mirrors_are_extra_training_rows_and_predictions_are_averaged():
    X, y, Xf, Xt, Xtf = _data()
    head = SklearnHead(LogisticRegression(max_iter=500)).fit(X, y, Xf)
    ref = LogisticRegression(max_iter=500).fit(np.concatenate([X, Xf]), np.concatenate([y, y]))
    np.testing.assert_allclose(head.estimator.coef_, ref.coef_, rtol=1e-6)
    P = (ref.predict_proba(Xt) + ref.predict_proba(Xtf)) / 2
    np.testing.assert_array_equal(head.predict(Xt, Xtf), ref.classes_[P.argmax(1)])
    np.testing.assert_allclose(head.predict_proba(Xt, Xtf), P, rtol=1e-6)
    # no predict_proba: decision_function is averaged
    ridge = SklearnHead(RidgeClassifier()).fit(X, y)
    D = (ridge.estimator.decision_function(Xt) + ridge.estimator.decision_function(Xtf)) / 2
    np.testing.assert_array_equal(ridge.predict(Xt, Xtf), ridge.classes_[D.argmax(1)])
    assert not np.array_equal(ridge.predict(Xt, Xtf), ridge.predict(Xtf))  # really both


class _PredictOnly(ClassifierMixin, BaseEstimator):
    """Nearest class mean, with neither predict_proba nor decision_function."""

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        self.means_ = np.stack([X[y == c].mean(0) for c in self.classes_])
        return self

    def predict(self, X):
        d = ((X[:, None, :] - self.means_[None]) ** 2).sum(-1)
        return self.classes_[d.argmin(1)]


def test_a_classifier_without_scores_predicts_plain_rows_only():
    X, y, Xf, Xt, Xtf = _data()
    head = SklearnHead(_PredictOnly()).fit(X, y, Xf)
    np.testing.assert_array_equal(head.predict(Xt, Xtf), head.estimator.predict(Xt))


USER_MODULE = '''
from sklearn.linear_model import RidgeClassifier
from featcache.heads import register_head


@register_head("user_ridge", default=False, grid=[{"alpha": 1.0}, {"alpha": 30.0}],
               keras=False)
def user_ridge(random_state=0, **params):
    """A user's ridge head."""
    return RidgeClassifier(**params)
'''


@pytest.mark.parametrize("workers", [0, 2])
def test_cli_runs_a_user_head_named_module_colon_attr(tmp_path, capsys, workers):
    """``--heads path/file.py:factory`` and ``--heads sklearn.linear_model:RidgeClassifier``
    (``make heads HEADS=...``): with worker processes too, which import the module again."""
    (tmp_path / "myheads.py").write_text(USER_MODULE)
    path = make_feature_file(tmp_path / "f.h5", n_train=300, n_test=100)
    try:
        heads = f"logreg,{tmp_path / 'myheads.py'}:user_ridge,sklearn.linear_model:RidgeClassifier"
        assert main(["heads", str(path), "--heads", heads, "--flip", "both", "-q",
                     "--workers", str(workers), "--out-dir", str(tmp_path / "out")]) == 0
        out = capsys.readouterr().out
        for row in ("user_ridge", "user_ridge+flip", "RidgeClassifier", "RidgeClassifier+flip"):
            assert f"| {row} " in out or f" {row} " in out, (row, out)
        import json

        res = json.loads((tmp_path / "out" / "results.json").read_text())
        rows = {r["name"]: r for r in res["rows"]}
        assert [s["params"] for s in rows["user_ridge"]["selection"]] == \
            [{"alpha": 1.0}, {"alpha": 30.0}]
        assert rows["RidgeClassifier"]["test_accuracy"] > 0.4
    finally:
        HEADS.pop("user_ridge", None), HEADS.pop("RidgeClassifier", None)


def test_user_head_errors_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="cannot import"):
        resolve_heads("no_such_module_xyz:Thing")
    with pytest.raises(ConfigError, match="has no 'Nope'"):
        resolve_heads("sklearn.linear_model:Nope")
    with pytest.raises(ConfigError, match="module:attr"):
        resolve_heads("svm")


def test_a_head_saved_under_a_module_path_that_is_gone_is_one_line_naming_make_heads(tmp_path):
    """A head pickled by a layout whose module no longer exists (the package's earlier name,
    say) is refused with what to do; so is a damaged file."""
    old = tmp_path / "logreg.joblib"
    # a pickle of an instance of old_package.heads.linear.LinearHead: GLOBAL, NEWOBJ, BUILD
    old.write_bytes(b"\x80\x02cold_package.heads.linear\nLinearHead\nq\x00)\x81q\x01}q\x02b.")
    with pytest.raises(ConfigError, match=r"saved by another featcache version .*make heads"):
        load_head(old)
    damaged = tmp_path / "knn.joblib"
    damaged.write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(ConfigError, match=r"not a readable saved head .*make heads"):
        load_head(damaged)


def test_heads_saved_without_a_feature_file_load_with_a_warning_and_a_shape_check(
        tmp_path, caplog):
    """A head saved before heads recorded their feature file (or saved outside stage two)
    still loads, with a warning; its width and classes are checked against the file."""
    import logging

    from featcache.heads import get_head, save_head

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(80, 16)).astype(np.float32), np.arange(80) % 4
    path = save_head(get_head("logreg").fit(X, y), tmp_path, "logreg")
    ident = {"feature_file": "f.h5", "config_sha256": "0" * 64,
             "classes": ["a", "b", "c", "d"], "n_features": 16}
    with caplog.at_level(logging.WARNING, logger="featcache"):
        head = load_head(path, fitted_on=ident)
    assert head.predict(X[:3]).shape == (3,)
    assert any("records no feature file it was fitted on" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ConfigError, match=r"scores 4 classes \(labels 0..3\) but f.h5 has 3"):
        load_head(path, fitted_on={**ident, "classes": ["a", "b", "c"]})
    with pytest.raises(ConfigError, match=r"scores 4 classes .* but f.h5 has 5"):
        load_head(path, fitted_on={**ident, "classes": list("abcde")})
    with pytest.raises(ConfigError, match="takes features of width 16 but f.h5 has 8"):
        load_head(path, fitted_on={**ident, "n_features": 8})


def test_a_dense_head_carries_its_feature_file_in_its_json(tmp_path):
    from featcache.heads import HEADS, fitted_on, record_fitted_on, save_head

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 8)).astype(np.float32), np.arange(40) % 2
    head = HEADS["dense"].make(random_state=0, epochs=1, hidden=4).fit(X, y)
    ident = {"feature_file": "a.h5", "config_sha256": "1" * 64, "classes": ["x", "y"],
             "n_features": 8}
    record_fitted_on(head, ident)
    path = save_head(head, tmp_path, "dense")
    assert fitted_on(load_head(path, fitted_on=ident)) == ident
    with pytest.raises(ConfigError, match=r"dense.keras was fitted on a.h5 \(other class "
                                          r"names: y vs z\), not on b.h5"):
        load_head(path, fitted_on={**ident, "feature_file": "b.h5", "classes": ["x", "z"]})
