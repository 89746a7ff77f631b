"""Any scikit-learn classifier as a head: :class:`SklearnHead`, :func:`as_head`, and
:func:`save_head` / :func:`load_head` for every kind of head (``module:attr`` user heads
are :mod:`featcache.heads.user`).

Reads the saved head files it is given; writes ``directory/<name>.joblib`` (or a dense head's
``.keras`` + ``.json``) through :meth:`featcache.heads.base.Head.save`. A head fitted by stage
two carries the identity of its feature file (:func:`record_fitted_on`: path, config hash,
class names, feature width, as the ``fitted_on_`` attribute pickled with it, or in a dense
head's ``.json``), and :func:`load_head` / :func:`check_fitted_on` refuse to use it with
another file.

A plain estimator does not take mirrored features, so :class:`SklearnHead` hands them over
the only ways a plain ``fit``/``predict`` allows: as extra training rows (``X`` and
``X_flip`` concatenated, ``y`` twice; a copy of the features) for ``train_flip``, and as a
second prediction averaged with the first for test-time averaging — ``predict_proba`` if
the estimator has it, else ``decision_function``; with neither it predicts the plain rows
only (no test-time averaging, logged once).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from featcache.errors import ConfigError
from featcache.heads.base import Head, dump_joblib

log = logging.getLogger(__name__)


class SklearnHead(Head):
    """Adapter: a plain scikit-learn classifier ``estimator`` (fitted in place) with the
    :class:`Head` interface stage two uses. Saving it saves ``estimator`` itself, so
    :func:`load_head` gives back the user's own estimator."""

    def __init__(self, estimator=None):
        self.estimator = estimator

    def _mirrors(self) -> bool:
        return bool(getattr(self.estimator, "takes_mirrors", False))

    def set_grid_point(self, params: dict) -> "SklearnHead":
        self.estimator.set_params(**params)
        return self

    def fit(self, X, y, X_flip=None):
        est = self.estimator
        if self._mirrors():
            est.fit(X, y, X_flip)
        elif X_flip is None:
            est.fit(X, y)
        else:
            y = np.asarray(y)
            est.fit(np.concatenate([np.asarray(X), np.asarray(X_flip)]),
                    np.concatenate([y, y]))
        self.classes_ = est.classes_
        self.n_features_in_ = getattr(est, "n_features_in_", np.shape(X)[1])
        return self

    def _averaged(self, X, X_flip):
        """Mean of predict_proba (else decision_function) over plain and mirrored rows;
        None when the estimator has neither."""
        for method in ("predict_proba", "decision_function"):
            if hasattr(self.estimator, method):
                f = getattr(self.estimator, method)
                S = np.asarray(f(X), dtype=np.float64)
                return S if X_flip is None else (S + np.asarray(f(X_flip), np.float64)) / 2
        return None

    def predict_proba(self, X, X_flip=None) -> np.ndarray:
        if self._mirrors():
            return self.estimator.predict_proba(X, X_flip)
        if X_flip is None:
            return self.estimator.predict_proba(X)
        return (self.estimator.predict_proba(X) + self.estimator.predict_proba(X_flip)) / 2

    def predict(self, X, X_flip=None) -> np.ndarray:
        est = self.estimator
        if self._mirrors():
            return est.predict(X, X_flip)
        if X_flip is None:
            return est.predict(X)
        S = self._averaged(X, X_flip)
        if S is None:
            if type(est).__name__ not in _WARNED:
                _WARNED.add(type(est).__name__)
                log.info("%s has neither predict_proba nor decision_function: predicting "
                         "the plain rows only (no test-time averaging)", type(est).__name__)
            return est.predict(X)
        if S.ndim == 1:                      # binary decision_function: > 0 is classes_[1]
            return est.classes_[(S > 0).astype(int)]
        return est.classes_[S.argmax(1)]

    def to_keras(self):
        if hasattr(self.estimator, "to_keras"):
            return self.estimator.to_keras()
        return super().to_keras()

    def save(self, directory, name: str) -> Path:
        """Write the wrapped estimator (not this adapter) to ``<name>.joblib``."""
        if isinstance(self.estimator, Head):
            return self.estimator.save(directory, name)
        return dump_joblib(self.estimator, directory, name)


_WARNED: set[str] = set()


def as_head(estimator) -> Head:
    """``estimator`` itself if it is a :class:`Head`, else wrapped in :class:`SklearnHead`."""
    return estimator if isinstance(estimator, Head) else SklearnHead(estimator)


# --------------------------------------------------------------------------- save / load

def save_head(estimator, directory, name: str) -> Path:
    """Write a fitted head (a :class:`Head` or a plain estimator) to
    ``directory/<name>.joblib`` (dense: ``<name>.keras`` and ``<name>.json``), atomically;
    return the main file's path."""
    return as_head(estimator).save(directory, name)


