"""Stage one's runtimes: which runtime and precision ``auto`` picks, the file
names and cache keys that keep runtimes apart, OpenVINO's conversion cache (reuse,
invalidation, damaged entries), agreement with TensorFlow for every backbone, and the
one-line error (naming the TensorFlow fallback) when OpenVINO cannot convert.

Tiny sizes, random weights, synthetic data; the conversion cache is a per-test folder
where reuse is checked, else the session's (see conftest)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featcache.backbones import runtime
from featcache.backbones.registry import BACKBONES, build_backbone, get_backbone
from featcache.cache import lock, reader
from featcache.config import ExtractConfig, config_sha256
from featcache.errors import ConfigError, ConversionError
from featcache.extract.run import extract_features, make_step, step_graph

ROOT = Path(__file__).resolve().parents[2]
BF16_FLAGS = frozenset({"avx2", "avx512f", "avx512_bf16"})


def _cfg(tmp_path, **kw):
    base = dict(dataset="synthetic", backbone="mobilenet_025", weights="none", size=32,
                batch=32, out_dir=str(tmp_path))
    base.update(kw)
    return ExtractConfig(**base)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(runtime, "visible_gpus", lambda: [])


# ---------------------------------------------------------------------------- choosing

def test_auto_picks_openvino_on_a_cpu_and_tensorflow_when_a_gpu_is_visible(monkeypatch):
    monkeypatch.setattr(runtime, "visible_gpus", lambda: [])
    assert runtime.resolve_runtime("auto") == "openvino"
    cpu = ExtractConfig(runtime="auto", precision="float32", flip=True, cut="none")
    assert cpu.resolved().runtime == "openvino"
    assert cpu.output_path.name == "cifar10_mobilenet_v2_224_ov_flip.h5"

    monkeypatch.setattr(runtime, "visible_gpus", lambda: ["/proc/driver/nvidia/gpus/0000:01:00.0"])
    assert runtime.resolve_runtime("auto") == "tensorflow"
    gpu = ExtractConfig(runtime="auto", flip=True, cut="none")
    assert gpu.resolved().runtime == "tensorflow" and gpu.resolved().precision == "float32"
    assert gpu.output_path.name == "cifar10_mobilenet_v2_224_flip.h5"
    # an explicit choice is never second-guessed
    assert runtime.resolve_runtime("openvino") == "openvino"
    with pytest.raises(ConfigError, match="unknown runtime"):
        runtime.resolve_runtime("onnx")


def test_visible_gpus_reads_the_device_list_and_honours_cuda_visible_devices(monkeypatch):
    listed = {"/proc/driver/nvidia/gpus/*": ["/proc/driver/nvidia/gpus/0000:01:00.0"]}
    monkeypatch.setattr(runtime.glob, "glob", lambda pat: listed.get(pat, []))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert runtime.visible_gpus() == ["/proc/driver/nvidia/gpus/0000:01:00.0"]
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert runtime.visible_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    listed = {"/dev/nvidia[0-9]*": ["/dev/nvidia0"]}
    assert runtime.visible_gpus() == ["/dev/nvidia0"]
    listed = {}
    assert runtime.visible_gpus() == []


def test_precision_auto_is_bf16_only_for_openvino_on_a_cpu_that_has_it(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: BF16_FLAGS)
    assert runtime.resolve_precision("auto", "openvino") == "bf16"
    assert runtime.resolve_precision("auto", "tensorflow") == "float32"
    assert ExtractConfig(runtime="openvino", flip=True, cut="none").output_path.name == \
        "cifar10_mobilenet_v2_224_ov_bf16_flip.h5"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert runtime.resolve_precision("auto", "openvino") == "float32"
    with pytest.raises(ConfigError, match="no native bfloat16.*--precision float32"):
        runtime.resolve_precision("bf16", "openvino")


@pytest.mark.parametrize("precision, rt, says", [
    ("bf16", "tensorflow", "mixed_bfloat16 with --runtime tensorflow"),
    ("mixed_bfloat16", "openvino", "bf16 with --runtime openvino"),
    ("mixed_float16", "openvino", "--runtime tensorflow"),
    ("float8", "openvino", "unknown precision"),
])
def test_precisions_of_the_other_runtime_are_refused_naming_the_fix(monkeypatch, precision,
                                                                    rt, says):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: BF16_FLAGS)
    with pytest.raises(ConfigError, match=says):
        ExtractConfig(runtime=rt, precision=precision).resolved()


def test_xla_needs_tensorflow():
    with pytest.raises(ConfigError, match="--xla.*--runtime tensorflow"):
        ExtractConfig(runtime="openvino", xla=True).resolved()


def test_naming_imports_neither_tensorflow_nor_openvino():
    code = ("import sys; from featcache.cli.main import main; main(['path', '-q', '--flip']); "
            "bad = [m for m in ('tensorflow', 'openvino', 'keras') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("features/cifar10_mobilenet_v2_224")


def test_cache_key_and_hash_include_runtime_and_precision():
    kw = dict(dataset_sha256="d" * 64, weights_sha256="w" * 64)
    ov = _cfg(Path("x"), runtime="openvino", precision="float32")
    tf = _cfg(Path("x"), runtime="tensorflow", precision="float32")
    k_ov = ov.cache_key(runtime_version="2026.4.1", **kw)
    k_tf = tf.cache_key(runtime_version="2.21.0", **kw)
    assert (k_ov["runtime"], k_ov["runtime_version"], k_ov["precision"]) == \
        ("openvino", "2026.4.1", "float32")
    assert k_tf["runtime"] == "tensorflow"
    keys = [k_ov, k_tf, ov.cache_key(runtime_version="2026.5.0", **kw),
            tf.cache_key(runtime_version="2.21.0", **kw) | {"precision": "mixed_bfloat16"}]
    assert len({config_sha256(k) for k in keys}) == len(keys)
    legacy = tf.cache_key(runtime_version=None, **kw)
    assert "runtime" not in legacy and {**legacy, "runtime": "tensorflow",
                                        "runtime_version": "2.21.0"} == k_tf


# ---------------------------------------------------------------------------- the file

def test_openvino_file_records_runtime_version_and_precision(tmp_path, no_gpu, capsys):
    import openvino

    from featcache.cli.main import main

    r = extract_features(_cfg(tmp_path, flip=True, precision="float32"))
    assert r.path.name == "synthetic_mobilenet_025_32_random_ov_flip.h5"
    attrs = reader.read_attrs(r.path)
    assert (attrs["runtime"], attrs["runtime_version"], attrs["precision"]) == \
        ("openvino", openvino.__version__, "float32")
    assert main(["info", str(r.path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["runtime"] == "openvino" and shown["runtime_version"] == openvino.__version__


def _make_legacy(path: Path, cfg: ExtractConfig) -> None:
    """Rewrite a TensorFlow file's attributes as featcache wrote them before runtimes."""
    import h5py

    with h5py.File(path, "r+") as f:
        key = cfg.cache_key(dataset_sha256=f.attrs["dataset_sha256"],
                            weights_sha256=f.attrs["weights_sha256"], runtime_version=None)
        del f.attrs["runtime"], f.attrs["runtime_version"]
        f.attrs["config_sha256"] = config_sha256(key)


