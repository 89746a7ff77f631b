"""Heads named by a user: :func:`resolve_heads` turns ``--heads`` names into registered
heads, importing ``module:attr`` and ``path/to/file.py:attr`` user heads on the way
(:func:`resolve_user_head`: a module that calls ``register_head`` registers its heads on
import; a scikit-learn classifier class is registered as it is), :func:`head_spec` (a name's
registry entry) and :func:`get_head` (a new estimator).

Reads a user's module; writes nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from featcache.errors import ConfigError
from featcache.heads.registry import HEADS, HeadSpec, default_heads, register_head


def resolve_heads(names) -> list[str]:
    """Names (a list or a comma-separated string) -> validated list; empty: the defaults.
    An entry ``module:attr`` (or ``path/to/file.py:attr``) imports a user head and
    registers it (:func:`resolve_user_head`); its name is ``attr``."""
    if isinstance(names, str):
        names = [n for n in names.replace(" ", "").split(",") if n]
    names = list(names or [])
    if not names:
        return default_heads()
    if any(":" in n for n in names):
        names = [resolve_user_head(n) if ":" in n else n for n in names]
    unknown = [n for n in names if n not in HEADS]
    if unknown:
        raise ConfigError(f"unknown head {', '.join(map(repr, unknown))}; choose from "
                          f"{', '.join(HEADS)}, or name your own as module:attr (e.g. "
                          f"sklearn.linear_model:RidgeClassifier)")
    return list(dict.fromkeys(names))


def head_spec(name: str) -> HeadSpec:
    """The registry entry of a head name (or of a ``module:attr`` user head)."""
    return HEADS[resolve_heads([name])[0]]


def get_head(name: str, *, random_state: int = 0, **params):
    """A new, unfitted head: the registry's factory with its fixed settings and ``params``
    (e.g. ``get_head("logreg", C=0.01)``). Every head is a scikit-learn estimator
    (``fit(X, y)``, ``predict``, ``predict_proba``, ``get_params``; the built-in ones pass
    ``sklearn.utils.estimator_checks.check_estimator``), so it drops into a scikit-learn
    ``Pipeline``, ``GridSearchCV`` or ``cross_val_score`` as it is."""
    return head_spec(name).make(random_state=random_state, **params)


def _import(module: str):
    if module.endswith(".py") or "/" in module:
        path = Path(module)
        if not path.is_file():
            raise ConfigError(f"no file {module} for a user head; give module:attr or "
                              f"path/to/file.py:attr")
        name = f"featcache_user_heads.{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(module)


def resolve_user_head(entry: str) -> str:
    """``module:attr`` or ``path/to/file.py:attr`` -> a registered head's name.

    The module is imported (a module that calls :func:`register_head` registers its heads
    on import). ``attr`` is then a registered head's name or factory (its grid and settings
    are the registration's), or a scikit-learn classifier class, registered here as head
    ``attr`` with its default parameters (one grid point, not a default head, no Keras
    export; ``random_state`` is passed when the class takes one)."""
    module, _, attr = entry.rpartition(":")
    if not module or not attr.isidentifier():
        raise ConfigError(f"--heads entry {entry!r}: a user head is module:attr (e.g. "
                          f"sklearn.linear_model:RidgeClassifier) or path/to/file.py:attr")
    try:
        mod = _import(module)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module!r} for head {entry!r} ({exc}); put it on "
                          f"PYTHONPATH (make and `python -m featcache` add the current "
                          f"folder) or give path/to/file.py:{attr}") from None
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's module raised while importing
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ConfigError(f"importing {module!r} for head {entry!r} raised "
                          f"{type(exc).__name__}: {first}; fix the module") from None
    obj = getattr(mod, attr, None)
    for name, spec in HEADS.items():
        if obj is not None and spec.factory is obj:
            return name
    if obj is None:
        if attr in HEADS:
            return attr
        raise ConfigError(f"{module} has no {attr!r} (head {entry!r}); name a scikit-learn "
                          f"classifier class or a factory registered with register_head")
    if inspect.isclass(obj) and hasattr(obj, "fit") and hasattr(obj, "predict"):
        if not _is_classifier(obj):
            raise ConfigError(f"{entry!r} is not a classifier (a scikit-learn classifier "
                              f"has _estimator_type 'classifier', e.g. ClassifierMixin); "
                              f"stage two needs class predictions: name a classifier such "
                              f"as sklearn.linear_model:RidgeClassifier")
        register_head(attr, default=False, keras=hasattr(obj, "to_keras"),
                      summary=_first_line(obj.__doc__) or f"{module}.{attr}")(
            _class_factory(obj))
        return attr
    raise ConfigError(f"{entry!r} is neither a scikit-learn classifier class nor a head "
                      f"registered with register_head")


def _is_classifier(cls) -> bool:
    """A scikit-learn classifier class (or a featcache ``Head``), judged before any work."""
    from sklearn.base import is_classifier

    try:
        return bool(is_classifier(cls()))
    except Exception:  # noqa: BLE001 - a class that needs arguments: judge by its tags
        return getattr(cls, "_estimator_type", None) == "classifier"


def _first_line(doc) -> str:
    return ((doc or "").strip().splitlines() or [""])[0].strip()


def _class_factory(cls):
    takes_seed = "random_state" in inspect.signature(cls).parameters

    def factory(random_state=0, **params):
        return cls(**({"random_state": random_state} if takes_seed else {}), **params)

    factory.__doc__ = cls.__doc__
    return factory


def absolute_entry(entry: str) -> str:
    """A ``path/to/file.py:attr`` user head with its path made absolute (worker processes
    import it again, from whatever their working directory is); other entries as they are."""
    module, _, attr = entry.rpartition(":")
    if module.endswith(".py") or "/" in module:
        return f"{Path(module).resolve()}:{attr}"
    return entry
