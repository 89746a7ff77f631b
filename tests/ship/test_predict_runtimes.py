"""``featcache predict`` on OpenVINO and on TensorFlow (featcache.ship.engines): the two give
the same probabilities at float32 (every format, the antialiased resize and the TTA mirror
inside); the conversion is cached, reused without loading the model, and made again when
the model's bytes change; ``auto`` picks OpenVINO on a CPU and TensorFlow when a GPU is
visible to TensorFlow; bad choices, a failed conversion and a missing OpenVINO are one line
naming the fix; more than a few hundred files get stage one's progress bar.

Offline: the generated image folder and the synthetic data set, mobilenet_025 at 32 px with
random weights whose batch norms are set to the statistics of one batch (plain random
weights give features of ~1e-18, where any two engines agree), ``logreg`` heads;
conversions go to a per-test cache folder where counted.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import sys

import numpy as np
import pytest
from image_folders import CLASSES, make_image_folder
from PIL import Image
from test_ship import cli, one_line_error

from featcache.backbones import runtime
from featcache.errors import ConfigError, ConversionError
from featcache.ship import engines


def _export(path, out, *, tta: bool, fmt: str = "keras", C: float = 1.0):
    from featcache.cache.reader import load_features
    from featcache.heads import get_head
    from featcache.ship.export import export_model

    fs = load_features(path)
    head = get_head("logreg", C=C).fit(fs["train"].features, fs["train"].labels)
    return export_model(path, head=head, output=out, tta=tta, format=fmt).path


def calibrated_weights(path):
    """A mobilenet_025 weight file: random weights, each batch norm's moving statistics set
    to those of one batch of random images (so activations stay O(1) through the network)."""
    import keras

    from featcache.backbones.registry import build_backbone, get_backbone, preprocess

    model = build_backbone(get_backbone("mobilenet_025"), weights="none")
    model.trainable = True          # a frozen batch norm ignores training=True
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0    # moving statistics := this batch's
    x = np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype(np.float32)
    model(preprocess(x, "tf"), training=True)
    model.save_weights(path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Feature files (an image folder: antialiased resize; the synthetic set: plain
    bilinear), their images as files, and exported models of them."""
    from featcache.config import ExtractConfig
    from featcache.data.datasets import Synthetic
    from featcache.extract.run import extract_features

    root = tmp_path_factory.mktemp("predict_rt")
    folder = make_image_folder(root / "pets", copies=2)
    weights = calibrated_weights(root / "calibrated.weights.h5")
    common = dict(backbone="mobilenet_025", weights=str(weights), size=32, batch=8,
                  flip=False, precision="float32", out_dir=str(root / "features"))
    folder_file = extract_features(ExtractConfig(dataset=str(folder), **common)).path
    synth_file = extract_features(ExtractConfig(dataset="synthetic", limit=40, **common)).path
    from featcache.cache.reader import load_features

    assert load_features(folder_file)["train"].features.std(0).mean() > 0.1   # O(1) features
    ds = Synthetic()
    images, _ = next(ds.batches("test", 0, 12, 12))
    synth_images = []
    for i, im in enumerate(images):   # at the model's size, and larger (down-sampled)
        p = root / "synthetic" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(im).resize((32 + 7 * (i % 3),) * 2).save(p)
        synth_images.append(p)
    folder_images = sorted(p for p in folder.rglob("*") if p.is_file() and "broken" not in
                           p.name and not any(part.startswith(".") for part in p.parts)
                           and p.suffix != ".txt")
    models = {
        "folder_tta": _export(folder_file, root / "m" / "folder_tta.keras", tta=True),
        "folder": _export(folder_file, root / "m" / "folder.keras", tta=False, C=0.1),
        "registry": _export(synth_file, root / "m" / "registry.keras", tta=False),
    }
    return {"models": models, "folder_file": folder_file, "root": root,
            "images": {"folder_tta": folder_images, "folder": folder_images,
                       "registry": synth_images}}


@pytest.fixture
def cache(tmp_path, monkeypatch, counted_conversions):
    """A conversion cache of this test's own, and the conversions made in it."""
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
    return counted_conversions


def _probs(rows, class_names):
    return np.array([[{t["class"]: t["probability"] for t in r["top"]}[c] for c in class_names]
                     for r in rows])


# ---------------------------------------------------------------------------- agreement

