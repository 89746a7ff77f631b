"""Selection on training rows: the plan for the data's size (single split or repeated
stratified k-fold), pooled scores, self-extending grids, the tie rules, and the model
that ``--search fast`` keeps."""

import numpy as np
import pytest
from stage_two_util import blobs, make_feature_file

from featcache.compare.protocol import SplitData, run_row, select
from featcache.compare.selection import (
    CHEAP_REPEATS,
    EXTEND_STEPS,
    best_index,
    extension,
    kfold_splits,
    merged_params,
    plan_for,
)
from featcache.config import HeadsConfig
from featcache.errors import ConfigError
from featcache.heads import HEADS, as_head
from featcache.heads.base import Head
from featcache.heads.registry import HeadSpec

PLAN = dict(val_fraction=0.1, cv_below=50, cv_folds=5, cv_repeats=None)


def test_plan_is_kfold_exactly_when_the_split_would_be_small():
    y = np.repeat(np.arange(2), 50)                       # 50 per class: 5 validation rows
    p = plan_for(y, **PLAN)
    assert p.kind == "kfold" and p.folds == 5 and p.repeats == CHEAP_REPEATS
    assert "5 validation rows" in p.reason
    y = np.repeat(np.arange(10), 500)                     # 50 validation rows per class
    assert plan_for(y, **PLAN).kind == "holdout"
    y = np.repeat(np.arange(10), 499)                     # 49.9 -> 50 rounded: holdout
    assert plan_for(y, **PLAN).kind == "holdout"
    y = np.repeat(np.arange(10), 300)                     # 3,000 rows: k-fold, not repeated
    p = plan_for(y, **PLAN)
    assert p.kind == "kfold" and p.repeats == 1 and p.n_splits == 5
    assert plan_for(y, **{**PLAN, "cv_below": 0}).kind == "holdout"
    assert plan_for(y, **{**PLAN, "cv_repeats": 2}).repeats == 2
    # the smallest class decides
    y = np.concatenate([np.zeros(5000, int), np.ones(20, int)])
    assert plan_for(y, **PLAN).kind == "kfold"


@pytest.mark.parametrize("bad", [dict(cv_folds=1), dict(cv_below=-1), dict(cv_repeats=0),
                                 dict(val_fraction=1.0)])
def test_bad_plan_settings_are_one_line_errors(bad):
    with pytest.raises(ConfigError) as e:
        plan_for(np.repeat(np.arange(2), 50), **{**PLAN, **bad})
    assert "\n" not in str(e.value) and "--" in str(e.value)


def test_kfold_validates_every_row_once_per_repeat_stratified_and_seeded():
    y = np.concatenate([np.zeros(23, int), np.ones(7, int), np.full(2, 2)])
    splits = kfold_splits(y, 5, 3, seed=1)
    assert len(splits) == 15
    for r in range(3):
        vals = np.concatenate([v for _, v in splits[5 * r:5 * r + 5]])
        assert np.array_equal(np.sort(vals), np.arange(len(y)))    # once per repeat
    for fit, val in splits:
        assert not set(fit) & set(val) and len(fit) + len(val) == len(y)
        assert set(y[fit]) == {0, 1, 2}                  # every class keeps a fit row
        assert abs(np.sum(y[val] == 0) - 23 / 5) < 1     # stratified
    again = kfold_splits(y, 5, 3, seed=1)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, again))
    other = kfold_splits(y, 5, 3, seed=2)
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(splits, other))
    # repeats are different shuffles
    assert not np.array_equal(splits[0][1], splits[5][1])


