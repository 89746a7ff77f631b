"""Backbone registry: name -> Keras builder, its preprocessing, default/minimum input size and
embedding dimension. Adding a backbone is one decorated function.

Reads ImageNet weights from the Keras cache (``$KERAS_HOME/models``) or an explicit ``.h5``
path; writes nothing (Keras itself may write ``keras.json`` into ``KERAS_HOME``).

Input size and weights: every backbone is built fully convolutional
(``input_shape=(None, None, 3)``), so Keras always asks for its canonical 224-px (or
family-default) weight file and the network then runs at whatever size the images are
resized to. Keras' MobileNet family would otherwise demand a resolution-specific file
when the size is 96/128/160/192 — files that do not exist offline and that would make the
input size silently change which weights are used. Same weights at every size is the
deliberate choice; the size is recorded in the feature file and in its cache key.

Keras is imported lazily: this module (and so the CLI's help and the Makefile's path
computation) works without TensorFlow installed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from featcache.errors import ConfigError, WeightsError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- preprocessing

#: Preprocessing modes, as Keras' ``imagenet_utils.preprocess_input`` names them, plus the
#: tutorial's ``scale01``. Each maps float32 RGB 0-255 pixels to what a backbone expects.
PREPROCESS_MODES = {
    "caffe": "RGB->BGR, subtract the ImageNet BGR mean (ResNet50, VGG16)",
    "tf": "scale to [-1, 1] (MobileNet, MobileNetV2, ResNet50V2, Inception, Xception)",
    "torch": "scale to [0, 1], normalise by the ImageNet mean/std (DenseNet)",
    "none": "raw 0-255; the model rescales inside (EfficientNet, MobileNetV3, ConvNeXt)",
    "scale01": "divide by 255 (the tutorial's recipe; wrong for every backbone here)",
}

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


def preprocess(x, mode: str):
    """Apply ``mode`` to a float32 NHWC RGB tensor in 0-255 (TensorFlow ops, graph-safe)."""
    import tensorflow as tf

    if mode == "caffe":
        return x[..., ::-1] - tf.constant(_CAFFE_MEAN_BGR, x.dtype)
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "torch":
        return (x / 255.0 - tf.constant(_TORCH_MEAN, x.dtype)) / tf.constant(_TORCH_STD, x.dtype)
    if mode == "none":
        return x
    if mode == "scale01":
        return x / 255.0
    raise ConfigError(f"unknown preprocessing {mode!r}; choose one of {sorted(PREPROCESS_MODES)}")


def preprocess_affine(mode: str):
    """``mode`` as a per-channel affine map ``x @ W + b`` on RGB 0-255 pixels, as numpy
    float32 ``(W (3, 3), b (3,))``, or ``None`` for ``none`` (identity). Every mode is one:
    a scale and an offset per channel, ``caffe`` with the RGB->BGR permutation folded into
    ``W``. Exported models run it as a frozen ``Dense(3)`` (a built-in Keras layer); it agrees
    with :func:`preprocess` to float32 rounding (tests compare them)."""
    import numpy as np

    if mode == "none":
        return None
    if mode == "caffe":
        W = np.eye(3, dtype=np.float32)[::-1].copy()   # out channel c = in channel 2 - c
        return W, -np.asarray(_CAFFE_MEAN_BGR, np.float32)
    if mode == "tf":
        return np.eye(3, dtype=np.float32) / np.float32(127.5), -np.ones(3, np.float32)
    if mode == "torch":
        std, mean = np.asarray(_TORCH_STD, np.float64), np.asarray(_TORCH_MEAN, np.float64)
        return (np.diag(1.0 / (255.0 * std)).astype(np.float32),
                (-mean / std).astype(np.float32))
    if mode == "scale01":
        return np.eye(3, dtype=np.float32) / np.float32(255.0), np.zeros(3, np.float32)
    raise ConfigError(f"unknown preprocessing {mode!r}; choose one of {sorted(PREPROCESS_MODES)}")


# ---------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class BackboneSpec:
    """What the pipeline needs to know about one backbone."""

    name: str
    build: Callable  # (**keras_application_kwargs) -> keras.Model
    preprocess: str
    dim: int
    default_size: int = 224
    min_size: int = 32
    keras_module: str = ""  # keras.applications.<module>.preprocess_input (tests compare)
    weights_file: str = ""  # the Keras cache file name of its ImageNet no-top weights
    family: str = ""
    #: the cut ``make finetune`` (``--cut recommended``) uses: a name ``featcache cuts`` lists,
    #: or None where no cut is sensible (see :data:`RECOMMENDED_CUT_RULE`)
    cut: str | None = None
    #: whether the default ``--cut auto`` stores that cut: only where its activations are
    #: small (:data:`DEFAULT_CUT_RULE`), so the quick path's file stays small
    cut_by_default: bool = False

    @property
    def offline_weights(self) -> Path | None:
        """Where Keras would look for the ImageNet weights in the cache, if known."""
        if not self.weights_file:
            return None
        return Path(keras_home()) / "models" / self.weights_file


BACKBONES: dict[str, BackboneSpec] = {}

#: How each backbone's recommended cut (``BackboneSpec.cut``) was chosen: the first cut at
#: the backbone's last feature-map resolution, i.e. right after the block that downsamples
#: to it. That is MobileNetV2's ``block_13``, the best cut measured so far
#: (docs/fine-tuning.md); for the others it is the same rule, not a measurement.
RECOMMENDED_CUT_RULE = ("the first cut at the last feature-map resolution (after the block "
                        "that downsamples to it): the smallest cache with the most blocks "
                        "above it")


def register_backbone(name: str, *, preprocess: str, dim: int, default_size: int = 224,
                      min_size: int = 32, keras_module: str = "", weights_file: str = "",
                      family: str = "", cut: str | None = None,
                      cut_by_default: bool = False):
    """Decorator: register ``fn(**kwargs) -> keras.Model`` under ``name``; ``cut``: its
    recommended cut (:data:`RECOMMENDED_CUT_RULE`), None where it has no sensible one;
    ``cut_by_default``: stage one stores it unless ``--cut none`` (:data:`DEFAULT_CUT_RULE`)."""
    if cut_by_default and not cut:
        raise ValueError(f"{name}: cut_by_default needs a recommended cut")
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(f"{name}: unknown preprocess {preprocess!r}")

    def deco(fn):
        BACKBONES[name] = BackboneSpec(name, fn, preprocess, dim, default_size, min_size,
                                       keras_module, weights_file, family or name, cut,
                                       cut_by_default)
        return fn
    return deco


#: When the default ``--cut auto`` stores a backbone's recommended cut: its float16
#: activations (plain and mirrored) take at most :data:`DEFAULT_CUT_MAX_RATIO` times the
#: pooled float32 features at the default size, so one extraction serves the frozen heads
#: and ``finetune`` at a few times the quick path's file (mobilenet_v2 ``block_13``:
#: 7x7x160 float16 = 3.1x; resnet50 ``conv5_block1``, 7x7x2048, would be 25x and is left
#: to ``--cut recommended``). A test checks every flagged backbone against it.
DEFAULT_CUT_MAX_RATIO = 4.0
DEFAULT_CUT_RULE = (f"the recommended cut, where its float16 activations are at most "
                    f"{DEFAULT_CUT_MAX_RATIO:g}x the pooled features")

#: the ``--cut`` value that means "this backbone's recommended cut" (``make finetune``)
RECOMMENDED = "recommended"
#: the default ``--cut``: the recommended cut where ``cut_by_default``, else none
AUTO_CUT = "auto"
#: the ``--cut`` value that stores no activations
NO_CUT = "none"


def recommended_cut(backbone: str) -> str:
    """``backbone``'s recommended cut (``--cut recommended``), or a one-line error."""
    spec = get_backbone(backbone)
    if spec.cut is None:
        with_cut = ", ".join(n for n, s in sorted(BACKBONES.items()) if s.cut)
        raise ConfigError(f"{backbone} has no recommended cut (featcache knows no sensible "
                          f"cut point of it); fine-tune one of: {with_cut}")
    return spec.cut


