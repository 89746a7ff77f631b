"""Stage two's worker processes: run independent jobs (head comparison rows) in parallel,
one BLAS/OpenMP/TensorFlow thread each, on feature arrays shared through memory-mapped
files instead of one copy per worker.

Reads nothing of the project's files. Writes the shared arrays to one temporary folder
(:class:`SharedArrays`; under ``$FEATCACHE_TMPDIR``, else the system's temporary folder),
removed when the comparison ends; the jobs themselves write what they are given.

- :func:`run_jobs` runs ``fn(job, *args)`` for every job with joblib's ``loky`` backend
  (``workers`` processes, reused between calls), longest job first (``costs``), and hands
  each result to ``on_done`` as it arrives; it returns the results in job order. With
  ``workers=0`` everything runs here, one job after another, with the libraries' own
  threading (stage two before worker processes existed: the benchmark's baseline).
- Arrays reach the workers by reference: a ``numpy.memmap`` argument is pickled by joblib
  as (file name, offset, shape), so every worker maps the same pages (checked by
  ``tests/compare/test_workers.py``); nothing is copied per worker.
- :func:`single_threaded` caps BLAS and OpenMP at one thread (threadpoolctl) and, once
  TensorFlow is imported, its intra/inter-op pools: with one thread everywhere a job's
  numbers do not depend on how many workers run beside it (same seed, same answer).
- A worker started by a quiet CLI (``FEATCACHE_QUIET_TF=1``, :mod:`featcache._util.quiet`) hides
  TensorFlow's C++ start-up lines as the CLI does.
- Workers die with the process that started them: each runs :func:`watch_parent` (loky's
  worker initializer), a thread that ends the worker within ``PARENT_POLL_S`` once its
  parent is gone. Without it a ``kill -9`` of ``featcache heads`` left every worker (about
  0.7 GiB each) running its fit to the end and then idle for loky's 300-s timeout.
- A full disk while writing the shared arrays is a one-line
  :class:`~featcache.errors.DiskFullError` naming ``FEATCACHE_TMPDIR``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from featcache._util.atomic import disk_full_is_one_line
from featcache._util.quiet import quiet_tensorflow_if_asked

log = logging.getLogger(__name__)

# A loky worker imports this module (it holds the job wrapper) before it runs a job, so a
# worker of a quiet CLI keeps TensorFlow's start-up lines off the shared stderr too.
quiet_tensorflow_if_asked()


# --------------------------------------------------------------------------- threads

@contextlib.contextmanager
def single_threaded():
    """One BLAS and one OpenMP thread for the block (threadpoolctl), TensorFlow too."""
    from threadpoolctl import threadpool_limits

    os.environ["TF_NUM_INTRAOP_THREADS"] = "1"
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    with threadpool_limits(limits=1):
        yield


def tensorflow_single_threaded() -> None:
    """Set TensorFlow's thread pools to one thread each (before its first op; a no-op
    with a warning when it is already running with other settings)."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        if (tf.config.threading.get_intra_op_parallelism_threads(),
                tf.config.threading.get_inter_op_parallelism_threads()) != (1, 1):
            log.warning("TensorFlow was already initialised with more than one thread; "
                        "this job's numbers may differ slightly from a worker's")


# --------------------------------------------------------------------------- shared arrays

class SharedArrays:
    """Arrays written once to files in a temporary folder and opened read-only as
    ``numpy.memmap``: every process that maps them shares the same page-cache pages.
    A context manager; the folder is removed on exit."""

    def __init__(self, directory: str | None = None):
        base = directory or os.environ.get("FEATCACHE_TMPDIR") or None
        self.dir = Path(tempfile.mkdtemp(prefix="featcache-heads-", dir=base))

    def put(self, name: str, array, rows=None) -> np.memmap:
        """``array[rows]`` (all rows when ``rows`` is None) as a float32 read-only memmap.
        Written with plain file writes in row blocks: no second full copy in memory, and
        the written pages are page cache, not this process's resident memory."""
        n = len(array) if rows is None else len(rows)
        shape = (n,) + tuple(array.shape[1:])
        path = self.dir / f"{name}.f32"
        with disk_full_is_one_line(path, "free some space there, or set FEATCACHE_TMPDIR to "
                                         "a folder with room, and run the same command again"):
            with open(path, "wb") as f:
                for i in range(0, n, 8192):
                    src = array[i:i + 8192] if rows is None else array[rows[i:i + 8192]]
                    f.write(np.ascontiguousarray(src, dtype=np.float32).tobytes())
        if n == 0 or int(np.prod(shape)) == 0:
            return np.zeros(shape, np.float32)
        return np.memmap(path, dtype=np.float32, mode="r", shape=shape)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "SharedArrays":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- running jobs

def run_jobs(fn: Callable, jobs: Sequence, args: tuple = (), *, workers: int,
             costs: Sequence[float] | None = None,
             on_done: Callable[[int, object], None] | None = None) -> list:
    """``[fn(job, *args) for job in jobs]``, in parallel on ``workers`` processes (0: here,
    in order). Jobs are started longest first by ``costs``; ``on_done(i, result)`` is
    called in this process as each job ``i`` finishes. Results come back in job order."""
    n = len(jobs)
    results: list = [None] * n
    if workers <= 0 or n == 0:
        for i, job in enumerate(jobs):
            results[i] = fn(job, *args)
            if on_done:
                on_done(i, results[i])
        return results
    from joblib import Parallel, delayed, parallel_config

    order = sorted(range(n), key=lambda i: (-(costs[i] if costs else 0.0), i))
    # the same initializer and pid on every call: loky keeps reusing its workers
    with parallel_config(backend="loky", inner_max_num_threads=1, initializer=watch_parent,
                         initargs=(os.getpid(),)):
        par = Parallel(n_jobs=workers, return_as="generator_unordered",
                       batch_size=1, pre_dispatch="all")
        for i, result in par(delayed(_indexed)(i, fn, jobs[i], args) for i in order):
            results[i] = result
            if on_done:
                on_done(i, result)
    return results


def _indexed(i: int, fn: Callable, job, args: tuple):
    with single_threaded():
        return i, fn(job, *args)


#: seconds between a worker's checks that its parent is still there
PARENT_POLL_S = 0.25


def watch_parent(parent: int) -> None:
    """In a worker (loky's initializer): end this process as soon as ``parent``, the
    process that started it, is gone. A process whose parent dies is handed to another
    (init, or a subreaper), so ``os.getppid()`` stops being ``parent``; a daemon thread
    checks every ``PARENT_POLL_S`` seconds and then exits at once (``os._exit``: in the
    middle of a fit, no clean-up is owed to a parent that is not there). Polling, not
    ``PR_SET_PDEATHSIG``: that signal follows the *thread* that started the worker, and
    loky may start workers from a thread that ends while the pool lives on."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="featcache-parent-watch", daemon=True).start()


# --------------------------------------------------------------------------- progress

class Ticker:
    """Calls ``report()`` every ``interval`` seconds from a background thread while the
    ``with`` block runs (so a progress bar's elapsed time and ETA keep moving between
    finished jobs), and once more at the end."""

    def __init__(self, report: Callable[[], None] | None, interval: float = 1.0):
        self.report, self.interval = report, interval
        self._stop = threading.Event()
        self._thread = None
        self.lock = threading.Lock()

    def __call__(self) -> None:
        if self.report is not None:
            with self.lock:
                self.report()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self()

    def __enter__(self) -> "Ticker":
        if self.report is not None:
            self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
