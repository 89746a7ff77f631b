"""Any scikit-learn classifier as a head: :class:`SklearnHead`, :func:`as_head`, and
:func:`save_head` / :func:`load_head` for every kind of head (``module:attr`` user heads
are :mod:`featcache.heads.user`).

Reads the saved head files it is given; writes ``directory/<name>.joblib`` (or a dense head's
``.keras`` + ``.json``) through :meth:`featcache.heads.base.Head.save`.

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


def load_head(path):
    """A fitted head saved by :func:`save_head` (``.joblib``, or ``.keras`` + ``.json``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no saved head at {path}; run `featcache heads` first")
    if path.suffix == ".keras":
        from featcache.heads.dense import DenseHead

        return DenseHead.load(path)
    return Head.load(path)
