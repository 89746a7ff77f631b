"""Stage two's jobs: which comparison rows run together, their relative cost, and the
function a worker process runs for one job.

Reads nothing; writes what :func:`featcache.compare.protocol.run_row` writes (a fitted head under
the job's ``out_dir``). A job crosses into a worker process by pickling, so it carries
plain values only: row tuples, the seed, and the ``module:attr`` user heads
(``--heads``) that a fresh worker must import to register them again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.compare.protocol import SplitData, run_row
from featcache.heads import HEADS, resolve_heads


@dataclass(frozen=True)
class Job:
    """Rows run one after another in one worker (today: one row per job)."""

    rows: tuple[tuple[str, bool, bool], ...]     # (head, train_flip, tta)
    seed: int
    n_classes: int
    out_dir: str | None
    search: str
    in_worker: bool
    log_level: int
    user_heads: tuple[str, ...] = ()             # module:attr entries a worker imports
    fitted_on: dict | None = None                # the feature file's identity, saved heads carry
    budget_s: float | None = None                # --budget: seconds per fit of a budget head


def make_jobs(rows, **ctx) -> list[Job]:
    """One job per row. A TensorFlow head's rows used to share one job (one TensorFlow
    import, ~0.3 GB, whatever the worker count), but then `dense` and `dense+flip` ran one
    after another and were the comparison's critical path; now each worker that runs a
    dense row imports TensorFlow once (a constant per worker, measured in `make bench`
    section 4), and the rows run side by side."""
    return [Job((r,), **ctx) for r in rows]


def job_cost(row, data: SplitData) -> float:
    name, train_flip, tta = row
    return HEADS[name].cost * len(data.y) * (2 if train_flip else 1) * (1.25 if tta else 1)


def run_job(job: Job, data: SplitData) -> list[tuple[dict, np.ndarray, np.ndarray | None]]:
    """Worker side: run the job's rows; returns [(row, test predictions, test
    probabilities or None)…]."""
    if job.in_worker:
        _worker_logging(job.log_level)
        if job.user_heads:   # a fresh worker process registers the user's heads again
            resolve_heads(job.user_heads)
    out = []
    for name, train_flip, tta in job.rows:
        spec = HEADS.get(name)   # None: run_row says how to register it
        if job.in_worker and spec is not None and spec.tensorflow:
            from featcache.compare.workers import tensorflow_single_threaded

            tensorflow_single_threaded()
        row, pred, proba, _ = run_row(
            name, data, train_flip=train_flip, tta=tta, seed=job.seed, n_classes=job.n_classes,
            search=job.search, report_dir=Path(job.out_dir) if job.out_dir else None,
            fitted_on=job.fitted_on, budget_s=job.budget_s)
        row["worker_pid"] = os.getpid()
        out.append((row, pred, proba))
    return out


def _worker_logging(level: int) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.WARNING, datefmt="%H:%M:%S",
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("featcache").setLevel(level)
