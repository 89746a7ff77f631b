"""The plain heads of ``make bench`` section 4's baseline, the exhaustive protocol
(``--heads benchmarks.baseline_heads:logreg,...``): importing this module re-registers
``logreg``, ``linear_svm`` and ``knn`` under their own names with the textbook solver and
search — plain L-BFGS (no preconditioner) and cosine kNN on the raw features, k up to 50.
Everything else (grids, costs, ``fast_select``) is the registry's own entry. With
``--workers 0 --search exhaustive`` (one process, every grid point, every head refit; the
dense head early-stopped through ``model.fit``) this is the straightforward comparison that
stage two's defaults are measured against.

Importing it changes the registry of the importing process, so only the baseline's child
process imports it (``benchmarks.stage2`` names it in ``HEADS_ARG`` without importing it).
Reads and writes nothing.
"""

from __future__ import annotations

from dataclasses import replace

from featcache.heads import HEADS

from .stage2 import BASELINE_HEADS

_TODAY = {name: HEADS[name] for name in BASELINE_HEADS}


def logreg(random_state=0, **params):
    """logreg with plain L-BFGS: no preconditioner."""
    return _TODAY["logreg"].factory(random_state=random_state, precondition=False, **params)


def linear_svm(random_state=0, **params):
    """linear_svm with plain L-BFGS: no preconditioner."""
    return _TODAY["linear_svm"].factory(random_state=random_state, precondition=False,
                                        **params)


def knn(random_state=0, **params):
    """knn with cosine search on the raw features, k up to 50."""
    return _TODAY["knn"].factory(random_state=random_state, dim=None, **params)


for _factory, _changes in ((logreg, {}), (linear_svm, {}),
                           (knn, {"grid": tuple({"k": k} for k in (1, 5, 10, 20, 50))})):
    _name = _factory.__name__
    HEADS[_name] = replace(_TODAY[_name], factory=_factory, summary=_factory.__doc__,
                           **_changes)
