"""The notebook API: what ``import featcache`` offers, one function per step, the same
functions the ``featcache`` command and the Makefile run.

- :func:`extract_features` — stage one (``make features``): a backbone over a data set once,
  into one feature file; a no-op when that file is up to date. Takes an
  :class:`~featcache.config.ExtractConfig` or its settings as keywords
  (``extract_features(dataset="data/photos", backbone="mobilenet_v2")``); ``engine="ray"``
  runs it as Ray tasks.
- :func:`featcache.load_features` (:mod:`featcache.cache.reader`) — a feature file's arrays.
- :func:`featcache.compare_heads` (:mod:`featcache.compare.comparison`) — stage two
  (``make heads``): a :class:`~featcache.compare.result.Comparison`.
- :func:`featcache.list_backbones`, :func:`featcache.list_heads`, :func:`featcache.get_head`
  — the registries; :func:`featcache.export_model`, :func:`featcache.load_classifier`,
  :func:`featcache.predict_images` — ship a model and classify images with it.

Reads and writes what the functions it calls read and write.
"""

from __future__ import annotations

from featcache.config import ExtractConfig, with_settings


def extract_config(config: ExtractConfig | None = None, /, **settings) -> ExtractConfig:
    """``config`` (default: every default) with ``settings`` (its field names) on top."""
    if config is not None and not isinstance(config, ExtractConfig):
        from featcache.errors import ConfigError

        raise ConfigError(f"extract_features takes an ExtractConfig or settings as keywords, "
                          f"not {type(config).__name__}")
    return with_settings(config or ExtractConfig(), **settings)


def extract_features(config: ExtractConfig | None = None, /, *, progress=None, **settings):
    """Stage one: cache the backbone's features of a data set in one feature file.

    ``config``: an :class:`ExtractConfig`, or nothing; ``settings`` (``dataset``,
    ``backbone``, ``size``, ``flip``, ``cut``, ``engine`` … as in ``featcache settings``)
    override its fields. ``progress(Progress)`` is called as batches finish. Returns an
    ``ExtractResult`` (``.path``, ``.images``, ``.seconds``, ``.cached``, ``.summary()``),
    or with ``engine="ray"`` a ``DistributedResult``.
    """
    cfg = extract_config(config, **settings)
    if cfg.engine == "ray":
        from featcache.extract.distributed import extract_with_ray

        return extract_with_ray(cfg)
    from featcache.extract.run import extract_features as run

    return run(cfg, progress=progress)
