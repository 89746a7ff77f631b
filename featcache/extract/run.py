"""Stage one: images -> resize + preprocess -> backbone -> pooled features -> HDF5, streaming.

Reads a dataset (:mod:`featcache.data.datasets`) and backbone weights
(:mod:`featcache.backbones.registry`); writes one feature file through :mod:`featcache.cache.writer`
(or one part file with ``shard``).

Per batch: uint8 images go into one compiled graph (:func:`step_graph`) that casts,
resizes to the configured size, applies the backbone's own preprocessing and runs the
backbone with ``training=False`` (and again on the mirrored images with ``--flip``); the
pooled features come back as float32 and are written at once. The runtime
(:mod:`featcache.backbones.runtime`) decides what runs that graph: TensorFlow (a ``tf.function``),
or OpenVINO (the same graph converted once and cached on disk, compiled for a fixed batch
size; a short last batch is padded). A reader thread keeps the next batches ready while
the backbone runs. Nothing of size N is ever held: peak memory is a few batches plus the
model (and, with OpenVINO, its compiled copy). With ``cut`` the graph also returns the
activations after that block, written beside the features (:mod:`featcache.cache.activations`).
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from featcache import __version__
from featcache._util.prefetch import prefetch
from featcache.backbones import runtime as runtimes
from featcache.backbones.registry import build_backbone, get_backbone, preprocess, weights_sha256
from featcache.cache.lock import check_output
from featcache.cache.writer import FeatureWriter, SplitSpec
from featcache.config import ExtractConfig, config_sha256
from featcache.data.base import Dataset
from featcache.data.datasets import open_dataset
from featcache.data.resize import REGISTRY_ANTIALIAS
from featcache.data.resize import describe as describe_resize
from featcache.errors import ConfigError, Interrupted

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Reported after every batch (the CLI draws a bar from it)."""

    split: str
    done: int          # rows of this run done so far (all splits)
    total: int         # rows this run has to do (all splits)
    images_per_s: float
    eta_s: float


@dataclass
class ExtractResult:
    path: Path
    images: int        # images run through the backbone in this call
    seconds: float
    cached: bool       # True: the file was already complete, nothing was done
    peak_rss_mb: float
    file_mb: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        if self.cached:
            return f"{self.path} is up to date (same configuration, complete); nothing to do"
        return (f"{self.images} images in {self.seconds:.1f} s ({self.images_per_s:.1f} img/s) "
                f"-> {self.path} ({self.file_mb:.1f} MiB), peak RSS {self.peak_rss_mb:.0f} MiB")


