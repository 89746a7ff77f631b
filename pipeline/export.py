"""Export and predict: one model from raw images to class probabilities, in three formats.

``export_model`` reads a feature file's provenance and class names (:mod:`pipeline.store`),
rebuilds the backbone it was extracted with (:mod:`pipeline.backbones`; the weights are
checked against the file's ``weights_sha256``), loads a fitted head (:mod:`pipeline.heads`,
by default the best head of ``<report_dir>/results.json``) and writes it as one model of
built-in Keras layers only, so it loads anywhere Keras/TensorFlow does, without featcache:

    float32 RGB 0-255 images (None, H, W, 3), any H and W (uint8 arrays are cast)
    -> keras.layers.Resizing to image_size (bilinear; antialiased exactly when stage one's
       resize was: image folders yes, registry data sets such as CIFAR-10 no)
    -> the backbone's preprocessing as a frozen Dense(3) (a per-channel affine map, RGB->BGR
       folded in for caffe; none for backbones that rescale inside)
    -> backbone -> head (Dense/Softmax; dense: its Keras model; rbf_svm: Dense + a cosine
       built from built-in layers)
    (-> with ``tta``: the same for the mirrored image, a frozen anti-diagonal Dense over
       the width, probabilities averaged)
    -> probabilities (None, classes)

Formats (``FORMATS``): ``keras`` (one ``.keras`` file), ``savedmodel`` (a TensorFlow
SavedModel folder ``.savedmodel``, signature ``serve``), ``tflite`` (one ``.tflite`` file).
TFLite has no antialiased resize (``ScaleAndTranslate`` is not a TFLite op), so the TFLite
model takes images already resized to ``image_size`` x ``image_size`` (float32, not
rounded) and has no resize inside; ``predict`` resizes with the same function as stage
one (:func:`pipeline.resize.resize_images`).

The class names (in column order), the input contract and the provenance travel in a small
JSON beside every format: ``<model>.json`` (``m.keras.json``, ``m.savedmodel.json``,
``m.tflite.json``), which ``predict`` reads. Only heads with ``to_keras()`` (linear ones,
rbf_svm, the dense heads) can be exported.

``predict_images``/``iter_predictions`` read such a model and image files (decoded like
stage one's folders, :func:`pipeline.folders.decode_image`, resized like them), run them
through the model in batches and return the top-k classes; a file that cannot be read is
reported on its own and the others still get their result.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from . import __version__
from .atomic import replacing, write_bytes, write_text
from .config import cache_key_fields
from .resize import resizing_layer, uses_antialias
from .errors import ConfigError, DataError, WeightsError

log = logging.getLogger(__name__)

FORMATS = ("keras", "savedmodel", "tflite")
SUFFIXES = {"keras": ".keras", "savedmodel": ".savedmodel", "tflite": ".tflite"}
SIDECAR_VERSION = 1
PREDICT_BATCH = 32


def sidecar_path(model_path) -> Path:
    """Where the class names and input contract of an exported model are: ``<model>.json``."""
    return Path(str(Path(model_path)) + ".json")


def format_of(output=None, fmt: str | None = None) -> str:
    """The export format: ``fmt`` if given, else from ``output``'s suffix, else keras."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        return fmt
    suffix = Path(output).suffix if output else ""
    return next((f for f, s in SUFFIXES.items() if s == suffix), "keras")


# ---------------------------------------------------------------------------- export

@dataclass
class ExportResult:
    path: Path
    head: str
    classes: list[str]
    backbone: str
    image_size: int
    tta: bool
    head_max_abs_diff: float   # |Keras head - predict_proba| on probe features
    seconds: float
    chosen: str = ""           # why this head (e.g. "the best validation accuracy")
    format: str = "keras"
    sidecar: Path | None = None
    format_max_abs_diff: float = 0.0  # |written model - Keras model| on probe images

    def summary(self) -> str:
        why = f" ({self.chosen})" if self.chosen else ""
        conv = "" if self.format == "keras" else \
            f"; the {self.format} model matches the Keras model to {self.format_max_abs_diff:.1e}"
        return (f"exported {self.backbone} ({self.image_size} px) + head {self.head}{why}"
                f"{' with flip TTA' if self.tta else ''}, {len(self.classes)} classes -> "
                f"{self.path} ({_size_mib(self.path):.1f} MiB, {self.format}) and "
                f"{self.sidecar.name} (class names) in {self.seconds:.1f} s; Keras head "
                f"matches the fitted head to {self.head_max_abs_diff:.1e}{conv}")


