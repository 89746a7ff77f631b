"""The opt-in ``finetune`` head: the backbone's blocks above the cut fine-tuned, with a
dense head, on the activations stage one cached at the cut (``featcache features --cut``).

The one head that does not take arrays: it is registered with ``file_rows``, so stage two
(:mod:`featcache.compare.protocol`) hands it :class:`featcache.heads.finetune.data.ActRows` (the
feature file and row numbers of the same fit/validation/test rows) and it streams them from the
file itself. It reads the feature file (:mod:`featcache.heads.finetune.data`) and the backbone's
weights to rebuild the layers above the cut (:mod:`featcache.heads.finetune.model`), both
imported lazily; it never runs the bottom of the backbone. Writes only what
:meth:`Head.save` is given (one joblib file holding the Keras model's ``.keras`` bytes).

Training (:meth:`FinetuneHead.fit`), two phases as fine-tuning practice has it: (1) the
dense head alone on the stored pooled features (the top's output before training: cheap),
batch ``warmup_batch_size``, Adam at ``learning_rate``; (2) the top's ``trainable_blocks``
blocks (default: all of them) and the head together on the activations, the pretrained
layers at ``backbone_lr`` (lower than the head's ``finetune_lr``), both decaying to 0 over
``decay_epochs`` (default ``epochs``) epochs with ``schedule="cosine"``, BatchNorm frozen. Each
phase early-stops on validation accuracy (test-time averaging of plain and mirror when the row uses
it) and restores its best epoch; phase 2 starts from phase 1's best, so it can only keep or
improve it. With mirrored activations each sample is plain or mirrored at random per
epoch; ``shift`` (off by default) also translates each activation map at random by up
to that many cells (:func:`featcache.heads.finetune.data.shift_maps`). ``time_budget_s`` stops
before an epoch that would not finish in time. Memory: the model, the optimizer state and
a few row blocks — flat in the number of rows.

``budget_s`` (``featcache finetune --budget``) replaces ``epochs`` and ``time_budget_s`` by a
plan (:mod:`featcache.heads.finetune.budget`): phase 1 stops before an epoch that would end
past ``PHASE1_SHARE`` of the budget; phase 2 times its first steps, plans how many epochs fit
into what is left (:func:`~featcache.heads.finetune.budget.plan_epochs`, validation passes
included) and stretches the cosine over exactly those epochs; no step starts that would end
past the budget. ``budget_`` records what the budget bought (the comparison's row shows it).
With ``decay_epochs`` given (a refit of a chosen schedule) nothing is planned, the budget
only stops the fit.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from featcache.errors import ConfigError
from featcache.heads.base import Head
from featcache.heads.finetune.budget import Deadline, plan_epochs
from featcache.heads.registry import register_head

log = logging.getLogger(__name__)


SCHEDULES = ("constant", "cosine")
#: under a budget, phase 1 (the head alone, cheap) stops before an epoch that would end past
#: this share of it, so that phase 2 gets the rest
PHASE1_SHARE = 0.25
#: under a budget, phase 2's step time is measured on this many steps after the first one
#: (which traces the step function and is not counted)
MEASURE_STEPS = 5


def check_schedule(schedule: str) -> None:
    """Refuse a phase-2 learning-rate schedule other than :data:`SCHEDULES`."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"finetune: schedule={schedule!r}: use one of {', '.join(SCHEDULES)}")


def learning_rate(lr: float, decay_steps: int = 0):
    """Adam's learning rate: ``lr``, or with ``decay_steps`` a cosine from ``lr`` down to 0
    over that many steps (phase 2's ``schedule="cosine"``: all its planned epochs)."""
    if not decay_steps:
        return float(lr)
    import keras

    return keras.optimizers.schedules.CosineDecay(float(lr), int(decay_steps))


def planned_cosine(lr: float, decay_steps: int):
    """:func:`learning_rate`'s cosine, with a length that can be set after the optimizer is
    built (``schedule.decay_steps.assign(n)``): the budget plans it on the first steps."""
    import keras
    from keras import ops

    class PlannedCosine(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self):
            self.lr = float(lr)
            self.decay_steps = keras.Variable(float(max(1, decay_steps)), dtype="float32",
                                              trainable=False, name="decay_steps")

        def __call__(self, step):
            t = ops.minimum(ops.cast(step, "float32"), self.decay_steps)
            return self.lr * 0.5 * (1.0 + ops.cos(math.pi * t / self.decay_steps))

        def get_config(self):
            return {"lr": self.lr, "decay_steps": float(self.decay_steps.numpy())}

    return PlannedCosine()


