"""The base class of featcache's own heads, :class:`Head`.

Reads and writes nothing itself; :meth:`Head.save` writes the one file it is given a
folder and name for (joblib, fsynced, renamed into place) and :meth:`Head.load` reads it.
Takes arrays, never feature files, and never imports stage one or Keras.

:class:`Head` holds what stage two needs from a head, as scikit-learn holds it on its
estimators: input validation and label encoding, probabilities averaged over mirrored
features (``takes_mirrors = True``: ``fit(X, y, X_flip)``, ``predict(X, X_flip)``),
the default grid loop :meth:`Head.score_grid` (a fit and a validation score per grid
point, warm-started along the grid, stopped early on a path), the warm-start hand-over
:meth:`Head.warm_start_from` / :meth:`Head.refit_from`, and :meth:`Head.save` /
:meth:`Head.load`. Subclasses implement ``fit`` and ``_proba`` and, to warm-start,
``_warm_state`` / ``_set_warm_state``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from featcache._util.atomic import replacing
from featcache.errors import ConfigError
from featcache.heads.registry import fmt_params, is_path

log = logging.getLogger(__name__)


class Head(ClassifierMixin, BaseEstimator):
    """Base of featcache's heads: the scikit-learn estimator contract plus mirrored
    features, the grid loop, warm starts and save/load (see the module docstring)."""

    #: ``fit(X, y, X_flip)`` / ``predict(X, X_flip)`` take mirrored features; stage two
    #: wraps estimators without this attribute in ``SklearnHead``.
    takes_mirrors = True
    #: attributes not pickled (caches that only a warm-started path needs)
    _transient: tuple[str, ...] = ("warm_state_",)

    # ---- input checks (float32, never a float64 copy)
    def _validate_fit(self, X, y, X_flip=None) -> tuple[list, np.ndarray]:
        """(feature blocks, integer labels); sets ``classes_`` and ``n_features_in_``."""
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, yi = np.unique(y, return_inverse=True)
        blocks = [X]
        if X_flip is not None:
            Xf = check_array(X_flip, dtype=np.float32)
            if Xf.shape != X.shape:
                raise ValueError(f"X_flip has shape {Xf.shape}, X has {X.shape}")
            blocks.append(Xf)
        return blocks, yi.astype(np.int64).ravel()

    def _validate(self, X) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=np.float32)

    # ---- prediction
    def predict_proba(self, X, X_flip=None) -> np.ndarray:
        P = self._proba(self._validate(X))
        if X_flip is not None:
            P = (P + self._proba(self._validate(X_flip))) / 2
        return P

    def predict(self, X, X_flip=None) -> np.ndarray:
        P = self.predict_proba(X, X_flip)      # checks fitted before classes_ is read
        return self.classes_[np.argmax(P, axis=1)]

    def to_keras(self):
        raise NotImplementedError(f"{type(self).__name__} is not expressible as a Keras model")

    # ---- selection
    def set_grid_point(self, params: dict) -> "Head":
        """Apply one grid point (``set_params`` here; an adapter forwards it)."""
        return self.set_params(**params)

    def score_grid(self, grid, X_fit, y_fit, X_val, y_val, X_fit_flip=None, X_val_flip=None,
                   *, stop_early: bool = False, label: str = "") -> list[tuple[dict, float]]:
        """Validation accuracy of grid points in order, ``[(params, accuracy)…]``.

        Fits this estimator once per point (warm-started along the grid when it has a
        ``warm_start`` parameter) on the fit rows, scores it on the validation rows
        (mirrored features: train on both, average both), and keeps the best point's
        solution (``warm_state_``) for :meth:`warm_start_from`. With ``stop_early`` and a
        path (:func:`is_path`) it stops at the first point below the best so far: the
        points after it are not scored. Leaves the estimator fitted at the best point
        (the first of equals): its saved solution restored (:meth:`_set_warm_state`), or
        fitted again at that point when it keeps none."""
        if "warm_start" in self.get_params():
            self.set_params(warm_start=True)
        early = stop_early and is_path(grid)
        scores: list[tuple[dict, float]] = []
        self.warm_state_ = None
        best = -1
        for params in grid:
            t = time.perf_counter()
            self.set_grid_point(params).fit(X_fit, y_fit, X_fit_flip)
            acc = float(np.mean(self.predict(X_val, X_val_flip) == y_val))
            log.debug("  %s %s: validation %.4f (%.1f s)", label, fmt_params(params), acc,
                      time.perf_counter() - t)
            best_so_far = max((s for _, s in scores), default=-1.0)
            if acc > best_so_far:
                self.warm_state_ = self._warm_state()
                best = len(scores)
            scores.append((dict(params), acc))
            if early and acc < best_so_far:
                break
        if 0 <= best < len(scores) - 1:          # fitted at a later point: go back
            self.set_grid_point(scores[best][0])
            if self.warm_state_ is not None:
                self._set_warm_state(self.warm_state_)
            else:
                self.fit(X_fit, y_fit, X_fit_flip)
        return scores

    # ---- warm starts
    def _warm_state(self):
        """A copy of the solution a later fit can start from (None: cannot warm-start)."""
        return None

    def _set_warm_state(self, state) -> None:
        """Take ``state`` (from :meth:`_warm_state`) as the current solution: the start of
        the next warm-started fit, and what the head predicts with until then."""

    def warm_start_from(self, other: "Head") -> "Head":
        """Start this head's next fit from ``other``'s best grid point (recorded by
        :meth:`score_grid`) when it can warm-start; otherwise change nothing."""
        state = getattr(other, "warm_state_", None)
        if state is not None and "warm_start" in self.get_params():
            self.set_params(warm_start=True)
            self._set_warm_state(state)
        return self

    def refit_from(self, other: "Head", X, y, X_flip=None) -> "Head":
        """``fit`` warm-started from ``other`` (:meth:`warm_start_from`); the ``warm_start``
        parameter is left as it was."""
        before = self.get_params().get("warm_start")
        self.warm_start_from(other).fit(X, y, X_flip)
        if before is not None:
            self.set_params(warm_start=before)
        return self

    # ---- save / load, pickling
    def save(self, directory, name: str) -> Path:
        """Write this fitted head to ``directory/<name>.joblib`` atomically; the path."""
        return dump_joblib(self, directory, name)

    @classmethod
    def load(cls, path) -> "Head":
        """The head saved at ``path``. A head pickled by another featcache layout (a module
        path that no longer exists) or a damaged file is a one-line error that says to fit
        it again; feature files and exported models do not depend on module paths."""
        import joblib

        try:
            return joblib.load(path)
        except (ModuleNotFoundError, AttributeError) as exc:
            raise ConfigError(f"{path} was saved by another featcache version ({exc}); "
                              f"{FIT_AGAIN}") from None
        except Exception as exc:  # unpickling a damaged file raises almost anything
            raise unreadable_head(path, exc) from None

    def __getstate__(self):
        state = dict(super().__getstate__())   # a copy: Python 3.11 hands out __dict__ itself
        for k in self._transient:
            state.pop(k, None)
        return state


#: what every error about a saved head that cannot be used tells the user to do
FIT_AGAIN = "fit it again with `make heads` (featcache heads FEATURE_FILE)"


def unreadable_head(path, exc: BaseException) -> ConfigError:
    """The one-line error for a saved head file that cannot be read (damaged, truncated,
    not a head): what failed, and :data:`FIT_AGAIN`."""
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return ConfigError(f"{path} is not a readable saved head ({type(exc).__name__}"
                       f"{': ' + text if text else ''}); {FIT_AGAIN}")


def dump_joblib(obj, directory, name: str) -> Path:
    """``obj`` to ``directory/<name>.joblib`` via a fsynced temporary file and a rename."""
    import joblib

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.joblib"
    with replacing(path, ".joblib") as tmp:
        joblib.dump(obj, tmp)
    return path


def data_key(blocks) -> tuple:
    """Identity of feature blocks (buffer address, shape, strides, first and last value)
    for reusing a scaler or projection along a warm-started path on the same rows."""
    out = []
    for b in blocks:
        ends = (float(b[0, 0]), float(b[-1, -1])) if b.size else ()
        out.append((b.__array_interface__["data"][0], b.shape, b.strides, ends))
    return tuple(out)
