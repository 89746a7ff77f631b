"""Export and predict: one Keras model from raw images of any size to class probabilities.

``export_model`` reads a feature file's provenance and class names (:mod:`pipeline.store`),
rebuilds the backbone it was extracted with (:mod:`pipeline.backbones`; the weights are
checked against the file's ``weights_sha256``), loads a fitted head (:mod:`pipeline.heads`,
by default the best head of ``<report_dir>/results.json``) and writes one ``.keras`` file:

    uint8 (None, None, None, 3) -> cast -> resize to image_size (bilinear, antialiased, the
    same op as the folder pipeline) -> the backbone's preprocessing -> backbone -> head
    (-> with ``tta``: the same for the mirrored image, probabilities averaged)
    -> ``FeatcacheLabels`` (identity; carries the class names and provenance).

Only heads with ``to_keras()`` (Keras-expressible: linear ones, the dense head) can be
exported. ``predict_images`` reads such a ``.keras`` file and image files (decoded like
stage one's folders, :func:`pipeline.folders.decode_image`) and returns the top-k classes.
Loading an exported model elsewhere needs ``import pipeline.export`` first: it registers
the two small custom layers.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import keras
import numpy as np

from . import __version__
from .errors import ConfigError, DataError, WeightsError

log = logging.getLogger(__name__)

LABELS_LAYER = "featcache_labels"


# ---------------------------------------------------------------------------- layers

@keras.saving.register_keras_serializable(package="featcache")
class ImagePreprocess(keras.layers.Layer):
    """uint8/float RGB 0-255 images of any size -> resized, preprocessed float32 input."""

    def __init__(self, size: int, mode: str, flip: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.size, self.mode, self.flip = int(size), str(mode), bool(flip)

    def call(self, images):
        import tensorflow as tf

        from .backbones import preprocess
        from .folders import resize_images

        x = resize_images(tf.cast(images, tf.float32), self.size)
        x = preprocess(x, self.mode)
        return tf.reverse(x, axis=[2]) if self.flip else x

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.size, self.size, 3)

    def get_config(self):
        return {**super().get_config(), "size": self.size, "mode": self.mode, "flip": self.flip}


@keras.saving.register_keras_serializable(package="featcache")
class FeatcacheLabels(keras.layers.Layer):
    """Identity on the class probabilities; its config carries the class names (in column
    order) and the provenance of the model, so a saved model needs nothing else."""

    def __init__(self, class_names, metadata=None, **kwargs):
        super().__init__(**kwargs)
        self.class_names = [str(c) for c in class_names]
        self.metadata = dict(metadata or {})

    def call(self, probabilities):
        return keras.ops.cast(probabilities, "float32")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "class_names": self.class_names,
                "metadata": self.metadata}


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

    def summary(self) -> str:
        why = f" ({self.chosen})" if self.chosen else ""
        return (f"exported {self.backbone} ({self.image_size} px) + head {self.head}{why}"
                f"{' with flip TTA' if self.tta else ''}, {len(self.classes)} classes -> "
                f"{self.path} ({self.path.stat().st_size / 2**20:.1f} MiB, {self.seconds:.1f} s; "
                f"Keras head matches the fitted head to {self.head_max_abs_diff:.1e})")


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


def _probe(estimator, head_model, dim: int, seed: int = 0) -> float:
    """Max |Keras head - predict_proba| on random non-negative features (like pooled ReLU
    outputs): the Keras form must be the same function as the fitted head."""
    X = np.random.default_rng(seed).gamma(1.0, 1.0, size=(64, dim)).astype(np.float32)
    want = np.asarray(estimator.predict_proba(X), np.float32)
    got = np.asarray(head_model(X, training=False), np.float32)
    if got.shape != want.shape:
        raise ConfigError(f"the Keras form of the head gives {got.shape[1:]} outputs, "
                          f"predict_proba {want.shape[1:]}; the head is broken")
    return float(np.abs(got - want).max())


def assemble(backbone, head_model, *, size: int, mode: str, class_names: list[str],
             metadata: dict, tta: bool = False):
    """uint8 images -> probabilities, with the labels layer (see the module docstring)."""
    inp = keras.Input(shape=(None, None, 3), dtype="uint8", name="image")
    probs = head_model(backbone(ImagePreprocess(size, mode, name="preprocess")(inp)))
    if tta:
        flipped = head_model(backbone(ImagePreprocess(size, mode, flip=True,
                                                      name="preprocess_flip")(inp)))
        probs = keras.layers.Average(name="tta_average")([probs, flipped])
    out = FeatcacheLabels(class_names, metadata, name=LABELS_LAYER)(probs)
    return keras.Model(inp, out, name="featcache_classifier")


def export_model(feature_file, *, head=None, head_file=None, output=None, report_dir=None,
                 weights: str | None = None, tta: bool | None = None,
                 tolerance: float = 1e-4) -> ExportResult:
    """Write ``feature_file``'s backbone + a fitted head as one ``.keras`` model.

    ``head``: a head name from the comparison (default: its best head) or a fitted estimator
    object. ``head_file``: a saved head file instead (``pipeline.heads.load_head``).
    ``tta``: average with the mirrored image (default: as the comparison scored the head).
    """
    from .store import load_features

    t0 = time.perf_counter()
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
        from .heads import load_head

        estimator = load_head(path)
    head_model = _keras_head(estimator, name)
    backbone = rebuild_backbone(attrs, weights)
    dim = int(backbone.output_shape[-1])
    if int(head_model.input_shape[-1]) != dim:
        raise ConfigError(f"head {name!r} takes {head_model.input_shape[-1]} features but "
                          f"{attrs['backbone']} gives {dim}; it was fitted on another file")
    diff = _probe(estimator, head_model, dim)
    if not diff <= tolerance:
        raise ConfigError(f"the Keras form of head {name!r} differs from the fitted head by "
                          f"{diff:.2e} (> {tolerance}); it cannot be exported faithfully")
    columns = getattr(estimator, "classes_", np.arange(len(fs.classes)))
    class_names = [fs.classes[int(c)] for c in columns]
    if tta is None:
        tta = bool(entry.get("tta")) and bool(attrs.get("flip"))
    metadata = {
        "featcache_version": __version__, "feature_file": str(feature_file), "head": name,
        "tta": bool(tta), "exported_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **{k: attrs.get(k) for k in ("dataset", "dataset_sha256", "backbone", "weights",
                                     "weights_sha256", "image_size", "preprocess", "pooling",
                                     "config_sha256") if k in attrs},
    }
    model = assemble(backbone, head_model, size=int(attrs["image_size"]),
                     mode=str(attrs["preprocess"]), class_names=class_names,
                     metadata=metadata, tta=bool(tta))
    stem = f"{feature_file.stem}_{name.replace('+', '_')}"
    out = Path(output) if output else report_dir / f"{stem}.keras"
    if out.suffix != ".keras":
        raise ConfigError(f"--output must end in .keras, not {out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.keras")
    model.save(tmp)
    tmp.replace(out)
    return ExportResult(out, name, class_names, str(attrs["backbone"]),
                        int(attrs["image_size"]), bool(tta), diff, time.perf_counter() - t0,
                        chosen)


# ---------------------------------------------------------------------------- predict

@dataclass
class Classifier:
    """A loaded exported model: ``model``, ``class_names``, ``metadata``."""

    model: object
    class_names: list[str]
    metadata: dict

    def __post_init__(self):
        import tensorflow as tf

        self._fn = tf.function(lambda x: self.model(x, training=False),
                               input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, classes) float32."""
        return self._fn(np.asarray(images, np.uint8)).numpy()