@pytest.mark.parametrize("which", ["folder_tta", "registry"])
def test_openvino_gives_tensorflows_probabilities_at_float32(built, which):
    from featcache.ship.predict import load_classifier, predict_images

    model, files = built["models"][which], built["images"][which]
    ov = load_classifier(model, runtime="openvino", precision="float32", batch=8)
    tf = load_classifier(model, runtime="tensorflow")
    assert (ov.runtime, ov.precision, tf.runtime, tf.precision) == \
        ("openvino", "float32", "tensorflow", "float32")
    names = tf.class_names
    k = len(names)
    got = _probs(predict_images(ov, files, top_k=k, batch=5), names)   # padded to 8
    want = _probs(predict_images(tf, files, top_k=k, batch=5), names)
    assert got.shape == want.shape == (len(files), k)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()
    assert want.std(0).max() > 1e-3      # the images get different answers: a real check
    # any number of images per call: chunked into the compiled batch, or padded
    from featcache.data.imagefiles import decode_image

    x = np.stack([ov.resize(decode_image(f)) for f in files[:19]])
    np.testing.assert_allclose(ov.probabilities(x), tf.probabilities(x), atol=1e-4)
    if runtime.cpu_has_bf16():   # runs, and is bf16 (how close: the real-weights test)
        bf = _probs(predict_images(load_classifier(model, runtime="openvino",
                                                   precision="bf16"), files, top_k=k), names)
        np.testing.assert_allclose(bf.sum(1), 1, atol=1e-2)
        assert np.abs(bf - want).max() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["savedmodel", "tflite"])
def test_the_other_formats_agree_too(built, tmp_path, fmt):
    from featcache.ship.predict import load_classifier, predict_images

    model = _export(built["folder_file"], tmp_path / f"m.{fmt}", tta=True, fmt=fmt)
    files = built["images"]["folder_tta"]
    ov = load_classifier(model, runtime="openvino", precision="float32")
    tf = load_classifier(model, runtime="tensorflow")
    assert ov.format == fmt
    got = _probs(predict_images(ov, files, top_k=3), CLASSES)
    want = _probs(predict_images(tf, files, top_k=3), CLASSES)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_resize_to_another_size_is_refused_not_converted():
    """The antialiased resize converts as the identity only from the model's own size."""
    import keras
    import openvino as ov
    import tensorflow as tf

    inp = keras.Input((None, None, 3))
    model = keras.Model(inp, keras.layers.Resizing(16, 16, antialias=True)(inp))
    fn = tf.function(lambda x: model(x), input_signature=[tf.TensorSpec((None, 24, 24, 3))])
    with pytest.raises(Exception, match="only a resize to the input's own size"):
        ov.convert_model(fn, extension=[engines.same_size_resize(16)])
    same = tf.function(lambda x: model(x), input_signature=[tf.TensorSpec((None, 16, 16, 3))])
    compiled = ov.Core().compile_model(
        ov.convert_model(same, extension=[engines.same_size_resize(16)]), "CPU")
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(compiled(x)[0], model(x).numpy())


def test_a_fresh_conversion_owns_its_weights(built, cache):
    """The Keras model a conversion traced is gone once it returns; the converted model must
    not point into its freed memory (OpenVINO shares weights by default: here the memory
    is reused at once, and shared weights gave probabilities off by 0.5)."""
    import gc

    import keras
    import tensorflow as tf

    from featcache.ship.predict import load_classifier

    model = built["models"]["registry"]
    x = np.random.default_rng(3).uniform(0, 255, (6, 32, 32, 3)).astype(np.float32)
    want = np.asarray(keras.saving.load_model(model, compile=False)(x, training=False))
    shapes = [tuple(w.shape) for w in keras.saving.load_model(model, compile=False).weights]
    clf = load_classifier(model, runtime="openvino", precision="float32")
    assert len(cache) == 1       # converted here, not read from the cache
    gc.collect()
    junk = [tf.Variable(tf.random.normal(s) * 100) for s in shapes for _ in range(3)]
    np.testing.assert_allclose(clf.probabilities(x), want, atol=1e-4)
    del junk


def test_rbf_svms_cosine_converts_with_the_bucketize_rule():
    """``rbf_svm``'s cosine (Discretization = TensorFlow's Bucketize) on OpenVINO: the
    frontend's own rule fails on it; with featcache's it is TensorFlow's to the bit."""
    import keras
    import openvino as ov

    from featcache.heads import cosine_block

    inp = keras.Input((4,))
    model = keras.Model(inp, cosine_block(inp))
    graph = lambda t: {"cos": model(t)}  # noqa: E731
    with pytest.raises(Exception, match="Bucketize"):
        runtime.convert_graph(graph, (4,), "float32")
    converted = runtime.convert_graph(graph, (4,), "float32",
                                      extensions=[engines.bucketize_rule()])
    x = np.random.default_rng(1).uniform(-300, 300, (500, 4)).astype(np.float32)
    x[:25] = np.linspace(-12, 12, 100).reshape(25, 4)
    x[25] = [np.pi, -np.pi, 3 * np.pi, 0]   # on bucket edges
    got = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
    np.testing.assert_array_equal(got, np.asarray(model(x)))
    np.testing.assert_allclose(got, np.cos(x), atol=2e-6)


