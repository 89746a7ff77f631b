"""Stage one at ``--precision int8``: the graph quantized by NNCF, calibrated on training rows
only, with its own cache key, file name and conversion-cache entry; resumable like any run.
A tiny random-weight backbone on the synthetic data set (the accuracy of real int8 features
is measured in the real-data test and in docs/stage-one.md)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from featcache.backbones import runtime
from featcache.cache import reader
from featcache.config import ExtractConfig, config_sha256
from featcache.data import sizes
from featcache.data.datasets import Synthetic
from featcache.errors import ConfigError, Interrupted, StaleCacheError
from featcache.extract import quantize
from featcache.extract.run import extract_features


def _cfg(tmp_path, **kw):
    base = dict(dataset="synthetic", backbone="mobilenet_025", weights="none", size=48,
                batch=32, out_dir=str(tmp_path), precision="int8", calibration=40)
    base.update(kw)
    return ExtractConfig(**base)


class SpyDataset(Synthetic):
    """Synthetic data that records which split every ``take``/``batches`` call reads."""

    def __post_init__(self):
        super().__post_init__()
        self.reads = []

    def take(self, split, rows):
        self.reads.append(("take", split, tuple(int(r) for r in rows)))
        return super().take(split, rows)

    def batches(self, split, start, stop, batch_size):
        self.reads.append(("batches", split, (start, stop)))
        return super().batches(split, start, stop, batch_size)


def test_calibration_reads_only_training_rows(tmp_path, monkeypatch):
    seen = []
    real = quantize.quantize

    def spying(model, images, **kw):
        seen.append(images.copy())
        return real(model, images, **kw)
    monkeypatch.setattr(quantize, "quantize", spying)
    monkeypatch.setenv("FEATCACHE_CACHE_DIR", str(tmp_path / "cache"))   # a fresh conversion
    ds = SpyDataset()
    r = extract_features(_cfg(tmp_path), dataset=ds)
    assert len(seen) == 1 and len(seen[0]) == 40
    takes = [x for x in ds.reads if x[0] == "take"]
    assert takes and {split for _, split, _ in takes} == {"train"}
    rows = np.array(takes[0][2])
    want, _ = Synthetic().take("train", rows)
    np.testing.assert_array_equal(seen[0], want)    # the sampled training images, exactly
    assert len(set(rows)) == 40 and rows.max() < ds.splits["train"]
    fs = reader.load_features(r.path)
    assert fs.attrs["precision"] == "int8" and fs.attrs["calibration_split"] == "train"
    assert fs.attrs["calibration_images"] == 40 and "nncf_version" in fs.attrs


def test_calibration_rows_are_a_seeded_sample_of_distinct_rows():
    a = quantize.calibration_rows(1000, 300, seed=0)
    assert len(a) == 300 and len(set(a)) == 300 and (np.diff(a) > 0).all()
    np.testing.assert_array_equal(a, quantize.calibration_rows(1000, 300, seed=0))
    assert not np.array_equal(a, quantize.calibration_rows(1000, 300, seed=1))
    assert len(quantize.calibration_rows(50, 300, seed=0)) == 50   # never more than exist


def test_int8_features_are_finite_close_to_float32_and_not_the_same(tmp_path,
                                                                     calibrated_weights):
    w = calibrated_weights("mobilenet_025")
    f32 = reader.load_features(extract_features(_cfg(tmp_path, precision="float32",
                                                     weights=w)).path)
    i8 = reader.load_features(extract_features(_cfg(tmp_path, weights=w)).path)
    a, b = f32["test"].features, i8["test"].features
    assert np.isfinite(b).all() and not np.array_equal(a, b)   # another computation
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    cos = an @ bn.T     # every int8 row against every float32 row
    assert np.abs(a).max() > 1e-3
    # each image's int8 features are closer to its own float32 ones than to other images'
    # (random weights quantize far worse than trained ones: test_real says how close)
    others = (cos.sum(0) - cos.diagonal()) / (len(a) - 1)
    assert (cos.diagonal() > others).mean() >= 0.9, (cos.diagonal(), others)
    assert i8["test"].features_flip is not None   # mirrors work at int8


def test_int8_is_in_the_key_and_the_name(tmp_path):
    f32, i8 = _cfg(tmp_path, precision="float32"), _cfg(tmp_path, calibration=300)
    assert "_ov_int8_" in i8.output_path.name and "int8" not in f32.output_path.name
    assert "_cal" not in i8.output_path.name     # the default calibration is not spelled
    assert "_int8_cal40_" in _cfg(tmp_path).output_path.name
    k = dict(dataset_sha256="d", weights_sha256="w", runtime_version="v")
    assert i8.cache_key(**k)["precision"] == "int8" and i8.cache_key(**k)["calibration"] == 300
    assert "calibration" not in f32.cache_key(**k)       # float files keep their key
    assert config_sha256(i8.cache_key(**k)) != config_sha256(
        dataclasses.replace(i8, calibration=40).cache_key(**k))


def test_a_float32_file_is_never_taken_for_an_int8_one(tmp_path):
    out = str(tmp_path / "one.h5")
    extract_features(_cfg(tmp_path, precision="float32", output=out))
    with pytest.raises(StaleCacheError, match="precision"):
        extract_features(_cfg(tmp_path, output=out))


def test_a_killed_int8_run_resumes_bit_identically_and_a_repeat_is_a_no_op(tmp_path):
    whole = reader.load_features(extract_features(_cfg(tmp_path / "a")).path)
    cfg = _cfg(tmp_path / "b")
    with pytest.raises(Interrupted):
        extract_features(cfg, stop_after=64)
    done = extract_features(cfg)
    assert not done.cached
    again = reader.load_features(done.path)
    for split in ("train", "test"):
        np.testing.assert_array_equal(again[split].features, whole[split].features)
        np.testing.assert_array_equal(again[split].features_flip, whole[split].features_flip)
    assert extract_features(cfg).cached


def test_int8_with_a_cut_stores_activations(tmp_path, calibrated_weights):
    from featcache.cache.activations import ActivationReader

    r = extract_features(_cfg(tmp_path, backbone="mobilenet_v2", size=32, cut="block_15",
                              limit=40, calibration=8,
                              weights=calibrated_weights("mobilenet_v2")))
    with ActivationReader(r.path) as acts:
        assert acts.cut == "block_15" and acts.rows("train") == 40
        a, a_flip = acts.read("train", 0, 40), acts.read("train", 0, 40, flip=True)
        assert np.isfinite(a).all() and a.shape == (40, *acts.shape) and a.std() > 0
        assert not np.array_equal(a, a_flip)


@pytest.mark.parametrize("kw, says", [
    (dict(precision="int4"), "unknown precision 'int4'"),
    (dict(precision="int8", runtime="tensorflow"), "--runtime openvino"),
])
def test_bad_int8_requests_are_one_line_errors(kw, says):
    with pytest.raises(ConfigError, match=says):
        ExtractConfig(**kw).resolved()


def test_int8_without_nncf_names_float32_but_files_are_still_named(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "nncf_available", lambda: False)
    assert "_int8_" in _cfg(tmp_path).output_path.name   # make names files before installing
    with pytest.raises(ConfigError, match="needs NNCF.*--precision float32"):
        extract_features(_cfg(tmp_path))
    assert not list(tmp_path.iterdir())                   # nothing written


def test_the_cli_refuses_a_bad_precision_in_one_line(capsys):
    from featcache.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["path", "--precision", "int4"])
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and len(err.splitlines()) == 1 and "int4" in err


@pytest.mark.parametrize("flags, want", [
    ({"avx2", "avx512f", "avx512_vnni"}, "int8"),                 # AVX-512 VNNI
    ({"avx2", "avx_vnni"}, "int8"),                               # AVX-VNNI
    ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8"}, "int8"),   # AMX
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),                 # bf16 without VNNI
    ({"avx2", "fma"}, "float32"),                                 # AVX2 only: not measured
])
def test_auto_is_the_measured_rule_read_from_the_cpu_flags(monkeypatch, flags, want):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    # the default stores mobilenet_v2's recommended cut; the rule is the same with or without
    # one (the fine-tuned row from int8 activations is within 0.5 points of float32's)
    cfg = ExtractConfig(runtime="openvino")
    assert cfg.resolved().precision == want
    assert cfg.output_path.name == "cifar10_mobilenet_v2_224_ov" + \
        {"int8": "_int8", "bf16": "_bf16", "float32": ""}[want] + "_flip_cut-block_13.h5"
    assert ExtractConfig(runtime="openvino", cut="none").resolved().precision == want
    assert ExtractConfig(runtime="tensorflow").resolved().precision == "float32"


def test_auto_keeps_float_below_the_size_where_quantizing_pays(monkeypatch, tmp_path):
    """int8's one-off quantization is paid back only on a large data set: ``auto`` counts the
    images (a folder's files, a registered set's splits, ``--limit`` applied) first."""
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(
        {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8"}))
    big = runtime.INT8_AUTO_MIN_IMAGES
    assert ExtractConfig(runtime="openvino").resolved().precision == "int8"   # 60,000
    assert ExtractConfig(runtime="openvino", limit=big // 2).resolved().precision == "int8"
    assert ExtractConfig(runtime="openvino", limit=big // 2 - 1).resolved().precision == "bf16"
    assert ExtractConfig(runtime="openvino", dataset="synthetic").resolved().precision == "bf16"
    folder = tmp_path / "photos"
    for cls, n in (("cat", 3), ("dog", 2)):
        (folder / cls).mkdir(parents=True)
        for i in range(n):
            (folder / cls / f"{i}.JPG").write_bytes(b"")
    (folder / "cat" / ".hidden.jpg").write_bytes(b"")
    (folder / "cat" / "notes.txt").write_bytes(b"")
    assert sizes.count_images(str(folder)) == 5
    assert sizes.count_images(str(folder), limit=1) == 2 and \
        sizes.count_images(str(folder), stop_at=4) == 4
    cfg = ExtractConfig(runtime="openvino", dataset=str(folder))
    assert cfg.resolved().precision == "bf16" and "_ov_bf16_" in cfg.output_path.name
    monkeypatch.setattr(runtime, "INT8_AUTO_MIN_IMAGES", 5)
    assert ExtractConfig(runtime="openvino", dataset=str(folder)).resolved().precision == "int8"
    # an explicit precision is never second-guessed, and what cannot be counted is taken as
    # large (the run itself says what is missing)
    assert ExtractConfig(runtime="openvino", dataset="synthetic",
                         precision="int8").resolved().precision == "int8"
    assert sizes.count_images(str(tmp_path / "missing")) is None
