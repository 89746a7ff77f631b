"""The Keras heads ``dense`` and ``dense_ens``: :class:`DenseHead`, and the one place
featcache's heads import Keras (:func:`keras_module`; the other heads' ``to_keras`` use it).

Reads and writes only what :meth:`DenseHead.save` / :meth:`DenseHead.load` are given:
``<name>.keras`` (the model) and ``<name>.json`` (classes, parameters, best epochs, the
feature file it was fitted on).
Pickling a fitted DenseHead keeps its model (the ``.keras`` file's bytes, through a
temporary folder). Importing this module does not import Keras or TensorFlow; fitting,
loading and ``to_keras`` do.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.utils.validation import check_array

from featcache._util.atomic import replacing, write_text
from featcache.errors import ConfigError
from featcache.heads.base import FIT_AGAIN, Head, unreadable_head
from featcache.heads.registry import register_head
from featcache.heads.solver import Scaler


def keras_module():
    """``keras``, imported on first use (TensorFlow's start-up is seconds and ~0.5 GB)."""
    import keras

    return keras


class DenseHead(Head):
    """The tutorial's head: Normalization -> Dense(hidden, relu) -> [Dropout] ->
    Dense(n_classes, softmax), Adam. With ``schedule="constant"`` (``--search exhaustive``)
    and validation data it early-stops on validation accuracy, restores the best epoch's
    weights and records that epoch count in ``best_epochs_``; the refit on all training rows
    then runs exactly that many epochs. With ``schedule="cosine"`` (``--search fast``, the
    registry's ``fast_select``) it runs exactly ``epochs`` epochs with the learning rate
    decaying from ``learning_rate`` to 0 along a cosine, and no early stopping: on the real
    MobileNetV2 CIFAR-10 features 4 cosine epochs at 2e-3 reach the validation accuracy that
    the constant rate reaches after 9 (of 12 run) epochs (docs/stage-two.md). With ``X_flip``
    every sample is drawn plain or mirrored at random each epoch (augmentation at no extra
    cost per epoch).

    ``members > 1`` trains that many such networks (seeds ``random_state + i``) and
    averages their probabilities inside one Keras model (``model_``), so the ensemble
    saves, loads and exports like a single dense head; ``best_epochs_`` is then the
    members' mean best epoch.
    """

    def __init__(self, hidden=1024, dropout=0.5, learning_rate=1e-3, batch_size=512,
                 epochs=30, patience=3, schedule="constant", members=1, random_state=0):
        self.hidden, self.dropout, self.learning_rate = hidden, dropout, learning_rate
        self.batch_size, self.epochs, self.patience = batch_size, epochs, patience
        self.schedule = schedule
        self.members = members
        self.random_state = random_state

    def _learning_rate(self, steps_per_epoch: int):
        if self.schedule == "constant":
            return self.learning_rate
        if self.schedule == "cosine":
            return keras_module().optimizers.schedules.CosineDecay(
                self.learning_rate, max(1, steps_per_epoch * int(self.epochs)))
        raise ValueError(f"DenseHead schedule must be 'constant' or 'cosine', not "
                         f"{self.schedule!r}")

    def _build(self, dim: int, n_classes: int, mean, var, name="featcache_dense_head",
               steps_per_epoch: int = 1):
        keras = keras_module()
        inp = keras.Input((dim,), dtype="float32", name="features")
        x = keras.layers.Normalization(mean=mean, variance=var, name="standardize")(inp)
        x = keras.layers.Dense(self.hidden, activation="relu", name="hidden")(x)
        if self.dropout:
            x = keras.layers.Dropout(self.dropout, name="dropout")(x)
        out = keras.layers.Dense(n_classes, activation="softmax", name="proba")(x)
        model = keras.Model(inp, out, name=name)
        model.compile(optimizer=keras.optimizers.Adam(self._learning_rate(steps_per_epoch)),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    def fit(self, X, y, X_flip=None, validation_data=None):
        keras = keras_module()
        blocks, yi = self._validate_fit(X, y, X_flip)
        scaler = Scaler.fit(blocks)
        models, epochs = [], []
        for i in range(max(1, int(self.members))):
            seed = int(self.random_state) + i
            name = "featcache_dense_head" if self.members <= 1 else f"member_{i}"
            model, best = self._fit_one(blocks, yi, scaler, seed, validation_data, name)
            models.append(model)
            epochs.append(best)
        if len(models) == 1:
            self.model_ = models[0]
        else:
            inp = keras.Input((blocks[0].shape[1],), dtype="float32", name="features")
            outs = [m(inp) for m in models]
            self.model_ = keras.Model(inp, keras.layers.Average(name="proba")(outs),
                                      name="featcache_dense_ensemble")
        self.best_epochs_ = int(round(float(np.mean(epochs))))
        return self

    def _fit_one(self, blocks, yi, scaler, seed, validation_data, name):
        keras = keras_module()
        keras.utils.set_random_seed(seed)
        data = Batches(blocks, yi, self.batch_size, seed)
        model = self._build(blocks[0].shape[1], len(self.classes_), scaler.mean,
                            scaler.scale ** 2, name, steps_per_epoch=len(data))
        callbacks, val = [], None
        if validation_data is not None and self.schedule == "constant":
            Xv, yv = validation_data[:2]
            yv = np.searchsorted(self.classes_, yv)
            val = Batches([check_array(Xv, dtype=np.float32)], yv, 4096, shuffle=False)
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor="val_accuracy", patience=self.patience, restore_best_weights=True))
        if val is None:
            # A fixed number of epochs: one compiled step per batch (``train_on_batch``),
            # the batches in the same order ``fit`` would draw them. ``model.fit`` on the
            # PyDataset spent ~3 s per epoch of 45,000 rows in its input pipeline
            # (8.5 s vs 5.2 s per epoch, one thread; docs/stage-two.md).
            for _ in range(int(self.epochs)):
                for i in range(len(data)):
                    model.train_on_batch(*data[i])
                data.on_epoch_end()
            return model, int(self.epochs)
        hist = model.fit(data, epochs=self.epochs, validation_data=val,
                         callbacks=callbacks, verbose=0)
        acc = hist.history.get("val_accuracy")
        return model, (int(np.argmax(acc)) + 1 if acc else int(self.epochs))

    def _proba(self, X):
        out = np.empty((len(X), len(self.classes_)), np.float32)
        for i in range(0, len(X), 4096):
            out[i:i + 4096] = np.asarray(self.model_(X[i:i + 4096], training=False))
        return out

    def score_grid(self, grid, X_fit, y_fit, X_val, y_val, X_fit_flip=None, X_val_flip=None,
                   *, stop_early: bool = False, label: str = ""):
        """Per grid point: early-stopped fit; the chosen ``epochs`` is the best epoch.
        Leaves this estimator fitted as the best grid point (first of equals)."""
        out, best = [], None
        for g in grid:
            self.set_params(**g).fit(X_fit, y_fit, X_fit_flip, validation_data=(X_val, y_val))
            acc = float(np.mean(self.predict(X_val, X_val_flip) == y_val))
            out.append(({**g, "epochs": self.best_epochs_}, acc))
            if best is None or acc > best[0]:
                best = (acc, dict(g), self.model_, self.best_epochs_)
        if best is not None and len(grid) > 1:
            self.set_params(**best[1])
            self.model_, self.best_epochs_ = best[2], best[3]
        return out

    def to_keras(self):
        return self.model_

    # ---- save / load: <name>.keras (the model) + <name>.json (classes, parameters)
    def save(self, directory, name: str) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}.keras"
        with replacing(path, ".keras") as tmp:
            self.model_.save(tmp)
        meta = {"class": "DenseHead", "params": self.get_params(),
                "classes": self.classes_.tolist(), "best_epochs": self.best_epochs_,
                "n_features_in": self.n_features_in_}
        if getattr(self, "fitted_on_", None) is not None:   # its feature file (stage two)
            meta["fitted_on"] = self.fitted_on_
        write_text(directory / f"{name}.json", json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path) -> "DenseHead":
        """The head saved at ``path`` (``.keras``) and the ``.json`` beside it; without the
        ``.json``, or with either file damaged, a one-line error that says what to do."""
        path = Path(path)
        side = path.with_suffix(".json")
        if not side.is_file():
            raise ConfigError(f"{path} has no {side.name} beside it (the head's classes and "
                              f"parameters, saved with it): copy the two files together, "
                              f"or {FIT_AGAIN}")
        try:
            meta = json.loads(side.read_text())
            head = cls(**meta["params"])
            classes = np.asarray(meta["classes"])
            best_epochs, width = meta["best_epochs"], meta["n_features_in"]
        except Exception as exc:  # noqa: BLE001 - a damaged JSON raises several types
            raise unreadable_head(side, exc) from None
        try:
            head.model_ = keras_module().models.load_model(path)
        except Exception as exc:  # noqa: BLE001 - Keras raises many types for bad files
            raise unreadable_head(path, exc) from None
        head.classes_, head.best_epochs_, head.n_features_in_ = classes, best_epochs, width
        if isinstance(meta.get("fitted_on"), dict):
            head.fitted_on_ = meta["fitted_on"]
        return head

    # ---- pickling keeps the model: its .keras bytes
    def __getstate__(self):
        state = super().__getstate__()
        if "model_" in state:
            with tempfile.TemporaryDirectory(prefix="featcache-dense-") as d:
                p = Path(d) / "model.keras"
                state["model_"].save(p)
                state["model_"] = _KerasBytes(p.read_bytes())
        return state

    def __setstate__(self, state):
        model = state.get("model_")
        if isinstance(model, _KerasBytes):
            with tempfile.TemporaryDirectory(prefix="featcache-dense-") as d:
                p = Path(d) / "model.keras"
                p.write_bytes(model.data)
                state = {**state, "model_": keras_module().models.load_model(p)}
        super().__setstate__(state)


