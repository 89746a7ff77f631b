"""Stage one: images -> resize + preprocess -> backbone -> pooled features -> HDF5, streaming.

Reads a dataset (:mod:`pipeline.datasets`) and backbone weights (:mod:`pipeline.backbones`);
writes one feature file through :mod:`pipeline.store` (or one part file with ``shard``).

Per batch: uint8 images go into one compiled ``tf.function`` that casts, resizes to the
configured size, applies the backbone's own preprocessing and runs the backbone with
``training=False``; the pooled features come back as float32 and are written at once. A
reader thread keeps the next batches ready while the backbone runs. Nothing of size N
is ever held: peak memory is a few batches plus the model.
"""

from __future__ import annotations

import logging
import math
import queue
import resource
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import __version__
from .backbones import build_backbone, get_backbone, preprocess, weights_sha256
from .config import ExtractConfig, config_sha256
from .datasets import Dataset, open_dataset
from .errors import ConfigError, Interrupted
from .store import FeatureWriter, SplitSpec, check_output

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

def make_step(model, *, size: int, mode: str, flip: bool = False, xla: bool = False):
    """A compiled ``images -> (features, flipped features or None)`` function.

    ``images``: (B, H, W, 3) uint8 or float32 RGB 0-255, any H, W (resized to ``size``).
    """
    import tensorflow as tf

    def forward(x):
        return tf.cast(model(x, training=False), tf.float32)

    @tf.function(jit_compile=xla, reduce_retracing=True)
    def step(images):
        x = tf.cast(images, tf.float32)
        if x.shape[1] != size or x.shape[2] != size:
            x = tf.image.resize(x, (size, size), method="bilinear")
        x = preprocess(x, mode)
        feats = forward(x)
        if flip:
            return feats, forward(tf.reverse(x, axis=[2]))
        return feats, tf.zeros((0,), tf.float32)

    def run(images: np.ndarray):
        f, ff = step(images)
        return f.numpy(), (ff.numpy() if flip else None)

    return run


def _prefetch(it: Iterator, depth: int = 3) -> Iterator:
    """Run ``it`` in a daemon thread, ``depth`` items ahead; re-raise its errors here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    end = object()
    stop = threading.Event()

    def work():
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(exc)

    t = threading.Thread(target=work, daemon=True, name="featcache-reader")
    t.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


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
    resuming. Raises :class:`~pipeline.errors.FeatcacheError` subclasses on user errors.
    """
    import keras
    import tensorflow as tf

    t0 = time.perf_counter()
    cfg = config.resolved()
    spec = get_backbone(cfg.backbone)
    check_output(cfg.output_path)  # a folder there, or a read-only folder: refused before work
    ds = dataset or open_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                                 limit=cfg.limit, val_fraction=cfg.val_fraction, seed=cfg.seed,
                                 image_size=cfg.size)
    if not ds.splits or not any(ds.splits.values()):
        raise ConfigError(f"dataset {ds.name} has no images")
    log.info("fingerprinting dataset %s (%s)", ds.name,
             ", ".join(f"{k}: {v}" for k, v in ds.splits.items()))
    ds_sha = ds.fingerprint()
    log.info("building %s (weights: %s, %s)", spec.name, cfg.weights, cfg.precision)
    model = build_backbone(spec, weights=cfg.weights, pooling=cfg.pooling,
                           precision=cfg.precision, seed=cfg.seed)
    w_sha = weights_sha256(model)
    key = cfg.cache_key(dataset_sha256=ds_sha, weights_sha256=w_sha)
    dim = int(model.output_shape[-1])
    attrs = dict(key)
    attrs.update(
        config_sha256=config_sha256(key), batch_size=cfg.batch,
        tensorflow_version=tf.__version__, keras_version=keras.__version__,
        featcache_version=__version__, created_utc=datetime.now(timezone.utc).isoformat(),
        weights_source=str(cfg.weights), xla=cfg.xla,
    )
    attrs.update(ds.extra_attrs)
    ranges = {s: shard_range(n, cfg.batch, cfg.shard) for s, n in ds.splits.items()}
    if cfg.shard:
        attrs["shard"] = f"{cfg.shard[0]}/{cfg.shard[1]}"
        attrs["total_rows"] = [ds.splits[s] for s in ds.splits]
    specs = {s: SplitSpec(hi - lo, lo) for s, (lo, hi) in ranges.items()}
    path = cfg.output_path

    with FeatureWriter.open(path, attrs=attrs, classes=ds.classes, splits=specs, dim=dim,
                            dtype=cfg.dtype, flip=cfg.flip, force=cfg.force,
                            wait=cfg.wait) as writer:
        if writer.complete:
            return ExtractResult(path, 0, time.perf_counter() - t0, True, peak_rss_mb(),
                                 path.stat().st_size / 2**20)
        batch = int(writer.attrs.get("batch_size", cfg.batch))
        if batch != cfg.batch:
            log.info("resuming with the file's batch size %d (not %d) so batches line up",
                     batch, cfg.batch)
        step = make_step(model, size=cfg.size, mode=cfg.preprocess, flip=cfg.flip, xla=cfg.xla)
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
                for images, labels in _prefetch(ds.batches(split, start, hi, batch)):
                    feats, flipped = step(images)
                    writer.write(split, feats.astype(cfg.dtype, copy=False), labels,
                                 None if flipped is None else flipped.astype(cfg.dtype, copy=False))
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


def describe(config: ExtractConfig) -> dict:
    """The resolved settings of ``config`` as a dict (for ``featcache features --dry-run``)."""
    cfg = config.resolved()
    return {**vars(cfg), "output": str(cfg.output_path)}


