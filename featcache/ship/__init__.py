"""Ship a model: one Keras model from raw images to class probabilities, and prediction with it.

:mod:`~featcache.ship.export` (:func:`export_model`: formats, self-checks),
:mod:`~featcache.ship.assemble` (backbone rebuilt from the file's provenance + the head as
Keras layers), :mod:`~featcache.ship.sidecar` (``<model>.json``: class names, input contract),
:mod:`~featcache.ship.predict` (:func:`load_classifier`, :func:`predict_images`).
"""
