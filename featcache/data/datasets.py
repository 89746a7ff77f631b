"""Datasets: name -> a source of uint8 image batches with labels, per split.

Reads CIFAR-10 in the official python layout (``<data_dir>/cifar-10-batches-py/``,
downloading and sha256-checking the official archive when it is absent and a network is
there), image folders (:mod:`featcache.data.folders`), and a tiny generated ``synthetic`` set
for tests. Writes only a downloaded archive and its extraction into ``data_dir``.

Every dataset streams: ``batches(split, start, stop, batch_size)`` yields arrays of at
most ``batch_size`` images, so memory does not grow with the dataset. ``fingerprint()``
is a sha256 of the raw pixels and labels in order (CIFAR, synthetic) or of the file list
and contents (folders): it goes into the feature file's cache key. ``ids(split)`` is what
stage one stores as each row's identity: the index in the split (folders: the path).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from featcache.data.base import Batch, Dataset
from featcache.data.sizes import CIFAR10_SPLITS, KNOWN_SPLITS, SYNTHETIC_SPLITS, limited
from featcache.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
#: how to say where CIFAR-10 is, in featcache features/heads and in make
WHERE = "name the folder that holds it with --data-dir PATH (make: DATA_DIR=PATH)"

# ---------------------------------------------------------------------------- registry

DATASETS: dict[str, Callable[..., Dataset]] = {}


def register_dataset(name: str, splits: dict[str, int] | None = None):
    """Decorator: register ``fn(data_dir, download, limit) -> Dataset`` under ``name``, with
    its rows per split where they are known (``splits``: what
    :func:`featcache.data.sizes.count_images` answers without opening it)."""
    def deco(fn):
        DATASETS[name] = fn
        if splits is not None:
            KNOWN_SPLITS[name] = dict(splits)
        return fn
    return deco


def open_dataset(spec: str, *, data_dir: str | os.PathLike = "data", download: bool = True,
                 limit: int | None = None, **kw) -> Dataset:
    """A registered dataset by name, or an image folder by path."""
    if spec in DATASETS:
        return DATASETS[spec](Path(data_dir), download=download, limit=limit)
    if os.sep in spec or Path(spec).exists():
        from featcache.data.folders import FolderDataset  # lazy: only folder users need it
        return FolderDataset(Path(spec), limit=limit, **kw)
    raise ConfigError(f"unknown dataset {spec!r}: use one of {', '.join(sorted(DATASETS))} "
                      f"or the path of an image folder (one sub-folder per class)")


# ---------------------------------------------------------------------------- CIFAR-10

def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise DataError(f"{path} is missing; restore the full cifar-10-batches-py folder") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataError(f"{path} is not a readable CIFAR-10 batch ({type(exc).__name__}); "
                        f"delete the folder and download/copy it again") from None


def _cifar_arrays(d: dict, path: Path) -> Batch:
    try:
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    except (KeyError, ValueError) as exc:
        raise DataError(f"{path} does not have the CIFAR-10 batch layout ({exc}); "
                        f"download/copy it again") from None
    if len(images) != len(labels):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


@dataclass
class Cifar10(Dataset):
    """CIFAR-10, official python layout. One 10,000-image file in memory at a time."""

    root: Path
    limit: int | None = None
    name: str = "cifar10"
    extra_attrs: dict = field(default_factory=dict)

    def __post_init__(self):
        missing = [f for fs in CIFAR10_FILES.values() for f in fs
                   if not (self.root / f).is_file()]
        if not (self.root / "batches.meta").is_file():
            missing.append("batches.meta")
        if missing:
            raise DataError(f"CIFAR-10 folder {self.root} lacks {', '.join(missing)}; "
                            f"copy the complete cifar-10-batches-py folder there")
        meta = _unpickle(self.root / "batches.meta")
        self.classes = [c.decode() for c in meta[b"label_names"]]
        self.splits = limited(CIFAR10_SPLITS, self.limit)

    def _files(self, split: str) -> Iterator[Batch]:
        for fname in CIFAR10_FILES[split]:
            yield _cifar_arrays(_unpickle(self.root / fname), self.root / fname)

    def batches(self, split, start, stop, batch_size):
        stop = min(stop, self.splits[split])
        offset = 0
        for images, labels in self._files(split):
            lo, hi = max(start, offset), min(stop, offset + len(images))
            for i in range(lo, hi, batch_size):
                j = min(i + batch_size, hi)
                a, b = i - offset, j - offset
                yield np.ascontiguousarray(images[a:b]), labels[a:b]
            offset += len(images)
            if offset >= stop:
                break

    def take(self, split, rows):
        """One pass over ``split``'s files, keeping ``rows`` (sorted indices)."""
        rows = np.asarray(rows, dtype=np.int64)
        images, labels, offset = [], [], 0
        for x, y in self._files(split):
            mine = rows[(rows >= offset) & (rows < offset + len(x))] - offset
            images.append(x[mine])
            labels.append(y[mine])
            offset += len(x)
            if offset > rows.max(initial=-1):
                break
        return np.concatenate(images), np.concatenate(labels)

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"cifar10")
        for split, n in self.splits.items():
            h.update(f"{split}:{n}".encode())
            for images, labels in self.batches(split, 0, n, 10000):
                h.update(labels.astype("<i8").tobytes())
                h.update(images.tobytes())
        return h.hexdigest()


