"""CIFAR-10 loading from the official python layout (a tiny fake written here), its
fingerprint, streaming batches, and the errors for missing/corrupt data offline."""

from __future__ import annotations

import pickle
import urllib.error

import numpy as np
import pytest

from featcache.data import datasets
from featcache.data.datasets import Cifar10, open_dataset
from featcache.errors import ConfigError, DataError


def fake_cifar(root, per_file=6, seed=0):
    """Write a miniature cifar-10-batches-py (same keys and layout, no 'filenames')."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        obj = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, per_file).tolist(),
               b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)}
        (d / name).write_bytes(pickle.dumps(obj))
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": per_file}
    (d / "batches.meta").write_bytes(pickle.dumps(meta))
    return d


class SmallCifar(Cifar10):
    """Cifar10 over the fake files, whose split sizes are smaller than the real ones."""

    def __post_init__(self):
        super().__post_init__()
        self.splits = {"train": 30, "test": 6} if self.limit is None else \
            {"train": min(30, self.limit), "test": min(6, self.limit)}


def test_layout_channel_major_to_nhwc(tmp_path):
    d = fake_cifar(tmp_path)
    ds = SmallCifar(d)
    raw = pickle.loads((d / "data_batch_2").read_bytes())
    images, labels = next(ds.batches("train", 6, 12, 6))
    expect = raw[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(images, expect)
    np.testing.assert_array_equal(labels, raw[b"labels"])
    assert images.dtype == np.uint8 and ds.classes[3] == "c3"


def test_batches_cross_file_boundaries_in_order(tmp_path):
    ds = SmallCifar(fake_cifar(tmp_path))
    parts = list(ds.batches("train", 4, 23, 5))
    assert [len(y) for _, y in parts] == [2, 5, 1, 5, 1, 5]  # never mixes two files in a batch
    whole = np.concatenate([y for _, y in ds.batches("train", 0, 30, 100)])
    np.testing.assert_array_equal(np.concatenate([y for _, y in parts]), whole[4:23])


def test_fingerprint_changes_with_one_pixel(tmp_path):
    a = SmallCifar(fake_cifar(tmp_path / "a")).fingerprint()
    assert a == SmallCifar(fake_cifar(tmp_path / "b")).fingerprint()
    d = tmp_path / "b" / "cifar-10-batches-py"
    obj = pickle.loads((d / "test_batch").read_bytes())
    obj[b"data"][0, 0] ^= 1
    (d / "test_batch").write_bytes(pickle.dumps(obj))
    assert SmallCifar(d).fingerprint() != a


def test_finds_the_folder_or_its_parent(tmp_path):
    d = fake_cifar(tmp_path)
    assert datasets.find_cifar10(tmp_path) == d
    assert datasets.find_cifar10(d) == d
    assert datasets.find_cifar10(tmp_path / "elsewhere") is None


def test_missing_batch_file_is_named(tmp_path):
    d = fake_cifar(tmp_path)
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match="lacks data_batch_3"):
        Cifar10(d)


def test_corrupt_batch_file_is_a_data_error(tmp_path):
    d = fake_cifar(tmp_path)
    (d / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="not a readable CIFAR-10 batch"):
        list(SmallCifar(d).batches("test", 0, 6, 6))


def test_offline_and_missing_says_where_to_put_the_files(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(datasets.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match=r"could not be downloaded.*cifar-10-batches-py.*DATA_DIR"):
        open_dataset("cifar10", data_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # no half-downloaded leftovers
    with pytest.raises(DataError, match="not found"):
        open_dataset("cifar10", data_dir=tmp_path, download=False)


def test_download_checks_sha256(tmp_path, monkeypatch):
    import io

    monkeypatch.setattr(datasets.urllib.request, "urlopen",
                        lambda *a, **k: io.BytesIO(b"not the archive"))
    with pytest.raises(DataError, match="sha256"):
        datasets.download_cifar10(tmp_path)
    assert not list(tmp_path.glob("*.part"))


def test_download_extracts_a_good_archive(tmp_path, monkeypatch):
    import hashlib
    import io
    import tarfile

    src = fake_cifar(tmp_path / "src")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    blob = buf.getvalue()
    monkeypatch.setattr(datasets.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(blob))
    out = datasets.download_cifar10(tmp_path / "data", sha256=hashlib.sha256(blob).hexdigest())
    assert (out / "test_batch").is_file()


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet22k'"):
        open_dataset("imagenet22k", data_dir=tmp_path)


def test_synthetic_is_deterministic_and_limited():
    a = open_dataset("synthetic", limit=10)
    assert a.splits == {"train": 10, "test": 10}
    assert a.fingerprint() == open_dataset("synthetic", limit=10).fingerprint()
    assert a.fingerprint() != open_dataset("synthetic").fingerprint()
