"""The feature file, the contract between the two stages (HDF5; the only room that imports
h5py).

:mod:`~featcache.cache.reader` (layout, schema check, :func:`load_features`,
:func:`read_attrs`), :mod:`~featcache.cache.writer` (:class:`FeatureWriter`: create, resume,
append, complete), :mod:`~featcache.cache.activations` (activations at a cut),
:mod:`~featcache.cache.lock` (the writer lock, ``.partial`` names),
:mod:`~featcache.cache.progress` (how far a writer got), :mod:`~featcache.cache.merge` (shard
parts into one file), :mod:`~featcache.cache.upgrade` (schema 1 -> 2 in place).
"""
