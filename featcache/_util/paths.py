"""Finding the real data a development checkout can use: CIFAR-10 and ImageNet weights.

The one place the tests (``tests/conftest.py``), the benchmarks (``benchmarks/``) and CI
(``.ci/run``, in bash, same names and order) look for them:

- CIFAR-10: ``explicit``, then ``$FEATCACHE_REAL_DATA``, then ``<checkout>/data``, then
  ``<checkout>/../shared/data``; a folder holding ``cifar-10-batches-py`` (or being it).
- ImageNet weights: a writable ``$KERAS_HOME`` (or ``~/.keras``) whose ``models/`` holds the
  backbone's file is used as it is; else the ``models/`` of a read-only ``$KERAS_HOME`` or
  of ``<checkout>/../shared/keras`` is copied into a writable folder (Keras writes into
  ``KERAS_HOME`` and would fall back to a download), and ``$KERAS_HOME`` is set to it.

Reads only file metadata; writes only that copy. Keras reads ``KERAS_HOME`` once, when it
is first imported: call :func:`keras_home` before importing Keras.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

#: The environment variable naming the folder that holds ``cifar-10-batches-py``.
REAL_DATA_ENV = "FEATCACHE_REAL_DATA"
#: The checkout this package lives in (for ``data/`` and ``../shared``).
CHECKOUT = Path(__file__).resolve().parents[2]   # featcache/_util/paths.py -> the checkout
MOBILENET_V2_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


def shared_dir(root: str | os.PathLike | None = None) -> Path:
    """``<checkout>/../shared``: the data and weights a development machine provides."""
    return Path(root or CHECKOUT).resolve().parent / "shared"


def find_cifar10(explicit: str | os.PathLike | None = None, *,
                 root: str | os.PathLike | None = None) -> Path | None:
    """The first folder holding ``cifar-10-batches-py`` (or being it), else None."""
    root = Path(root or CHECKOUT)
    for cand in (explicit, os.environ.get(REAL_DATA_ENV), root / "data",
                 shared_dir(root) / "data"):
        if not cand:
            continue
        p = Path(cand)
        if (p / "cifar-10-batches-py" / "test_batch").is_file() or (p / "test_batch").is_file():
            return p
    return None


def keras_home(weights_file: str = MOBILENET_V2_FILE, *,
               work_dir: str | os.PathLike | None = None,
               root: str | os.PathLike | None = None) -> Path | None:
    """A writable KERAS_HOME whose ``models/`` holds ``weights_file``; sets ``$KERAS_HOME``.

    A copy goes into ``<work_dir>/keras_home`` (default: a temporary folder removed at
    exit). None when the file is nowhere to be found (``$KERAS_HOME`` is left alone).
    """
    env = os.environ.get("KERAS_HOME")
    for own in ([Path(env)] if env else []) + [Path.home() / ".keras"]:
        if (own / "models" / weights_file).is_file() and os.access(own, os.W_OK):
            os.environ["KERAS_HOME"] = str(own)
            return own
    for src in ([Path(env)] if env else []) + [shared_dir(root) / "keras"]:
        if (src / "models" / weights_file).is_file():
            if work_dir is None:
                dst = Path(tempfile.mkdtemp(prefix="featcache-keras-home-"))
                atexit.register(shutil.rmtree, dst, ignore_errors=True)
            else:
                dst = Path(work_dir).resolve() / "keras_home"
            shutil.copytree(src / "models", dst / "models", dirs_exist_ok=True)
            os.environ["KERAS_HOME"] = str(dst)
            return dst
    return None
