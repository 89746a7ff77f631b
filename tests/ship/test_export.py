"""Export + predict (featcache.ship.export): the exported .keras model reproduces the pipeline.

Offline: the generated image folder of test_folders.py, a tiny random-weight backbone, and
a small linear stand-in head with ``to_keras`` (the export contract of featcache.heads);
then heads of a real comparison, kNN among them (also as the best row: export without a
head name, then predict).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from image_folders import CLASSES, make_image_folder, write_image

from featcache.errors import ConfigError, DataError, WeightsError


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class LinearStandIn:
    """A fitted softmax-linear head with the export contract (to_keras)."""

    def fit(self, X, y):
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(max_iter=2000).fit(X, y)
        self.coef_ = lr.coef_.T.astype(np.float32)
        self.intercept_ = lr.intercept_.astype(np.float32)
        self.classes_ = lr.classes_
        return self

    def _p(self, X):
        return _softmax(np.asarray(X, np.float32) @ self.coef_ + self.intercept_)

    def predict_proba(self, X, X_flip=None):
        P = self._p(X)
        return P if X_flip is None else (P + self._p(X_flip)) / 2

    def to_keras(self):
        import keras

        inp = keras.Input((self.coef_.shape[0],), dtype="float32")
        dense = keras.layers.Dense(len(self.classes_))
        out = keras.layers.Softmax()(dense(inp))
        dense.set_weights([self.coef_, self.intercept_])
        return keras.Model(inp, out)


class NotKeras:
    classes_ = np.arange(3)

    def predict_proba(self, X):
        return np.full((len(X), 3), 1 / 3)

    def to_keras(self):
        raise NotImplementedError("KNNHead is not expressible as a Keras model")


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """(folder, feature file, fitted stand-in) on a random-weight mobilenet_025 at 32 px."""
    from featcache.cache.reader import load_features
    from featcache.config import ExtractConfig
    from featcache.extract.run import extract_features

    root = tmp_path_factory.mktemp("exp")
    folder = make_image_folder(root / "pets", copies=2)
    # float32 on every CPU: the exported model (Keras, float32) is compared at 1e-4
    cfg = ExtractConfig(dataset=str(folder), backbone="mobilenet_025", weights="none", size=32,
                        batch=8, flip=True, precision="float32", out_dir=str(root / "features"))
    path = extract_features(cfg).path
    fs = load_features(path)
    head = LinearStandIn().fit(fs["train"].features, fs["train"].labels)
    return folder, path, head


def _pipeline_rows(folder, path):
    from featcache.cache.reader import load_features
    from featcache.data.folders import FolderDataset

    fs = load_features(path)
    files = FolderDataset(folder, image_size=32).files("test")
    return fs, [folder / rel for rel, _ in files]


@pytest.mark.parametrize("tta", [False, True])
def test_exported_model_reproduces_the_pipeline(extracted, tmp_path, tta):
    from featcache.ship.export import export_model
    from featcache.ship.predict import load_classifier, predict_images

    folder, path, head = extracted
    res = export_model(path, head=head, output=tmp_path / "m.keras", tta=tta)
    assert res.path.is_file() and res.tta is tta and res.head_max_abs_diff < 1e-5
    fs, images = _pipeline_rows(folder, path)
    want = head.predict_proba(fs["test"].features, fs["test"].features_flip if tta else None)

    clf = load_classifier(res.path, precision="float32")  # a fresh load from disk
    assert clf.class_names == list(CLASSES)
    assert clf.metadata["backbone"] == "mobilenet_025" and clf.metadata["tta"] is tta
    from featcache.data.imagefiles import decode_image

    got = np.concatenate([clf.probabilities(decode_image(p)[None]) for p in images])
    assert got.shape == want.shape == (len(images), 3)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()

    top = predict_images(clf, images[:4], top_k=2)
    for row, p in zip(top, want[:4]):
        assert [t["class"] for t in row["top"]] == [CLASSES[i] for i in np.argsort(-p)[:2]]
        assert row["top"][0]["probability"] == pytest.approx(p.max(), abs=1e-4)


def test_export_refuses_heads_without_a_keras_form(extracted, tmp_path):
    from featcache.ship.export import export_model

    _, path, _ = extracted
    with pytest.raises(ConfigError, match="Keras-expressible head: .*logreg"):
        export_model(path, head=NotKeras(), output=tmp_path / "x.keras")
    with pytest.raises(ConfigError, match="has no to_keras"):
        export_model(path, head=object(), output=tmp_path / "x.keras")
    assert not (tmp_path / "x.keras").exists()


def test_probe_leaves_out_only_a_knn_heads_near_ties():
    """The Keras-vs-fitted check skips the rows a head names in ``near_ties`` (kNN: the k-th
    neighbour is a rounding tie) and no others; a head without it is checked on every row."""
    from featcache.ship.assemble import probe

    P = np.full((4, 2), 0.5, np.float32)
    Q = P.copy()
    Q[2] = [0.6, 0.4]                                    # one vote went the other way

    class Fitted:
        def __init__(self, tied):
            self.tied = np.asarray(tied)

        def predict_proba(self, X):
            return P

        def near_ties(self, X):
            return self.tied

    def keras_form(X, training=False):
        return Q

    X = np.zeros((4, 3), np.float32)
    assert probe(Fitted([False, False, True, False]), keras_form, X) == 0.0
    assert probe(Fitted([True, False, False, False]), keras_form, X) == pytest.approx(0.1)

    class NoTies:
        predict_proba = Fitted.predict_proba

    assert probe(NoTies(), keras_form, X) == pytest.approx(0.1)


def test_export_refuses_other_backbone_weights(extracted, tmp_path):
    from featcache.cache.reader import read_attrs
    from featcache.ship.export import export_model

    _, path, head = extracted
    attrs = read_attrs(path)
    with pytest.raises(WeightsError, match="weights_sha256 differs"):
        from featcache.ship.assemble import rebuild_backbone

        rebuild_backbone({**attrs, "seed": 12345})
    with pytest.raises(ConfigError, match="no head comparison"):
        export_model(path)  # no results.json next to it yet


def test_export_without_comparison_and_bad_output(extracted, tmp_path):
    from featcache.ship.export import export_model

    _, path, head = extracted
    with pytest.raises(ConfigError, match="must end in .keras"):
        export_model(path, head=head, output=tmp_path / "m.h5")


def test_predict_cli_text_json_and_errors(extracted, tmp_path, capsys):
    from featcache.cli.main import main
    from featcache.ship.export import export_model

    folder, path, head = extracted
    model = export_model(path, head=head, output=tmp_path / "m.keras").path
    a, b = folder / "cat" / "a0.jpg", folder / "bird" / "e1.gif"
    assert main(["predict", str(model), str(a), str(b), "--top-k", "2"]) == 0
    text = capsys.readouterr().out
    assert str(a) in text and str(b) in text and text.count("%") >= 4

    assert main(["predict", str(model), str(a), "--json", "--top-k", "5"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["image"] == str(a)
    assert len(rows[0]["top"]) == 3  # only 3 classes exist
    assert sum(t["probability"] for t in rows[0]["top"]) == pytest.approx(1.0, abs=1e-5)

    broken = folder / "dog" / "broken.jpg"
    assert main(["predict", str(model), str(a), str(broken)]) != 0
    err = capsys.readouterr().err
    assert err.startswith("featcache: error:") and "broken.jpg" in err and err.count("\n") == 1

    assert main(["predict", str(tmp_path / "none.keras"), str(a)]) != 0
    assert "does not exist" in capsys.readouterr().err
    other = tmp_path / "plain.keras"
    import keras

    keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]).save(other)
    with pytest.raises(DataError, match="not one exported by featcache"):
        from featcache.ship.predict import load_classifier

        load_classifier(other)


def test_exported_model_takes_any_size_and_mode(extracted, tmp_path):
    from featcache.ship.export import export_model
    from featcache.ship.predict import predict_images

    _, path, head = extracted
    model = export_model(path, head=head, output=tmp_path / "m.keras").path
    imgs = []
    for i, (size, mode, fmt) in enumerate([((7, 300), "L", "PNG"), ((500, 400), "RGBA", "PNG"),
                                            ((32, 32), "P", "BMP")]):
        p = tmp_path / f"x{i}.{fmt.lower()}"
        write_image(p, "dog", size, mode, fmt, i)
        imgs.append(p)
    rows = predict_images(model, imgs, top_k=1)
    assert [len(r["top"]) for r in rows] == [1, 1, 1]
    assert all(0.0 <= r["top"][0]["probability"] <= 1.0 for r in rows)


# ---------------------------------------------------------------------------- real weights

@pytest.mark.real
@pytest.mark.slow
def test_real_cifar_folder_accuracy_and_export_round_trip(real_data_dir, keras_home, tmp_path):
    """A folder of real CIFAR-10 test images (PNG, 50 per class), real MobileNetV2 at 224 px:
    logreg (fixed C) on 30 images per class must be far above chance (10%; 0.63 measured),
    and the exported model must reproduce the pipeline's probabilities on held-out images."""
    from PIL import Image

    from featcache.cache.reader import load_features
    from featcache.config import ExtractConfig
    from featcache.data.datasets import open_dataset
    from featcache.data.folders import FolderDataset
    from featcache.extract.run import extract_features
    from featcache.ship.export import export_model
    from featcache.ship.predict import predict_images

    cifar = open_dataset("cifar10", data_dir=real_data_dir, download=False)
    folder = tmp_path / "cifar_pngs"
    per_class = dict.fromkeys(range(10), 0)
    for images, labels in cifar.batches("test", 0, 2000, 500):
        for img, lab in zip(images, labels):
            if per_class[int(lab)] < 50:
                d = folder / cifar.classes[int(lab)]
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(d / f"{per_class[int(lab)]:03d}.png")
                per_class[int(lab)] += 1
    assert set(per_class.values()) == {50}

    cfg = ExtractConfig(dataset=str(folder), backbone="mobilenet_v2", size=224, batch=50,
                        test_fraction=0.4, precision="float32", out_dir=str(tmp_path / "features"))
    fs = load_features(extract_features(cfg).path)
    assert len(fs["train"]) == 300 and len(fs["test"]) == 200
    from featcache.heads import get_head

    head = get_head("logreg", C=0.01).fit(fs["train"].features, fs["train"].labels)
    proba = head.predict_proba(fs["test"].features)
    accuracy = float((proba.argmax(1) == fs["test"].labels).mean())
    print(f"real MobileNetV2 folder accuracy: {accuracy:.3f} on {len(proba)} test images")
    assert accuracy >= 0.55, accuracy  # measured 0.63; chance is 0.10

    model = export_model(fs.path, head=head, output=tmp_path / "cifar.keras").path
    files = FolderDataset(folder, image_size=224, test_fraction=0.4).files("test")[:6]
    rows = predict_images(model, [folder / rel for rel, _ in files], top_k=10,
                          precision="float32")
    for row, p in zip(rows, proba[:6]):
        got = {t["class"]: t["probability"] for t in row["top"]}
        np.testing.assert_allclose([got[c] for c in fs.classes], p, atol=1e-3)