def resolve_cut(cut: str | None, backbone: str, *, sharded: bool = False) -> str | None:
    """The block ``--cut`` names: ``auto`` (the default) the recommended cut of a backbone
    registered ``cut_by_default`` (none for a sharded run: shards do not carry activations
    yet), ``none``/None none, ``recommended`` :func:`recommended_cut`, else ``cut`` itself."""
    if cut in (None, NO_CUT):
        return None
    if cut == AUTO_CUT:
        spec = get_backbone(backbone)
        return spec.cut if spec.cut_by_default and not sharded else None
    if cut == RECOMMENDED:
        return recommended_cut(backbone)
    return cut


def list_backbones(pattern: str = "*") -> list[str]:
    """The registered backbones whose names match the shell-style ``pattern``
    (``"mobilenet*"``, ``"efficientnet_b?"``), sorted (timm's ``list_models``)."""
    return sorted(n for n in BACKBONES if fnmatch.fnmatchcase(n, pattern))


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; choose one of: "
                          f"{', '.join(sorted(BACKBONES))}") from None


def _apps():
    import keras
    return keras.applications


@register_backbone("resnet50", preprocess="caffe", dim=2048, keras_module="resnet50",
                   weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   cut="conv5_block1")
def _resnet50(**kw):
    return _apps().ResNet50(**kw)


