"""Hostile inputs that used to end in a traceback or a wrong action, through the real CLI:
each is one line on stderr and a non-zero exit, before any work."""

from __future__ import annotations

import pytest
from stage_two_util import make_feature_file

from featcache.cli.main import main


def _one_line(argv, capsys, *want):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc not in (0, None) and "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in want:
        assert w in err, err
    return err


def test_a_folder_given_as_a_feature_file(tmp_path, capsys):
    (tmp_path / "report").mkdir()
    for cmd in ("heads", "info"):
        err = _one_line([cmd, tmp_path / "report"], capsys, "is a folder, not a feature file")
        assert "truncated" not in err and "delete it" not in err


def test_an_empty_dataset_and_a_variant_with_a_path_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line(["features", "--dataset", ""], capsys, "--dataset is empty")
    _one_line(["features", "--dataset", "synthetic", "--variant", "../../x"], capsys,
              "--variant '../../x' must be a plain file-name part")
    assert not list(tmp_path.iterdir())              # nothing written anywhere


def test_user_heads_that_raise_at_import_or_are_not_classifiers(tmp_path, capsys):
    path = make_feature_file(tmp_path / "f.h5", n_train=60, n_test=20)
    (tmp_path / "boom.py").write_text("raise RuntimeError('boom')\n")
    _one_line(["heads", path, "--heads", f"{tmp_path / 'boom.py'}:Head", "--workers", "0"],
              capsys, "raised RuntimeError: boom", "fix the module")
    _one_line(["heads", path, "--heads", "sklearn.linear_model:LinearRegression",
               "--workers", "0"], capsys, "is not a classifier")
    assert not (tmp_path / "f").exists()             # no report started


@pytest.mark.parametrize("sizes", ["1", "100000"])
def test_curve_sizes_outside_the_data(tmp_path, capsys, sizes):
    path = make_feature_file(tmp_path / "f.h5", n_train=80, n_test=20)
    _one_line(["curve", path, "--heads", "logreg", "--sizes", sizes], capsys, "--sizes")


def test_an_output_without_h5_is_refused(tmp_path, capsys):
    _one_line(["features", "--dataset", "synthetic", "--output", tmp_path / "plain"], capsys,
              "must be a file name ending in .h5")
    assert not list(tmp_path.iterdir())


def test_a_huge_finite_feature_value_is_a_damaged_file(tmp_path, capsys):
    import h5py

    path = make_feature_file(tmp_path / "f.h5", n_train=60, n_test=20)
    with h5py.File(path, "r+") as f:
        f["train"]["features"][3, 2] = 3e38                  # finite, squares overflow
    _one_line(["heads", path, "--heads", "knn", "--workers", "0"], capsys,
              "features hold values up to 3e+38", "--force")