def test_files_written_before_runtimes_are_tensorflow_and_still_a_cache_hit(tmp_path):
    cfg = _cfg(tmp_path, runtime="tensorflow")
    path = extract_features(cfg).path
    _make_legacy(path, cfg)
    attrs = reader.read_attrs(path)
    assert attrs["runtime"] == "tensorflow" and attrs["runtime_version"] == \
        attrs["tensorflow_version"]
    assert reader.load_features(path).attrs["runtime"] == "tensorflow"
    again = extract_features(cfg)
    assert again.cached and again.images == 0


# ---------------------------------------------------------------------------- conversion cache

def _tiny_graph(size=40, flip=True):
    model = build_backbone(get_backbone("mobilenet_025"), weights="none")
    return model, step_graph(model, size=size, mode="tf", flip=flip)


def _trivial_graph(images):
    """Stands in for a backbone where only the cache's bookkeeping is tested (fast to convert)."""
    import tensorflow as tf

    x = tf.cast(images, tf.float32)
    return {"features": tf.reduce_mean(x, axis=[1, 2]),
            "features_flip": tf.reduce_max(x, axis=[1, 2])}


def _key(**kw):
    base = dict(backbone="mobilenet_025", weights_sha256="w" * 64, input_shape=(32, 32, 3),
                input_dtype="uint8", image_size=40, preprocess="tf", pooling="avg", flip=True,
                precision="float32")
    base.update(kw)
    return runtime.conversion_key(**base)


