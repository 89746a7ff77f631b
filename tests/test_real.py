"""Real ImageNet weights on real CIFAR-10 (marked ``real``; skipped without the files).

A logistic-regression probe on MobileNetV2 features must beat the same probe on
random-weight features of the same images by a wide margin, and the real data must look
like CIFAR-10."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.real

N = 300  # images per split: a few hundred, seconds on a CPU


def _probe(fs) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    tr, te = fs["train"], fs["test"]
    scaler = StandardScaler().fit(tr.features)
    clf = LogisticRegression(C=0.1, max_iter=1000).fit(scaler.transform(tr.features), tr.labels)
    return float(clf.score(scaler.transform(te.features), te.labels))


def test_real_cifar10_is_the_official_data(real_data_dir):
    from featcache.data.datasets import open_dataset

    ds = open_dataset("cifar10", data_dir=real_data_dir, download=False)
    assert ds.splits == {"train": 50000, "test": 10000}
    assert ds.classes[0] == "airplane" and ds.classes[9] == "truck"
    counts = np.bincount(ds.labels("test"), minlength=10)
    assert (counts == 1000).all()
    images, _ = next(ds.batches("train", 0, 5000, 5000))
    mean = images.reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(mean, [0.4914, 0.4822, 0.4465], atol=0.01)


def test_imagenet_features_beat_random_features_by_a_wide_margin(real_data_dir, keras_home,
                                                                 tmp_path):
    from featcache.cache.reader import load_features
    from featcache.config import ExtractConfig
    from featcache.extract.run import extract_features

    common = dict(dataset="cifar10", data_dir=str(real_data_dir), backbone="mobilenet_v2",
                  size=224, limit=N, out_dir=str(tmp_path), download=False)
    real = load_features(extract_features(ExtractConfig(weights="imagenet", **common)).path)
    rand = load_features(extract_features(ExtractConfig(weights="none", **common)).path)
    assert real.attrs["weights"] == "imagenet" and rand.attrs["weights"] == "none"
    acc_real, acc_rand = _probe(real), _probe(rand)
    print(f"probe accuracy: imagenet {acc_real:.3f}, random {acc_rand:.3f}")
    assert acc_real > 0.5
    assert acc_real > acc_rand + 0.25


def test_input_size_does_not_change_the_weight_file(real_data_dir, keras_home, tmp_path):
    """Only the 224-px MobileNetV2 file exists offline; 96 px (a size Keras has its own file
    for) must still run, on exactly the same weights."""
    from featcache.cache.reader import read_attrs
    from featcache.config import ExtractConfig
    from featcache.extract.run import extract_features

    common = dict(data_dir=str(real_data_dir), limit=8, batch=8, out_dir=str(tmp_path),
                  download=False)
    a = read_attrs(extract_features(ExtractConfig(size=96, **common)).path)
    b = read_attrs(extract_features(ExtractConfig(size=128, **common)).path)
    assert a["weights_sha256"] == b["weights_sha256"]
    assert a["image_size"] == 96 and b["image_size"] == 128
