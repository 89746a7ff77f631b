"""Backbones: the registry of pretrained Keras networks (:mod:`~featcache.backbones.registry`:
builders, preprocessing, default sizes), their cut points (:mod:`~featcache.backbones.cut`),
and what runs them (:mod:`~featcache.backbones.runtime`: TensorFlow or OpenVINO, precision,
the conversion cache). TensorFlow, Keras and OpenVINO are imported inside the functions that
need them.
"""
