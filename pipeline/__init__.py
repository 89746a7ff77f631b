"""featcache: run a pretrained backbone once, cache its features, compare fast heads on them.

The notebook API (imported lazily, so ``import pipeline`` needs no TensorFlow):

- ``extract_features(ExtractConfig(...))`` — stage one, see :mod:`pipeline.extract`
- ``load_features(path)`` — read a feature file, see :mod:`pipeline.store`
- ``compare_heads(HeadsConfig(...))`` — stage two, see :mod:`pipeline.compare`
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "extract_features": ("pipeline.extract", "extract_features"),
    "load_features": ("pipeline.store", "load_features"),
    "compare_heads": ("pipeline.compare", "compare_heads"),
    "ExtractConfig": ("pipeline.config", "ExtractConfig"),
    "HeadsConfig": ("pipeline.config", "HeadsConfig"),
    "FeatcacheError": ("pipeline.errors", "FeatcacheError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