def find_cifar10(data_dir: Path) -> Path | None:
    """``data_dir`` itself or ``data_dir/cifar-10-batches-py`` if it holds the batches."""
    for cand in (data_dir, data_dir / CIFAR10_DIR):
        if (cand / "test_batch").is_file():
            return cand
    return None


def download_cifar10(data_dir: Path, url: str = CIFAR10_URL, sha256: str = CIFAR10_SHA256,
                     timeout: float = 30.0) -> Path:
    """Download the official archive, check its sha256, extract into ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading CIFAR-10 from %s", url)
    with tempfile.NamedTemporaryFile(dir=data_dir, suffix=".tar.gz.part", delete=False) as tmp:
        tmp_path = Path(tmp.name)
        try:
            h = hashlib.sha256()
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                while chunk := resp.read(1 << 20):
                    h.update(chunk)
                    tmp.write(chunk)
        except OSError as exc:
            tmp_path.unlink(missing_ok=True)
            raise DataError(
                f"CIFAR-10 is not in {data_dir} and could not be downloaded ({exc}); offline, "
                f"put the official cifar-10-batches-py folder in {data_dir}/ or {WHERE}") from None
    if h.hexdigest() != sha256:
        tmp_path.unlink(missing_ok=True)
        raise DataError(f"downloaded CIFAR-10 archive has sha256 {h.hexdigest()}, expected "
                        f"{sha256}; retry, or download {url} yourself into {data_dir}")
    try:
        with tarfile.open(tmp_path) as tar:
            tar.extractall(data_dir, filter="data")
    finally:
        tmp_path.unlink(missing_ok=True)
    return data_dir / CIFAR10_DIR


@register_dataset("cifar10", CIFAR10_SPLITS)
def _cifar10(data_dir: Path, *, download: bool = True, limit: int | None = None) -> Dataset:
    root = find_cifar10(data_dir)
    if root is None:
        if not download:
            raise DataError(f"CIFAR-10 not found in {data_dir}; put the cifar-10-batches-py "
                            f"folder there or {WHERE}")
        root = download_cifar10(data_dir)
    return Cifar10(root, limit=limit)


# ---------------------------------------------------------------------------- synthetic

@dataclass
class Synthetic(Dataset):
    """Tiny generated images whose class sets the colour and stripe direction: learnable
    even from random-weight features. Deterministic for a given seed. For tests and
    ``make bench --quick``."""

    n_train: int = SYNTHETIC_SPLITS["train"]
    n_test: int = SYNTHETIC_SPLITS["test"]
    n_classes: int = 4
    image_size: int = 32
    seed: int = 0
    name: str = "synthetic"
    extra_attrs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.classes = [f"class_{i}" for i in range(self.n_classes)]
        self.splits = {"train": self.n_train, "test": self.n_test}

    def _make(self, split: str, i: int, j: int) -> Batch:
        out = np.empty((j - i, self.image_size, self.image_size, 3), np.uint8)
        labels = np.empty(j - i, np.int64)
        s = self.image_size
        yy, xx = np.mgrid[0:s, 0:s]
        for k, row in enumerate(range(i, j)):
            rng = np.random.default_rng([self.seed, 0 if split == "train" else 1, row])
            c = row % self.n_classes
            colour = np.array([(c * 67) % 256, (c * 131 + 40) % 256, (c * 29 + 90) % 256])
            stripes = ((xx if c % 2 else yy) // max(1, s // 8)) % 2
            img = colour[None, None, :] * (0.6 + 0.4 * stripes[..., None])
            img = img + rng.normal(0, 20, size=img.shape)
            out[k] = np.clip(img, 0, 255).astype(np.uint8)
            labels[k] = c
        return out, labels

    def batches(self, split, start, stop, batch_size):
        stop = min(stop, self.splits[split])
        for i in range(start, stop, batch_size):
            yield self._make(split, i, min(i + batch_size, stop))

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"synthetic")
        for split, n in self.splits.items():
            for images, labels in self.batches(split, 0, n, 256):
                h.update(labels.astype("<i8").tobytes())
                h.update(images.tobytes())
        return h.hexdigest()


@register_dataset("synthetic", SYNTHETIC_SPLITS)
def _synthetic(data_dir: Path, *, download: bool = True, limit: int | None = None) -> Dataset:
    ds = Synthetic()
    if limit is not None:
        ds.splits = limited(ds.splits, limit)
    return ds