def load_classifier(path) -> Classifier:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"model {path} does not exist; make one with `featcache export`")
    try:
        from .heads import keras_custom_objects  # layers inside some heads (rbf_svm)

        custom = keras_custom_objects()
    except (ImportError, AttributeError):  # pragma: no cover - heads without custom layers
        custom = {}
    try:
        model = keras.saving.load_model(path, custom_objects=custom, compile=False)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for bad archives
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{path} is not a loadable .keras model ({first[:160]}); export it "
                        f"again with `featcache export`") from None
    try:
        labels = model.get_layer(LABELS_LAYER)
    except ValueError:
        raise DataError(f"{path} is a Keras model but not one exported by featcache (no class "
                        f"names inside); export it with `featcache export`") from None
    return Classifier(model, list(labels.class_names), dict(labels.metadata))


def predict_images(model, images: Iterable, top_k: int = 3) -> list[dict]:
    """Top-k classes per image file: ``[{"image", "top": [{"class", "probability"}]}]``.

    ``model``: a path or a :class:`Classifier`. An image that cannot be decoded raises a
    :class:`~pipeline.errors.DataError` naming it.
    """
    from .folders import decode_image

    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, not {top_k}")
    clf = model if isinstance(model, Classifier) else load_classifier(model)
    k = min(top_k, len(clf.class_names))
    out = []
    for image in images:
        pixels = decode_image(Path(image))
        p = clf.probabilities(pixels[None])[0]
        order = np.argsort(-p, kind="stable")[:k]
        out.append({"image": str(image),
                    "top": [{"class": clf.class_names[i], "probability": float(p[i])}
                            for i in order]})
    return out

