"""The one resize of featcache: stage one (registry data sets and image folders), export
and ``featcache predict`` all go through here. Reads and writes nothing.

Bilinear, on float32 0-255 pixels, never rounded. Antialiasing (a wider kernel when
*down*sampling) is on for image folders, whose photos are usually larger than the input
size, and off for registry data sets such as CIFAR-10 (32 px, always *up*sampled). When
upsampling the two agree up to float rounding (CIFAR-10 32 -> 224 px: at most 4.6e-5 of
255, mean 3.5e-6, on 256 test images), so registry files keep plain bilinear and their
bytes (and cache key) stay as they were. Which one a feature file used is recorded in its
``resize`` attribute (:func:`describe`) and read back by export (:func:`uses_antialias`).
"""

from __future__ import annotations

RESIZE_METHOD = "bilinear"
#: image folders (:mod:`featcache.data.folders`)
FOLDER_ANTIALIAS = True
#: registry data sets (CIFAR-10, synthetic), resized inside stage one's step graph
REGISTRY_ANTIALIAS = False


def describe(antialias: bool) -> str:
    """The ``resize`` attribute of a feature file, e.g. ``"bilinear, antialias=True"``."""
    return f"{RESIZE_METHOD}, antialias={bool(antialias)}"


def uses_antialias(attrs: dict) -> bool:
    """Whether stage one's resize for a file with these attributes was antialiased (files
    without a ``resize`` attribute are registry files: not antialiased)."""
    return "antialias=true" in str(attrs.get("resize", "")).replace(" ", "").lower()


def resize_images(x, size: int, antialias: bool = FOLDER_ANTIALIAS):
    """Resize float32 images ((H, W, 3) or (N, H, W, 3), 0-255) to ``size`` x ``size``
    (TensorFlow op; also inside stage one's graph that OpenVINO converts)."""
    import tensorflow as tf

    return tf.image.resize(x, (size, size), method=RESIZE_METHOD, antialias=antialias)


def resizing_layer(size: int, antialias: bool, name: str = "resize"):
    """The same resize as a Keras layer, for exported models (``keras.layers.Resizing`` calls
    the same ``tf.image.resize`` on the TensorFlow backend)."""
    from keras import layers

    return layers.Resizing(size, size, interpolation=RESIZE_METHOD, antialias=antialias,
                           name=name)