def peak_rss_mb() -> float:
    """This process's own peak resident memory (VmHWM; ``ru_maxrss`` would include a
    parent's peak inherited across fork+exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------- the graph

def step_graph(model, *, size: int, mode: str, flip: bool = False, cut: str | None = None):
    """The whole step as TensorFlow ops: ``images -> {"features"[, "features_flip"]}``.

    ``images``: (B, H, W, 3) uint8 or float32 RGB 0-255, any H, W (resized to ``size`` by
    :func:`featcache.data.resize.resize_images`, bilinear without antialias: registry data sets;
    folders arrive resized). Both runtimes run exactly this graph. With ``cut`` (a block,
    :mod:`featcache.backbones.cut`) it also returns ``"acts"`` (``"acts_flip"``): the float32
    activations after that block.
    """
    import tensorflow as tf

    from featcache.data.resize import resize_images

    if cut:
        from featcache.backbones.cut import bottom_model
        net = bottom_model(model, cut)

    def forward(x, suffix=""):
        if not cut:
            return {"features" + suffix: tf.cast(model(x, training=False), tf.float32)}
        feats, acts = net(x, training=False)
        return {"features" + suffix: tf.cast(feats, tf.float32),
                "acts" + suffix: tf.cast(acts, tf.float32)}

    def graph(images):
        x = tf.cast(images, tf.float32)
        if x.shape[1] != size or x.shape[2] != size:
            x = resize_images(x, size, antialias=REGISTRY_ANTIALIAS)
        x = preprocess(x, mode)
        out = forward(x)
        if flip:
            out.update(forward(tf.reverse(x, axis=[2]), "_flip"))
        return out

    return graph


def make_step(model, *, size: int, mode: str, flip: bool = False, xla: bool = False,
              cut: str | None = None):
    """TensorFlow's compiled ``images -> (features, flipped features or None)`` function;
    its ``outputs(images)`` gives every output as a dict (the activations at ``cut`` too)."""
    import tensorflow as tf

    step = tf.function(step_graph(model, size=size, mode=mode, flip=flip, cut=cut),
                       jit_compile=xla, reduce_retracing=True)

    def run(images: np.ndarray):
        out = step(images)
        return out["features"].numpy(), (out["features_flip"].numpy() if flip else None)

    run.outputs = lambda images: {k: v.numpy() for k, v in step(images).items()}
    return run


def make_runtime_step(cfg: ExtractConfig, model, ds: Dataset, *, batch: int,
                      weights_sha: str, dataset_sha: str):
    """The step of ``cfg.runtime`` for ``model`` on ``ds``'s images at ``batch``; at
    ``int8``, the converted graph quantized on a calibration sample of ``ds``'s training
    images (:mod:`featcache.extract.quantize`; converted and quantized once per key)."""
    if cfg.runtime == "tensorflow":
        return make_step(model, size=cfg.size, mode=cfg.preprocess, flip=cfg.flip, xla=cfg.xla,
                         cut=cfg.cut)
    first = next(s for s, n in ds.splits.items() if n)
    probe, _ = next(iter(ds.batches(first, 0, 1, 1)))
    key = runtimes.conversion_key(
        backbone=cfg.backbone, weights_sha256=weights_sha, input_shape=probe.shape[1:],
        input_dtype=str(probe.dtype), image_size=cfg.size, preprocess=cfg.preprocess,
        pooling=cfg.pooling, flip=cfg.flip, precision=cfg.precision, cut=cfg.cut)
    graph = step_graph(model, size=cfg.size, mode=cfg.preprocess, flip=cfg.flip, cut=cfg.cut)
    if cfg.precision != "int8":
        return runtimes.openvino_step(graph, key, batch=batch, threads=cfg.threads)
    from featcache.extract import quantize

    rows = quantize.calibration_size(ds, cfg.calibration)
    key["calibration"] = quantize.calibration_key(dataset_sha256=dataset_sha, rows=rows,
                                                  seed=cfg.seed)

    def convert():  # only on a conversion-cache miss: the sample is read only then
        float_model = runtimes.convert_graph(graph, tuple(key["input_shape"]),
                                             key["input_dtype"])
        return quantize.quantize(float_model,
                                 quantize.calibration_images(ds, cfg.calibration, cfg.seed))

    compiled = runtimes.compile_cached(key, batch=batch, threads=cfg.threads, convert=convert)
    return runtimes.OpenVINOStep(compiled, batch=batch, flip=cfg.flip,
                                 input_dtype=key["input_dtype"])


# ---------------------------------------------------------------------------- shards

def shard_range(rows: int, batch: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """The contiguous, batch-aligned row range ``[lo, hi)`` of ``shard`` = (i, n).

    Aligning to the batch keeps every batch identical to a single-process run's, so the
    merged shards are bit-identical to it.
    """
    if shard is None:
        return 0, rows
    i, n = shard
    nb = math.ceil(rows / batch)
    return min(rows, (i * nb // n) * batch), min(rows, ((i + 1) * nb // n) * batch)


# ---------------------------------------------------------------------------- stage one

def extract_features(config: ExtractConfig, *, dataset: Dataset | None = None,
                     progress: Callable[[Progress], None] | None = None,
                     stop_after: int | None = None) -> ExtractResult:
    """Run stage one for ``config``; a no-op if its complete feature file exists.

    ``dataset`` overrides ``config.dataset`` (tests). ``stop_after`` stops (as if
    interrupted) once that many rows are written in this call — for tests and demos of
    resuming. Raises :class:`~featcache.errors.FeatcacheError` subclasses on user errors.
    """
    import keras
    import tensorflow as tf

    t0 = time.perf_counter()
    cfg = config.resolved()
    spec = get_backbone(cfg.backbone)
    if cfg.precision == "int8":
        runtimes.require_int8()
    check_output(cfg.output_path)  # a folder there, or a read-only folder: refused before work
    # an image folder never reads what this run writes (`--dataset .` writes ./features/)
    own = (cfg.output_path.parent, cfg.merged_path.with_suffix(""))
    ds = dataset or open_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                                 limit=cfg.limit, test_fraction=cfg.test_fraction, seed=cfg.seed,
                                 image_size=cfg.size, exclude=own,
                                 reduce_pixels=cfg.reduce_pixels, max_pixels=cfg.max_pixels)
    if not ds.splits or not any(ds.splits.values()):
        raise ConfigError(f"dataset {ds.name} has no images")
    log.info("fingerprinting dataset %s (%s)", ds.name,
             ", ".join(f"{k}: {v}" for k, v in ds.splits.items()))
    ds_sha = ds.fingerprint()
    log.info("building %s (weights: %s; runtime: %s, %s)", spec.name, cfg.weights,
             cfg.runtime, cfg.precision)
    if config.runtime == "auto" and cfg.runtime == "tensorflow" \
            and not tf.config.list_physical_devices("GPU"):
        log.warning("a GPU is visible but TensorFlow does not see it (install featcache[gpu]); "
                    "TensorFlow runs on the CPU, where --runtime openvino is faster")
    model = build_backbone(spec, weights=cfg.weights, pooling=cfg.pooling,
                           precision=cfg.keras_precision, seed=cfg.seed)
    w_sha = weights_sha256(model)
    version = runtimes.runtime_version(cfg.runtime)
    key = cfg.cache_key(dataset_sha256=ds_sha, weights_sha256=w_sha, runtime_version=version)
    accept = None
    if cfg.runtime == "tensorflow":
        # files made before runtimes were recorded: TensorFlow's, under the key without them
        legacy = config_sha256(cfg.cache_key(dataset_sha256=ds_sha, weights_sha256=w_sha,
                                             runtime_version=None))
        accept = lambda old: ("runtime" not in old and old.get("config_sha256") == legacy  # noqa: E731
                              and old.get("tensorflow_version") == version)
    dim = int(model.output_shape[-1])
    writer_cls, cut_attrs = _writer_for(cfg, model, spec.name)
    attrs = dict(key, **cut_attrs)
    attrs.update(
        config_sha256=config_sha256(key), batch_size=cfg.batch,
        tensorflow_version=tf.__version__, keras_version=keras.__version__,
        featcache_version=__version__, created_utc=datetime.now(timezone.utc).isoformat(),
        weights_source=str(cfg.weights), xla=cfg.xla,
    )
    attrs["resize"] = describe_resize(REGISTRY_ANTIALIAS)  # a folder's extra_attrs say its own
    if cfg.precision == "int8":
        import nncf

        from featcache.extract.quantize import CALIBRATION_SPLIT, calibration_size
        attrs.update(calibration_split=CALIBRATION_SPLIT, nncf_version=nncf.__version__,
                     calibration_images=calibration_size(ds, cfg.calibration))
    attrs.update(ds.extra_attrs)
    ranges = {s: shard_range(n, cfg.batch, cfg.shard) for s, n in ds.splits.items()}
    if cfg.shard:
        attrs["shard"] = f"{cfg.shard[0]}/{cfg.shard[1]}"
        attrs["total_rows"] = [ds.splits[s] for s in ds.splits]
    hashes = {s: ds.file_sha256(s) for s in ranges}   # image folders: each file's content
    specs = {s: SplitSpec(hi - lo, lo, ds.ids(s)[lo:hi],
                          None if hashes[s] is None else hashes[s][lo:hi])
             for s, (lo, hi) in ranges.items()}
    path = cfg.output_path
    step = None
    if not path.exists():  # convert before any file is made; a final file is complete
        step = make_runtime_step(cfg, model, ds, batch=cfg.batch, weights_sha=w_sha,
                                 dataset_sha=ds_sha)

    with writer_cls.open(path, attrs=attrs, classes=ds.classes, splits=specs, dim=dim,
                         dtype=cfg.dtype, flip=cfg.flip, force=cfg.force,
                         wait=cfg.wait, accept=accept) as writer:
        if writer.complete:
            return ExtractResult(path, 0, time.perf_counter() - t0, True, peak_rss_mb(),
                                 path.stat().st_size / 2**20)
        batch = int(writer.attrs.get("batch_size", cfg.batch))
        if batch != cfg.batch:
            log.info("resuming with the file's batch size %d (not %d) so batches line up",
                     batch, cfg.batch)
        if step is None or batch != cfg.batch:
            step = make_runtime_step(cfg, model, ds, batch=batch, weights_sha=w_sha,
                                     dataset_sha=ds_sha)
        todo = sum(writer.rows(s) - writer.rows_done(s) for s in ds.splits)
        done = 0
        t_start = time.perf_counter()
        try:
            for split in ds.splits:
                lo, hi = ranges[split]
                start = lo + writer.rows_done(split)
                if start >= hi:
                    continue
                log.info("%s: rows %d..%d of %d", split, start, hi, ds.splits[split])
                for images, labels in prefetch(ds.batches(split, start, hi, batch)):
                    if cfg.cut:   # activations at the cut too (featcache.cache.activations)
                        out = step.outputs(images)
                        feats, flipped = out["features"], out.get("features_flip")
                        extra = {"acts": out["acts"], "acts_flip": out.get("acts_flip")}
                    else:
                        (feats, flipped), extra = step(images), {}
                    writer.write(split, feats.astype(cfg.dtype, copy=False), labels,
                                 None if flipped is None else flipped.astype(cfg.dtype, copy=False),
                                 **extra)
                    done += len(labels)
                    if progress:
                        el = time.perf_counter() - t_start
                        rate = done / el if el > 0 else 0.0
                        progress(Progress(split, done, todo, rate,
                                          (todo - done) / rate if rate > 0 else math.inf))
                    if stop_after is not None and done >= stop_after:
                        raise KeyboardInterrupt
            writer.mark_complete()
        except KeyboardInterrupt:
            kept = {s: writer.rows_done(s) for s in ds.splits}
            raise Interrupted(f"interrupted; {kept} rows are saved in {path}: run the same "
                              f"command again to resume") from None
    final = writer.path
    return ExtractResult(final, done, time.perf_counter() - t0, False, peak_rss_mb(),
                         final.stat().st_size / 2**20)


def _writer_for(cfg, model, backbone: str):
    """The writer class and extra root attributes: with a cut, an ActivationWriter for its
    activation shape and ``cut_layer`` (a bad cut name is a one-line error listing them)."""
    if not cfg.cut:
        return FeatureWriter, {}
    from featcache.backbones.cut import activation_shape, cut_layer
    from featcache.cache.activations import ActivationWriter

    layer = cut_layer(model, cfg.cut, backbone)
    shape = activation_shape(model, cfg.cut, cfg.size)
    return ActivationWriter.for_shape(shape), {"cut_layer": layer}


def describe(config: ExtractConfig) -> dict:
    """The resolved settings of ``config`` as a dict (as ``featcache path --json`` prints them)."""
    cfg = config.resolved()
    return {**vars(cfg), "output": str(cfg.output_path)}


