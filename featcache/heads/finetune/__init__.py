"""The ``finetune`` head: the backbone's top blocks above a cut, trained on the activations
stage one cached at that cut, with a dense head on top (opt-in: ``--heads finetune``).

Modules: :mod:`~featcache.heads.finetune.head` (:class:`FinetuneHead`, its registration),
:mod:`~featcache.heads.finetune.data` (file rows, streamed activation blocks, pooled
statistics), :mod:`~featcache.heads.finetune.model` (the Keras model above the cut; the
frozen bottom for export). Reads a feature file's activations; writes nothing itself.
"""

from __future__ import annotations

from featcache.heads.finetune.head import FinetuneHead, finetune

__all__ = ["FinetuneHead", "finetune"]