# ---------------------------------------------------------------------------- with stage two

#: a plain scikit-learn classifier as a head: no to_keras, so not exportable
PLAIN = "sklearn.dummy:DummyClassifier"


@pytest.fixture(scope="module")
def compared(extracted, tmp_path_factory):
    """A head comparison (logreg, rbf_svm, dense, knn and a plain scikit-learn classifier;
    +flip rows: mirrored rows + TTA)."""
    from featcache.compare.comparison import compare_heads
    from featcache.config import HeadsConfig

    folder, path, _ = extracted
    report = tmp_path_factory.mktemp("report")
    heads = ("logreg", "rbf_svm", "dense", "knn", PLAIN)
    results = compare_heads(HeadsConfig(feature_file=str(path), heads=heads, out_dir=str(report)))
    return folder, path, report, results


def _exported_probs(clf, images):
    from featcache.data.imagefiles import decode_image

    return np.concatenate([clf.probabilities(decode_image(p)[None]) for p in images])


def _untied(head, fs, tta: bool) -> np.ndarray:
    """Test rows on which a kNN head's votes cannot depend on float32 rounding: no near tie
    at the k-th neighbour (tolerance 1e-4: the exported backbone's features differ from the
    file's by rounding too), plain and, with TTA, mirrored. Every row for other heads."""
    test = fs["test"]
    if not hasattr(head, "near_ties"):
        return np.ones(len(test.labels), bool)
    tied = head.near_ties(test.features, tol=1e-4)
    if tta:
        tied |= head.near_ties(test.features_flip, tol=1e-4)
    return ~tied


