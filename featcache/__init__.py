"""featcache: run a pretrained backbone once, cache its features, compare fast heads on them.

The notebook API (imported lazily, so ``import featcache`` needs no TensorFlow):

- ``extract_features(ExtractConfig(...))`` — stage one, see :mod:`featcache.extract.run`
- ``load_features(path)`` — read a feature file, see :mod:`featcache.cache.writer`
- ``compare_heads(HeadsConfig(...))`` — stage two, see :mod:`featcache.compare.comparison`
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "extract_features": ("featcache.extract.run", "extract_features"),
    "load_features": ("featcache.cache.reader", "load_features"),
    "compare_heads": ("featcache.compare.comparison", "compare_heads"),
    "ExtractConfig": ("featcache.config", "ExtractConfig"),
    "HeadsConfig": ("featcache.config", "HeadsConfig"),
    "FeatcacheError": ("featcache.errors", "FeatcacheError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")
