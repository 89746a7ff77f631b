"""The linear and kNN heads as they were before issue 12, for ``make bench`` section 4's
baseline run (``--heads benchmarks.before12:logreg,...``): importing this module
re-registers ``logreg``, ``linear_svm`` and ``knn`` under their own names with the solver
and search of that time — plain L-BFGS (no preconditioner) and cosine kNN on the raw
features, k up to 50. With ``--workers 0 --search exhaustive`` (one process, every grid
point, every head refit; the dense head early-stopped through ``model.fit``) this is the
comparison as it ran before the issue, on today's code otherwise.

Reads and writes nothing.
"""

from __future__ import annotations

from pipeline.heads import CosineKNNHead, LinearHead, register_head

#: the selection-time tolerance of that time (``fast_select``; unused under exhaustive)
_FAST = {"tol": 3e-4}


@register_head("logreg", grid=[{"C": c} for c in (0.001, 0.003, 0.01)], cost=1.0,
               fast_select=_FAST)
def logreg(random_state=0, **params):
    """logreg before issue 12: L-BFGS without the preconditioner."""
    return LinearHead(loss="softmax", precondition=False, random_state=random_state, **params)


@register_head("linear_svm", grid=[{"C": c} for c in (0.0001, 0.0003, 0.001)], cost=1.5,
               fast_select=_FAST)
def linear_svm(random_state=0, **params):
    """linear_svm before issue 12: L-BFGS without the preconditioner."""
    return LinearHead(loss="squared_hinge", precondition=False, random_state=random_state,
                      **params)


@register_head("knn", grid=[{"k": k} for k in (1, 5, 10, 20, 50)], keras=False, cost=1.0)
def knn(random_state=0, **params):
    """knn before issue 12: cosine on the raw features."""
    return CosineKNNHead(dim=None, random_state=random_state, **params)


#: the ``--heads`` value of the baseline run (the default head set, these three replaced)
HEADS_ARG = ",".join([f"benchmarks.before12:{n}" for n in ("logreg", "linear_svm", "knn")]
                     + ["dense"])