@pytest.mark.parametrize("row", ["logreg", "rbf_svm", "dense", "logreg+flip", "knn",
                                 "knn+flip"])
def test_export_a_compared_head_reproduces_it(compared, tmp_path, row):
    from featcache.heads import load_head
    from featcache.ship.export import export_model
    from featcache.ship.predict import load_classifier

    folder, path, report, results = compared
    rows = {r["name"]: r for r in results["rows"]}
    if row not in rows:
        pytest.skip(f"the comparison has no {row} row ({', '.join(rows)})")
    res = export_model(path, head=row, report_dir=report, output=tmp_path / "m.keras")
    assert res.tta is bool(rows[row]["tta"]) and res.tta is row.endswith("+flip")
    assert res.head_max_abs_diff <= 1e-4
    head = load_head(report / rows[row]["saved"])
    fs, images = _pipeline_rows(folder, path)
    want = head.predict_proba(fs["test"].features, fs["test"].features_flip if res.tta else None)
    clf = load_classifier(res.path, precision="float32")
    got = _exported_probs(clf, images)
    ok = _untied(head, fs, res.tta)
    assert ok.mean() >= 0.75, f"{ok.sum()} of {len(ok)} test rows without a near tie"
    np.testing.assert_allclose(got[ok], want[ok], atol=1e-4)
    assert clf.class_names == list(CLASSES) and clf.metadata["head"] == row
    if row.startswith("knn"):   # the model holds the training rows (+flip: and mirrors)
        assert len(head.index_) == (2 if row.endswith("+flip") else 1)
        index = sum(len(b) for b in head.index_)
        assert res.path.stat().st_size > 4 * index * head.index_[0].shape[1]