@dataclass(frozen=True)
class _KerasBytes:
    """A pickled DenseHead's model: the bytes of its ``.keras`` file."""

    data: bytes


class Batches:
    """Keras ``PyDataset`` factory: shuffled mini-batches that pick, per sample and epoch,
    one of the given feature blocks (plain or mirrored) without concatenating them."""

    def __new__(cls, blocks, y, batch_size, seed=0, shuffle=True):
        keras = keras_module()
        class Batches(keras.utils.PyDataset):
            def __init__(self):
                super().__init__()
                self.rng = np.random.default_rng(seed)
                self.order = np.arange(len(y))
                self.choice = np.zeros(len(y), np.int64)
                self.on_epoch_end()

            def __len__(self):
                return -(-len(y) // batch_size)

            def __getitem__(self, i):
                idx = np.sort(self.order[i * batch_size:(i + 1) * batch_size])
                x = blocks[0][idx]
                if len(blocks) > 1:
                    pick = self.choice[idx] == 1
                    x[pick] = blocks[1][idx[pick]]
                return x, y[idx]

            def on_epoch_end(self):
                if shuffle:
                    self.rng.shuffle(self.order)
                    self.choice = self.rng.integers(0, len(blocks), len(y))

        return Batches()


# --search fast: a fixed 4-epoch cosine schedule instead of early stopping (about a third of
# the epochs for the same validation accuracy on real features; docs/stage-two.md).
FAST_DENSE = {"epochs": 4, "schedule": "cosine", "learning_rate": 2e-3}


@register_head("dense", grid=[{"dropout": 0.5}], cost=3.5, tensorflow=True,
               fast_select=FAST_DENSE)
def dense(random_state=0, **params):
    """Keras Dense(1024, relu) -> Dense(n_classes, softmax), Adam; early-stopped epochs
    (--search exhaustive) or 4 cosine-decayed epochs (--search fast)."""
    return DenseHead(random_state=random_state, **params)


@register_head("dense_ens", default=False, grid=[{"dropout": 0.5}], cost=10.5, tensorflow=True,
               fast_select=FAST_DENSE, members=3)
def dense_ens(random_state=0, **params):
    """Three `dense` heads (seeds differ), probabilities averaged in one Keras model;
    3x the time."""
    return DenseHead(random_state=random_state, **params)
