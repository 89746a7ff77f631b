"""Stage two's heads: the registry, featcache's own estimators, and any scikit-learn
classifier as a head.

Reads and writes only what :func:`save_head`/:func:`load_head` are given (joblib files;
``.keras`` + ``.json`` for the dense head). Takes arrays, never feature files, and never
imports stage one (extract/backbones/datasets) — except the opt-in ``finetune`` head
(:mod:`~featcache.heads.finetune`), which takes file rows and lazily rebuilds the
backbone's layers above a cut. Keras is imported only by
:mod:`featcache.heads.dense` (:func:`~featcache.heads.dense.keras_module`), on first use.

Modules: :mod:`~featcache.heads.registry` (``HEADS``, ``register_head``),
:mod:`~featcache.heads.base` (the :class:`Head` base class: validation, mirrored features,
grid loop, warm starts, save/load), :mod:`~featcache.heads.user` (``--heads`` names and
``module:attr`` user heads), :mod:`~featcache.heads.linear`
(``logreg``, ``linear_svm``), :mod:`~featcache.heads.rff` (``rbf_svm``),
:mod:`~featcache.heads.knn` (``knn``), :mod:`~featcache.heads.dense` (``dense``,
``dense_ens``), :mod:`~featcache.heads.plain` (any scikit-learn classifier as a head,
save/load, the feature file a saved head was fitted on), :mod:`~featcache.heads.finetune`
(``finetune``, opt-in).

Every head follows the scikit-learn estimator contract: ``fit(X, y)`` returns self,
learned state ends in ``_``, ``random_state``, ``predict``, ``predict_proba``,
``classes_``, ``get_params``/``set_params`` (``tests/heads/test_estimator_checks.py`` runs
scikit-learn's ``check_estimator`` on them). Inputs are float32 (N, D) and are never copied to
float64. Heads derived from :class:`Head` (``takes_mirrors = True``) take ``X_flip`` (features of
mirrored images) in ``fit`` (train-time augmentation) and ``predict``/``predict_proba``
(test-time averaging); any other classifier gets the mirrors as extra training rows and
averaged predictions (:class:`~featcache.heads.plain.SklearnHead`).

Heads that are Keras-expressible implement ``to_keras() -> keras.Model`` mapping float32
features (None, D) to class probabilities, scaler included (the export contract); every
built-in head does (``knn``: its index inside the model).

Adding a head is one decorated factory returning a :class:`Head` or any scikit-learn
classifier::

    @register_head("ridge", default=False, grid=[{"alpha": 1.0}, {"alpha": 10.0}],
                   keras=False)
    def ridge(random_state=0, **params):
        from sklearn.linear_model import RidgeClassifier
        return RidgeClassifier(**params)

and from the command line ``--heads mymodule:ridge`` (or ``make heads
HEADS=mymodule:ridge``) imports ``mymodule`` so that it registers; ``--heads
sklearn.linear_model:RidgeClassifier`` registers a classifier class as it is.
"""

from __future__ import annotations

# The import order is the registry's order: the comparison's rows, the default heads and
# the tie-break between equal validation scores follow it.
# isort: off
from featcache.heads.registry import (HEADS, HeadSpec, default_heads, is_path, list_heads,
                                      register_head)
from featcache.heads.base import Head
from featcache.heads.user import get_head, head_spec, resolve_heads, resolve_user_head
from featcache.heads.linear import FAST_PATH, LinearHead, linear_svm, logreg
from featcache.heads.rff import RFFSVMHead, cosine_block, rbf_svm
from featcache.heads.knn import CosineKNNHead, inv_norms, knn, top_k
from featcache.heads.dense import DenseHead, dense, dense_ens
from featcache.heads.plain import (SklearnHead, as_head, check_fitted_on, fitted_on, load_head,
                                   record_fitted_on, save_head)
from featcache.heads.finetune import FinetuneHead, finetune
# isort: on

__all__ = ["HEADS", "Head", "HeadSpec", "default_heads", "get_head", "head_spec", "is_path",
           "list_heads",
           "register_head", "resolve_heads", "resolve_user_head", "FAST_PATH", "LinearHead",
           "linear_svm", "logreg", "RFFSVMHead", "cosine_block", "rbf_svm", "CosineKNNHead",
           "inv_norms", "knn", "top_k", "DenseHead", "dense", "dense_ens", "SklearnHead",
           "as_head", "load_head", "save_head", "check_fitted_on", "fitted_on",
           "record_fitted_on", "FinetuneHead", "finetune"]
