"""featcache._util.paths: the one place tests, benchmarks and CI find CIFAR-10 and KERAS_HOME."""

from __future__ import annotations

import os

from featcache._util import paths


def _cifar(folder):
    (folder / "cifar-10-batches-py").mkdir(parents=True)
    (folder / "cifar-10-batches-py" / "test_batch").write_bytes(b"x")
    return folder


def test_find_cifar10_order(tmp_path, monkeypatch):
    root = tmp_path / "checkout"
    root.mkdir()
    monkeypatch.delenv(paths.REAL_DATA_ENV, raising=False)
    assert paths.find_cifar10(root=root) is None
    shared = _cifar(tmp_path / "shared" / "data")
    assert paths.find_cifar10(root=root) == shared              # ../shared/data
    own = _cifar(root / "data")
    assert paths.find_cifar10(root=root) == own                 # data/ before ../shared
    env = _cifar(tmp_path / "env")
    monkeypatch.setenv(paths.REAL_DATA_ENV, str(env))
    assert paths.find_cifar10(root=root) == env                 # the variable before both
    assert paths.find_cifar10(str(shared), root=root) == shared  # explicit first


def test_keras_home_copies_shared_weights_into_a_writable_folder(tmp_path, monkeypatch):
    root = tmp_path / "checkout"
    root.mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KERAS_HOME", raising=False)
    assert paths.keras_home("w.h5", root=root) is None and "KERAS_HOME" not in os.environ
    src = tmp_path / "shared" / "keras" / "models"
    src.mkdir(parents=True)
    (src / "w.h5").write_bytes(b"weights")
    got = paths.keras_home("w.h5", work_dir=tmp_path / "work", root=root)
    assert got == (tmp_path / "work" / "keras_home").resolve()
    assert (got / "models" / "w.h5").read_bytes() == b"weights"
    assert os.environ["KERAS_HOME"] == str(got)
    assert paths.keras_home("w.h5", root=root) == got           # writable: used as it is


def test_checkout_is_the_folder_holding_the_package():
    """``data/`` and ``../shared`` are looked for beside the package's checkout."""
    from featcache._util import paths

    assert (paths.CHECKOUT / "featcache" / "__init__.py").is_file()
    assert (paths.CHECKOUT / "pyproject.toml").is_file()
    assert paths.shared_dir() == paths.CHECKOUT.parent / "shared"
