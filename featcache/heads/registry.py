"""The head registry: ``HEADS`` (name -> :class:`HeadSpec`: factory, default flag, grid,
cost …), :func:`register_head`, :func:`default_heads`, :func:`list_heads`, and the grid
helpers :func:`is_path` and :func:`fmt_params`.

Reads and writes nothing. Names given by a user (``--heads``, ``module:attr`` user heads)
are resolved by :mod:`featcache.heads.user`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from sklearn.base import BaseEstimator


@dataclass(frozen=True)
class HeadSpec:
    """One registry entry. ``grid`` is the list of parameter dicts tried on validation."""

    name: str
    factory: Callable[..., BaseEstimator]
    default: bool = True
    grid: tuple[dict, ...] = ()
    summary: str = ""
    keras: bool = True             # implements to_keras (export contract)
    fixed: dict = field(default_factory=dict)
    cost: float = 1.0              # relative seconds per training row (job order, ETA)
    tensorflow: bool = False       # fitting imports TensorFlow (one thread per worker)
    fast_select: dict = field(default_factory=dict)  # --search fast: params while selecting
    file_rows: Callable | None = None   # reads the file itself: data -> its own (finetune)
    mirror_rows_only: bool = False      # with mirrors in the file: only its +flip row
    budget: bool = False           # takes budget_s, the time budget of one fit (--budget)
    in_process: bool = False       # wants every core: unless --workers is given, a
    #                                comparison with it runs in this process (workers 0)

    def make(self, random_state: int = 0, **params) -> BaseEstimator:
        return self.factory(random_state=random_state, **{**self.fixed, **params})

    def data_for(self, data):
        """The comparison's data as this head takes it (``file_rows`` heads: file rows)."""
        return self.file_rows(data) if self.file_rows is not None else data

    def flip_rows(self, extra: list) -> list:
        """(train_flip, tta) of this head's rows: plain, then ``extra`` (the mirrored row);
        a ``mirror_rows_only`` head runs only the mirrored one when there is one."""
        return list(extra) if extra and self.mirror_rows_only else [(False, False), *extra]


HEADS: dict[str, HeadSpec] = {}


def register_head(name: str, *, default: bool = True, grid=(), summary: str = "",
                  keras: bool = True, cost: float = 1.0, tensorflow: bool = False,
                  fast_select: dict | None = None, file_rows: Callable | None = None,
                  mirror_rows_only: bool = False, budget: bool = False,
                  in_process: bool = False, **fixed):
    """Register ``factory(random_state=..., **params) -> estimator`` under ``name``.

    The estimator is a :class:`Head` or any scikit-learn classifier (stage two wraps a
    plain one in :class:`featcache.heads.plain.SklearnHead`). ``grid`` is tried in order; a
    grid over one numeric parameter is a path (ordered, the linear heads warm-start along
    it) that ``--search fast`` stops once validation accuracy falls below its best.
    ``cost`` (relative seconds per training row) orders the jobs and the ETA;
    ``tensorflow=True`` marks a head whose fit imports TensorFlow (its worker caps
    TensorFlow's thread pools at one); ``fast_select`` are parameters used under
    ``--search fast`` (e.g. a looser solver tolerance, a short learning-rate schedule),
    where the model selected on the fit rows is the final one; ``--search exhaustive``
    refits the chosen point on all training rows with the head's own parameters.
    ``file_rows(data)``: the head reads the feature file itself and takes the comparison's
    data through this function (``finetune``: :class:`featcache.heads.finetune.data.ActRows`);
    ``mirror_rows_only``: only its ``+flip`` row when the file has mirrors; ``budget``: its
    factory takes ``budget_s`` (``--budget``, the seconds one fit may take); ``in_process``:
    it runs its own threads on every core, so a comparison with it runs everything in the
    calling process unless ``--workers`` says otherwise."""
    def deco(factory):
        doc = summary or ((factory.__doc__ or "").strip().splitlines() or [""])[0]
        HEADS[name] = HeadSpec(name, factory, default, tuple(dict(g) for g in grid), doc,
                               keras, dict(fixed), float(cost), bool(tensorflow),
                               dict(fast_select or {}), file_rows, bool(mirror_rows_only),
                               bool(budget), bool(in_process))
        return factory
    return deco


def default_heads() -> list[str]:
    return [n for n, s in HEADS.items() if s.default]


def is_path(grid) -> bool:
    """A grid over one numeric parameter in strictly monotone order (a regularisation
    path): validation accuracy along it rises to a peak and falls, so it can stop early."""
    if len(grid) < 3:
        return False
    varying = [k for k in grid[0] if len({repr(g.get(k)) for g in grid}) > 1]
    if len(varying) != 1 or any(set(g) != set(grid[0]) for g in grid):
        return False
    v = [g[varying[0]] for g in grid]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return False
    d = np.diff(np.asarray(v, dtype=np.float64))
    return bool(np.all(d > 0) or np.all(d < 0))


def fmt_params(params: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in params.items()) or "defaults"


# --------------------------------------------------------------------------- base class


def list_heads(pattern: str = "*", *, defaults: bool = False) -> list[str]:
    """The registered heads whose names match the shell-style ``pattern`` (``"*svm*"``), in
    registry order; ``defaults=True``: only those a comparison runs when none are named."""
    return [n for n, s in HEADS.items()
            if fnmatch.fnmatchcase(n, pattern) and (s.default or not defaults)]
