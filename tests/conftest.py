"""Shared fixtures. Real-data tests (marked ``real``) find their files here:

- CIFAR-10: ``$FEATCACHE_REAL_DATA`` (a folder holding ``cifar-10-batches-py``), else
  ``../shared/data`` beside the checkout.
- OpenVINO conversions: ``$FEATCACHE_CACHE_DIR``, a per-session temporary folder unless set.
- ImageNet weights: ``$KERAS_HOME/models`` if it is writable and holds the MobileNetV2
  file, else a writable per-session copy of ``../shared/keras``, made when this file is
  imported (Keras reads ``KERAS_HOME`` once, when it is first imported).

They skip, saying why, when the files are absent — unless ``FEATCACHE_REQUIRE_REAL=1``
(set by ``.ci/run``), where a missing file is a failure: in CI they must run.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MOBILENET_V2_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


def _usable_keras_home() -> Path | None:
    env = os.environ.get("KERAS_HOME")
    if env and (Path(env) / "models" / MOBILENET_V2_FILE).is_file() and os.access(env, os.W_OK):
        return Path(env)
    return None


def _prepare_keras_home() -> None:
    """Point KERAS_HOME at a writable copy of ../shared/keras *now*, before any test module
    imports Keras: Keras reads KERAS_HOME once, at import, so setting it later (in a
    fixture) would leave it looking in ~/.keras."""
    if _usable_keras_home() is not None:
        return
    src = SHARED / "keras" / "models"
    if (src / MOBILENET_V2_FILE).is_file():
        dst = Path(tempfile.mkdtemp(prefix="featcache-keras-home-"))
        atexit.register(shutil.rmtree, dst, ignore_errors=True)
        shutil.copytree(src, dst / "models")
        os.environ["KERAS_HOME"] = str(dst)


_prepare_keras_home()


def _prepare_conversion_cache() -> None:
    """One OpenVINO conversion cache for the whole session (subprocesses inherit it), so
    tests share conversions and never write into the user's ~/.cache."""
    if not os.environ.get("FEATCACHE_CACHE_DIR"):
        d = tempfile.mkdtemp(prefix="featcache-cache-")
        atexit.register(shutil.rmtree, d, ignore_errors=True)
        os.environ["FEATCACHE_CACHE_DIR"] = d


_prepare_conversion_cache()


def _skip_or_fail(reason: str):
    if os.environ.get("FEATCACHE_REQUIRE_REAL") == "1":
        pytest.fail(f"FEATCACHE_REQUIRE_REAL=1 but {reason}")
    pytest.skip(reason)


def _real_data() -> Path | None:
    for cand in (os.environ.get("FEATCACHE_REAL_DATA"), SHARED / "data"):
        if cand and (Path(cand) / "cifar-10-batches-py" / "test_batch").is_file():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """A folder holding the real ``cifar-10-batches-py``; skips when there is none."""
    found = _real_data()
    if found is None:
        _skip_or_fail("real CIFAR-10 not found: set FEATCACHE_REAL_DATA or provide ../shared/data")
    return found


@pytest.fixture(scope="session")
def keras_home() -> Path:
    """The writable KERAS_HOME with the real MobileNetV2 weights (set up at import, above);
    skips if there is none."""
    found = _usable_keras_home()
    if found is None:
        _skip_or_fail("real ImageNet weights not found: set KERAS_HOME (writable) or provide "
                      "../shared/keras")
    return found


@pytest.fixture
def synthetic_features(tmp_path):
    """A small, complete feature file from the synthetic dataset and a random tiny backbone."""
    from pipeline.config import ExtractConfig
    from pipeline.extract import extract_features

    cfg = ExtractConfig(dataset="synthetic", backbone="mobilenet_025", weights="none", size=32,
                        batch=32, out_dir=str(tmp_path), flip=False)
    return extract_features(cfg).path
