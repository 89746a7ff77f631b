"""Stage one end to end on the synthetic dataset with a tiny random-weight backbone:
features match an independent Keras computation, cache hit, resume, mismatch, naming."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from featcache.backbones.registry import build_backbone, get_backbone
from featcache.cache import lock, reader
from featcache.config import ExtractConfig
from featcache.data.datasets import Synthetic
from featcache.errors import ConfigError, Interrupted, StaleCacheError
from featcache.extract.run import extract_features, make_step, shard_range


def _cfg(tmp_path, **kw):
    base = dict(dataset="synthetic", backbone="mobilenet_025", weights="none", size=48,
                batch=32, out_dir=str(tmp_path))
    base.update(kw)
    return ExtractConfig(**base)


def test_features_equal_keras_reference_computation(tmp_path):
    import keras
    import tensorflow as tf

    r = extract_features(_cfg(tmp_path, flip=True, precision="float32"))  # bf16 is tested apart
    fs = reader.load_features(r.path)
    ds = Synthetic()
    images, labels = next(ds.batches("test", 0, 8, 8))
    model = build_backbone(get_backbone("mobilenet_025"), weights="none")
    x = tf.image.resize(images.astype("float32"), (48, 48), method="bilinear").numpy()
    ref = model(keras.applications.mobilenet.preprocess_input(x.copy()), training=False)
    np.testing.assert_allclose(fs["test"].features[:8], np.asarray(ref), rtol=1e-4, atol=1e-5)
    ref_flip = model(keras.applications.mobilenet.preprocess_input(x[:, :, ::-1].copy()),
                     training=False)
    np.testing.assert_allclose(fs["test"].features_flip[:8], np.asarray(ref_flip),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(fs["test"].labels[:8], labels)
    assert fs.attrs["image_size"] == 48 and fs.attrs["preprocess"] == "tf"
    assert fs.attrs["dataset_sha256"] == ds.fingerprint()
    for key in reader.PROVENANCE_KEYS:
        assert key in fs.attrs, key


def test_second_run_is_a_cache_hit(tmp_path):
    first = extract_features(_cfg(tmp_path))
    assert not first.cached and first.images == 160
    stamp = first.path.stat().st_mtime_ns
    again = extract_features(_cfg(tmp_path))
    assert again.cached and again.images == 0 and "up to date" in again.summary()
    assert first.path.stat().st_mtime_ns == stamp


def test_resume_after_interruption_is_bit_identical(tmp_path):
    whole = reader.load_features(extract_features(_cfg(tmp_path / "a")).path)
    cfg = _cfg(tmp_path / "b")
    with pytest.raises(Interrupted, match="run the same command again to resume"):
        extract_features(cfg, stop_after=64)
    partial = lock.partial_path(cfg.output_path)
    assert partial.exists() and not cfg.output_path.exists()
    assert reader.read_attrs(partial)["rows_done"] == [64, 0]
    # resume with another batch size: the file's own batch size is used so batches line up
    r = extract_features(dataclasses.replace(cfg, batch=50))
    assert r.images == 96
    resumed = reader.load_features(r.path)
    for split in ("train", "test"):
        np.testing.assert_array_equal(resumed[split].features, whole[split].features)
        np.testing.assert_array_equal(resumed[split].labels, whole[split].labels)


def test_changed_setting_under_the_same_name_is_refused(tmp_path):
    extract_features(_cfg(tmp_path, variant="mine"))
    with pytest.raises(StaleCacheError, match=r"preprocess differ.*--force"):
        extract_features(_cfg(tmp_path, variant="mine", preprocess="scale01"))
    r = extract_features(_cfg(tmp_path, variant="mine", preprocess="scale01", force=True))
    assert reader.read_attrs(r.path)["preprocess"] == "scale01"


def test_changed_dataset_is_stale(tmp_path):
    cfg = _cfg(tmp_path)
    extract_features(cfg)
    changed = Synthetic(seed=1)
    with pytest.raises(StaleCacheError, match="dataset_sha256"):
        extract_features(cfg, dataset=changed)


def test_file_names_spell_out_non_default_settings():
    tf = dict(runtime="tensorflow")
    c = ExtractConfig(**tf)  # mirrored features and the default cut are stored by default
    assert str(c.output_path) == "features/cifar10_mobilenet_v2_224_flip_cut-block_13.h5"
    assert ExtractConfig(cut="none", **tf).output_path.name == "cifar10_mobilenet_v2_224_flip.h5"
    assert ExtractConfig(flip=False, **tf).output_path.name == \
        "cifar10_mobilenet_v2_224_cut-block_13.h5"
    c = ExtractConfig(size=32, preprocess="scale01", flip=True, dtype="float16", limit=500, **tf)
    assert c.output_path.name == "cifar10_mobilenet_v2_32_scale01_f16_flip_n500_cut-block_13.h5"
    assert ExtractConfig(backbone="inception_v3", flip=False, **tf).output_path.name == \
        "cifar10_inception_v3_299.h5"
    assert ExtractConfig(variant="x", shard=(1, 4)).output_path.name == \
        "cifar10_mobilenet_v2_224_x.part1of4.h5"
    # the runtime and precision are spelled as resolved: OpenVINO files are never
    # TensorFlow's, a bf16 file is never a float32 one
    ov = dict(runtime="openvino", flip=True)
    assert ExtractConfig(precision="float32", **ov).output_path.name == \
        "cifar10_mobilenet_v2_224_ov_flip_cut-block_13.h5"
    assert ExtractConfig(precision="mixed_bfloat16", flip=True, **tf).output_path.name == \
        "cifar10_mobilenet_v2_224_bf16_flip_cut-block_13.h5"
    assert ExtractConfig(output="/tmp/o.h5").output_path.as_posix() == "/tmp/o.h5"


@pytest.mark.parametrize("kw, msg", [
    (dict(backbone="nope"), "unknown backbone"),
    (dict(backbone="inception_v3", size=32), "at least 75 px"),
    (dict(precision="float8"), "unknown precision"),
    (dict(batch=0), "--batch must be between 1 and 4096"),
])
def test_bad_settings_are_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        ExtractConfig(**kw).resolved()


def test_shard_ranges_are_contiguous_batch_aligned_and_cover_everything():
    for rows, batch, n in [(160, 32, 2), (50000, 64, 3), (10, 4, 4), (7, 64, 3)]:
        ranges = [shard_range(rows, batch, (i, n)) for i in range(n)]
        assert ranges[0][0] == 0 and ranges[-1][1] == rows
        for (a, b), (c, d) in zip(ranges, ranges[1:]):
            assert b == c and a <= b
        assert all(lo % batch == 0 for lo, _ in ranges)


def test_make_step_accepts_uint8_of_any_size():
    model = build_backbone(get_backbone("mobilenet_025"), weights="none")
    step = make_step(model, size=40, mode="tf")
    a, _ = step(np.zeros((2, 32, 32, 3), np.uint8))
    b, _ = step(np.zeros((3, 57, 41, 3), np.uint8))
    assert a.shape == (2, 256) and b.shape == (3, 256) and a.dtype == np.float32


def test_bfloat16_precision_stores_float32_close_to_float32(tmp_path):
    f32 = reader.load_features(
        extract_features(_cfg(tmp_path, runtime="tensorflow")).path)["test"].features
    r = extract_features(_cfg(tmp_path, runtime="tensorflow", precision="mixed_bfloat16"))
    assert "bf16" in r.path.name
    bf = reader.load_features(r.path)["test"].features
    assert bf.dtype == np.float32
    cos = (f32 * bf).sum(1) / np.linalg.norm(f32, axis=1) / np.linalg.norm(bf, axis=1)
    assert cos.min() > 0.95