def test_export_refuses_a_head_without_a_keras_form(compared, tmp_path):
    from featcache.ship.export import export_model

    _, path, report, _ = compared
    with pytest.raises(ConfigError, match=r"'DummyClassifier' cannot be exported: it has no "
                                          r"Keras form \(the best exportable row of this "
                                          r"comparison: --head [\w+]+\).*Keras-expressible "
                                          r"head: .*knn.*logreg.*--head"):
        export_model(path, head="DummyClassifier", report_dir=report,
                     output=tmp_path / "d.keras")
    assert not (tmp_path / "d.keras").exists()
    with pytest.raises(ConfigError, match="was not fitted"):
        export_model(path, head="linear_svm", report_dir=report)


def test_default_export_takes_the_best_exportable_row_with_a_warning(compared, tmp_path,
                                                                     caplog):
    """A best row without a Keras form (a plain scikit-learn head won validation): the
    default export ships the best exportable row instead, and says so."""
    import json
    import shutil

    from featcache.ship.export import export_model
    from featcache.ship.predict import load_classifier

    _, path, report, _ = compared
    copy = tmp_path / "report"
    shutil.copytree(report, copy)
    results = json.loads((copy / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    dummy = rows["DummyClassifier"]
    dummy["val_accuracy"] = 1.0
    results["best_row"] = "DummyClassifier"
    (copy / "results.json").write_text(json.dumps(results))
    others = [r for r in results["rows"] if r["name"] != "DummyClassifier"]
    want = max(others, key=lambda r: r["val_accuracy"])["name"]
    with caplog.at_level("WARNING", logger="featcache"):
        res = export_model(path, report_dir=copy, output=tmp_path / "m.keras")
    assert load_classifier(res.path).metadata["head"] == want
    assert any("best row DummyClassifier has no Keras form" in r.getMessage()
               and want in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="no Keras form"):     # asked for by name: refused
        export_model(path, head="DummyClassifier", report_dir=copy,
                     output=tmp_path / "d.keras")


def test_default_export_of_a_knn_best_row_and_predict(extracted, tmp_path, capsys):
    """`make export` (no HEAD) when the best row is kNN: a comparison of knn alone, the CLI's
    export of its best row, then `featcache predict` on the test images."""
    from featcache.cli.main import main
    from featcache.compare.comparison import compare_heads
    from featcache.config import HeadsConfig
    from featcache.heads import load_head

    folder, path, _ = extracted
    report = tmp_path / "report"
    results = compare_heads(HeadsConfig(feature_file=str(path), heads=("knn",),
                                        out_dir=str(report)))
    best = results["best_row"]
    assert best in ("knn", "knn+flip")
    out = tmp_path / "best.keras"
    rc = main(["export", str(path), "--report-dir", str(report), "--output", str(out)])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert f"head {best} (best validation accuracy" in stdout and out.is_file()
    side = json.loads(out.with_name(out.name + ".json").read_text())
    assert side["metadata"]["head"] == best and side["metadata"]["tta"] is (best == "knn+flip")

    row = next(r for r in results["rows"] if r["name"] == best)
    head = load_head(report / row["saved"])
    fs, images = _pipeline_rows(folder, path)
    tta = side["metadata"]["tta"]
    want = head.predict(fs["test"].features, fs["test"].features_flip if tta else None)
    assert main(["predict", str(out), *map(str, images), "--json", "--top-k", "1"]) == 0
    got = [r["top"][0]["class"] for r in json.loads(capsys.readouterr().out)]
    ok = _untied(head, fs, tta)
    assert ok.mean() >= 0.75, f"{ok.sum()} of {len(ok)} test rows without a near tie"
    assert [g for g, o in zip(got, ok) if o] == [CLASSES[int(c)] for c, o in zip(want, ok) if o]
