"""Helpers every room uses, standard library only: :mod:`~featcache._util.atomic` (fsync +
rename, the one atomic-write helper), :mod:`~featcache._util.prefetch` (an iterator run a few
items ahead in a thread), :mod:`~featcache._util.quiet` (TensorFlow's start-up lines off
stderr), :mod:`~featcache._util.settings` (the settings table's machinery: ``setting()``,
argparse options, configs from arguments) and :mod:`~featcache._util.paths` (where the tests,
benchmarks and CI find real CIFAR-10 and a writable ``KERAS_HOME``).

Private to featcache: nothing here is part of the public API.
"""
