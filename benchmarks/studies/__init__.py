"""One-off studies: the measurements behind a default, each runnable on its own and
documented where its result is used. Unlike the ``make bench`` sections (one level up),
they are not run by ``make bench``; each says what it reads and writes.

- :mod:`benchmarks.studies.heads` — the linear heads' preconditioner and the kNN projection,
  on validation rows (docs/stage-two.md):
  ``python -m benchmarks.studies.heads FILE --parts linear,knn``
- :mod:`benchmarks.studies.dense_schedule` — the dense head's learning-rate schedules, on
  validation rows (docs/stage-two.md):
  ``python -m benchmarks.studies.dense_schedule FILE --epochs 4 --schedule cosine``
- :mod:`benchmarks.studies.finetune` — one fit of the ``finetune`` head with given settings
  and its per-epoch validation accuracy (docs/fine-tuning.md):
  ``python -m benchmarks.studies.finetune FILE '{"trainable_blocks": 4}'``
- :mod:`benchmarks.studies.agreement` — top-1 agreement of an exported Keras model with
  stage two's predictions on OpenVINO features (README, docs/own-images.md):
  ``python -m benchmarks.studies.agreement 1000``
- :mod:`benchmarks.studies.tf_precision` — TensorFlow's ``mixed_bfloat16`` against float32:
  speed on the same batches and a logistic probe's accuracy
  (``python -m benchmarks.studies.tf_precision``)
"""
