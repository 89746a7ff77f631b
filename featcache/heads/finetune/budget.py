"""The ``finetune`` head's time budget (``featcache finetune --budget 30m``): how many
phase-2 epochs fit into it, and the clock that holds a fit to it.

Reads and writes nothing; numpy-free, Keras-free: a few pure functions and one small class.

- :func:`plan_epochs` (pure): the budget, the seconds one training step took (measured on
  the first steps of phase 2), the steps per epoch, what the fit has already spent (and
  what else each epoch costs: its validation pass) -> the number of epochs that fit, at most
  ``cap``. The head then fits the whole cosine learning-rate schedule into that many epochs.
- :class:`Deadline`: the clock of one fit. Before every training step the head asks
  :meth:`Deadline.step_fits`; a step that would end past the budget (less the time the
  epoch's validation still needs) is not started, so a fit ends within the budget unless
  one step or one validation pass takes longer than measured (about one step's time).
"""

from __future__ import annotations

import math
import time

#: at most this many phase-2 epochs, however large the budget: the study (docs/fine-tuning.md)
#: saw validation flat from epoch 3 of a 3-epoch cosine, and early stopping (``patience``)
#: ends a longer one anyway; a cap keeps a huge budget from stretching the cosine into
#: many epochs at a high rate
MAX_PLANNED_EPOCHS = 10


def plan_epochs(budget_s: float, step_s: float, steps_per_epoch: int, fixed_s: float = 0.0,
                epoch_extra_s: float = 0.0, cap: int = MAX_PLANNED_EPOCHS) -> int:
    """The number of whole epochs of ``steps_per_epoch`` steps of ``step_s`` seconds each
    (plus ``epoch_extra_s`` per epoch: its validation) that fit into ``budget_s`` after
    ``fixed_s`` already spent or committed; between 0 and ``cap``.

    ``epochs * (steps_per_epoch * step_s + epoch_extra_s) + fixed_s <= budget_s`` always
    holds for the result (0 when not even one epoch fits)."""
    if budget_s <= 0 or steps_per_epoch <= 0:
        return 0
    per_epoch = steps_per_epoch * max(float(step_s), 0.0) + max(float(epoch_extra_s), 0.0)
    left = float(budget_s) - max(float(fixed_s), 0.0)
    if left <= 0:
        return 0
    if per_epoch <= 0:
        return int(cap)
    # a hair of slack against float rounding (10 epochs of 0.1 s in 1.0 s fit)
    return int(max(0, min(int(cap), math.floor(left / per_epoch + 1e-9))))


class Deadline:
    """The clock of one fit under a budget of ``budget_s`` seconds, started at ``t0``
    (``time.perf_counter()``; default now). ``None`` budget: every step fits."""

    def __init__(self, budget_s: float | None, t0: float | None = None):
        self.budget_s = None if budget_s is None else float(budget_s)
        self.t0 = time.perf_counter() if t0 is None else float(t0)

    def spent(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - self.spent()

    def step_fits(self, step_s: float, reserve_s: float = 0.0) -> bool:
        """Whether one more step of ``step_s`` seconds ends within the budget with
        ``reserve_s`` (the epoch's validation) still left after it."""
        return self.left() >= float(step_s) + float(reserve_s)
