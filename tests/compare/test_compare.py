"""Stage two's protocol: validation split, selection without the test labels, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from stage_two_util import make_feature_file

from featcache.compare.comparison import compare_heads
from featcache.compare.protocol import SplitData, flip_rows, select, stratified_split
from featcache.config import HeadsConfig
from featcache.errors import ConfigError, CorruptFeatureFile, IncompleteFeatureFile
from featcache.heads import HEADS

FAST_HEADS = ("logreg", "linear_svm", "knn")


def test_stratified_split_is_seeded_disjoint_and_stratified():
    y = np.repeat(np.arange(5), [100, 50, 20, 10, 2])
    fit, val = stratified_split(y, 0.1, seed=3)
    assert len(np.intersect1d(fit, val)) == 0
    assert len(fit) + len(val) == len(y)
    assert list(np.bincount(y[val])) == [10, 5, 2, 1, 1]          # >= 1 per class
    fit2, val2 = stratified_split(y, 0.1, seed=3)
    np.testing.assert_array_equal(val, val2)
    assert not np.array_equal(val, stratified_split(y, 0.1, seed=4)[1])
    with pytest.raises(ConfigError, match="val-fraction"):
        stratified_split(y, 1.5, seed=0)


def _choices(results):
    return {r["name"]: (r["params"], [s["val_accuracy"] for s in r["selection"]])
            for r in results["rows"]}


def test_permuting_test_labels_changes_no_choice(tmp_path):
    """The protocol test: the same file with permuted test labels yields exactly the same
    chosen hyper-parameters and validation scores (only test accuracy may move)."""
    perm = lambda y: np.random.default_rng(7).permutation(y)  # noqa: E731
    a = make_feature_file(tmp_path / "a.h5", seed=5)
    b = make_feature_file(tmp_path / "b.h5", seed=5, test_labels=perm)
    heads = FAST_HEADS
    ra = compare_heads(HeadsConfig(str(a), heads=heads, flip="both"), write=False)
    rb = compare_heads(HeadsConfig(str(b), heads=heads, flip="both"), write=False)
    assert _choices(ra) == _choices(rb)
    # The probe can fail: test accuracy really is read from the (permuted) labels ...
    acc = lambda r: [x["test_accuracy"] for x in r["rows"]]  # noqa: E731
    assert acc(ra) != acc(rb)
    # ... and a grid scored on the test split instead picks differently under the
    # permutation, so selection that leaked test labels would change the choices above.
    def leaky(path):
        from featcache.cache.reader import load_features

        fs = load_features(path)
        tr, te = fs["train"], fs["test"]
        data = SplitData(tr.features, tr.labels, None, te.features, te.labels, None, 0.1, 0)
        data.X = np.concatenate([data.X[:data.n_fit], te.features])   # "validate" on test
        data.y = np.concatenate([data.y[:data.n_fit], te.labels])
        return [select(HEADS[h], data, train_flip=False, tta=False, seed=0, label=h).scores
                for h in FAST_HEADS]
    assert leaky(a) != leaky(b)


def test_selection_is_on_validation_and_refit_uses_all_rows(tmp_path):
    path = make_feature_file(tmp_path / "f.h5", n_train=400)
    r = compare_heads(HeadsConfig(str(path), heads=("logreg",), flip="off", cv_below=0,
                                  val_fraction=0.25, search="exhaustive"), write=False)
    row = r["rows"][0]
    assert row["refit"] and row["n_fit"] + row["n_val"] == row["n_train"] == 400
    fast = compare_heads(HeadsConfig(str(path), heads=("logreg",), flip="off", cv_below=0,
                                     val_fraction=0.25), write=False)["rows"][0]
    assert not fast["refit"] and fast["n_train"] == fast["n_fit"] == row["n_fit"]
    assert abs(row["n_val"] - 100) <= 4                       # 25%, rounded per class
    best = max(row["selection"], key=lambda s: s["val_accuracy"])
    assert row["val_accuracy"] == best["val_accuracy"]
    grid = list(HEADS["logreg"].grid)
    assert [s["params"] for s in row["selection"] if s["params"] in grid] == grid


def test_flip_rows(tmp_path):
    with_flip = make_feature_file(tmp_path / "f.h5")
    without = make_feature_file(tmp_path / "n.h5", flip=False)
    assert flip_rows("auto", True) == [(True, True)]
    assert flip_rows("auto", False) == []
    assert flip_rows("off", True) == []
    r = compare_heads(HeadsConfig(str(with_flip), heads=("logreg",), flip="tta"), write=False)
    assert [x["name"] for x in r["rows"]] == ["logreg", "logreg+tta"]
    r = compare_heads(HeadsConfig(str(with_flip), heads=("logreg",)), write=False)
    flip_row = r["rows"][1]
    assert flip_row["name"] == "logreg+flip" and flip_row["n_train"] == 2 * r["rows"][0]["n_train"]
    with pytest.raises(ConfigError, match="mirrored features"):
        compare_heads(HeadsConfig(str(without), heads=("logreg",), flip="both"), write=False)
    with pytest.raises(ConfigError, match="--flip must be"):
        flip_rows("sideways", True)


def test_incomplete_file_is_refused(tmp_path):
    path = make_feature_file(tmp_path / "f.h5", complete=False)
    partial = tmp_path / "f.h5.partial"
    assert partial.exists() and not path.exists()
    with pytest.raises(IncompleteFeatureFile, match="incomplete.*make features"):
        compare_heads(HeadsConfig(str(partial)))
    assert not (tmp_path / "f.h5").exists()


def test_missing_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(Exception) as err:
        compare_heads(HeadsConfig(str(tmp_path / "none.h5")))
    assert "make features" in str(err.value) or "not" in str(err.value)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(CorruptFeatureFile, match="truncated or not"):
        compare_heads(HeadsConfig(str(junk)))


def test_unknown_head_lists_valid_ones(tmp_path):
    path = make_feature_file(tmp_path / "f.h5")
    with pytest.raises(ConfigError, match="logreg.*dense"):
        compare_heads(HeadsConfig(str(path), heads=("nope",)))


def test_workers_are_handed_absolute_paths(tmp_path, monkeypatch):
    """Worker processes outlive the caller's working directory (a notebook that changes
    folder reuses them): the file and any path:attr user head reach them absolute."""
    from featcache.compare.protocol import load_data, split_data
    from featcache.heads.user import absolute_entry

    make_feature_file(tmp_path / "f.h5")
    monkeypatch.chdir(tmp_path)
    cfg = HeadsConfig("f.h5")
    data, _ = split_data(load_data(cfg), cfg)
    assert data.feature_file == str((tmp_path / "f.h5").resolve())
    assert absolute_entry("my/heads.py:ridge") == f"{(tmp_path / 'my/heads.py').resolve()}:ridge"
    assert absolute_entry("sklearn.linear_model:RidgeClassifier") == \
        "sklearn.linear_model:RidgeClassifier"


def test_a_comparison_after_a_chdir_writes_its_own_report(tmp_path, monkeypatch):
    """The worker pool is reused across comparisons: after the caller changes folder, the
    second comparison's heads still land in its own report (relative paths everywhere)."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        make_feature_file(tmp_path / name / "f.h5", n_train=80 if name == "a" else 120,
                          n_test=40)
    monkeypatch.chdir(tmp_path / "a")
    compare_heads("f.h5", heads="logreg,knn", flip="off", workers=2)
    monkeypatch.chdir(tmp_path / "b")
    b = compare_heads("f.h5", heads="logreg,knn", flip="off", workers=2)
    assert (tmp_path / "b" / "f" / b.best["saved"]).is_file()
    assert b.head().n_features_in_ == 16
    assert sorted(p.name for p in (tmp_path / "a" / "f" / "heads").iterdir()) == \
        ["knn.joblib", "logreg.joblib"]