def test_a_keras_head_without_its_json_or_damaged_is_one_line(tmp_path, capsys):
    """A dense head is two files (``.keras`` + ``.json``): either one missing or damaged is
    one line naming the file and what to do, never a traceback."""
    import numpy as np

    from featcache.heads import HEADS, save_head

    path = make_feature_file(tmp_path / "f.h5", n_train=60, n_test=20)
    X = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32)
    head = HEADS["dense"].make(random_state=0, epochs=1, hidden=8).fit(X, np.arange(40) % 4)
    saved = save_head(head, tmp_path / "heads", "dense")
    side = saved.with_suffix(".json")
    meta = side.read_text()
    export = ["export", path, "--head-file", saved, "--output", tmp_path / "m.keras"]
    side.unlink()
    _one_line(export, capsys, f"{saved} has no dense.json beside it", "make heads")
    side.write_text(meta[:len(meta) // 2])                    # a truncated JSON
    _one_line(export, capsys, f"{side} is not a readable saved head", "make heads")
    side.write_text(meta)
    saved.write_bytes(saved.read_bytes()[:100])               # a truncated model
    _one_line(export, capsys, f"{saved} is not a readable saved head", "make heads")
    assert not (tmp_path / "m.keras").exists()


def _tiny_model(path, n_classes: int, fmt: str = "keras"):
    """A model of the exported kind (RGB images -> class probabilities) in ``fmt``, with no
    sidecar: pooling and a softmax Dense, built in a second."""
    import keras

    inp = keras.Input((None, None, 3) if fmt != "tflite" else (8, 8, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D()(inp)
    model = keras.Model(inp, keras.layers.Dense(n_classes, activation="softmax")(x))
    if fmt == "keras":
        model.save(path)
    elif fmt == "savedmodel":
        model.export(str(path), format="tf_saved_model", verbose=False)
    else:
        import tensorflow as tf

        path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return path


def _sidecar(model, class_names, fmt: str = "keras"):
    import json

    from featcache.ship.sidecar import sidecar_path

    sidecar_path(model).write_text(json.dumps({
        "featcache_export": 1, "format": fmt, "model": model.name, "class_names": class_names,
        "input": {"image_size": 8, "resize": {"antialias": True}}}))


@pytest.mark.parametrize("runtime", ["tensorflow", "openvino"])
def test_predict_with_a_sidecar_of_the_wrong_class_count(tmp_path, capsys, monkeypatch,
                                                         runtime):
    """A ``<model>.json`` naming more or fewer classes than the model scores (used to print
    names the model never scored, or an IndexError) is one line naming the sidecar."""
    import numpy as np
    from PIL import Image

    monkeypatch.setenv("FEATCACHE_CACHE_DIR", str(tmp_path / "cache"))
    model = _tiny_model(tmp_path / "m.keras", 3)
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "x.png")
    predict = ["predict", model, tmp_path / "x.png", "--runtime", runtime]
    for names in (["a", "b"], ["a", "b", "c", "d"]):
        _sidecar(model, names)
        _one_line(predict, capsys, f"{model}.json names {len(names)} classes but m.keras "
                  f"scores 3", "featcache export")
    _sidecar(model, ["a", "b", "c"])                  # the right count predicts
    assert main([str(a) for a in predict]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'x.png'}: ")


@pytest.mark.parametrize("fmt", ["savedmodel", "tflite"])
def test_the_other_formats_know_their_class_count_too(tmp_path, fmt):
    from featcache.errors import DataError
    from featcache.ship.predict import load_classifier

    model = _tiny_model(tmp_path / f"m.{fmt}", 3, fmt)
    _sidecar(model, ["a", "b"], fmt)
    with pytest.raises(DataError, match="names 2 classes but m.* scores 3"):
        load_classifier(model, runtime="tensorflow")
    _sidecar(model, ["a", "b", "c"], fmt)
    assert load_classifier(model, runtime="tensorflow").class_names == ["a", "b", "c"]


def test_a_head_fitted_on_another_feature_file_is_refused_by_export(tmp_path, capsys):
    """``export --head-file`` (or ``--report-dir``) with a head fitted on another feature
    file used to ship it under this file's class names (an IndexError when there were
    fewer): the head carries its file's identity and export refuses a mismatch, naming it."""
    a = make_feature_file(tmp_path / "a.h5", n_train=60, n_test=20, flip=False, seed=0)
    other = make_feature_file(tmp_path / "b.h5", n_train=60, n_test=20, flip=False, seed=1)
    fewer = make_feature_file(tmp_path / "c.h5", n_train=60, n_test=20, flip=False, k=3)
    wider = make_feature_file(tmp_path / "d.h5", n_train=60, n_test=20, flip=False, dim=8)
    assert main(["heads", str(a), "--heads", "logreg", "--workers", "0", "-q"]) == 0
    capsys.readouterr()
    saved = tmp_path / "a" / "heads" / "logreg.joblib"
    out = tmp_path / "m.keras"
    for path, why in ((other, "another configuration: config_sha256"),
                      (fewer, "4 classes vs 3"), (wider, "features of width 16 vs 8")):
        err = _one_line(["export", path, "--head-file", saved, "--output", out], capsys,
                        f"{saved} was fitted on {a} ({why}", f"not on {path}",
                        f"featcache heads {path}")
        assert "IndexError" not in err
        _one_line(["export", path, "--report-dir", tmp_path / "a", "--output", out], capsys,
                  f"was fitted on {a} (")
    assert not out.exists()


def test_the_check_accepts_the_head_on_its_own_file(tmp_path):
    from featcache.cache.reader import file_identity
    from featcache.compare.comparison import compare_heads
    from featcache.heads import fitted_on, load_head

    a = make_feature_file(tmp_path / "a.h5", n_train=60, n_test=20, flip=False)
    res = compare_heads(a, heads="logreg", workers=0)
    path = tmp_path / "a" / res["rows"][0]["saved"]
    head = load_head(path, fitted_on=file_identity(a))            # no error
    assert fitted_on(head) == file_identity(a)
    assert fitted_on(head)["classes"] == ["class0", "class1", "class2", "class3"]


def _fake_cifar(root, n: int = 40):
    """A miniature cifar-10-batches-py (n images per batch file) under ``root``."""
    import pickle

    import numpy as np

    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (d / name).write_bytes(pickle.dumps({
            b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}))
    (d / "batches.meta").write_bytes(pickle.dumps(
        {b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return root


def test_heads_takes_data_dir_for_the_images_of_mistakes_png(tmp_path, capsys, caplog,
                                                             monkeypatch):
    """mistakes.png draws a CIFAR-10 file's wrong test rows from CIFAR-10 itself. When it
    is not in the default folder, heads used to say "pass DATA_DIR=", a make variable,
    while featcache heads had no such option: now --data-dir (stage one's setting, the
    Makefile passes DATA_DIR to both) and the message names both."""
    import h5py

    from featcache._util import paths

    path = make_feature_file(tmp_path / "f.h5", n_train=80, n_test=40)
    with h5py.File(path, "r+") as f:
        f.attrs["dataset"] = "cifar10"             # rows 0..39 of CIFAR-10's test split
    data = _fake_cifar(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path)                    # no data/ here
    monkeypatch.setattr(paths, "CHECKOUT", tmp_path)   # nor a development checkout's
    for var in (paths.REAL_DATA_ENV, "FEATCACHE_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    # an earlier test in the same process may have configured logging away from caplog
    # (a library's dictConfig disables existing loggers); this test reads the warning
    import logging
    for name in ("featcache", "featcache.compare.mistakes"):
        logging.getLogger(name).disabled = False
    caplog.set_level(logging.INFO)
    args = ["heads", str(path), "--heads", "logreg", "--workers", "0", "--flip", "off", "-q"]
    assert main(args) == 0
    said = [r.getMessage() for r in caplog.records if "mistakes.png" in r.getMessage()]
    assert len(said) == 1 and "CIFAR-10 not found in data" in said[0], said
    assert "--data-dir PATH (make: DATA_DIR=PATH)" in said[0] and "pass DATA_DIR" not in said[0]
    assert not (tmp_path / "f" / "mistakes.png").exists()
    capsys.readouterr()
    assert main([*args, "--data-dir", str(data)]) == 0
    assert (tmp_path / "f" / "mistakes.png").is_file()
    import json

    assert json.loads((tmp_path / "f" / "results.json").read_text())["plots"]["mistakes"]
    for cmd, has in (("heads", True), ("curve", False)):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert ("--data-dir" in capsys.readouterr().out) is has, cmd