# ---------------------------------------------------------------------------- the cache

def test_the_conversion_is_cached_reused_and_redone_when_the_model_changes(built, tmp_path,
                                                                          cache, monkeypatch):
    import keras

    from featcache.ship.predict import load_classifier

    model = tmp_path / "m.keras"
    shutil.copy(built["models"]["folder"], model)
    shutil.copy(str(built["models"]["folder"]) + ".json", str(model) + ".json")
    before = hashlib.sha256(model.read_bytes()).hexdigest()
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    first = load_classifier(model, runtime="openvino", precision="float32").probabilities(x)
    assert len(cache) == 1
    entries = list((tmp_path / "cache" / "openvino").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.xml").is_file()
    assert hashlib.sha256(model.read_bytes()).hexdigest() == before   # stays plain Keras

    # a second call (another batch size, a touched file) reads the cache: no conversion,
    # and the Keras model is not even loaded
    def no_load(*a, **kw):
        raise AssertionError("the Keras model was loaded on a cache hit")
    real_load = keras.saving.load_model
    monkeypatch.setattr(keras.saving, "load_model", no_load)
    model.touch()
    again = load_classifier(model, runtime="openvino", precision="float32", batch=4)
    np.testing.assert_array_equal(again.probabilities(x), first)
    assert len(cache) == 1
    monkeypatch.setattr(keras.saving, "load_model", real_load)

    # the model file replaced by another model (same name): converted again
    shutil.copy(built["models"]["folder_tta"], model)
    other = load_classifier(model, runtime="openvino", precision="float32").probabilities(x)
    assert len(cache) == 2 and len(list((tmp_path / "cache" / "openvino").iterdir())) == 2
    assert np.abs(other - first).max() > 1e-6
    # another precision is another entry
    key = engines.conversion_key(model, "keras", 32, "float32")
    assert key != engines.conversion_key(model, "keras", 32, "bf16")
    assert key["openvino_version"] and key["model_bytes"] == model.stat().st_size


# ---------------------------------------------------------------------------- choosing

def test_auto_is_openvino_on_a_cpu_and_tensorflow_with_a_gpu(built, monkeypatch):
    from featcache.ship.predict import load_classifier

    monkeypatch.setattr(engines, "gpu_for_tensorflow", lambda: False)
    assert engines.choose_runtime("auto") == "openvino"
    assert load_classifier(built["models"]["registry"]).runtime == "openvino"
    monkeypatch.setattr(engines, "gpu_for_tensorflow", lambda: True)
    assert engines.choose_runtime("auto") == "tensorflow"
    clf = load_classifier(built["models"]["registry"])
    assert (clf.runtime, clf.precision) == ("tensorflow", "float32")
    assert engines.choose_runtime("openvino") == "openvino"   # an explicit choice stays
    with pytest.raises(ConfigError, match="unknown runtime 'onnx'.*auto, tensorflow, openvino"):
        engines.choose_runtime("onnx")


def test_a_gpu_counts_only_when_tensorflow_sees_it(monkeypatch):
    import tensorflow as tf

    def never(*a):
        raise AssertionError("asked TensorFlow without a GPU in the device list")
    monkeypatch.setattr(runtime, "visible_gpus", lambda: [])
    monkeypatch.setattr(tf.config, "list_physical_devices", never)
    assert engines.gpu_for_tensorflow() is False
    monkeypatch.setattr(runtime, "visible_gpus", lambda: ["/dev/nvidia0"])
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert engines.gpu_for_tensorflow() is False       # a CPU-only TensorFlow
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"])
    assert engines.gpu_for_tensorflow() is True


def test_precision_follows_stage_ones_auto_rule(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert engines.choose_precision("auto", "openvino") == "bf16"
    assert engines.choose_precision("float32", "openvino") == "float32"
    assert engines.choose_precision("auto", "tensorflow") == "float32"
    with pytest.raises(ConfigError, match="--precision bf16 runs on OpenVINO"):
        engines.choose_precision("bf16", "tensorflow")
    with pytest.raises(ConfigError, match="unknown precision 'mixed_float16'"):
        engines.choose_precision("mixed_float16", "openvino")
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx512f"}))
    assert engines.choose_precision("auto", "openvino") == "float32"
    with pytest.raises(ConfigError, match="no native bfloat16"):
        engines.choose_precision("bf16", "openvino")


def test_a_head_on_int8_features_predicts_in_the_fastest_float_precision(monkeypatch):
    """An exported model is not quantized (predict has no calibration images): a head fitted
    on int8 features runs in bf16 where the CPU has it, else float32 - even on a CPU where
    stage one's auto picks int8."""
    flags = frozenset({"avx512f", "avx512_bf16", "avx512_vnni", "amx_int8"})
    monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)
    assert engines.choose_precision("auto", "openvino", "int8") == "bf16"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2", "avx_vnni"}))
    assert engines.choose_precision("auto", "openvino", "int8") == "float32"
    with pytest.raises(ConfigError, match="unknown precision 'int8'"):
        engines.choose_precision("int8", "openvino")


# ---------------------------------------------------------------------------- errors

def test_bad_choices_are_one_line_errors(built):
    model, image = built["models"]["registry"], built["images"]["registry"][0]
    one_line_error(cli("predict", model, image, "--runtime", "onnx"),
                   "unknown runtime 'onnx' for predict", "auto, tensorflow, openvino")
    one_line_error(cli("predict", model, image, "--runtime", "tensorflow", "--precision",
                       "bf16"), "--precision bf16 runs on OpenVINO", "--runtime openvino")


def test_a_failed_conversion_or_no_openvino_is_one_line_naming_tensorflow(built, cache,
                                                                         monkeypatch, capsys):
    from featcache.cli.main import main
    from featcache.ship.predict import load_classifier

    model, image = built["models"]["registry"], built["images"]["registry"][0]

    def broken(*a, **kw):
        raise RuntimeError("Check 'is_conversion_successful' failed: no rule for FooOp\nmore")
    monkeypatch.setattr(runtime, "convert_graph", broken)
    with pytest.raises(ConversionError, match=r"could not convert registry.keras .*FooOp.*"
                                              r"--runtime tensorflow"):
        load_classifier(model, runtime="openvino", precision="float32")
    argv = ["predict", "-q", str(model), str(image), "--precision", "float32"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("featcache: error: OpenVINO could not convert")
    assert "run featcache predict with --runtime tensorflow" in err[0]
    assert main(argv + ["--runtime", "tensorflow"]) == 0      # the fallback it names works
    assert capsys.readouterr().out.startswith(f"{image}: ")

    monkeypatch.setitem(sys.modules, "openvino", None)         # OpenVINO not installed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "OpenVINO cannot be imported" in err[0]
    assert "--runtime tensorflow" in err[0]


# ---------------------------------------------------------------------------- progress

def test_progress_is_reported_per_batch_and_the_cli_draws_the_bar(built, monkeypatch, capsys):
    from featcache.cli import ship
    from featcache.cli.main import main
    from featcache.ship.predict import iter_predictions

    files = built["images"]["registry"]
    seen = []
    rows = list(iter_predictions(built["models"]["registry"], files, batch=5,
                                 progress=seen.append))
    assert [p.done for p in seen] == [5, 10, 12] and {p.total for p in seen} == {12}
    assert len(rows) == len(seen) and all(p.split == "predict" and p.images_per_s > 0
                                          for p in seen)
    assert seen[-1].eta_s == 0

    monkeypatch.setattr(ship, "PROGRESS_FROM", 10)
    assert main(["predict", str(built["models"]["registry"]), *map(str, files)]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 12
    assert "predict [############################] 12/12" in err and "img/s" in err
    assert main(["predict", "-q", str(built["models"]["registry"]), *map(str, files)]) == 0
    assert "predict [" not in capsys.readouterr().err
    monkeypatch.setattr(ship, "PROGRESS_FROM", 12)            # 12 files: no bar
    assert main(["predict", str(built["models"]["registry"]), *map(str, files)]) == 0
    assert "predict [" not in capsys.readouterr().err


def test_the_bar_is_cleared_for_other_lines_on_a_terminal():
    from featcache.cli.base import ProgressBar
    from featcache.ship.predict import PredictProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = ProgressBar(stream)
    bar(PredictProgress("predict", 1, 4, 10.0, 0.3))
    bar.clear()
    bar(PredictProgress("predict", 2, 4, 10.0, 0.2))   # drawn again at once, not throttled
    text = stream.getvalue()
    assert text.count("predict [") == 2 and "\r\033[K" in text
    assert text.endswith("2/4   10.0 img/s ETA 0m00s")


def test_auto_precision_is_the_features_precision_where_the_cpu_runs_it(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert engines.choose_precision("auto", "openvino", "float32") == "float32"
    assert engines.choose_precision("auto", "openvino", "bf16") == "bf16"
    assert engines.choose_precision("float32", "openvino", "bf16") == "float32"   # asked
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx512f"}))
    assert engines.choose_precision("auto", "openvino", "bf16") == "float32"      # cannot
    assert engines.choose_precision("auto", "tensorflow", "bf16") == "float32"