def load_head(path, *, fitted_on: dict | None = None):
    """A fitted head saved by :func:`save_head` (``.joblib``, or ``.keras`` + ``.json``).

    ``fitted_on``: the identity of the feature file the caller will use it with
    (:func:`featcache.cache.reader.file_identity`): a head fitted on another file is
    refused (:func:`check_fitted_on`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no saved head at {path}; run `featcache heads` first")
    if path.suffix == ".keras":
        from featcache.heads.dense import DenseHead

        head = DenseHead.load(path)
    else:
        head = Head.load(path)
    if fitted_on is not None:
        check_fitted_on(head, fitted_on, path)
    return head


# --------------------------------------------------------------------------- fitted on

#: the attribute a saved head carries the identity of its feature file in
FITTED_ON = "fitted_on_"


def record_fitted_on(head, identity: dict) -> None:
    """Record on ``head`` (and on the estimator an adapter saves in its place) the
    identity of the feature file it was fitted on
    (:func:`featcache.cache.reader.file_identity`), so that its saved file carries it."""
    targets = [head] + ([head.estimator] if isinstance(head, SklearnHead) else [])
    for t in targets:
        try:
            setattr(t, FITTED_ON, dict(identity))
        except AttributeError:   # an estimator with __slots__: saved without it
            log.warning("%s cannot record the feature file it was fitted on; export "
                        "checks only its width and classes", type(t).__name__)


def fitted_on(head) -> dict | None:
    """The identity of the feature file ``head`` was fitted on, None if it records none
    (a head saved before heads recorded it, or an estimator fitted outside stage two)."""
    rec = getattr(head, FITTED_ON, None)
    if rec is None and isinstance(head, SklearnHead):
        rec = getattr(head.estimator, FITTED_ON, None)
    return rec if isinstance(rec, dict) else None


def check_fitted_on(head, identity: dict, source=None) -> None:
    """Refuse, with a one-line :class:`~featcache.errors.ConfigError`, to use ``head`` with
    the feature file of ``identity`` when it was fitted on another: another configuration
    (``config_sha256``), other class names or another feature width. ``source``: the
    saved head file it came from (None: an estimator object).

    A head that records no feature file is checked for what it shows of one: its feature
    width, and that its labels are this file's classes (a saved one: all of them) — with a
    warning, for a saved one, that it should be fitted again to be checked fully."""
    this = identity["feature_file"]
    what = str(source) if source is not None else f"head {type(head).__name__}"
    fix = (f"use it with the feature file it was fitted on, or fit a head on this one with "
           f"`featcache heads {this}`")
    rec = fitted_on(head)
    if rec is not None:
        diff = _differences(rec, identity)
        if diff:
            raise ConfigError(f"{what} was fitted on {rec.get('feature_file')} ({diff}), not "
                              f"on {this}; {fix}")
        return
    if source is not None:
        log.warning("%s records no feature file it was fitted on (saved by an older "
                    "featcache, or not by `featcache heads`): only its feature width and "
                    "classes are checked against %s; fit it again with `featcache heads` to "
                    "have it checked fully", source, this)
    n, width = len(identity["classes"]), identity.get("n_features")
    have = getattr(head, "n_features_in_", None)
    if have is not None and width is not None and int(have) != int(width):
        raise ConfigError(f"{what} takes features of width {int(have)} but {this} has "
                          f"{int(width)}: it was fitted on another feature file; {fix}")
    labels = getattr(head, "classes_", None)
    if labels is None:
        return
    try:
        labels = [int(c) for c in np.asarray(labels).tolist()]
    except (TypeError, ValueError):
        raise ConfigError(f"{what} predicts labels {list(labels)[:5]} where {this} has class "
                          f"numbers 0..{n - 1}; {fix}") from None
    out = [c for c in labels if not 0 <= c < n]
    if out or (source is not None and labels != list(range(n))):
        raise ConfigError(f"{what} scores {len(labels)} classes (labels "
                          f"{_span(labels)}) but {this} has {n}: it was fitted on another "
                          f"feature file; {fix}")


def _span(labels: list[int]) -> str:
    return f"{min(labels)}..{max(labels)}" if labels else "none"


def _differences(rec: dict, identity: dict) -> str:
    """What differs between a recorded feature file and this one, for the message."""
    out = []
    a, b = rec.get("config_sha256"), identity.get("config_sha256")
    if a and b and a != b:
        out.append(f"another configuration: config_sha256 {str(a)[:12]}… vs {str(b)[:12]}…")
    ca, cb = list(rec.get("classes") or []), list(identity.get("classes") or [])
    if ca != cb:
        out.append(f"{len(ca)} classes vs {len(cb)}" if len(ca) != len(cb) else
                   "other class names: " + ", ".join(
                       f"{x} vs {y}" for x, y in zip(ca, cb) if x != y)[:120])
    wa, wb = rec.get("n_features"), identity.get("n_features")
    if wa is not None and wb is not None and int(wa) != int(wb):
        out.append(f"features of width {int(wa)} vs {int(wb)}")
    return "; ".join(out)