def _size_mib(path: Path) -> float:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
    return path.stat().st_size / 2**20


def keras_heads() -> list[str]:
    """Registered heads that can be exported (implement ``to_keras``)."""
    from .heads import HEADS

    return sorted(n for n, s in HEADS.items() if getattr(s, "keras", True))


def _not_exportable(name: str, why: str = "") -> ConfigError:
    try:
        ok = ", ".join(keras_heads())
    except ImportError:  # pragma: no cover - heads.py is part of the package
        ok = "logreg, linear_svm, dense"
    return ConfigError(
        f"head {name!r} cannot be exported{': ' + why if why else ''}; export needs a "
        f"Keras-expressible head: {ok}. Pass --head NAME (one of those that was fitted)")


def _read_results(report_dir: Path) -> dict:
    path = report_dir / "results.json"
    if not path.is_file():
        raise ConfigError(f"no head comparison at {path}; run `make heads` (or `featcache "
                          f"heads FEATURE_FILE`) first, or pass --head-file PATH")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not readable JSON ({exc}); re-run `make heads`") from None


def _rows(results: dict) -> dict[str, dict]:
    """The comparison's rows by name (``logreg``, ``logreg+tta``, ``dense+flip`` …)."""
    rows = results.get("rows", [])
    return {str(r["name"]): r for r in rows if isinstance(r, dict) and "name" in r}


def _exportable(row: dict) -> bool:
    from .heads import HEADS

    spec = HEADS.get(str(row.get("head", row.get("name"))))
    return bool(spec is not None and getattr(spec, "keras", True) and row.get("saved"))


def resolve_head(report_dir: Path, name: str | None = None) -> tuple[str, Path, dict]:
    """(row name, saved head file, results row) from ``report_dir/results.json``.

    ``name=None``: the comparison's best row, the highest *validation* accuracy
    (``best_row``; older reports: ``best_val_head``; the test split is not used to choose
    what ships). A name may be a head (``logreg``) or a row of the comparison
    (``logreg+tta``)."""
    results = _read_results(report_dir)
    rows = _rows(results)
    where = report_dir / "results.json"
    best = results.get("best_row") if "best" in results.get("protocol", {}) else \
        results.get("best_val_head") or results.get("best_head")
    name = name or best
    if not name:
        raise DataError(f"{where} names no best head; pass --head NAME")
    if name not in rows:
        raise ConfigError(f"head {name!r} was not fitted in {where} (fitted: "
                          f"{', '.join(rows) or 'none'}); run `make heads HEADS=<name>` "
                          f"first or pass another --head")
    row = rows[name]
    if not _exportable(row):
        ok = [r for r in rows.values() if not (r.get("train_flip") or r.get("tta"))
              and _exportable(r)]
        best = max(ok, key=lambda r: r.get("val_accuracy", 0.0))["name"] if ok else None
        hint = f" (the best exportable head of this comparison: --head {best})" if best else ""
        raise _not_exportable(name, "it has no Keras form" + hint)
    path = Path(row["saved"])
    if not path.is_absolute():
        path = report_dir / path
    return name, path, row


def rebuild_backbone(attrs: dict, weights: str | None = None):
    """The backbone of a feature file, built again; refuses other weights than the file's."""
    from .backbones import build_backbone, get_backbone, weights_sha256

    spec = get_backbone(str(attrs["backbone"]))
    source = weights or str(attrs.get("weights_source") or attrs.get("weights") or "imagenet")
    if attrs.get("precision", "float32") != "float32":
        log.warning("features were computed with %s; the exported model runs in float32",
                    attrs["precision"])
    model = build_backbone(spec, weights=source, pooling=str(attrs.get("pooling", "avg")),
                           precision="float32", seed=int(attrs.get("seed", 0)))
    want = attrs.get("weights_sha256")
    if want and weights_sha256(model) != want:
        raise WeightsError(
            f"the {spec.name} weights found now ({source}) are not the ones the features were "
            f"extracted with (weights_sha256 differs); pass --weights PATH with the original "
            f"weight file, or re-extract the features")
    return model