def test_conversion_is_cached_reused_invalidated_and_rebuilt_when_damaged(tmp_path,
                                                                           counted_conversions,
                                                                           caplog):
    graph = _trivial_graph
    key = _key()
    _, converted = runtime.load_or_convert(key, graph, root=tmp_path)
    assert converted and len(counted_conversions) == 1
    entry = next((tmp_path / "openvino").iterdir())
    meta = json.loads((entry / "key.json").read_text())
    assert meta["key"] == key and set(meta["sha256"]) == {"model.xml", "model.bin"}
    # the same key: read back, not converted
    _, converted = runtime.load_or_convert(key, graph, root=tmp_path)
    assert not converted and len(counted_conversions) == 1
    # any part of the key changed: converted again, in its own entry
    for changed in (dict(flip=False), dict(input_shape=(48, 48, 3)), dict(image_size=48),
                    dict(weights_sha256="v" * 64), dict(precision="bf16")):
        _, converted = runtime.load_or_convert(_key(**changed), graph, root=tmp_path)
        assert converted, changed
    assert len(counted_conversions) == 6
    assert len(list((tmp_path / "openvino").iterdir())) == 6
    # a new OpenVINO version (part of every key) invalidates too
    assert key["openvino_version"] and key["format"] == runtime.CONVERSION_FORMAT
    # damaged entries (changed bytes, garbage manifest, missing graph) are converted again,
    # with a warning, never crashed on
    for damage in (lambda e: (e / "model.bin").write_bytes(b"not the weights"),
                   lambda e: (e / "key.json").write_text("{not json"),
                   lambda e: (e / "model.xml").unlink()):
        damage(entry)
        caplog.clear()
        _, converted = runtime.load_or_convert(key, graph, root=tmp_path)
        assert converted and "converting again" in caplog.text
    _, converted = runtime.load_or_convert(key, graph, root=tmp_path)
    assert not converted


def test_second_run_does_not_convert_again(tmp_path, no_gpu, counted_conversions, monkeypatch):
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
    a = extract_features(_cfg(tmp_path / "a", precision="float32"))
    assert len(counted_conversions) == 1
    b = extract_features(_cfg(tmp_path / "b", precision="float32"))
    assert len(counted_conversions) == 1   # another output, the same conversion
    np.testing.assert_array_equal(reader.load_features(a.path)["test"].features,
                                  reader.load_features(b.path)["test"].features)
    # flip is on by default: the plain-only graph is another one
    extract_features(_cfg(tmp_path / "c", precision="float32", flip=False))
    assert len(counted_conversions) == 2   # another graph
    assert extract_features(_cfg(tmp_path / "a", precision="float32")).cached
    assert len(counted_conversions) == 2   # a no-op converts nothing