@register_backbone("resnet50v2", preprocess="tf", dim=2048, keras_module="resnet_v2",
                   weights_file="resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   cut="conv4_block6")
def _resnet50v2(**kw):
    return _apps().ResNet50V2(**kw)


@register_backbone("vgg16", preprocess="caffe", dim=512, keras_module="vgg16",
                   weights_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   cut="block4")
def _vgg16(**kw):
    return _apps().VGG16(**kw)


@register_backbone("mobilenet", preprocess="tf", dim=1024, keras_module="mobilenet",
                   weights_file="mobilenet_1_0_224_tf_no_top.h5")
def _mobilenet(**kw):
    return _apps().MobileNet(alpha=1.0, **kw)


@register_backbone("mobilenet_025", preprocess="tf", dim=256, keras_module="mobilenet",
                   weights_file="mobilenet_2_5_224_tf_no_top.h5", family="mobilenet")
def _mobilenet_025(**kw):
    return _apps().MobileNet(alpha=0.25, **kw)


@register_backbone("mobilenet_v2", preprocess="tf", dim=1280, keras_module="mobilenet_v2",
                   weights_file="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
                   cut="block_13", cut_by_default=True)
def _mobilenet_v2(**kw):
    return _apps().MobileNetV2(alpha=1.0, **kw)


@register_backbone("mobilenet_v3_small", preprocess="none", dim=576, keras_module="mobilenet_v3",
                   weights_file="weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5")
def _mobilenet_v3_small(**kw):
    return _apps().MobileNetV3Small(**kw)


@register_backbone("mobilenet_v3_large", preprocess="none", dim=960, keras_module="mobilenet_v3",
                   weights_file="weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5")
def _mobilenet_v3_large(**kw):
    return _apps().MobileNetV3Large(**kw)


def _efficientnet(variant: str, dim: int, size: int):
    @register_backbone(f"efficientnet_{variant}", preprocess="none", dim=dim,
                       default_size=size, keras_module="efficientnet",
                       weights_file=f"efficientnet{variant}_notop.h5", family="efficientnet",
                       cut="block6a", cut_by_default=variant == "b0")
    def build(**kw):
        return getattr(_apps(), f"EfficientNet{variant.upper()}")(**kw)
    return build


for _v, _d, _s in (("b0", 1280, 224), ("b1", 1280, 240), ("b2", 1408, 260), ("b3", 1536, 300)):
    _efficientnet(_v, _d, _s)


@register_backbone("efficientnetv2_b0", preprocess="none", dim=1280,
                   keras_module="efficientnet_v2", weights_file="efficientnetv2-b0_notop.h5",
                   family="efficientnetv2",
                   cut="block6a", cut_by_default=True)
def _efficientnetv2_b0(**kw):
    return _apps().EfficientNetV2B0(**kw)


@register_backbone("efficientnetv2_s", preprocess="none", dim=1280, default_size=384,
                   keras_module="efficientnet_v2", weights_file="efficientnetv2-s_notop.h5",
                   family="efficientnetv2",
                   cut="block6a")
def _efficientnetv2_s(**kw):
    return _apps().EfficientNetV2S(**kw)


@register_backbone("convnext_tiny", preprocess="none", dim=768, keras_module="convnext",
                   weights_file="convnext_tiny_notop.h5",
                   cut="convnext_tiny_downsampling_block_2")
def _convnext_tiny(**kw):
    return _apps().ConvNeXtTiny(**kw)


@register_backbone("densenet121", preprocess="torch", dim=1024, keras_module="densenet",
                   weights_file="densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   cut="conv5_block1")
def _densenet121(**kw):
    return _apps().DenseNet121(**kw)


@register_backbone("inception_v3", preprocess="tf", dim=2048, default_size=299, min_size=75,
                   keras_module="inception_v3",
                   weights_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5")
def _inception_v3(**kw):
    return _apps().InceptionV3(**kw)


@register_backbone("xception", preprocess="tf", dim=2048, default_size=299, min_size=71,
                   keras_module="xception",
                   weights_file="xception_weights_tf_dim_ordering_tf_kernels_notop.h5")
def _xception(**kw):
    return _apps().Xception(**kw)


# ---------------------------------------------------------------------------- building

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
POOLINGS = ("avg", "max")


def keras_home() -> str:
    return os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))


def weights_tag(weights: str) -> str:
    """How the weights appear in provenance and file names: imagenet, none, or a file stem."""
    if weights in ("imagenet", "none"):
        return weights
    return Path(weights).stem


def build_backbone(spec: BackboneSpec, *, weights: str = "imagenet", pooling: str = "avg",
                   precision: str = "float32", seed: int = 0):
    """Build ``spec`` headless and pooled, ``(None, None, 3)`` input, inference-only.

    ``weights``: ``"imagenet"`` (Keras cache; a download where there is a network),
    ``"none"`` (random init, for tests) or a path to an ``.h5``/``.weights.h5`` file.
    ``precision``: a Keras dtype policy; the policy is restored afterwards.
    ``seed`` makes random (``"none"``) weights reproducible.
    """
    import keras

    if pooling not in POOLINGS:
        raise ConfigError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise WeightsError(f"weights file {weights} does not exist; give an existing .h5 "
                           f"path, 'imagenet' or 'none'")
    kw = dict(include_top=False, input_shape=(None, None, 3), pooling=pooling,
              weights=None if weights == "none" else weights)
    if weights == "none":
        keras.utils.set_random_seed(seed)
    old_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input_shape is undefined ... 224 loaded"
            model = spec.build(**kw)
    except (ValueError, OSError, Exception) as exc:  # noqa: BLE001 - Keras raises bare Exception on download failure
        raise _weights_error(spec, weights, exc) from None
    finally:
        keras.mixed_precision.set_global_policy(old_policy)
    model.trainable = False
    return model


def _weights_error(spec: BackboneSpec, weights: str, exc: Exception) -> Exception:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if weights == "imagenet":
        where = spec.offline_weights or Path(keras_home()) / "models"
        return WeightsError(
            f"ImageNet weights for {spec.name} are not at {where} and could not be downloaded "
            f"({first[:160]}); copy the Keras no-top weight file there (or set KERAS_HOME), "
            f"pass --weights PATH.h5, or --weights none for random weights")
    if weights == "none":
        return ConfigError(f"cannot build {spec.name}: {first[:200]}")
    return WeightsError(f"weights file {weights} does not fit {spec.name} ({first[:160]}); "
                        f"give the Keras no-top weights of this backbone")


def weights_sha256(model) -> str:
    """SHA-256 over the model's weight tensors in order: identifies the weights whatever
    file they came from."""
    h = hashlib.sha256()
    for w in model.weights:
        arr = w.numpy()
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()