def _keras_head(estimator, name: str):
    to_keras = getattr(estimator, "to_keras", None)
    if to_keras is None:
        raise _not_exportable(name, f"{type(estimator).__name__} has no to_keras()")
    try:
        return to_keras()
    except NotImplementedError as exc:
        raise _not_exportable(name, str(exc)) from None


def _inference_only(head_model):
    """``head_model`` without its training-only layers (Dropout, noise): a saved model is
    called as ``model(x)`` by users, and a SavedModel's ``serve`` was traced, with
    ``training`` unset — and Keras then ran the dense head's Dropout (probabilities changed
    by up to 1.0 between two calls). The other layers are reused, weights and all."""
    import keras

    L = keras.layers
    noise = (L.Dropout, L.GaussianNoise, L.GaussianDropout, L.AlphaDropout)
    if not any(isinstance(layer, noise) for layer in _all_layers(head_model)):
        return head_model
    return keras.models.clone_model(
        head_model, recursive=True,
        clone_function=lambda layer: L.Identity(name=layer.name)
        if isinstance(layer, noise) else layer)


def _all_layers(model):
    for layer in getattr(model, "layers", []):
        yield layer
        yield from _all_layers(layer)


def _probe(estimator, head_model, X: np.ndarray) -> float:
    """Max |Keras head - predict_proba| on ``X``, rows of the feature file (real features:
    random ones can be far outside what a head was fitted on, where e.g. rbf_svm's cosine
    arguments are meaningless): the Keras form must be the same function as the fitted head."""
    want = np.asarray(estimator.predict_proba(X), np.float32)
    got = np.asarray(head_model(X, training=False), np.float32)
    if got.shape != want.shape:
        raise ConfigError(f"the Keras form of the head gives {got.shape[1:]} outputs, "
                          f"predict_proba {want.shape[1:]}; the head is broken")
    return float(np.abs(got - want).max())


def _probe_rows(feature_file: Path, dim: int, n: int = 64) -> np.ndarray:
    """Up to ``n`` rows of each split of the feature file (float32), for :func:`_probe`."""
    from .store import load_features

    fs = load_features(feature_file, flip=False, max_rows=n)
    rows = [np.asarray(s.features[:n], np.float32) for s in fs.splits.values() if len(s)]
    X = np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
    if X.shape[1:] != (dim,):
        raise ConfigError(f"{feature_file} holds {X.shape[1:]} features, the backbone gives "
                          f"{dim}; the file does not belong to this backbone")
    return X


def _mirror(x, size: int, name: str):
    """Horizontal flip of (N, size, size, C) as built-in layers: the width axis goes last,
    a frozen anti-diagonal Dense(size) reverses it (exact: one 1 per column), and back."""
    import keras

    L = keras.layers
    t = L.Permute((1, 3, 2), name=f"{name}_width_last")(x)
    rev = L.Dense(size, use_bias=False, trainable=False, name=f"{name}_reverse")
    t = rev(t)
    rev.set_weights([np.eye(size, dtype=np.float32)[::-1].copy()])
    return L.Permute((1, 3, 2), name=f"{name}_width_back")(t)


def assemble(backbone, head_model, *, size: int, mode: str, tta: bool = False,
             antialias: bool = True, resize: bool = True):
    """float32 images -> probabilities, built-in layers only (see the module docstring).

    ``resize=False``: the input is (None, size, size, 3), already resized (TFLite)."""
    import keras

    from .backbones import preprocess_affine

    L = keras.layers
    shape = (None, None, 3) if resize else (size, size, 3)
    inp = keras.Input(shape=shape, dtype="float32", name="image")
    x = resizing_layer(size, antialias)(inp) if resize else inp
    affine = preprocess_affine(mode)
    if affine is not None:
        pre = L.Dense(3, trainable=False, name=f"preprocess_{mode}")
        x = pre(x)
        pre.set_weights([affine[0], affine[1]])
    probs = head_model(backbone(x))
    if tta:
        flipped = head_model(backbone(_mirror(x, size, "mirror")))
        probs = L.Average(name="tta_average")([probs, flipped])
    out = L.Identity(name="probabilities")(probs)
    return keras.Model(inp, out, name="featcache_classifier")


