"""featcache: run a pretrained backbone once, cache its features, compare fast heads on them.

The notebook API, imported lazily (``import featcache`` needs no TensorFlow; ``dir()`` and
tab completion list every name):

- ``extract_features(dataset=..., backbone=..., ...)`` — stage one (:mod:`featcache.api`)
- ``load_features(path)`` — a feature file's arrays (:mod:`featcache.cache.reader`)
- ``compare_heads(path_or_features, heads=..., ...)`` — stage two, a ``Comparison``
  (:mod:`featcache.compare.comparison`)
- ``list_backbones(pattern)``, ``list_heads(pattern)``, ``get_head(name, **params)`` — the
  registries; every head is a scikit-learn estimator
- ``export_model(path)``, ``load_classifier(model)``, ``predict_images(model, files)`` — ship
- ``ExtractConfig``, ``HeadsConfig`` (the settings), ``FeatcacheError`` (every user error)
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "extract_features": "featcache.api",
    "load_features": "featcache.cache.reader",
    "compare_heads": "featcache.compare.comparison",
    "list_backbones": "featcache.backbones.registry",
    "list_heads": "featcache.heads",      # the package: importing it registers the heads
    "get_head": "featcache.heads",
    "export_model": "featcache.ship.export",
    "load_classifier": "featcache.ship.predict",
    "predict_images": "featcache.ship.predict",
    "ExtractConfig": "featcache.config",
    "HeadsConfig": "featcache.config",
    "FeatcacheError": "featcache.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value    # later look-ups skip this function
        return value
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY})
