"""The ``finetune`` head's Keras model: the backbone's layers above the cut, rebuilt with
its weights, plus a dense head; and, for export, the backbone's bottom up to the cut.

Reads a feature file's provenance and activation shape (:mod:`featcache.cache.reader`,
:mod:`featcache.cache.activations`) and the backbone's weights (:mod:`featcache.backbones.registry`;
the layers are found by :mod:`featcache.backbones.cut`); writes nothing. Imports Keras inside its
functions only.

:func:`build` gives ``activations (H, W, C) -> the layers above the cut (the top
``trainable_blocks`` blocks trainable, ``None``: all of them, the rest frozen; every
BatchNorm frozen, in inference mode) -> pooled features -> Normalization (fit-row
statistics) -> Dense(hidden, relu) -> Dropout -> Dense(n_classes, softmax)`` as one model, its top
and its head (the head alone takes pooled features: phase 1 trains it on the stored ones).
:func:`build_base` and :func:`build_above_cut` are its two steps without a feature file (the
benchmark's fine-tuning "the usual way" trains the same top and head on images, through
:func:`to_cut`, the frozen bottom).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.errors import ConfigError


@dataclass
class Built:
    """What :func:`build` returns: the whole model, its top and head, and the cut."""

    model: object
    top: object
    head: object
    cut: str
    backbone: str
    top_layers: list
    trainable_blocks: int     # resolved: ``None`` asked for every block above the cut
    base: object = None       # the whole backbone (its layers above the cut are ``top``'s)


def file_weights(attrs: dict) -> str:
    """The weights a feature file was extracted with (its source if it is still there)."""
    weights = str(attrs.get("weights_source") or attrs.get("weights", "imagenet"))
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        weights = str(attrs.get("weights", "imagenet"))
    return weights


def build(path: str, n_classes: int, mean, var, *, trainable_blocks: int | None, hidden: int,
          dropout: float, seed: int) -> Built:
    """The model for the feature file at ``path`` (see the module docstring);
    ``trainable_blocks`` None: every block above the cut."""
    from featcache.cache.activations import ActivationReader
    from featcache.cache.reader import read_attrs

    attrs = read_attrs(path)
    with ActivationReader(path) as r:
        shape = r.shape
    base = build_base(str(attrs["backbone"]), weights=file_weights(attrs),
                      pooling=str(attrs.get("pooling", "avg")),
                      backbone_seed=int(attrs.get("seed", 0)), seed=seed)
    return build_above_cut(base, str(attrs["backbone"]), str(attrs["cut"]), n_classes, mean,
                           var, shape=shape, trainable_blocks=trainable_blocks, hidden=hidden,
                           dropout=dropout)


def build_base(backbone: str, *, weights: str, pooling: str, backbone_seed: int, seed: int):
    """The whole backbone :func:`build` cuts, built after seeding Keras with ``seed`` (which,
    with :func:`build_above_cut` next, sets the head's initial weights)."""
    import keras

    from featcache.backbones.registry import build_backbone, get_backbone

    keras.utils.set_random_seed(int(seed))
    return build_backbone(get_backbone(backbone), weights=weights, pooling=pooling,
                          seed=int(backbone_seed))


def build_above_cut(base, backbone: str, cut: str, n_classes: int, mean, var, *,
                    shape=None, trainable_blocks: int | None, hidden: int, dropout: float) -> Built:
    """:func:`build`'s model on ``base`` (:func:`build_base`) cut at ``cut``: the top's
    layers are ``base``'s own. ``shape``: the activations' (H, W, C), ``None``: any H, W."""
    import keras

    from featcache.backbones.cut import top_model, top_units
    from featcache.backbones.registry import get_backbone

    spec = get_backbone(backbone)
    top = top_model(base, cut, spec.name)
    units = top_units(top)
    k = len(units) if trainable_blocks is None else int(trainable_blocks)
    if not 0 <= k <= len(units):
        raise ConfigError(f"trainable_blocks={k}: the cut {cut} has {len(units)} "
                          f"blocks above it (0..{len(units)})")
    top.trainable = True
    for i, unit in enumerate(units):
        for layer in unit:
            # BatchNorm frozen: inference mode, its ImageNet statistics kept
            layer.trainable = i >= len(units) - k and \
                not isinstance(layer, keras.layers.BatchNormalization)
    feats = keras.Input((len(mean),), dtype="float32", name="features")
    x = keras.layers.Normalization(mean=mean, variance=var, name="standardize")(feats)
    x = keras.layers.Dense(hidden, activation="relu", name="hidden")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    out = keras.layers.Dense(n_classes, activation="softmax", name="proba")(x)
    head = keras.Model(feats, out, name="featcache_finetune_head")
    inp = keras.Input(tuple(shape) if shape is not None else tuple(top.input.shape[1:]),
                      dtype="float32", name="activations")
    model = keras.Model(inp, head(top(inp)), name="featcache_finetune")
    return Built(model, top, head, cut, spec.name,
                 [layer.name for layer in top.layers if layer.weights], k, base)


def to_cut(base, cut: str, backbone: str = ""):
    """``base``'s frozen bottom: images -> the activations at ``cut`` (its own layers)."""
    import keras

    from featcache.backbones.cut import cut_layer

    layer = base.get_layer(cut_layer(base, cut, backbone))
    return keras.Model(base.input, layer.output, name=f"{base.name}_to_{cut}")


def export_bottom(estimator, backbone, head_model, feature_file, n: int = 16):
    """For ``featcache export``: ``backbone`` cut at the head's cut (images -> activations),
    and max |``head_model`` - the head's predictions| on the file's first test rows (the
    Keras form must be the fitted head). The bottom keeps the backbone's frozen weights;
    the fine-tuned top is inside ``head_model``."""
    from featcache.cache.activations import ActivationReader
    from featcache.heads.finetune.data import ActRows

    bottom = to_cut(backbone, estimator.cut_, estimator.backbone_)
    with ActivationReader(feature_file) as r:
        n = min(n, r.rows("test"))
        acts = r.read("test", 0, n).astype(np.float32)
    if not n:
        return bottom, 0.0
    want = estimator.predict_proba(ActRows(str(feature_file), "test", np.arange(n)))
    got = np.asarray(head_model(acts, training=False), np.float32)
    return bottom, float(np.abs(got - want).max())
