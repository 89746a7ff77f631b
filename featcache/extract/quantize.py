"""Stage one at ``--precision int8``: the converted step graph quantized by NNCF.

NNCF's post-training quantization (``nncf.quantize``) calibrates the activation ranges of
the OpenVINO model on a sample of images and inserts int8 quantize/dequantize pairs around
the convolutions and matrix products, which OpenVINO's CPU plugin then runs as int8
arithmetic (VNNI/AMX where the CPU has them). The resize (``Interpolate``), the backbone's
preprocessing and the pooling (``ReduceMean``) stay float: only the backbone's own layers are
quantized. Full bias correction (not NNCF's fast variant) is used: on MobileNetV2's CIFAR-10
features it lifted the cosine to float32 from 0.87 to 0.96 and kept the linear-probe
accuracy within half a point (docs/stage-one.md).

The calibration sample is :func:`calibration_rows`: ``count`` rows of the **training** split
drawn with ``seed``; test rows are never read. Its identity (split, rows' count and seed,
the data set's fingerprint, NNCF's version and the settings below) is part of the
conversion-cache key (:func:`calibration_key`), so a cached quantized model is reused only
for the same calibration. Reads the sampled images through the data set; writes nothing (the
quantized model is cached by :func:`featcache.backbones.runtime.load_or_convert`).
"""

from __future__ import annotations

import logging

import numpy as np

from featcache.errors import DataError

log = logging.getLogger(__name__)

#: The split calibration images come from (never the test split).
CALIBRATION_SPLIT = "train"
#: How NNCF quantizes (part of the conversion key: changing one re-quantizes).
NNCF_SETTINGS = {"preset": "performance", "fast_bias_correction": False,
                 "ignored_types": ("Interpolate", "ReduceMean")}


def calibration_size(ds, count: int) -> int:
    """How many images calibrate on ``ds``: ``count``, at most its training rows."""
    return min(count, ds.splits.get(CALIBRATION_SPLIT, 0))


def calibration_rows(n_rows: int, count: int, seed: int) -> np.ndarray:
    """Sorted indices of ``min(count, n_rows)`` distinct training rows drawn with ``seed``."""
    if n_rows < 1:
        raise DataError(f"--precision int8 calibrates on {CALIBRATION_SPLIT} images, and this "
                        f"data set has none; use --precision float32")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_rows, size=min(count, n_rows), replace=False))


def calibration_key(*, dataset_sha256: str, rows: int, seed: int) -> dict:
    """The calibration's identity for the conversion-cache key."""
    import nncf

    return {"split": CALIBRATION_SPLIT, "images": int(rows), "seed": int(seed),
            "dataset_sha256": dataset_sha256, "nncf_version": nncf.__version__,
            "settings": {k: list(v) if isinstance(v, tuple) else v
                         for k, v in NNCF_SETTINGS.items()}}


def calibration_images(ds, count: int, seed: int) -> np.ndarray:
    """The calibration sample of ``ds``: :func:`calibration_rows` of its training split."""
    split = CALIBRATION_SPLIT
    rows = calibration_rows(ds.splits.get(split, 0), count, seed)
    images, _ = ds.take(split, rows)
    return images


def quantize(model, images: np.ndarray, *, batch: int = 1):
    """``model`` (an ``ov.Model`` with a dynamic batch) quantized to int8 by
    ``nncf.quantize``, calibrated on ``images`` (fed ``batch`` at a time)."""
    import contextlib
    import io

    import nncf

    samples = [images[i:i + batch] for i in range(0, len(images), batch)]
    log.info("quantizing to int8 with NNCF, calibrated on %d training images", len(images))
    preset = {"performance": nncf.QuantizationPreset.PERFORMANCE,
              "mixed": nncf.QuantizationPreset.MIXED}[NNCF_SETTINGS["preset"]]
    # NNCF's own INFO lines and progress bars (printed to stdout) stay out of the CLI's
    # output; --verbose (DEBUG) shows them
    nncf_log = logging.getLogger("nncf")
    level, quiet = nncf_log.level, not log.isEnabledFor(logging.DEBUG)
    if quiet:
        nncf_log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            return nncf.quantize(
                model, nncf.Dataset(samples), subset_size=len(samples), preset=preset,
                fast_bias_correction=NNCF_SETTINGS["fast_bias_correction"],
                ignored_scope=nncf.IgnoredScope(types=list(NNCF_SETTINGS["ignored_types"]),
                                                validate=False))
    finally:
        nncf_log.setLevel(level)
