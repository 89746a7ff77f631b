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
