"""The exported model itself: the backbone rebuilt from a feature file's provenance, a
fitted head as Keras layers, and :func:`assemble` — raw images -> resize -> preprocessing
-> backbone -> head (-> mirrored twin averaged) as one model of built-in Keras layers
(see :mod:`featcache.ship.export` for the contract and the formats it is written in).

Reads the backbone's weights (checked against the file's ``weights_sha256``) and, for the
probes, a few rows of the feature file; writes nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from featcache.data.resize import resizing_layer
from featcache.errors import ConfigError, WeightsError

log = logging.getLogger(__name__)


def keras_heads() -> list[str]:
    """Registered heads that can be exported (implement ``to_keras``)."""
    from featcache.heads import HEADS

    return sorted(n for n, s in HEADS.items() if getattr(s, "keras", True))


def not_exportable(name: str, why: str = "") -> ConfigError:
    try:
        ok = ", ".join(keras_heads())
    except ImportError:  # pragma: no cover - heads.py is part of the package
        ok = "logreg, linear_svm, dense"
    return ConfigError(
        f"head {name!r} cannot be exported{': ' + why if why else ''}; export needs a "
        f"Keras-expressible head: {ok}. Pass --head NAME (one of those that was fitted)")


def rebuild_backbone(attrs: dict, weights: str | None = None):
    """The backbone of a feature file, built again; refuses other weights than the file's."""
    from featcache.backbones.registry import build_backbone, get_backbone, weights_sha256

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


def keras_head(estimator, name: str):
    to_keras = getattr(estimator, "to_keras", None)
    if to_keras is None:
        raise not_exportable(name, f"{type(estimator).__name__} has no to_keras()")
    try:
        return to_keras()
    except NotImplementedError as exc:
        raise not_exportable(name, str(exc)) from None


def inference_only(head_model):
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


def probe(estimator, head_model, X: np.ndarray) -> float:
    """Max |Keras head - predict_proba| on ``X``, rows of the feature file (real features:
    random ones can be far outside what a head was fitted on, where e.g. rbf_svm's cosine
    arguments are meaningless): the Keras form must be the same function as the fitted head.

    A head with ``near_ties(X)`` (``knn``) is compared on the other rows only: where its
    k-th and (k+1)-th neighbour are equally similar to float32 rounding, the Keras form may
    take the other one (the votes then differ by 1/k; see ``CosineKNNHead.to_keras``)."""
    want = np.asarray(estimator.predict_proba(X), np.float32)
    got = np.asarray(head_model(X, training=False), np.float32)
    if got.shape != want.shape:
        raise ConfigError(f"the Keras form of the head gives {got.shape[1:]} outputs, "
                          f"predict_proba {want.shape[1:]}; the head is broken")
    diff = np.abs(got - want).max(axis=1, initial=0.0)
    near_ties = getattr(estimator, "near_ties", None)
    if near_ties is not None and len(X):
        tied = np.asarray(near_ties(X), bool)
        if tied.any():
            log.info("%d of %d probe rows have a near tie at the k-th neighbour; compared on "
                     "the others", int(tied.sum()), len(X))
        diff = diff[~tied]
    return float(diff.max(initial=0.0))


def probe_rows(feature_file: Path, dim: int, n: int = 64) -> np.ndarray:
    """Up to ``n`` rows of each split of the feature file (float32), for :func:`probe`."""
    from featcache.cache.reader import load_features

    fs = load_features(feature_file, flip=False, max_rows=n)
    rows = [np.asarray(s.features[:n], np.float32) for s in fs.splits.values() if len(s)]
    X = np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
    if X.shape[1:] != (dim,):
        raise ConfigError(f"{feature_file} holds {X.shape[1:]} features, the backbone gives "
                          f"{dim}; the file does not belong to this backbone")
    return X


def checked_backbone(estimator, backbone, head_model, feature_file, name: str,
                     backbone_name: str):
    """(the backbone part the head sits on, max |Keras head - fitted head| on file rows).

    Usually the whole ``backbone`` (images -> pooled features). A head fine-tuned above a
    cut (``finetune``: its ``cut_``) sits on the backbone's frozen bottom up to that cut
    (:func:`featcache.heads.finetune.model.export_bottom`); its Keras form holds the top."""
    if getattr(estimator, "cut_", None):
        from featcache.heads.finetune.model import export_bottom

        return export_bottom(estimator, backbone, head_model, feature_file)
    dim = int(backbone.output_shape[-1])
    if int(head_model.input_shape[-1]) != dim:
        raise ConfigError(f"head {name!r} takes {head_model.input_shape[-1]} features but "
                          f"{backbone_name} gives {dim}; it was fitted on another file")
    return backbone, probe(estimator, head_model, probe_rows(feature_file, dim))


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

    from featcache.backbones.registry import preprocess_affine

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


