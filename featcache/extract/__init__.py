"""Stage one: run a backbone over a data set once and cache one pooled embedding per image.

:mod:`~featcache.extract.run` (the step graph, the reader thread, :func:`extract_features`) and
:mod:`~featcache.extract.distributed` (``--engine ray``: shards as Ray tasks, then a merge).
Its settings are :class:`featcache.config.ExtractConfig`.
"""