_uses_antialias = uses_antialias  # stage one's resize, read from the file (pipeline.resize)


def _check_output(out: Path, fmt: str) -> None:
    """Refuse, before the backbone is built, an output that cannot be written."""
    suffix = SUFFIXES[fmt]
    if out.suffix != suffix:
        raise ConfigError(f"--output for --format {fmt} must end in {suffix}, not {out.name}")
    if fmt == "savedmodel":
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--output {out} is a file; a SavedModel is a folder: give a new "
                              f"name ending in .savedmodel")
    elif out.is_dir():
        raise ConfigError(f"--output {out} is a folder; give a file name ending in {suffix}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write to {out.parent} ({exc.strerror or exc}); choose "
                          f"another --output") from None


def _write(model, fixed, out: Path, fmt: str) -> float:
    """Write ``model`` (``fixed``: its fixed-size twin, for TFLite) as ``fmt`` at ``out``
    (atomically: a temporary name, then a rename); return max |written - Keras| on probes."""
    import tensorflow as tf

    size = int(fixed.input_shape[1])
    probe = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    if fmt == "keras":
        with replacing(out, ".keras") as tmp:
            model.save(tmp)
        return 0.0
    want = np.asarray(model(probe, training=False))
    if fmt == "savedmodel":
        with replacing(out) as tmp:
            model.export(str(tmp), format="tf_saved_model", verbose=False)
            loaded = tf.saved_model.load(str(tmp))  # keep it referenced while serve runs
            got = loaded.serve(tf.constant(probe)).numpy()
            del loaded
    else:
        converter = tf.lite.TFLiteConverter.from_keras_model(fixed)
        try:
            # the converter saves a temporary SavedModel and prints its signature to stdout
            with contextlib.redirect_stdout(io.StringIO()), _quiet_native():
                data = converter.convert()
        except Exception as exc:  # noqa: BLE001 - the converter raises many types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"TFLite conversion failed ({first[:200]}); export --format "
                              f"keras or savedmodel instead") from None
        got = _tflite_runner(model_content=data)(probe)
        write_bytes(out, data)
    return float(np.abs(got - want).max())


