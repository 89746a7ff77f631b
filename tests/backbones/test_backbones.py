"""The backbone registry: every entry builds headless with random weights, gives its declared
embedding size, and its preprocessing equals Keras' own ``preprocess_input``."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from featcache.backbones.registry import (
    BACKBONES,
    PREPROCESS_MODES,
    build_backbone,
    get_backbone,
    preprocess,
    weights_sha256,
)
from featcache.errors import ConfigError, WeightsError

REQUIRED = {"resnet50", "resnet50v2", "vgg16", "mobilenet", "mobilenet_v2", "mobilenet_v3_small",
            "mobilenet_v3_large", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2",
            "efficientnet_b3", "efficientnetv2_b0", "efficientnetv2_s", "convnext_tiny",
            "densenet121", "inception_v3", "xception"}


def test_registry_covers_the_required_backbones():
    assert REQUIRED <= set(BACKBONES)


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ConfigError, match="unknown backbone 'resnet9000'.*mobilenet_v2"):
        get_backbone("resnet9000")


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_builds_with_declared_dim(name):
    spec = BACKBONES[name]
    model = build_backbone(spec, weights="none")
    size = max(spec.min_size, 32)
    x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    out = np.asarray(model(preprocess(x, spec.preprocess), training=False))
    assert out.shape == (2, spec.dim)
    assert np.isfinite(out).all()
    # fully convolutional: a second input size runs through the same model
    y = np.random.default_rng(2).uniform(0, 255, (1, size + 16, size + 8, 3)).astype("float32")
    out2 = np.asarray(model(preprocess(y, spec.preprocess), training=False))
    assert out2.shape[-1] == spec.dim


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_preprocessing_equals_keras_preprocess_input(name):
    spec = BACKBONES[name]
    module = importlib.import_module(f"keras.applications.{spec.keras_module}")
    x = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3)).astype("float32")
    expected = np.asarray(module.preprocess_input(x.copy()))
    got = np.asarray(preprocess(x, spec.preprocess))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)


def test_scale01_is_the_tutorials_divide_by_255():
    x = np.arange(0, 256, dtype="float32").reshape(1, 1, -1, 1).repeat(3, axis=-1)
    np.testing.assert_allclose(np.asarray(preprocess(x, "scale01")), x / 255.0, rtol=1e-7)
    assert set(PREPROCESS_MODES) >= {"caffe", "tf", "torch", "none", "scale01"}


def test_random_weights_are_seeded():
    spec = get_backbone("mobilenet_025")
    a = weights_sha256(build_backbone(spec, weights="none", seed=3))
    b = weights_sha256(build_backbone(spec, weights="none", seed=3))
    c = weights_sha256(build_backbone(spec, weights="none", seed=4))
    assert a == b != c


def test_weights_file_of_the_wrong_backbone_is_refused(tmp_path):
    small = build_backbone(get_backbone("mobilenet_025"), weights="none")
    path = tmp_path / "small.weights.h5"
    small.save_weights(path)
    with pytest.raises(WeightsError, match="does not fit mobilenet_v2"):
        build_backbone(get_backbone("mobilenet_v2"), weights=str(path))


def test_weights_file_path_round_trips(tmp_path):
    spec = get_backbone("mobilenet_025")
    model = build_backbone(spec, weights="none", seed=7)
    path = tmp_path / "mine.weights.h5"
    model.save_weights(path)
    again = build_backbone(spec, weights=str(path))
    assert weights_sha256(again) == weights_sha256(model)


def test_missing_weights_file_path():
    with pytest.raises(WeightsError, match="does not exist"):
        build_backbone(get_backbone("mobilenet_025"), weights="/nonexistent/w.h5")


def test_imagenet_weights_missing_offline_says_where(tmp_path, monkeypatch):
    from keras.src.utils import file_utils

    def offline(*a, **k):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- offline")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(WeightsError,
                       match=r"resnet50 are not at .*resnet50_weights.*--weights none"):
        build_backbone(get_backbone("resnet50"), weights="imagenet")
