"""Cut points of a backbone: where its graph can be split into a frozen bottom, whose output
(the *activations at the cut*) stage one caches, and a top that stage two can fine-tune.

Reads nothing, writes nothing; imports Keras only inside the functions that build models.

A **cut** is named by a block (``block_13`` of MobileNetV2, ``conv4_block6`` of ResNet50,
``block6a`` of EfficientNet) and means "after that block": the output of the block's last
layer. Only *sensible* cuts are offered: block boundaries where exactly one tensor crosses
from the bottom to the top (no skip connection jumps over the cut), so the bottom's output
is a single activation map and the top is a function of it alone. The last block of a
backbone is a valid cut when something (a final 1x1 convolution) still follows it.

- :func:`check_cut_name`: the cheap check of ``--cut`` (``ExtractConfig.resolved()``, no
  Keras); the real one, against the built backbone, is :func:`find_cut`.
- :func:`cut_points`: the cuts of a built backbone, in order.
- :func:`cut_layer`: a cut's layer name, or a one-line :class:`ConfigError` listing the valid
  ones.
- :func:`bottom_model`: input -> (pooled features, activations at the cut), one model.
- :func:`top_model`: activations at the cut -> pooled features, sharing the backbone's layers
  (and so its weights); :func:`top_units` groups its layers into blocks (for freezing).
- :func:`describe_cuts`: each cut's activation shape, CIFAR-10 cache size and the FLOPs of
  the part above it (what ``featcache cuts`` prints).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from featcache.errors import ConfigError

#: A layer's block: the name up to its block number (``block_13``, ``conv4_block6``,
#: ``block6a``). Layers whose names do not match (stems, final convs, pooling) have none.
_BLOCK = re.compile(r"^(.*?block_?\d+[a-z]?)(?:_|$)")

#: CIFAR-10's images (train + test): what ``featcache cuts`` sizes the cache for.
CIFAR10_IMAGES = 60_000


def block_of(layer_name: str) -> str | None:
    """The block a layer belongs to (``None`` for layers outside numbered blocks)."""
    m = _BLOCK.match(layer_name)
    return m.group(1) if m else None


def _producers(layer) -> list[str]:
    """Names of the layers whose outputs ``layer`` consumes (Keras 3 functional graph)."""
    names = []
    for node in layer._inbound_nodes[:1]:
        for t in node.input_tensors:
            names.append(t._keras_history.operation.name)
    return names


@dataclass(frozen=True)
class CutPoint:
    """One cut: its name (the block), the layer whose output it is, its position."""

    name: str
    layer: str
    index: int        # position of ``layer`` in ``model.layers``


def _top_connects(model, layer) -> bool:
    """Whether ``model``'s output is a function of ``layer``'s output alone: what the graph
    walk cannot see (ConvNeXt's blocks also read tensors made outside its layers) shows
    when Keras builds the top model."""
    import keras

    try:
        keras.Model(layer.output, model.output)
    except ValueError:
        return False
    return True


def cut_points(model) -> list[CutPoint]:
    """The sensible cuts of ``model``: ends of numbered blocks that a single tensor crosses,
    with at least one weighted layer above them, from which Keras can build the top."""
    layers = model.layers
    pos = {l.name: i for i, l in enumerate(layers)}
    last_use = list(range(len(layers)))
    for i, layer in enumerate(layers):
        for p in _producers(layer):
            if p in pos:
                last_use[pos[p]] = max(last_use[pos[p]], i)
    weighted_after = [False] * (len(layers) + 1)
    for i in range(len(layers) - 1, -1, -1):
        weighted_after[i] = weighted_after[i + 1] or bool(layers[i].weights)
    cuts, reach = [], 0   # reach: the last consumer of any layer before the current one
    for i, layer in enumerate(layers[:-1]):
        block = block_of(layer.name)
        crosses = reach > i   # an earlier layer's output is still needed above layer i
        reach = max(reach, last_use[i])
        if block is None or crosses or block_of(layers[i + 1].name) == block:
            continue  # not the end of a block, or another tensor crosses
        if weighted_after[i + 1] and _top_connects(model, layer):
            cuts.append(CutPoint(block, layer.name, i))
    return cuts


def _no_cuts(backbone: str) -> ConfigError:
    return ConfigError(f"{backbone} has no cut points featcache knows (no numbered blocks a "
                       f"single tensor crosses); use mobilenet_v2, resnet50 or efficientnet_b0")


def check_cut_name(cut: str | None, backbone: str, shard=None) -> str | None:
    """``cut`` if it can name a block (letters, digits, ``_``), else a one-line error."""
    if cut is None:
        return None
    if not (isinstance(cut, str) and re.fullmatch(r"\w+", cut)):
        raise ConfigError(f"--cut takes a block name (`featcache cuts {backbone}` lists them), "
                          f"not {cut!r}")
    if shard:
        raise ConfigError("--cut does not work with --shard yet (merge does not copy the "
                          "activations); extract the file with a cut in one run")
    return cut


def find_cut(model, cut: str, backbone: str = "") -> CutPoint:
    """The :class:`CutPoint` called ``cut`` (a block name, or its layer's name)."""
    points = cut_points(model)
    if not points:
        raise _no_cuts(backbone or model.name)
    for p in points:
        if cut in (p.name, p.layer):
            return p
    raise ConfigError(f"unknown cut {cut!r} for {backbone or model.name}; choose one of: "
                      f"{', '.join(p.name for p in points)}")


def cut_layer(model, cut: str, backbone: str = "") -> str:
    """The layer name of ``cut`` in ``model`` (one-line error listing the valid cuts)."""
    return find_cut(model, cut, backbone).layer


def bottom_model(model, cut: str, backbone: str = ""):
    """``images -> [pooled features, activations at cut]`` sharing ``model``'s layers."""
    import keras

    layer = model.get_layer(cut_layer(model, cut, backbone))
    return keras.Model(model.input, [model.output, layer.output], name=f"{model.name}_to_cut")


def activation_shape(model, cut: str, size: int) -> tuple[int, int, int]:
    """(H, W, C) of the activations at ``cut`` for ``size``-px inputs (one zero image run)."""
    import numpy as np

    _, acts = bottom_model(model, cut)(np.zeros((1, size, size, 3), np.float32),
                                       training=False)
    return tuple(int(d) for d in acts.shape[1:])


def top_model(model, cut: str, backbone: str = ""):
    """``activations at cut -> pooled features``: the layers above the cut (the same layer
    objects as ``model``'s, so the same weights)."""
    import keras

    layer = model.get_layer(cut_layer(model, cut, backbone))
    return keras.Model(layer.output, model.output, name=f"{model.name}_above_cut")


def top_units(top) -> list[list]:
    """The weighted layers of a :func:`top_model`, grouped into blocks from the bottom up
    (layers outside numbered blocks, e.g. MobileNetV2's ``Conv_1``, form the last unit)."""
    units: list[list] = []
    keys: list = []
    for layer in top.layers:
        if not layer.weights:
            continue
        key = block_of(layer.name)
        if not keys or keys[-1] != key:
            units.append([])
            keys.append(key)
        units[-1].append(layer)
    return units


# ---------------------------------------------------------------------------- costs

def layer_flops(layer) -> int:
    """FLOPs (2 per multiply-add) of one forward pass of ``layer`` for one image, counting
    convolutions and dense layers (normalisation, activations and adds are ignored)."""
    import keras

    out = layer.output.shape
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        return 2 * int(out[1]) * int(out[2]) * int(out[3]) * kh * kw
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        cin = int(layer.input.shape[-1]) // max(1, int(getattr(layer, "groups", 1) or 1))
        return 2 * int(out[1]) * int(out[2]) * int(out[3]) * kh * kw * cin
    if isinstance(layer, keras.layers.Dense):
        return 2 * int(layer.input.shape[-1]) * int(out[-1])
    return 0


@dataclass(frozen=True)
class CutInfo:
    """One row of ``featcache cuts``."""

    name: str
    layer: str
    shape: tuple[int, int, int]
    cache_bytes: int          # CIFAR-10, float16, with mirrors if ``flip``
    flops_above: int          # per image, forward
    flops_total: int          # the whole backbone, per image
    units_above: int          # blocks above (trainable_blocks can be 1..this)


def describe_cuts(backbone: str, size: int, *, images: int = CIFAR10_IMAGES,
                  flip: bool = True, only: str | None = None) -> list[CutInfo]:
    """The cuts of ``backbone`` at ``size`` px (built with random weights: shapes and costs
    do not depend on them); ``only``: the row of that one cut (the others' tops are not
    built: a backbone with many cut points takes a minute for all)."""
    from featcache.backbones.registry import build_backbone, get_backbone

    spec = get_backbone(backbone)
    model = build_backbone(spec, weights="none")
    points = cut_points(model)
    if not points:
        raise _no_cuts(backbone)
    sized = spec.build(include_top=False, weights=None, input_shape=(size, size, 3),
                       pooling="avg")
    flops = [layer_flops(l) for l in sized.layers]
    total = sum(flops)
    rows = []
    for p in points:
        if only is not None and p.name != only:
            continue
        shape = tuple(int(d) for d in sized.layers[p.index].output.shape[1:])
        n = shape[0] * shape[1] * shape[2]
        units = len(top_units(top_model(model, p.name, backbone)))
        rows.append(CutInfo(p.name, p.layer, shape, images * n * 2 * (2 if flip else 1),
                            sum(flops[p.index + 1:]), total, units))
    return rows


def format_cuts(backbone: str, size: int, rows: list[CutInfo], *, flip: bool = True,
                recommended: str | None = None) -> str:
    """A markdown table of :func:`describe_cuts`'s rows, and a last line naming the
    ``recommended`` cut (the registry's ``BackboneSpec.cut``) when there is one."""
    lines = [f"Cut points of {backbone} at {size} px (cache: CIFAR-10's {CIFAR10_IMAGES:,} "
             f"images{', x2 with mirrors' if flip else ''}, float16; FLOPs per image, forward, "
             f"2 per multiply-add)", "",
             "| cut | layer | activation | cache | MFLOPs above | share of backbone "
             "| blocks above |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.name} | {r.layer} | {'x'.join(map(str, r.shape))} | "
                     f"{r.cache_bytes / 2**30:.2f} GiB | {r.flops_above / 1e6:.1f} | "
                     f"{100 * r.flops_above / max(1, r.flops_total):.1f}% | {r.units_above} |")
    if recommended:
        lines += ["", f"recommended: {recommended} (`--cut recommended`, what `make finetune` "
                      f"extracts)"]
    return "\n".join(lines)