def test_a_short_last_batch_is_padded_and_gives_the_same_rows(tmp_path):
    _, graph = _tiny_graph()
    step = runtime.openvino_step(graph, _key(), batch=8, root=tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    full, full_flip = step(images)
    short, short_flip = step(images[:5])
    assert full.shape == (8, 256) and short.shape == (5, 256) and short_flip.shape == (5, 256)
    np.testing.assert_allclose(short, full[:5], rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(short_flip, full_flip[:5], rtol=1e-5, atol=1e-30)
    assert not np.array_equal(full, full_flip)
    with pytest.raises(ValueError, match="compiled for 8"):
        step(np.concatenate([images, images]))


def test_resize_matches_tensorflow_bilinear(tmp_path):
    """The converted graph's resize is TensorFlow's ``tf.image.resize(..., "bilinear")``."""
    import openvino as ov
    import tensorflow as tf

    rng = np.random.default_rng(1)
    for src, dst in ((32, 224), (32, 40), (57, 32)):
        images = rng.integers(0, 256, (2, src, src, 3), dtype=np.uint8)
        graph = lambda x: {"features": tf.image.resize(tf.cast(x, tf.float32), (dst, dst),  # noqa: E731
                                                       method="bilinear")}
        compiled = ov.Core().compile_model(runtime.convert_graph(graph, (src, src, 3), "uint8"),
                                           "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        got = compiled(images)[0]
        want = tf.image.resize(images.astype(np.float32), (dst, dst), method="bilinear").numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-3)


# ---------------------------------------------------------------------------- every backbone

#: converted on every run: the default, and one of each preprocessing family but torch
#: (densenet121, the only one, takes minutes to trace); the rest with -m all_backbones
REPRESENTATIVE = ("mobilenet_025", "mobilenet_v2", "mobilenet_v3_small", "resnet50")


def _agreement(name: str, precision: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    spec = get_backbone(name)
    size = max(spec.min_size, 40)   # > 32: the 32 px images are resized in the graph
    model = build_backbone(spec, weights="none")
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    want, want_flip = make_step(model, size=size, mode=spec.preprocess, flip=True)(images)
    key = _key(backbone=name, image_size=size, preprocess=spec.preprocess, precision=precision)
    step = runtime.openvino_step(step_graph(model, size=size, mode=spec.preprocess, flip=True),
                                 key, batch=4, root=root)
    got, got_flip = step(images)
    return np.concatenate([want, want_flip]), np.concatenate([got, got_flip])


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=() if n in REPRESENTATIVE else pytest.mark.all_backbones)
    for n in sorted(BACKBONES)])
def test_every_backbone_converts_and_agrees_with_tensorflow(name, tmp_path, request):
    if name not in REPRESENTATIVE and "all_backbones" not in (request.config.option.markexpr
                                                              or ""):
        pytest.skip("not in the representative subset; run all with -m all_backbones")
    want, got = _agreement(name, "float32", tmp_path)
    scale = np.abs(want).max()
    assert scale > 0 and np.isfinite(got).all()
    assert np.abs(got - want).max() <= 1e-3 * scale, (np.abs(got - want).max(), scale)
    if not runtime.cpu_has_bf16():
        return  # the bf16 half is its own test below, skipped with the reason
    want, got = _agreement(name, "bf16", tmp_path)
    cos = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.99, cos


@pytest.mark.skipif(not runtime.cpu_has_bf16(),
                    reason="this CPU has no native bfloat16 (no avx512_bf16/amx_bf16)")
def test_bf16_features_are_close_to_float32(tmp_path):
    want, got = _agreement("mobilenet_v2", "bf16", tmp_path)
    cos = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.99, cos


# ---------------------------------------------------------------------------- failure

def test_a_failed_conversion_is_one_line_naming_the_tensorflow_fallback(tmp_path, no_gpu,
                                                                        monkeypatch, capsys):
    from featcache.cli.main import main

    def broken(*a, **kw):
        raise RuntimeError("Check 'is_conversion_successful' failed: Cannot create "
                           "FooBar layer\nmore lines of converter log")
    monkeypatch.setattr(runtime, "convert_graph", broken)
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
    cfg = _cfg(tmp_path, precision="float32")
    with pytest.raises(ConversionError, match=r"could not convert mobilenet_025 .*FooBar.*"
                                              r"--runtime tensorflow"):
        extract_features(cfg)
    assert not cfg.output_path.exists() and not lock.partial_path(cfg.output_path).exists()
    rc = main(["features", "-q", "--dataset", "synthetic", "--backbone", "mobilenet_025",
               "--weights", "none", "--size", "32", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and err[0].startswith("featcache: error: OpenVINO could not")
    assert "--runtime tensorflow" in err[0]
    # the fallback it names works
    assert extract_features(_cfg(tmp_path, runtime="tensorflow")).images > 0