def test_a_hundred_image_folder_is_chosen_on_all_its_rows_not_on_ten(tmp_path):
    """The old protocol scored every grid point on 10 validation images (5 per class), so
    most points and rows tied at 100%. Now each is scored on 300 predictions."""
    path = make_feature_file(tmp_path / "f.h5", n_train=100, n_test=70, k=2, dim=8, sep=1.2)
    from featcache.compare.comparison import compare_heads

    r = compare_heads(HeadsConfig(str(path), heads=("logreg", "knn"), workers=0,
                                  out_dir=str(tmp_path / "report")))
    assert r["protocol"]["plan"]["kind"] == "kfold"
    md = (tmp_path / "report" / "report.md").read_text()
    assert "stratified 5-fold cross-validation of the training rows, repeated 3x" in md
    assert "300 validation predictions over 15 folds" in md
    noted = [row for row in r["rows"] if row["search_note"]]
    assert ("Grid search notes" in md) is bool(noted)
    assert all(f"- {row['name']}: {row['search_note']}" in md for row in noted)
    assert all(row["n_val"] == 300 and row["plan"] == "kfold" for row in r["rows"])
    assert all(row["refit"] and row["n_train"] in (100, 200) for row in r["rows"])
    dense = compare_heads(HeadsConfig(str(path), heads=("dense",), flip="off", workers=0),
                          write=False)["rows"][0]
    assert dense["plan"] == "kfold" and dense["n_val"] == 100   # a dear head: one repeat
    # the scores have the resolution of 300 predictions, not of 10
    vals = {round(s["val_accuracy"] * 300, 6) for row in r["rows"] for s in row["selection"]}
    assert all(abs(v - round(v)) < 1e-6 for v in vals)
    assert len({s["val_accuracy"] for row in r["rows"] for s in row["selection"]}) > 3
    old = compare_heads(HeadsConfig(str(path), heads=("logreg", "knn"), workers=0,
                                    cv_below=0), write=False)
    assert all(row["n_val"] == 10 for row in old["rows"])
    assert "cross-validation" in r["protocol"]["selection"]


def test_ties_between_rows_go_to_the_steadier_then_the_cheaper_row():
    rows = [{"val_accuracy": 0.9, "val_std": 0.05}, {"val_accuracy": 0.9, "val_std": 0.01},
            {"val_accuracy": 0.9, "val_std": 0.01}, {"val_accuracy": 0.8, "val_std": 0.0}]
    assert best_index(rows, [1, 5, 2, 0]) == 2        # steadier, then cheaper
    assert best_index(rows, [1, 2, 2, 0]) == 1        # all equal: row order
    assert best_index(rows[:1] + [{"val_accuracy": 0.91, "val_std": 0.2}], [0, 9]) == 1


def test_merged_params_takes_the_median_of_what_folds_chose():
    per = [{"dropout": 0.5, "epochs": 7}, {"dropout": 0.5, "epochs": 9},
           {"dropout": 0.5, "epochs": 20}]
    assert merged_params(per) == {"dropout": 0.5, "epochs": 9}
    assert merged_params([{"lr": 0.1}, {"lr": 0.3}]) == {"lr": 0.2}


def test_extension_steps_past_the_edge_within_bounds():
    C = [{"C": c} for c in (0.001, 0.003, 0.01)]
    assert extension(C, 0, max_int=10) == {"C": 0.000333}
    assert extension(C, 2, max_int=10) == {"C": 0.0333}
    assert extension(C, 1, max_int=10) is None                    # inside: no extension
    k = [{"k": v} for v in (100, 50, 20, 10, 5, 1)]
    assert extension(k, 0, max_int=1000) == {"k": 200}
    assert extension(k, 0, max_int=150) is None                   # more than the fit rows
    assert extension(k, 5, max_int=1000) is None                  # below 1
    assert extension([{"dropout": 0.5}], 0, max_int=10) is None   # not a path


class _CurveHead(Head):
    """A head whose validation accuracy is a fixed function of C (no fitting): for
    driving the grid search."""

    def __init__(self, C=1.0, peak=1e-6, random_state=0):
        self.C, self.peak, self.random_state = C, peak, random_state

    def fit(self, X, y, X_flip=None):
        self._validate_fit(X, y, X_flip)
        return self

    def _proba(self, X):
        return np.full((len(X), len(self.classes_)), 1.0 / len(self.classes_))

    def score_grid(self, grid, X_fit, y_fit, X_val, y_val, X_fit_flip=None, X_val_flip=None,
                   *, stop_early=False, label=""):
        self.fit(X_fit, y_fit)
        return [(dict(g), 0.9 ** abs(np.log10(g["C"] / self.peak))) for g in grid]


def _spec(peak):
    return HeadSpec("curve", lambda random_state=0, **p: _CurveHead(peak=peak, **p),
                    grid=tuple({"C": c} for c in (0.01, 0.1, 1.0)))


def _small_data():
    X, y, _ = blobs(1000, dim=4, k=2)      # 5 folds of 200 validation rows
    return SplitData(X, y, None, X[:20], y[:20], None, 0.1, 0,
                     plan=plan_for(y, **{**PLAN, "cv_below": 10 ** 6}))


