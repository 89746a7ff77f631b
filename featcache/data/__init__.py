"""Data sets: sources of uint8 image batches with labels, per split.

:mod:`~featcache.data.base` (:class:`Dataset`), :mod:`~featcache.data.datasets` (the registry,
CIFAR-10, ``synthetic``, :func:`open_dataset`), :mod:`~featcache.data.folders` (image folders),
:mod:`~featcache.data.imagefiles` (which files are images, decoding),
:mod:`~featcache.data.sizes` (how many images a data set holds, told without opening it), and
:mod:`~featcache.data.resize` (the one resize stage one, export and predict share).
"""
