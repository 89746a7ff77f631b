"""Load an exported model and predict: :func:`load_classifier` reads ``<model>.json`` (the
sidecar :mod:`featcache.ship.export` writes) and the model in its format (``.keras``,
``.savedmodel``, ``.tflite``) on a runtime (:mod:`featcache.ship.engines`: ``auto`` =
OpenVINO on a CPU, TensorFlow when a GPU is visible to it; ``bf16`` on a CPU that has it);
:func:`predict_images` / :func:`iter_predictions` decode image files like stage one's
folders (:func:`featcache.data.imagefiles.decode_image`), resize them with the same function
(:func:`featcache.data.resize.resize_images`) whatever the runtime, run them through the
model in batches (``PREDICT_BATCH``, threaded decode) and yield the top-k classes per file,
reporting :class:`PredictProgress` after each batch; a file that cannot be read is reported
on its own and the others still get their result.

Reads the model, its sidecar and the images; writes nothing but, on OpenVINO, the
conversion-cache entry of a model converted for the first time. ``featcache predict``
(:mod:`featcache.cli.ship`) prints what it yields.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from featcache.errors import ConfigError, DataError, FeatcacheError
from featcache.ship import engines
from featcache.ship.sidecar import read_sidecar, sidecar_path

log = logging.getLogger(__name__)

#: images per forward pass of ``predict``
PREDICT_BATCH = 32


@contextlib.contextmanager
def quiet_native():
    """File descriptor 2 to /dev/null while native code runs that logs on its own, e.g.
    TFLite's "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." — when TensorFlow's
    INFO lines are off too (``TF_CPP_MIN_LOG_LEVEL`` >= 1, as the CLI sets it unless
    ``--verbose``)."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") in ("", "0"):
        yield
        return
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _tflite_interpreter(**kw):
    """A TFLite interpreter: LiteRT's (``ai_edge_litert``) where installed, else
    TensorFlow's own ``tf.lite.Interpreter`` (its deprecation warning silenced)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tf.lite.Interpreter(**kw)
    return Interpreter(**kw)


def tflite_runner(**kw) -> Callable[[np.ndarray], np.ndarray]:
    with quiet_native():
        it = _tflite_interpreter(**kw)
    inp, = it.get_input_details()
    out, = it.get_output_details()
    state = {"n": None}

    def run(x: np.ndarray) -> np.ndarray:
        with quiet_native():
            if state["n"] != len(x):
                it.resize_tensor_input(inp["index"], list(x.shape))
                it.allocate_tensors()
                state["n"] = len(x)
            it.set_tensor(inp["index"], np.ascontiguousarray(x, np.float32))
            it.invoke()
        return np.array(it.get_tensor(out["index"]))

    run.output_width = int(out["shape"][-1])   # the classes the model scores
    return run


@dataclass
class PredictProgress:
    """Reported after every batch of :func:`iter_predictions` (the CLI draws a bar from it,
    like stage one's ``Progress``)."""

    split: str         # what the bar is labelled with: "predict"
    done: int          # images classified (or found unreadable) so far
    total: int
    images_per_s: float
    eta_s: float


@dataclass
class Classifier:
    """A loaded exported model: ``class_names``, ``metadata`` (provenance), ``format``,
    ``image_size`` and ``antialias`` (its resize), ``sidecar`` (the whole JSON), and what
    runs it: ``runtime`` (``tensorflow`` or ``openvino``) at ``precision``."""

    path: Path
    format: str
    class_names: list[str]
    metadata: dict
    image_size: int
    antialias: bool
    sidecar: dict = field(default_factory=dict)
    run: Callable[[np.ndarray], np.ndarray] | None = None
    runtime: str = "tensorflow"
    precision: str = "float32"

    def resize(self, image: np.ndarray) -> np.ndarray:
        """One (H, W, 3) image -> (size, size, 3) float32 with the model's own resize (the
        function stage one used for these features; identity at the model's size)."""
        from featcache.data.resize import resize_images

        x = np.asarray(image, np.float32)
        if x.shape[:2] == (self.image_size, self.image_size):
            return x
        return resize_images(x, self.image_size, self.antialias).numpy()

    def probabilities(self, images) -> np.ndarray:
        """(N, H, W, 3) images (uint8 or float32 RGB 0-255) -> (N, classes) float32.
        Images not at the model's size are resized first with :meth:`resize`."""
        images = np.asarray(images)
        if images.shape[1:3] != (self.image_size, self.image_size):
            images = np.stack([self.resize(im) for im in images])
        return np.asarray(self.run(np.asarray(images, np.float32)), np.float32)




def load_classifier(path, *, runtime: str = engines.DEFAULT_RUNTIME,
                    precision: str = engines.DEFAULT_PRECISION,
                    batch: int = PREDICT_BATCH) -> Classifier:
    """An exported model (any format) and its ``<model>.json``, ready to classify.

    ``runtime``: ``auto`` (OpenVINO on a CPU, TensorFlow when a GPU is visible to it),
    ``openvino`` or ``tensorflow`` (TFLite's interpreter for ``.tflite``); ``precision``:
    ``auto`` (the precision the head's features were computed at, from the model's
    metadata, where this CPU runs it: a head trained on bf16 features predicts in bf16;
    else ``bf16`` with OpenVINO on a CPU with native bfloat16, else ``float32``),
    ``float32`` or ``bf16``. OpenVINO compiles for ``batch`` images per call (any number
    runs). Choices are checked before the model is touched (one-line errors); a sidecar
    whose class names are more or fewer than the model's outputs is refused
    (:func:`check_classes`)."""
    path = Path(path)
    rt = engines.choose_runtime(runtime)
    engines.choose_precision(precision, rt)      # a bad choice fails before any reading
    if batch < 1:
        raise ConfigError(f"--batch must be at least 1, not {batch}")
    if not path.exists():
        raise DataError(f"model {path} does not exist; make one with `featcache export`")
    meta = read_sidecar(path)
    features = (meta.get("metadata") or {})
    prec = engines.choose_precision(
        precision, rt, str(features.get("precision")) if features.get("runtime") ==
        "openvino" else "float32" if features.get("runtime") else None)
    fmt = str(meta.get("format", "keras"))
    size = meta["input"]["image_size"]
    antialias = bool(meta["input"].get("resize", {}).get("antialias", True))
    if rt == "openvino":
        run = engines.openvino_runner(path, fmt, size, prec, batch=batch)
    else:
        try:
            run = _runner(path, fmt, size)
        except FeatcacheError:
            raise
        except Exception as exc:  # noqa: BLE001 - Keras/TF raise many types for bad files
            raise engines.not_loadable(path, fmt, exc) from None
    check_classes(path, meta["class_names"], getattr(run, "output_width", None))
    log.info("%s runs on %s %s%s", path.name, "OpenVINO" if rt == "openvino" else
             "TFLite" if fmt == "tflite" else "TensorFlow", prec,
             " (--precision float32 for float32)" if prec == "bf16" else "")
    return Classifier(path, fmt, meta["class_names"], dict(meta.get("metadata", {})), size,
                      antialias, meta, run, rt, prec)


def check_classes(path: Path, class_names: list[str], width: int | None) -> None:
    """Refuse a sidecar whose class names do not match the model's output columns (one name
    per column: more would print names the model never scores, fewer an IndexError)."""
    if width is not None and int(width) != len(class_names):
        side = sidecar_path(path)
        raise DataError(f"{side} names {len(class_names)} classes but {path.name} scores "
                        f"{int(width)}: it is not the .json exported with this model; copy "
                        f"the model's own {side.name} beside it, or export the model again "
                        f"with `featcache export`")


def _runner(path: Path, fmt: str, size: int) -> Callable[[np.ndarray], np.ndarray]:
    """TensorFlow's runner of the model (TFLite's interpreter for ``.tflite``), with the
    number of classes the model scores as its ``output_width`` (None: not known)."""
    import tensorflow as tf

    spec = [tf.TensorSpec([None, size, size, 3], tf.float32)]
    if fmt == "keras":
        import keras

        model = keras.saving.load_model(path, compile=False)
        fn = tf.function(lambda x: model(x, training=False), input_signature=spec)
        run = lambda x: fn(x).numpy()  # noqa: E731
        run.output_width = _last(model.output_shape)
        return run
    if fmt == "savedmodel":
        loaded = tf.saved_model.load(str(path))  # the closure keeps its variables alive
        run = lambda x: loaded.serve(tf.constant(x)).numpy()  # noqa: E731
        outputs = [getattr(f, "structured_outputs", None)
                   for f in getattr(loaded.serve, "concrete_functions", ())]
        run.output_width = _last(getattr(outputs[0], "shape", None)) if outputs else None
        return run
    if fmt == "tflite":
        return tflite_runner(model_path=str(path))
    raise DataError(f"{sidecar_path(path)} names an unknown format {fmt!r}")


def _last(shape) -> int | None:
    """The last dimension of a shape (a tuple or a TensorShape), None when unknown."""
    try:
        return int(tuple(shape)[-1])
    except (TypeError, ValueError, IndexError):
        return None


def _load_image(clf: Classifier, image) -> tuple[np.ndarray | None, str | None]:
    from featcache.data.imagefiles import decode_image

    try:
        return clf.resize(decode_image(Path(image))), None
    except DataError as exc:
        return None, str(exc)
    except OSError as exc:  # e.g. a folder given as an image
        return None, f"{image} cannot be read ({exc.strerror or exc})"


def iter_predictions(model, images: Iterable, top_k: int = 3, batch: int = PREDICT_BATCH,
                     workers: int | None = None, *, runtime: str = engines.DEFAULT_RUNTIME,
                     precision: str = engines.DEFAULT_PRECISION,
                     progress: Callable[[PredictProgress], None] | None = None
                     ) -> Iterator[list[dict]]:
    """Classify ``images`` (paths) in batches; yield each batch's rows, in input order, as
    soon as it is done: ``{"image", "top": [{"class", "probability"}]}``, or
    ``{"image", "error"}`` for a file that cannot be read or decoded (the others go on).

    ``model``: a path (loaded with ``runtime`` and ``precision``, see
    :func:`load_classifier`) or a :class:`Classifier`. Files are decoded and resized in
    ``workers`` threads, one batch ahead of the model. ``progress(PredictProgress)`` is
    called once a batch's rows have been taken (so a bar drawn then sits below them)."""
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, not {top_k}")
    if batch < 1:
        raise ConfigError(f"--batch must be at least 1, not {batch}")
    clf = model if isinstance(model, Classifier) else \
        load_classifier(model, runtime=runtime, precision=precision, batch=batch)
    k = min(top_k, len(clf.class_names))
    images = [str(i) for i in images]
    workers = workers or min(8, (os.cpu_count() or 1) + 2)

    def finish(chunk, futures) -> list[dict]:
        loaded = [f.result() for f in futures]
        good = [i for i, (x, _) in enumerate(loaded) if x is not None]
        probs = clf.run(np.stack([loaded[i][0] for i in good])) if good else None
        rows = [{"image": name, "error": err} for name, (_, err) in zip(chunk, loaded)]
        for j, i in enumerate(good):
            p = probs[j]
            order = np.argsort(-p, kind="stable")[:k]
            rows[i] = {"image": chunk[i],
                       "top": [{"class": clf.class_names[c], "probability": float(p[c])}
                               for c in order]}
        return rows

    t0, done = time.perf_counter(), 0

    def report(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            el = time.perf_counter() - t0
            rate = done / el if el > 0 else 0.0
            progress(PredictProgress("predict", done, len(images), rate,
                                     (len(images) - done) / rate if rate > 0 else math.inf))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = None
        for a in range(0, len(images), batch):
            chunk = images[a:a + batch]
            futures = [pool.submit(_load_image, clf, p) for p in chunk]
            if pending is not None:
                yield finish(*pending)
                report(len(pending[0]))
            pending = (chunk, futures)
        if pending is not None:
            yield finish(*pending)
            report(len(pending[0]))


def predict_images(model, images: Iterable, top_k: int = 3, batch: int = PREDICT_BATCH, *,
                   runtime: str = engines.DEFAULT_RUNTIME,
                   precision: str = engines.DEFAULT_PRECISION) -> list[dict]:
    """Top-k classes per image file: ``[{"image", "top": [{"class", "probability"}]}]``.

    ``model``: a path (loaded with ``runtime`` and ``precision``, see
    :func:`load_classifier`) or a :class:`Classifier`. An image that cannot be decoded
    raises a :class:`~featcache.errors.DataError` naming it (``iter_predictions`` goes on
    instead).
    """
    rows = [r for rows in iter_predictions(model, images, top_k, batch, runtime=runtime,
                                           precision=precision) for r in rows]
    bad = [r for r in rows if "error" in r]
    if bad:
        raise DataError(bad[0]["error"])
    return rows