def export_model(feature_file, *, head=None, head_file=None, output=None, report_dir=None,
                 weights: str | None = None, tta: bool | None = None,
                 tolerance: float = 1e-4, format: str | None = None) -> ExportResult:
    """Write ``feature_file``'s backbone + a fitted head as one model in ``format``
    (``FORMATS``; default: from ``output``'s suffix, else keras) and ``<model>.json``.

    ``head``: a head name from the comparison (default: its best head) or a fitted estimator
    object. ``head_file``: a saved head file instead (``pipeline.heads.load_head``).
    ``tta``: average with the mirrored image (default: as the comparison scored the head).
    """
    from .store import load_features

    t0 = time.perf_counter()
    fmt = format_of(output, format)
    feature_file = Path(feature_file)
    fs = load_features(feature_file, splits=[])  # class names and provenance only
    attrs = fs.attrs
    report_dir = Path(report_dir) if report_dir else feature_file.with_suffix("")
    entry: dict = {}
    chosen = ""
    if head is not None and not isinstance(head, str):
        estimator, name = head, type(head).__name__
    else:
        if head_file:
            name, path = (head or Path(head_file).stem), Path(head_file)
        else:
            name, path, entry = resolve_head(report_dir, head)
            if head is None:
                chosen = f"best validation accuracy in {report_dir / 'results.json'}"
        if not path.exists():
            raise DataError(f"saved head {path} is missing; re-run `make heads`")
    stem = f"{feature_file.stem}_{name.replace('+', '_')}"
    out = Path(output) if output else report_dir / f"{stem}{SUFFIXES[fmt]}"
    _check_output(out, fmt)
    if head is None or isinstance(head, str):
        from .heads import load_head

        estimator = load_head(path)
    head_model = _inference_only(_keras_head(estimator, name))
    backbone = rebuild_backbone(attrs, weights)
    dim = int(backbone.output_shape[-1])
    if int(head_model.input_shape[-1]) != dim:
        raise ConfigError(f"head {name!r} takes {head_model.input_shape[-1]} features but "
                          f"{attrs['backbone']} gives {dim}; it was fitted on another file")
    diff = _probe(estimator, head_model, _probe_rows(feature_file, dim))
    if not diff <= tolerance:
        raise ConfigError(f"the Keras form of head {name!r} differs from the fitted head by "
                          f"{diff:.2e} (> {tolerance}); it cannot be exported faithfully")
    columns = getattr(estimator, "classes_", np.arange(len(fs.classes)))
    class_names = [fs.classes[int(c)] for c in columns]
    if tta is None:
        tta = bool(entry.get("tta")) and bool(attrs.get("flip"))
    size, mode, antialias = int(attrs["image_size"]), str(attrs["preprocess"]), \
        _uses_antialias(attrs)
    metadata = {
        "featcache_version": __version__, "feature_file": str(feature_file), "head": name,
        "tta": bool(tta), "exported_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **{k: attrs.get(k) for k in (*cache_key_fields(), "resize", "config_sha256")
           if k in attrs},
    }
    kw = dict(size=size, mode=mode, tta=bool(tta), antialias=antialias)
    model = assemble(backbone, head_model, **kw)
    fixed = assemble(backbone, head_model, resize=False, **kw)
    conv = _write(model, fixed, out, fmt)
    if not conv <= max(tolerance, 1e-4) * 10:
        raise ConfigError(f"the {fmt} model differs from the Keras model by {conv:.2e}; "
                          f"it was not converted faithfully (try --format keras)")
    in_model = fmt != "tflite"
    sidecar = {
        "featcache_export": SIDECAR_VERSION,
        "format": fmt,
        "model": out.name,
        "class_names": class_names,
        "input": {
            "name": "image", "dtype": "float32",
            "shape": [None, None, None, 3] if in_model else [None, size, size, 3],
            "pixels": "RGB, 0-255 (uint8 values as float32, not rescaled)",
            "image_size": size,
            "resize": {"method": "bilinear", "antialias": antialias, "in_model": in_model,
                       "how": ("inside the model: any H x W" if in_model else
                               f"resize to {size} x {size} before the model: "
                               f"tf.image.resize(x, ({size}, {size}), 'bilinear', "
                               f"antialias={antialias}) on float32, not rounded")},
        },
        "output": {"dtype": "float32", "shape": [None, len(class_names)],
                   "meaning": "class probabilities; column i is class_names[i]"},
        "signature": {"keras": "model(x)", "savedmodel": "tf.saved_model.load(p).serve(x)",
                      "tflite": "the interpreter's one input and one output"}[fmt],
        "metadata": metadata,
    }
    side = sidecar_path(out)
    write_text(side, json.dumps(sidecar, indent=2, default=str) + "\n")
    return ExportResult(out, name, class_names, str(attrs["backbone"]), size, bool(tta), diff,
                        time.perf_counter() - t0, chosen, fmt, side, conv)


# ---------------------------------------------------------------------------- predict

@contextlib.contextmanager
def _quiet_native():
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


def _tflite_runner(**kw) -> Callable[[np.ndarray], np.ndarray]:
    with _quiet_native():
        it = _tflite_interpreter(**kw)
    inp, = it.get_input_details()
    out, = it.get_output_details()
    state = {"n": None}

    def run(x: np.ndarray) -> np.ndarray:
        with _quiet_native():
            if state["n"] != len(x):
                it.resize_tensor_input(inp["index"], list(x.shape))
                it.allocate_tensors()
                state["n"] = len(x)
            it.set_tensor(inp["index"], np.ascontiguousarray(x, np.float32))
            it.invoke()
        return np.array(it.get_tensor(out["index"]))

    return run


@dataclass
class Classifier:
    """A loaded exported model: ``class_names``, ``metadata`` (provenance), ``format``,
    ``image_size`` and ``antialias`` (its resize), ``sidecar`` (the whole JSON)."""

    path: Path
    format: str
    class_names: list[str]
    metadata: dict
    image_size: int
    antialias: bool
    sidecar: dict = field(default_factory=dict)
    run: Callable[[np.ndarray], np.ndarray] | None = None

    def resize(self, image: np.ndarray) -> np.ndarray:
        """One (H, W, 3) image -> (size, size, 3) float32 with the model's own resize (the
        function stage one used for these features; identity at the model's size)."""
        from .resize import resize_images

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