def train_step(net, groups, loss_fn):
    """A compiled training step ``step(x, y) -> loss`` of ``net``: one Adam per ``(learning
    rate or schedule, variables)`` in ``groups``, all from one gradient tape. The tape
    watches those variables only, so frozen layers below them run forward and are not
    recorded (their activations are not kept for a backward pass that never reaches them)."""
    import keras
    import tensorflow as tf

    opts = [(keras.optimizers.Adam(lr), vs) for lr, vs in groups]
    for opt, vs in opts:
        opt.build(vs)
    all_vars = [v for _, vs in opts for v in vs]

    @tf.function(reduce_retracing=True)
    def step(x, y):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch([v.value for v in all_vars])
            loss = loss_fn(y, net(x, training=True))
        grads = tape.gradient(loss, all_vars)
        i = 0
        for opt, vs in opts:
            opt.apply_gradients(zip(grads[i:i + len(vs)], vs))
            i += len(vs)
        return loss
    return step


class FinetuneHead(Head):
    """Fine-tunes the backbone above the cut plus a dense head on cached activations
    (``X``: :class:`featcache.heads.finetune.data.ActRows`, see the module docstring)."""

    _transient = ("warm_state_", "_forward_fn", "head_")

    def __init__(self, trainable_blocks=None, hidden=1024, dropout=0.5, learning_rate=1e-3,
                 warmup_epochs=30, warmup_batch_size=512, warmup_patience=3, backbone_lr=1e-4,
                 finetune_lr=2e-4, batch_size=256, epochs=3, patience=2, shift=0,
                 schedule="cosine", decay_epochs=None, time_budget_s=1500.0, budget_s=None,
                 threads=None, random_state=0):
        self.trainable_blocks, self.hidden, self.dropout = trainable_blocks, hidden, dropout
        self.learning_rate, self.backbone_lr = learning_rate, backbone_lr
        self.warmup_epochs, self.finetune_lr = warmup_epochs, finetune_lr
        self.warmup_batch_size, self.warmup_patience = warmup_batch_size, warmup_patience
        self.batch_size, self.epochs, self.patience = batch_size, epochs, patience
        self.shift, self.schedule, self.decay_epochs = shift, schedule, decay_epochs
        self.time_budget_s, self.threads = time_budget_s, threads
        self.budget_s = budget_s
        self.random_state = random_state

    def _set_threads(self) -> None:
        """TensorFlow's intra-op threads (a stage-two worker sets 1 before TensorFlow
        starts; this head wants the cores). Best effort: once TensorFlow runs it stays."""
        n = int(self.threads or len(os.sched_getaffinity(0)))
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(n)
        try:
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(n)
        except RuntimeError:
            pass

    def _decay_epochs(self) -> int:
        """The cosine's length in epochs: ``decay_epochs``, or the epochs the budget planned,
        or ``epochs``."""
        if self.decay_epochs is not None:
            return int(self.decay_epochs)
        planned = (getattr(self, "budget_", None) or {}).get("epochs_planned")
        return int(self.epochs if planned is None else planned)

    def _planning(self) -> bool:
        """Whether phase 2's epochs come from the budget (a budget, no fixed schedule)."""
        return self.budget_s is not None and self.decay_epochs is None

    def fit(self, X, y, X_flip=None, validation_data=None):
        """Both phases (see the module docstring); ``validation_data``: ``(X_val, y_val[,
        X_val_flip])`` for early stopping, else every epoch runs."""
        check_schedule(self.schedule)
        self._set_threads()
        import keras

        from featcache.cache.activations import ActivationReader
        from featcache.heads.finetune.data import pooled_stats
        from featcache.heads.finetune.model import build

        t0 = time.perf_counter()
        self.classes_, yi = np.unique(np.asarray(y), return_inverse=True)
        labels = np.full(int(X.rows.max()) + 1, -1, np.int64)
        labels[X.rows] = yi
        mean, var = pooled_stats(X)
        b = build(X.path, len(self.classes_), mean, var, trainable_blocks=self.trainable_blocks,
                  hidden=self.hidden, dropout=self.dropout, seed=self.random_state)
        self.model_, self.head_ = b.model, b.head
        self.cut_, self.backbone_, self.top_layers_ = b.cut, b.backbone, b.top_layers
        self.trainable_blocks_ = b.trainable_blocks
        self.__dict__.pop("_forward_fn", None)
        loss_fn = keras.losses.SparseCategoricalCrossentropy()
        head_vars, bb_vars = list(b.head.trainable_weights), list(b.top.trainable_weights)
        log.info("finetune: %d trainable tensors above the cut (%d values), %d in the head",
                 len(bb_vars), sum(int(np.prod(v.shape)) for v in bb_vars), len(head_vars))

        schedules: list = []   # phase 2's cosines whose length the budget plans

        def rate(lr, decay_steps):
            if not (decay_steps and self._planning()):
                return learning_rate(lr, decay_steps)
            schedules.append(planned_cosine(lr, decay_steps))
            return schedules[-1]

        def make_step(net, groups, decay_steps=0):
            return train_step(net, [(rate(lr, decay_steps), vs) for lr, vs in groups
                                    if vs and lr], loss_fn)

        val = None
        if validation_data is not None:
            val = (validation_data[0], np.asarray(validation_data[1]),
                   validation_data[2] if len(validation_data) > 2 else None)
        history: list[dict] = []
        rng = np.random.default_rng(int(self.random_state))
        self.budget_ = None
        clock = Deadline(None if self.budget_s is None else float(self.budget_s), t0)
        with ActivationReader(X.path) as reader:
            run = dict(reader=reader, X=X, X_flip=X_flip, labels=labels, rng=rng, val=val,
                       history=history, t0=t0, clock=clock)
            # phase 1: the head on the pooled features
            best1 = self._run_phase(1, make_step(b.head, [(self.learning_rate, head_vars)]),
                                    int(self.warmup_epochs), "features",
                                    batch=int(self.warmup_batch_size),
                                    patience=int(self.warmup_patience), **run)
            # phase 2: the blocks above the cut and the head, on the activations
            if best1[1] is not None:
                self.model_.set_weights(best1[1])
            best2 = (best1[0], self.model_.get_weights(), 0)
            if int(self.epochs) > 0 and bb_vars:
                groups = [(self.backbone_lr, bb_vars), (self.finetune_lr, head_vars)]
                steps = self._decay_epochs() * -(-len(X) // int(self.batch_size)) \
                    if self.schedule == "cosine" else 0
                best2 = self._run_phase(2, make_step(b.model, groups, steps), int(self.epochs),
                                        "acts",
                                        start=best2, batch=int(self.batch_size),
                                        patience=int(self.patience), schedules=schedules,
                                        **run)
        if best2[1] is not None:
            self.model_.set_weights(best2[1])
        self.warmup_epochs_, self.best_epochs_ = best1[2], best2[2]
        self.history_ = history
        self.fit_s_ = time.perf_counter() - t0
        if self.budget_s is not None:
            self.budget_ = {**(self.budget_ or {"epochs_planned": None}),
                            "budget_s": float(self.budget_s),
                            "epochs_run": sum(1 for h in history if h["phase"] == 2),
                            "fit_s": self.fit_s_}
        return self

    def _run_phase(self, phase, step, epochs, what, *, reader, X, X_flip, labels, rng, val,
                   history, t0, clock, start=(-1.0, None, 0), batch: int, patience: int,
                   schedules=()):
        """Epochs of ``step`` on ``what`` ("features" or "acts") with early stopping on
        ``val``; returns (best validation accuracy, the whole model's weights, epoch).
        Under a budget (``clock``) no step starts that would end past it, phase 1 stops at
        its share, and phase 2 plans its epochs (and the cosine ``schedules``) on its first
        steps (:meth:`_plan`)."""
        import tensorflow as tf

        from featcache.heads.finetune.data import train_batches

        net = self.head_ if what == "features" else self.model_
        budget = clock.budget_s
        steps_per_epoch = -(-len(X) // batch)
        step_times: list[float] = []        # this phase's steps, the first (tracing) left out
        val_s = 0.0                          # the last validation pass's seconds
        best = start
        epoch = 0
        while epoch < epochs:
            epoch += 1
            te = time.perf_counter()
            losses, stopped = [], ""
            batches = train_batches(reader, X, labels, batch, rng, mirror=X_flip is not None,
                                    what=what, shift=int(self.shift or 0))
            try:
                for xb, yb in batches:
                    if budget is not None and step_times and not clock.step_fits(
                            float(np.mean(step_times[-20:])), val_s if val is not None else 0):
                        stopped = "budget"
                        break
                    ts = time.perf_counter()
                    losses.append(float(step(tf.constant(xb), tf.constant(yb))))
                    if epoch == 1 and len(losses) == 1:
                        first = time.perf_counter() - ts   # traced: not a step's time
                        continue
                    step_times.append(time.perf_counter() - ts)
                    if budget is not None and phase == 2 and epoch == 1 and \
                            len(step_times) == min(MEASURE_STEPS, steps_per_epoch - 1):
                        val_s = self._validation_estimate(val, xb, batch)
                        epochs = self._plan(clock, step_times, steps_per_epoch, len(losses),
                                            val_s, batch, schedules, epochs)
                        if epochs == 0:
                            stopped = "planned 0 epochs"
                            break
            finally:
                batches.close()
            if phase == 2 and epoch == 1 and budget is not None and self.budget_ is None \
                    and losses:
                # an epoch too short to measure on: plan on what its steps took
                step_times = step_times or [first]
                val_s = self._validation_estimate(val, xb, batch)
                epochs = self._plan(clock, step_times, steps_per_epoch, len(losses), val_s,
                                    batch, schedules, epochs)
                stopped = "planned 0 epochs" if epochs == 0 else stopped
            if not losses or stopped == "planned 0 epochs":
                break
            entry = {"phase": phase, "epoch": epoch, "loss": float(np.mean(losses)),
                     "train_s": time.perf_counter() - te, "steps": len(losses)}
            if val is not None:
                tv = time.perf_counter()
                acc = float(np.mean(self.predict(val[0], val[2], net=net, what=what) == val[1]))
                val_s = time.perf_counter() - tv
                entry["val_accuracy"] = acc
                if acc > best[0]:
                    best = (acc, self.model_.get_weights(), epoch)
            entry["epoch_s"] = time.perf_counter() - te
            history.append(entry)
            log.info("finetune phase %d epoch %d: loss %.4f%s (%.0f s)%s", phase, epoch,
                     entry["loss"], f", validation {entry['val_accuracy']:.4f}"
                     if "val_accuracy" in entry else "", entry["epoch_s"],
                     f"; stopped by the time budget after {len(losses)} of "
                     f"{steps_per_epoch} steps" if stopped else "")
            # a cosine the budget planned runs to its end (its low-rate tail is where phase
            # 2 settles; the best epoch is kept): patience stops only unplanned phases
            planned = phase == 2 and self._planning() and \
                bool((self.budget_ or {}).get("epochs_planned"))
            if stopped or (val is not None and not planned and epoch - best[2] >= patience):
                break
            spent = time.perf_counter() - t0
            if budget is not None:
                if phase == 1 and spent + entry["epoch_s"] > PHASE1_SHARE * budget:
                    log.info("finetune: phase 1 stops after epoch %d (its share of the "
                             "budget, %.0f s)", epoch, PHASE1_SHARE * budget)
                    break
            elif self.time_budget_s and spent + entry["epoch_s"] > float(self.time_budget_s):
                log.info("finetune: stopping after epoch %d (time budget %.0f s)", epoch,
                         float(self.time_budget_s))
                break
        if val is None:
            best = (-1.0, self.model_.get_weights(), epoch)
        return best

    def _validation_estimate(self, val, xb, batch: int) -> float:
        """Seconds a validation pass will take: one batch's forward pass (timed on the
        second call, the first traces), times the validation batches, twice with TTA."""
        if val is None:
            return 0.0
        import tensorflow as tf

        forward = self._forward(self.model_)
        x = tf.constant(xb)
        forward(x)
        tf_ = time.perf_counter()
        forward(x)
        per_row = (time.perf_counter() - tf_) / max(1, len(xb))
        return per_row * len(val[0]) * (2 if val[2] is not None else 1)

    def _plan(self, clock, step_times, steps_per_epoch, done, val_s, batch, schedules,
              epochs) -> int:
        """Phase 2's epochs under the budget (:func:`plan_epochs`), from the measured step
        time; sets the cosine ``schedules`` to that many epochs and records ``budget_``.
        ``done``: steps of epoch 1 already run (their time counts as spent)."""
        if not self._planning():
            self.budget_ = {"epochs_planned": None, "note": "schedule fixed by decay_epochs"}
            return epochs
        step_s = float(np.mean(step_times))
        fixed = clock.spent() - done * step_s
        planned = plan_epochs(clock.budget_s, step_s, steps_per_epoch, fixed, val_s)
        for sched in schedules:
            sched.decay_steps.assign(float(max(1, planned * steps_per_epoch)))
        self.budget_ = {"epochs_planned": planned, "step_s": step_s,
                        "rows_per_s": batch / step_s if step_s > 0 else None,
                        "steps_per_epoch": steps_per_epoch, "validation_s": val_s,
                        "spent_before_s": fixed}
        log.info("finetune: budget %.0f s: %d epoch%s of %d steps planned (%.3f s a step, "
                 "%.0f rows/s; %.0f s spent before, %.0f s a validation pass)",
                 clock.budget_s, planned, "" if planned == 1 else "s", steps_per_epoch,
                 step_s, batch / step_s if step_s > 0 else float("inf"), fixed, val_s)
        return planned

    # -- prediction ---------------------------------------------------------------------
    def _forward(self, net):
        fns = self.__dict__.setdefault("_forward_fn", {})
        if id(net) not in fns:
            import tensorflow as tf

            fns[id(net)] = tf.function(lambda x: net(x, training=False), reduce_retracing=True)
        return fns[id(net)]

    def predict_proba(self, X, X_flip=None, *, net=None, what: str = "acts") -> np.ndarray:
        """Class probabilities of ``X``'s rows (averaged with ``X_flip``'s: test-time
        mirroring). ``net``/``what``: the head alone on pooled features (phase 1)."""
        from featcache.cache.activations import ActivationReader
        from featcache.heads.finetune.data import predict_blocks

        forward = self._forward(net if net is not None else self.model_)
        out = np.zeros((len(X), len(self.classes_)), np.float32)
        with ActivationReader(X.path) as reader:
            for part in (X, X_flip):
                if part is not None:
                    for pos, xb in predict_blocks(reader, part, what=what):
                        out[pos] += np.asarray(forward(xb))
        return out / (2.0 if X_flip is not None else 1.0)

    def predict(self, X, X_flip=None, **kw) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X, X_flip, **kw), axis=1)]

    # -- selection (the refit of --search exhaustive runs the chosen epochs, no validation)
    def score_grid(self, grid, X_fit, y_fit, X_val, y_val, X_fit_flip=None, X_val_flip=None,
                   *, stop_early: bool = False, label: str = ""):
        """Per grid point: an early-stopped fit on the fit rows, scored on validation; the
        chosen ``warmup_epochs``/``epochs`` are the best epochs, and ``decay_epochs`` the
        cosine's length they were trained on (a refit stops where the fit did). Leaves the
        best fitted."""
        out, best = [], None
        for g in grid:
            self.set_params(**g).fit(X_fit, y_fit, X_fit_flip,
                                     validation_data=(X_val, y_val, X_val_flip))
            acc = float(np.mean(self.predict(X_val, X_val_flip) == np.asarray(y_val)))
            out.append(({**g, "trainable_blocks": self.trainable_blocks_,
                         "warmup_epochs": self.warmup_epochs_, "epochs": self.best_epochs_,
                         "decay_epochs": self._decay_epochs()}, acc))
            if best is None or acc > best[0]:
                best = (acc, dict(g), self.__getstate__())
        if best is not None and len(grid) > 1:
            self.__setstate__(best[2])
            self.set_params(**best[1])
        return out

    # -- export / persistence -----------------------------------------------------------
    def to_keras(self):
        """activations at the cut (None, H, W, C) -> class probabilities (export puts the
        backbone's bottom in front: :func:`featcache.heads.finetune.model.export_bottom`)."""
        return self.model_

    def __getstate__(self):
        state = super().__getstate__()
        model = state.pop("model_", None)
        if model is not None:
            with tempfile.TemporaryDirectory(prefix="featcache-finetune-") as d:
                p = Path(d) / "m.keras"
                model.save(p)
                state["model_keras_bytes_"] = p.read_bytes()
        return state

    def __setstate__(self, state):
        state = dict(state)
        blob = state.pop("model_keras_bytes_", None)
        super().__setstate__(state)
        if blob is not None:
            import keras

            with tempfile.TemporaryDirectory(prefix="featcache-finetune-") as d:
                p = Path(d) / "m.keras"
                p.write_bytes(blob)
                self.model_ = keras.models.load_model(p)


def _file_rows(data):
    """The comparison's data as file rows
    (:func:`featcache.heads.finetune.data.activation_data`)."""
    from featcache.heads.finetune.data import activation_data

    return activation_data(data)


@register_head("finetune", default=False, grid=[{}], cost=60.0,
               file_rows=_file_rows, mirror_rows_only=True, budget=True, in_process=True)
def finetune(random_state=0, **params):
    """The backbone's blocks above the cut (--cut) fine-tuned with a dense head, on cached
    activations."""
    return FinetuneHead(random_state=random_state, **params)
