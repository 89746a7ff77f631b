"""Shared fixtures. Real-data tests (marked ``real``) find their files with
:mod:`featcache._util.paths` (the one place the tests, benchmarks and CI look):

- CIFAR-10: ``$FEATCACHE_REAL_DATA`` (a folder holding ``cifar-10-batches-py``), else
  ``data/`` or ``../shared/data`` beside the checkout.
- OpenVINO conversions: ``$FEATCACHE_CACHE_DIR``, a per-session temporary folder unless set.
- ImageNet weights: ``$KERAS_HOME/models`` (or ``~/.keras``) if it is writable and holds the
  MobileNetV2 file, else a writable per-session copy of ``../shared/keras``, made when this
  file is imported (Keras reads ``KERAS_HOME`` once, when it is first imported).

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

from featcache._util import paths

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
MOBILENET_V2_FILE = paths.MOBILENET_V2_FILE


#: Keras reads KERAS_HOME once, at import: point it at a writable copy of the weights *now*,
#: before any test module imports Keras (a fixture would be too late).
_KERAS_HOME = paths.keras_home(MOBILENET_V2_FILE, root=ROOT)


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


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """A folder holding the real ``cifar-10-batches-py``; skips when there is none."""
    found = paths.find_cifar10(root=ROOT)
    if found is None:
        _skip_or_fail("real CIFAR-10 not found: set FEATCACHE_REAL_DATA or provide ../shared/data")
    return found


@pytest.fixture(scope="session")
def keras_home() -> Path:
    """The writable KERAS_HOME with the real MobileNetV2 weights (set up at import, above);
    skips if there is none."""
    found = _KERAS_HOME
    if found is None:
        _skip_or_fail("real ImageNet weights not found: set KERAS_HOME (writable) or provide "
                      "../shared/keras")
    return found


@pytest.fixture
def synthetic_features(tmp_path):
    """A small, complete feature file from the synthetic dataset and a random tiny backbone."""
    from featcache.config import ExtractConfig
    from featcache.extract.run import extract_features

    cfg = ExtractConfig(dataset="synthetic", backbone="mobilenet_025", weights="none", size=32,
                        batch=32, out_dir=str(tmp_path), flip=False)
    return extract_features(cfg).path


@pytest.fixture(scope="session")
def calibrated_weights(tmp_path_factory):
    """``calibrated_weights(backbone)``: the path of a random weight file of ``backbone``
    whose BatchNorm statistics are set to those of 16 synthetic images (Keras' random init
    makes the activations of a deep network vanish, ~1e-10, so its features would be all but
    zero); made once per backbone per session. For backbones with ``tf`` preprocessing."""
    made = {}

    def make(backbone: str) -> str:
        if backbone in made:
            return made[backbone]
        import keras
        import numpy as np

        from featcache.backbones.registry import build_backbone, get_backbone
        from featcache.data.datasets import Synthetic

        images, _ = next(Synthetic().batches("train", 0, 16, 16))
        m = build_backbone(get_backbone(backbone), weights="none")
        x = images.astype(np.float32) / 127.5 - 1.0
        bns = [la for la in m.layers if isinstance(la, keras.layers.BatchNormalization)]
        probe = keras.Model(m.input, [b.input for b in bns])
        for i, bn in enumerate(bns):
            a = np.asarray(probe(x, training=False)[i])
            bn.moving_mean.assign(a.mean((0, 1, 2)))
            bn.moving_variance.assign(a.var((0, 1, 2)) + 1e-3)
        path = tmp_path_factory.mktemp("weights") / f"{backbone}_calibrated.weights.h5"
        m.save_weights(path)
        made[backbone] = str(path)
        return made[backbone]
    return make


@pytest.fixture
def counted_conversions(monkeypatch):
    """Counts real OpenVINO conversions (calls of ``runtime.convert_graph``): the list of
    their arguments after the first, one entry per conversion."""
    from featcache.backbones import runtime

    calls = []
    real = runtime.convert_graph

    def counting(*a, **kw):
        calls.append(a[1:])
        return real(*a, **kw)
    monkeypatch.setattr(runtime, "convert_graph", counting)
    return calls


#: the test files that take longest (``--durations``), started first: ``make test`` runs
#: the files on pytest-xdist workers (``--dist loadfile --no-loadscope-reorder``) in
#: collection order, and a long file started last would leave one worker running it alone
#: at the end.
LONGEST_FIRST = ("test_bench.py", "test_ship.py", "test_notebook.py", "test_faults.py",
                 "test_real.py", "test_export.py", "test_finetune_flow.py", "test_runtime.py",
                 "test_predict_runtimes.py", "test_finetune.py", "test_int8.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))  # stable
