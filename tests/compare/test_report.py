"""Report files: every head listed, provenance carried, atomic writes, statistics, CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from stage_two_util import make_feature_file

from featcache.cache.reader import read_attrs
from featcache.cli.main import main
from featcache.compare import plots
from featcache.compare.comparison import compare_heads, label_curve
from featcache.compare.stats import (
    confusion,
    holm,
    macro_f1,
    mcnemar,
    pairwise_mcnemar,
    per_class_accuracy,
    wilson,
)
from featcache.config import HeadsConfig
from featcache.heads import load_head

HEADS = ("logreg", "knn")


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    path = make_feature_file(d / "toy_toy_32_flip.h5")
    results = compare_heads(HeadsConfig(str(path), heads=HEADS))
    return path, d / "toy_toy_32_flip", results


def test_report_files_list_every_head_and_carry_provenance(done):
    path, out, results = done
    names = ["logreg", "logreg+flip", "knn", "knn+flip"]
    for f in ("results.json", "results.csv", "report.md", "accuracy.png", "confusion.png",
              "fit_time.png", "per_class.png", "predictions.npz"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in saved["rows"]] == names
    attrs = read_attrs(path)
    for key in ("config_sha256", "dataset", "backbone", "image_size", "complete"):
        assert saved["provenance"][key] == attrs[key]
    assert saved["provenance"]["feature_file"] == str(path)
    # one best row: the highest validation accuracy (ties: the first row), named the same
    # way by the table's marker
    best = max(saved["rows"], key=lambda r: r["val_accuracy"])
    assert saved["best_row"] == best["name"] and "best_head" not in saved
    assert f"| {best['name']} **best** |" in (out / "report.md").read_text()
    assert (out / "report.md").read_text().count("**best**") == 1
    with open(out / "results.csv") as f:
        assert [r["name"] for r in csv.DictReader(f)] == names
    md = (out / "report.md").read_text()
    for n in names:
        assert f"| {n}" in md
    assert saved["provenance"]["config_sha256"] in md
    for r in saved["rows"]:
        lo, hi = r["ci95"]
        assert lo <= r["test_accuracy"] <= hi
        assert r["fit_s"] >= 0 and r["predict_s_per_1000"] >= 0 and 0 <= r["macro_f1"] <= 1
        assert (out / r["saved"]).is_file()
    assert len(saved["mcnemar"]) == 6                       # 4 rows -> 6 pairs
    preds = np.load(out / "predictions.npz")
    assert set(preds.files) == {"y_test", "logreg", "logreg_flip", "knn", "knn_flip"}


def test_saved_heads_reproduce_the_reported_predictions(done):
    from featcache.cache.reader import load_features

    path, out, results = done
    te = load_features(path)["test"]
    row = next(r for r in results["rows"] if r["name"] == "logreg")
    head = load_head(out / row["saved"])
    np.testing.assert_array_equal(head.predict(te.features),
                                  np.load(out / "predictions.npz")["logreg"])


def test_interrupted_run_keeps_the_previous_report(done, monkeypatch):
    path, out, _ = done
    before = (out / "results.json").read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_confusion", boom)
    with pytest.raises(KeyboardInterrupt):
        compare_heads(HeadsConfig(str(path), heads=("logreg",), flip="off"))
    assert (out / "results.json").read_bytes() == before
    assert not list(out.glob(".*.tmp"))


def test_new_plots_are_valid_pngs_linked_from_the_report(done):
    from PIL import Image

    path, out, results = done
    md = (out / "report.md").read_text()
    for name in ("accuracy", "confusion", "fit_time", "per_class"):
        f = out / f"{name}.png"
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(f) as im:
            im.verify()
        assert f"]({name}.png)" in md and results["plots"][name] == f"{name}.png"
    with Image.open(out / "per_class.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100
    # per-class accuracy in results.json matches the saved predictions
    saved = json.loads((out / "results.json").read_text())
    preds = np.load(out / "predictions.npz")
    y = preds["y_test"]
    for r in saved["rows"]:
        p = preds[r["name"].replace("+", "_")]
        want = [float(np.mean(p[y == c] == c)) for c in range(len(saved["classes"]))]
        assert r["per_class_accuracy"] == pytest.approx(want)
    # the header shows every cache-key setting the file has, generated from the table
    assert "image_size=32" in md and "weights=none" in md


def test_small_cases_by_hand():
    y = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([0, 1, 0, 1, 1, 0])
    # class 0: tp 2 fp 1 fn 1 -> F1 2*2/(4+1+1) = 2/3; class 1: tp 2 fp 1 fn 0 -> 4/5;
    # class 2: tp 0 -> 0; class 3 (no test rows, never predicted): no F1, left out
    assert macro_f1(y, p, 3) == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    assert macro_f1(y, p, 4) == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    np.testing.assert_array_equal(confusion(y, p, 3), [[2, 1, 0], [0, 2, 0], [1, 0, 0]])
    assert confusion(y, p, 4).shape == (4, 4) and confusion(y, p, 3).dtype == np.int64
    np.testing.assert_allclose(per_class_accuracy(y, p, 4), [2 / 3, 1.0, 0.0, np.nan])
    # Wilson by its formula, z = 1.96: 3 of 10
    z, n, k = 1.959964, 10, 3
    c = (k / n + z * z / (2 * n)) / (1 + z * z / n)
    h = z * np.sqrt(k / n * (1 - k / n) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson(k, n) == pytest.approx((c - h, c + h), abs=1e-6)
    assert wilson(0, 0) == (0.0, 1.0)
    # McNemar, 2 discordant pairs both one way: p = 2 * (1/2)^2 = 0.5; 1 vs 1: p = 1
    a, b = np.array([1, 1, 0, 1], bool), np.array([0, 0, 0, 1], bool)
    assert mcnemar(a, b) == {"only_a": 2, "only_b": 0, "p": pytest.approx(0.5)}
    assert mcnemar(np.array([1, 0], bool), np.array([0, 1], bool))["p"] == 1.0


def test_wilson_interval():
    lo, hi = wilson(837, 1000)
    assert lo == pytest.approx(0.8128, abs=5e-4) and hi == pytest.approx(0.8588, abs=5e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)


def test_mcnemar_and_holm():
    a = np.array([True] * 30 + [False] * 5 + [True] * 65)
    b = np.array([False] * 30 + [True] * 5 + [True] * 65)
    m = mcnemar(a, b)
    assert (m["only_a"], m["only_b"]) == (30, 5)
    assert m["p"] == pytest.approx(2 * (1 + 35 + 595 + 6545 + 52360 + 324632) / 2**35)  # exact
    assert mcnemar(a, a)["p"] == 1.0
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    pairs = pairwise_mcnemar({"a": a, "b": b, "c": a})
    ab = next(p for p in pairs if (p["a"], p["b"]) == ("a", "b"))
    assert ab["significant"] and ab["better"] == "a"
    assert not next(p for p in pairs if (p["a"], p["b"]) == ("a", "c"))["significant"]


def test_label_curve(tmp_path):
    path = make_feature_file(tmp_path / "c.h5", n_train=400, flip=False)
    r = label_curve(HeadsConfig(str(path), heads=HEADS), sizes=(5, 20, None))
    assert [(p["head"], p["per_class"]) for p in r["points"]] == [
        (h, s) for s in (5, 20, "all") for h in HEADS]
    assert {p["n_train"] for p in r["points"]} == {20, 80, 400}
    for f in ("curve.png", "curve.csv", "curve.md", "curve.json"):
        assert (tmp_path / "c" / f).is_file()
    assert "| logreg |" in (tmp_path / "c" / "curve.md").read_text()


def test_cli_heads_prints_the_table(tmp_path, capsys):
    path = make_feature_file(tmp_path / "f.h5")
    assert main(["heads", str(path), "--heads", "logreg", "--flip", "off", "-q"]) == 0
    out = capsys.readouterr().out
    assert "| logreg **best** |" in out and "best row (highest validation accuracy): logreg" in out
    assert (tmp_path / "f" / "results.json").is_file()


def test_cli_heads_json_is_the_summary_on_stdout(tmp_path, capsys):
    path = make_feature_file(tmp_path / "f.h5")
    assert main(["heads", str(path), "--heads", "logreg", "--flip", "off", "--json"]) == 0
    out = capsys.readouterr()
    data = json.loads(out.out)                      # nothing but the JSON on stdout
    assert data["best_row"] == "logreg" and [r["name"] for r in data["rows"]] == ["logreg"]
    assert 0 < data["rows"][0]["test_accuracy"] <= 1 and data["significant"] == []
    assert data["files"]["report.md"] == str(tmp_path / "f" / "report.md")
    assert "| logreg" not in out.out
    assert main(["heads", "--list", "--json"]) == 0
    reg = json.loads(capsys.readouterr().out)
    assert {"logreg", "knn"} <= {h["name"] for h in reg}


def test_cli_backbones_json(capsys):
    from featcache.backbones.registry import BACKBONES

    assert main(["backbones", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == sorted(BACKBONES)
    v2 = next(r for r in rows if r["name"] == "mobilenet_v2")
    assert (v2["default_size"], v2["dim"]) == (BACKBONES["mobilenet_v2"].default_size,
                                               BACKBONES["mobilenet_v2"].dim)


def test_cli_refuses_unknown_head_and_incomplete_file(tmp_path, capsys):
    path = make_feature_file(tmp_path / "f.h5", complete=False)
    assert main(["heads", str(path) + ".partial", "-q"]) == 2
    assert "incomplete" in capsys.readouterr().err
    assert main(["heads", str(path), "--heads", "bogus", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featcache: error: unknown head 'bogus'") and "logreg" in err
