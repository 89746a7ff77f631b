"""Stage two: train every head on the cached features, select on validation, score the test
split once, and write the report.

:mod:`~featcache.compare.comparison` (:func:`compare_heads`, :func:`label_curve`),
:mod:`~featcache.compare.protocol` (one row: validation split, grid selection, refit, test),
:mod:`~featcache.compare.jobs` and :mod:`~featcache.compare.workers` (rows as jobs in worker
processes), :mod:`~featcache.compare.stats` (intervals, McNemar, F1),
:mod:`~featcache.compare.report`, :mod:`~featcache.compare.plots` and
:mod:`~featcache.compare.mistakes` (the report folder). Its settings are
:class:`featcache.config.HeadsConfig`. Never imports stage one: the feature file is enough.
"""