def _read_sidecar(path: Path) -> dict:
    side = sidecar_path(path)
    if not side.is_file():
        raise DataError(f"{path} has no {side.name} beside it (the class names and input "
                        f"size): it is not one exported by featcache, or the .json was not "
                        f"copied with it; export it again with `featcache export`")
    try:
        meta = json.loads(side.read_text())
        meta["class_names"] = [str(c) for c in meta["class_names"]]
        meta["input"]["image_size"] = int(meta["input"]["image_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{side} is not a featcache model description ({exc}); export the "
                        f"model again with `featcache export`") from None
    if int(meta.get("featcache_export", 0)) > SIDECAR_VERSION:
        raise DataError(f"{side} was written by a newer featcache; upgrade featcache")
    return meta


def load_classifier(path) -> Classifier:
    """An exported model (any format) and its ``<model>.json``, ready to classify."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"model {path} does not exist; make one with `featcache export`")
    meta = _read_sidecar(path)
    fmt = str(meta.get("format", "keras"))
    size = meta["input"]["image_size"]
    antialias = bool(meta["input"].get("resize", {}).get("antialias", True))
    try:
        run = _runner(path, fmt, size)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - Keras/TF raise many types for bad files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{path} is not a loadable {fmt} model ({first[:160]}); export it "
                        f"again with `featcache export`") from None
    return Classifier(path, fmt, meta["class_names"], dict(meta.get("metadata", {})), size,
                      antialias, meta, run)


def _runner(path: Path, fmt: str, size: int) -> Callable[[np.ndarray], np.ndarray]:
    import tensorflow as tf

    spec = [tf.TensorSpec([None, size, size, 3], tf.float32)]
    if fmt == "keras":
        import keras

        model = keras.saving.load_model(path, compile=False)
        fn = tf.function(lambda x: model(x, training=False), input_signature=spec)
        return lambda x: fn(x).numpy()
    if fmt == "savedmodel":
        loaded = tf.saved_model.load(str(path))  # the closure keeps its variables alive
        return lambda x: loaded.serve(tf.constant(x)).numpy()
    if fmt == "tflite":
        return _tflite_runner(model_path=str(path))
    raise DataError(f"{sidecar_path(path)} names an unknown format {fmt!r}")


def _load_image(clf: Classifier, image) -> tuple[np.ndarray | None, str | None]:
    from .folders import decode_image

    try:
        return clf.resize(decode_image(Path(image))), None
    except DataError as exc:
        return None, str(exc)
    except OSError as exc:  # e.g. a folder given as an image
        return None, f"{image} cannot be read ({exc.strerror or exc})"


def iter_predictions(model, images: Iterable, top_k: int = 3, batch: int = PREDICT_BATCH,
                     workers: int | None = None) -> Iterator[list[dict]]:
    """Classify ``images`` (paths) in batches; yield each batch's rows, in input order, as
    soon as it is done: ``{"image", "top": [{"class", "probability"}]}``, or
    ``{"image", "error"}`` for a file that cannot be read or decoded (the others go on).

    Files are decoded and resized in ``workers`` threads, one batch ahead of the model."""
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, not {top_k}")
    if batch < 1:
        raise ConfigError(f"--batch must be at least 1, not {batch}")
    clf = model if isinstance(model, Classifier) else load_classifier(model)
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

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = None
        for a in range(0, len(images), batch):
            chunk = images[a:a + batch]
            futures = [pool.submit(_load_image, clf, p) for p in chunk]
            if pending is not None:
                yield finish(*pending)
            pending = (chunk, futures)
        if pending is not None:
            yield finish(*pending)


def predict_images(model, images: Iterable, top_k: int = 3,
                   batch: int = PREDICT_BATCH) -> list[dict]:
    """Top-k classes per image file: ``[{"image", "top": [{"class", "probability"}]}]``.

    ``model``: a path or a :class:`Classifier`. An image that cannot be decoded raises a
    :class:`~pipeline.errors.DataError` naming it (``iter_predictions`` goes on instead).
    """
    rows = [r for rows in iter_predictions(model, images, top_k, batch) for r in rows]
    bad = [r for r in rows if "error" in r]
    if bad:
        raise DataError(bad[0]["error"])
    return rows
