"""What runs an exported model in ``featcache predict``: the choice of runtime and precision,
and the OpenVINO runner (the exported model converted once, cached, compiled for the CPU).

- **Choosing** (cheap: imports neither TensorFlow nor OpenVINO until a GPU is listed):
  :func:`choose_runtime` turns ``auto`` into ``openvino``, or into ``tensorflow`` when a
  GPU is visible to TensorFlow (:func:`gpu_for_tensorflow`: the kernel shows one,
  :func:`featcache.backbones.runtime.visible_gpus`, and TensorFlow lists it);
  :func:`choose_precision` follows stage one's ``auto`` rule
  (:func:`featcache.backbones.runtime.resolve_precision`: ``bf16`` for OpenVINO on a CPU
  whose ``/proc/cpuinfo`` lists native bfloat16, else ``float32``). The TensorFlow runtime
  (TFLite's interpreter for a ``.tflite`` model) runs the model as saved: float32.
- **Running** (:func:`openvino_runner`): the exported model, traced for ``(None, size,
  size, 3)`` float32 images — ``featcache predict`` always resizes to the model's size
  first, with the same function as the TensorFlow path — is converted by
  ``ov.convert_model`` (``.keras``: the loaded Keras model; ``.savedmodel``: its ``serve``;
  ``.tflite``: the file) through stage one's conversion cache and compile helpers
  (:func:`featcache.backbones.runtime.compile_cached`), under :func:`conversion_key`. The
  antialiased resize inside a Keras/SavedModel model (TensorFlow's ``ScaleAndTranslate``,
  which OpenVINO has no rule for) is then a resize from ``size`` to ``size``: exactly the
  identity in TensorFlow, and converted as the identity (:func:`same_size_resize`); a
  resize to any other size is refused, so the conversion fails rather than differ.
  ``Bucketize`` (the ``rbf_svm`` head's cosine) gets a rule of its own
  (:func:`bucketize_rule`). The converted model owns its weights (the Keras model it came
  from is dropped).

Reads the model file (or SavedModel folder) to hash it, ``/proc/cpuinfo`` and the GPU
device list; writes only conversion-cache entries (``<cache_dir>/openvino/<key hash>/``,
beside stage one's; the model file itself is never changed).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable

from featcache.backbones import runtime
from featcache.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: ``featcache predict --runtime``: stage one's runtimes
RUNTIMES = runtime.RUNTIMES
DEFAULT_RUNTIME = runtime.DEFAULT_RUNTIME
#: ``featcache predict --precision``: auto (stage one's rule), float32, bf16 (OpenVINO)
PRECISIONS = ("auto", "float32", "bf16")
DEFAULT_PRECISION = runtime.DEFAULT_PRECISION
#: Bumped when the converted graph of an exported model changes (part of every key).
CONVERSION_FORMAT = "exported-model-1"
#: what a failed conversion tells the user to do instead
FALLBACK = "run featcache predict with --runtime tensorflow"


# ---------------------------------------------------------------------------- choosing

def gpu_for_tensorflow() -> bool:
    """True when TensorFlow would run the model on a GPU: the kernel shows one (cheap, no
    import) and TensorFlow lists it (a CPU-only TensorFlow does not)."""
    if not runtime.visible_gpus():
        return False
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def choose_runtime(name: str) -> str:
    """``auto`` -> ``tensorflow`` when a GPU is visible to TensorFlow, else ``openvino``."""
    if name not in RUNTIMES:
        raise ConfigError(f"unknown runtime {name!r} for predict; choose one of "
                          f"{', '.join(RUNTIMES)} (--runtime)")
    if name != "auto":
        return name
    return "tensorflow" if gpu_for_tensorflow() else "openvino"


def choose_precision(name: str, runtime_name: str, features: str | None = None) -> str:
    """The precision ``runtime_name`` runs at: ``auto`` -> the precision the head's
    features were computed at (``features``, from the model's metadata: bf16 features
    predict in bf16, float32 ones in float32, so predict reproduces what the head was
    trained and scored on) where OpenVINO on this CPU runs it, else the fastest float
    precision here (int8 features too: an exported model is not quantized);
    float32 for TensorFlow; ``bf16`` only with OpenVINO on a CPU that has it."""
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r} for predict; choose one of "
                          f"{', '.join(PRECISIONS)} (--precision)")
    if runtime_name == "tensorflow":
        if name == "bf16":
            raise ConfigError("--precision bf16 runs on OpenVINO: use --runtime openvino (the "
                              "TensorFlow runtime runs the exported model in float32)")
        return "float32"
    if name == "auto" and features in ("float32", "bf16") and \
            (features == "float32" or runtime.cpu_has_bf16()):
        return features
    if name == "auto":   # int8 features too: predict has no calibration set, it runs float
        return runtime.float_precision("openvino")
    return runtime.resolve_precision(name, "openvino")


# ---------------------------------------------------------------------------- the key

def model_sha256(path: Path) -> tuple[str, int]:
    """(sha256, bytes) of a model file, or of a SavedModel folder's files (their relative
    paths and contents, in sorted order)."""
    h = hashlib.sha256()
    total = 0
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
                total += len(block)
    return h.hexdigest(), total


def conversion_key(path: Path, fmt: str, size: int, precision: str) -> dict:
    """Everything the converted model depends on: the model's bytes (sha256 and size: a
    re-exported or edited model is converted again; a copy, a rename or a touch is not),
    its format and input size, the precision, and the OpenVINO, TensorFlow and Keras
    versions that convert it. The batch size is set at compile, not here."""
    import keras
    import openvino
    import tensorflow as tf

    digest, nbytes = model_sha256(path)
    return {"format": CONVERSION_FORMAT, "model_format": fmt, "model_sha256": digest,
            "model_bytes": nbytes, "input_shape": [int(size), int(size), 3],
            "input_dtype": "float32", "precision": precision,
            "openvino_version": openvino.__version__, "tensorflow_version": tf.__version__,
            "keras_version": keras.__version__}


# ---------------------------------------------------------------------------- converting

def not_loadable(path: Path, fmt: str, exc: BaseException) -> DataError:
    """The one-line error for a model file Keras/TensorFlow cannot load."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return DataError(f"{path} is not a loadable {fmt} model ({first[:160]}); export it "
                     f"again with `featcache export`")