def test_a_grid_extends_itself_until_the_score_turns():
    sel = select(_spec(1e-3), _small_data(), train_flip=False, tta=False, seed=0,
                 label="curve")
    tried = [p["C"] for p, _, _ in sel.scores]
    assert tried == [0.0001, 0.001, 0.01, 0.1, 1.0]              # one past the peak
    assert sel.params == {"C": 0.001}
    assert "stopped improving" in sel.note and "C=0.001" in sel.note
    inside = select(_spec(0.1), _small_data(), train_flip=False, tta=False, seed=0,
                    label="curve")
    assert inside.params == {"C": 0.1} and inside.note == "" and len(inside.scores) == 3


def test_a_grid_extends_at_most_a_bounded_number_of_points():
    sel = select(_spec(1e-12), _small_data(), train_flip=False, tta=False, seed=0,
                 label="curve")
    assert len(sel.scores) == 3 + EXTEND_STEPS
    assert sel.params["C"] == pytest.approx(0.01 / 10 ** EXTEND_STEPS)
    assert "still rising" in sel.note


def test_fast_search_keeps_the_model_fitted_at_the_chosen_point():
    """A path stops one point past its best; the model kept must be the best point's, not
    the one fitted last."""
    X, y, _ = blobs(600, dim=40, k=5, sep=0.25, seed=3)
    Xt, yt, _ = blobs(300, dim=40, k=5, sep=0.25, seed=4)
    data = SplitData(X, y, None, Xt, yt, None, 0.3, 0)
    row, _, _, head = run_row("logreg", data, train_flip=False, tta=False, seed=0,
                              n_classes=5, search="fast")
    spec = HEADS["logreg"]
    Xf, yf, _ = data.part("fit", False)
    at = {c: as_head(spec.make(random_state=0, C=c, **spec.fast_select)).fit(Xf, yf)
          for c in [s["params"]["C"] for s in row["selection"]]}
    chosen = row["params"]["C"]
    assert np.abs(head.coef_ - at[chosen].coef_).max() < 1e-2
    others = [np.abs(head.coef_ - m.coef_).max() for c, m in at.items() if c != chosen]
    assert others and min(others) > 5e-2                     # the check can tell them apart


def test_selection_study_never_reads_the_test_split(tmp_path, capsys):
    """benchmarks/studies/selection.py scores on held-out *training* rows: permuting the
    file's test labels changes nothing it prints (and the held-out rows are disjoint from
    the subset)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.studies import selection as study

    a = make_feature_file(tmp_path / "a.h5", n_train=400, n_test=50, seed=5)
    b = make_feature_file(tmp_path / "b.h5", n_train=400, n_test=50, seed=5,
                          test_labels=lambda y: (y + 1) % 4)
    out = []
    for path in (a, b):
        assert study.main([str(path), "--sizes", "10", "--seeds", "1",
                           "--heads", "logreg,knn"]) == 0
        lines = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
        out.append([{k: v for k, v in r.items() if k not in ("seconds", "mean_seconds")}
                    for r in lines])
    assert out[0] == out[1]
    plans = [r["plan"] for r in out[0] if "summary" not in r]
    assert plans == ["holdout", "kfold"]
    rows, held = study.subsets(np.arange(400) % 4, 10, 0)
    assert len(rows) == 40 and not set(rows) & set(held)


def test_a_test_split_missing_a_class_is_warned_and_left_out_of_macro_f1(tmp_path, caplog):
    import logging

    from featcache.compare.comparison import compare_heads

    path = make_feature_file(tmp_path / "f.h5", n_train=200, n_test=60, k=3, sep=3.0,
                             test_labels=lambda y: np.where(y == 2, 0, y))
    with caplog.at_level(logging.WARNING, logger="featcache"):
        r = compare_heads(HeadsConfig(str(path), heads=("logreg",), flip="off", workers=0,
                                      out_dir=str(tmp_path / "report")))
    assert "no rows of class class2" in caplog.text
    row = r["rows"][0]
    assert row["per_class_accuracy"][2] is None and None not in row["per_class_accuracy"][:2]
    # macro-F1 over the two classes present, not with a 0 for the absent one
    from sklearn.metrics import f1_score

    from featcache.cache.reader import load_features

    y = load_features(path)["test"].labels
    pred = np.load(tmp_path / "report" / "predictions.npz")["logreg"]
    want = f1_score(y, pred, labels=[0, 1], average="macro", zero_division=0.0)
    every = f1_score(y, pred, labels=[0, 1, 2], average="macro", zero_division=0.0)
    assert row["macro_f1"] == pytest.approx(want) and abs(want - every) > 0.05
    assert (tmp_path / "report" / "per_class.png").is_file()
