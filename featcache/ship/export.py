"""Export and predict: one model from raw images to class probabilities, in three formats.

``export_model`` reads a feature file's provenance and class names (:mod:`featcache.cache.writer`),
rebuilds the backbone it was extracted with (:mod:`featcache.backbones.registry`; the weights are
checked against the file's ``weights_sha256``), loads a fitted head (:mod:`featcache.heads`,
by default the best head of ``<report_dir>/results.json``) and writes it as one model of
built-in Keras layers only, so it loads anywhere Keras/TensorFlow does, without featcache:

    float32 RGB 0-255 images (None, H, W, 3), any H and W (uint8 arrays are cast)
    -> keras.layers.Resizing to image_size (bilinear; antialiased exactly when stage one's
       resize was: image folders yes, registry data sets such as CIFAR-10 no)
    -> the backbone's preprocessing as a frozen Dense(3) (a per-channel affine map, RGB->BGR
       folded in for caffe; none for backbones that rescale inside)
    -> backbone -> head (Dense/Softmax; dense: its Keras model; rbf_svm: Dense + a cosine
       built from built-in layers; knn: Dense + UnitNormalization + the index as a Dense
       kernel + keras.ops.top_k + the labels as an Embedding, one-hot, averaged)
    (-> with ``tta``: the same for the mirrored image, a frozen anti-diagonal Dense over
       the width, probabilities averaged)
    -> probabilities (None, classes)

Formats (``FORMATS``): ``keras`` (one ``.keras`` file), ``savedmodel`` (a TensorFlow
SavedModel folder ``.savedmodel``, signature ``serve``), ``tflite`` (one ``.tflite`` file).
TFLite has no antialiased resize (``ScaleAndTranslate`` is not a TFLite op), so the TFLite
model takes images already resized to ``image_size`` x ``image_size`` (float32, not
rounded) and has no resize inside; ``predict`` resizes with the same function as stage
one (:func:`featcache.data.resize.resize_images`).

The class names (in column order), the input contract and the provenance travel in a small
JSON beside every format: ``<model>.json`` (``m.keras.json``, ``m.savedmodel.json``,
``m.tflite.json``), which ``predict`` reads. Only heads with ``to_keras()`` (linear ones,
rbf_svm, knn, the dense heads, finetune) can be exported; a knn model holds its index
(n_index x dim float32: ~51 MB for 50,000 rows at dim 256, twice that with mirrors). A
``finetune`` head's model takes the activations at its cut, so the backbone is cut there
(its frozen bottom) and the head's fine-tuned top and dense head follow
(:func:`featcache.ship.assemble.checked_backbone`).

Loading such a model and predicting with it (``load_classifier``, ``predict_images``,
``iter_predictions``) is :mod:`featcache.ship.predict`; the sidecar's name and version are
:mod:`featcache.ship.sidecar`.

Reads the feature file's attributes, the report's ``results.json`` and saved head, the
backbone's weights; writes the model (atomically) and its sidecar JSON.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache import __version__
from featcache._util.atomic import replacing, write_bytes, write_text
from featcache.compare.selection import best_index
from featcache.config import cache_key_fields
from featcache.data.resize import uses_antialias
from featcache.errors import ConfigError, DataError
from featcache.ship.assemble import (
    assemble,
    checked_backbone,
    inference_only,
    keras_head,
    not_exportable,
    rebuild_backbone,
)
from featcache.ship.predict import quiet_native, tflite_runner
from featcache.ship.sidecar import SIDECAR_VERSION, sidecar_path

log = logging.getLogger(__name__)

FORMATS = ("keras", "savedmodel", "tflite")
SUFFIXES = {"keras": ".keras", "savedmodel": ".savedmodel", "tflite": ".tflite"}
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
    from featcache.heads import HEADS

    spec = HEADS.get(str(row.get("head", row.get("name"))))
    return bool(spec is not None and getattr(spec, "keras", True) and row.get("saved"))


def _row_cost(row: dict) -> float:
    """A results row's relative cost, as the comparison's tie rule weighs it."""
    from featcache.heads import HEADS

    spec = HEADS.get(str(row.get("head")))
    return (spec.cost if spec is not None else 1.0) * (2 if row.get("train_flip") else 1)


def resolve_head(report_dir: Path, name: str | None = None) -> tuple[str, Path, dict]:
    """(row name, saved head file, results row) from ``report_dir/results.json``.

    ``name=None``: the comparison's best row, the highest *validation* accuracy
    (``best_row``; older reports: ``best_val_head``; the test split is not used to choose
    what ships); when that row has no Keras form (a plain scikit-learn head), the best
    exportable row by the same rule, with a warning that names both. A name may be a head
    (``logreg``) or a row of the comparison (``logreg+tta``)."""
    results = _read_results(report_dir)
    rows = _rows(results)
    where = report_dir / "results.json"
    best = results.get("best_row") if "best" in results.get("protocol", {}) else \
        results.get("best_val_head") or results.get("best_head")
    asked = name
    name = name or best
    if not name:
        raise DataError(f"{where} names no best head; pass --head NAME")
    if name not in rows:
        raise ConfigError(f"head {name!r} was not fitted in {where} (fitted: "
                          f"{', '.join(rows) or 'none'}); run `make heads HEADS=<name>` "
                          f"first or pass another --head")
    row = rows[name]
    if not _exportable(row):
        ok = [r for r in rows.values() if _exportable(r)]
        alt = ok[best_index(ok, [_row_cost(r) for r in ok])]["name"] if ok else None
        if asked is None and alt is not None:
            log.warning("the best row %s has no Keras form; exporting %s, the best "
                        "exportable row (validation %.2f%% vs %.2f%%); --head NAME picks "
                        "another", name, alt, 100 * rows[alt].get("val_accuracy", 0.0),
                        100 * row.get("val_accuracy", 0.0))
            return resolve_head(report_dir, alt)
        hint = f" (the best exportable row of this comparison: --head {alt})" if alt else ""
        raise not_exportable(name, "it has no Keras form" + hint)
    path = Path(row["saved"])
    if not path.is_absolute():
        path = report_dir / path
    return name, path, row


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
            with contextlib.redirect_stdout(io.StringIO()), quiet_native():
                data = converter.convert()
        except Exception as exc:  # noqa: BLE001 - the converter raises many types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"TFLite conversion failed ({first[:200]}); export --format "
                              f"keras or savedmodel instead") from None
        got = tflite_runner(model_content=data)(probe)
        write_bytes(out, data)
    return float(np.abs(got - want).max())


def export_model(feature_file, *, head=None, head_file=None, output=None, report_dir=None,
                 weights: str | None = None, tta: bool | None = None,
                 tolerance: float = 1e-4, format: str | None = None) -> ExportResult:
    """Write ``feature_file``'s backbone + a fitted head as one model in ``format``
    (``FORMATS``; default: from ``output``'s suffix, else keras) and ``<model>.json``.

    ``head``: a head name from the comparison (default: its best head) or a fitted estimator
    object. ``head_file``: a saved head file instead (``featcache.heads.load_head``).
    ``tta``: average with the mirrored image (default: as the comparison scored the head).
    A head fitted on another feature file (its recorded config hash, class names or
    feature width differ from ``feature_file``'s) is refused before the backbone is built
    (:func:`featcache.heads.check_fitted_on`).
    """
    from featcache.cache.reader import load_features

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
    from featcache.cache.reader import file_identity
    from featcache.heads import check_fitted_on, load_head

    identity = file_identity(feature_file)
    if head is None or isinstance(head, str):   # refused when fitted on another file
        estimator = load_head(path, fitted_on=identity)
    else:
        check_fitted_on(estimator, identity)
    head_model = inference_only(keras_head(estimator, name))
    backbone, diff = checked_backbone(estimator, rebuild_backbone(attrs, weights), head_model,
                                      feature_file, name, str(attrs["backbone"]))
    if not diff <= tolerance:
        raise ConfigError(f"the Keras form of head {name!r} differs from the fitted head by "
                          f"{diff:.2e} (> {tolerance}); it cannot be exported faithfully")
    columns = getattr(estimator, "classes_", np.arange(len(fs.classes)))
    class_names = [fs.classes[int(c)] for c in columns]
    if tta is None:
        tta = bool(entry.get("tta")) and bool(attrs.get("flip"))
    size, mode, antialias = int(attrs["image_size"]), str(attrs["preprocess"]), \
        uses_antialias(attrs)
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