def same_size_resize(size: int):
    """An OpenVINO conversion extension: TensorFlow's ``ScaleAndTranslate`` (the antialiased
    bilinear resize) from ``size`` x ``size`` to ``size`` x ``size`` as the identity, which
    it is in TensorFlow (bit for bit). Any other resize is refused: the conversion fails,
    naming the TensorFlow fallback, instead of giving other numbers."""
    from openvino.frontend import ConversionExtension

    def convert(node):
        images = node.get_input(0)
        shape = images.get_partial_shape()
        target = node.get_input(1).get_node()
        hw = [shape[i].get_length() if shape[i].is_static else None for i in (1, 2)] \
            if shape.rank.is_static and shape.rank.get_length() == 4 else None
        want = [int(v) for v in target.get_data()] if hasattr(target, "get_data") else None
        if hw != [size, size] or want != [size, size]:
            raise ValueError(f"ScaleAndTranslate from {hw} to {want}: only a resize to the "
                             f"input's own size ({size} px) converts")
        return [images]

    return ConversionExtension("ScaleAndTranslate", convert)


def bucketize_rule():
    """An OpenVINO conversion extension for TensorFlow's ``Bucketize`` (``rbf_svm``'s cosine,
    :func:`featcache.heads.cosine_block`, is built on ``keras.layers.Discretization``): the
    frontend's own rule fails on the boundaries' type (``Bad as from vector<double>``);
    this one is OpenVINO's ``Bucketize`` with the float32 boundaries, left-closed buckets
    like TensorFlow's."""
    import numpy as np
    import openvino.opset13 as ops
    from openvino.frontend import ConversionExtension

    def convert(node):
        bounds = ops.constant(np.asarray(node.get_attribute("boundaries"), np.float32))
        return [ops.bucketize(node.get_input(0), bounds, output_type="i32",
                              with_right_bound=False).output(0)]

    return ConversionExtension("Bucketize", convert)


def _converter(path: Path, fmt: str, size: int) -> Callable:
    """``convert() -> ov.Model`` for the exported model at ``path`` (loads it only when
    called: on a cache hit nothing is loaded)."""
    def convert():
        if fmt == "tflite":
            import openvino as ov

            return ov.convert_model(str(path), share_weights=False)  # never the file's pages
        import tensorflow as tf

        try:
            if fmt == "keras":
                import keras

                model = keras.saving.load_model(path, compile=False)
                call = lambda x: model(x, training=False)  # noqa: E731
            else:
                loaded = tf.saved_model.load(str(path))  # the closure keeps it alive
                call = loaded.serve
        except Exception as exc:  # noqa: BLE001 - Keras/TF raise many types for bad files
            raise not_loadable(path, fmt, exc) from None
        # share_weights=False: the Keras model is dropped when this returns, and shared
        # weights would then be freed memory (wrong probabilities, seen in the tests)
        return runtime.convert_graph(lambda x: {"probabilities": call(x)}, (size, size, 3),
                                     "float32",
                                     extensions=[same_size_resize(size), bucketize_rule()],
                                     share_weights=False)

    return convert


def _import_openvino():
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"OpenVINO cannot be imported ({exc}); install it (pip install "
                          f"openvino), or {FALLBACK}") from None


def openvino_runner(path, fmt: str, size: int, precision: str, *, batch: int,
                    threads: int | None = None, root: Path | None = None
                    ) -> Callable:
    """``run(images) -> probabilities``: (N, size, size, 3) float32 RGB 0-255 -> (N, classes)
    float32 on OpenVINO at ``precision`` (``float32``/``bf16``), compiled for ``batch``
    images (more are run in chunks, fewer are padded); ``run.output_width`` is ``classes``."""
    import numpy as np

    _import_openvino()
    path = Path(path)
    if fmt not in ("keras", "savedmodel", "tflite"):
        raise DataError(f"{path}.json names an unknown format {fmt!r}")
    key = conversion_key(path, fmt, size, precision)
    compiled = runtime.compile_cached(key, convert=_converter(path, fmt, size), batch=batch,
                                      threads=threads, root=root, label=path.name,
                                      fallback=FALLBACK)
    step = runtime.OpenVINOStep(compiled, batch=batch, input_dtype="float32")
    classes = compiled.outputs[0].get_partial_shape()[-1].get_length()

    def run(images):
        x = np.asarray(images, np.float32)
        out = [step.infer(x[i:i + batch])[0] for i in range(0, len(x), batch)]
        return np.concatenate(out) if out else np.zeros((0, classes), np.float32)

    run.output_width = classes   # the classes the model scores
    return run
