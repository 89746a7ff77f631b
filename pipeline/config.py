"""Frozen settings for each stage, and the one place output paths are derived.

Reads nothing, writes nothing, imports no TensorFlow (the Makefile asks it for paths
before any virtualenv exists).

File names: ``<out_dir>/<dataset>_<backbone>_<size>[_<variant>].h5``. When no variant is
given, every setting that changes the numbers and differs from its default is spelled into
the variant (``scale01``, ``ov``, ``bf16``, ``f16``, ``flip``, ``n5000``…), so different
configurations land in different files and the cache key check only has to catch what a
name cannot show (changed data, changed weights, another runtime version). The runtime is
spelled as resolved: ``ov`` for OpenVINO, nothing for TensorFlow (so files made before
runtimes existed keep their names), and ``bf16`` is the precision of either runtime
(OpenVINO's ``bf16``, TensorFlow's ``mixed_bfloat16``); ``--runtime``/``--precision auto``
are resolved cheaply (:mod:`pipeline.runtime`) so naming still needs no TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .backbones import PREPROCESS_MODES, POOLINGS, get_backbone, weights_tag
from .errors import ConfigError
from .runtime import DEFAULT_PRECISION, DEFAULT_RUNTIME, resolve_precision, resolve_runtime

DEFAULT_BACKBONE = "mobilenet_v2"
DEFAULT_BATCH = 64
#: The largest input size (px) stage one accepts: one 1024-px float32 image through a
#: backbone already takes ~0.2 GiB of activations; 10,000 px took 4.7 GiB for one image.
MAX_SIZE = 1024


def check_size(size, backbone: str) -> int:
    """``size`` as an int if ``backbone`` can run at it (its minimum .. ``MAX_SIZE``), else a
    one-line :class:`ConfigError` that says the limits. The one home of the size rule."""
    spec = get_backbone(backbone)
    try:
        value = operator.index(size)  # ints (numpy's too); not floats, strings or None
    except TypeError:
        value = None
    if value is None or not spec.min_size <= value <= MAX_SIZE:
        raise ConfigError(f"--size {size} is out of range: {backbone} needs at least "
                          f"{spec.min_size} px and featcache takes at most {MAX_SIZE} px")
    return value


def dataset_name(spec: str) -> str:
    """The short name used in file names: a registry name as is, a folder's base name."""
    if os.sep in spec or os.path.isdir(spec):
        return Path(spec).resolve().name.replace(" ", "_") or "folder"
    return spec


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    if text in (None, ""):
        return None
    try:
        i, n = (int(p) for p in str(text).split("/"))
    except ValueError:
        raise ConfigError(f"--shard takes i/n (e.g. 0/4), not {text!r}") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard {text}: need 0 <= i < n")
    return i, n


@dataclass(frozen=True)
class ExtractConfig:
    """Stage one's settings. ``resolved()`` fills backbone defaults and validates."""

    dataset: str = "cifar10"
    data_dir: str = "data"
    backbone: str = DEFAULT_BACKBONE
    size: int | None = None          # None: the backbone's default size
    batch: int = DEFAULT_BATCH
    weights: str = "imagenet"        # imagenet | none | path
    preprocess: str | None = None    # None: the backbone's own
    pooling: str = "avg"
    dtype: str = "float32"           # stored feature dtype
    runtime: str = DEFAULT_RUNTIME   # auto | tensorflow | openvino
    precision: str = DEFAULT_PRECISION  # auto | float32 | bf16 (OpenVINO) | mixed_* (Keras)
    flip: bool = False
    xla: bool = False
    limit: int | None = None         # at most this many rows per split
    val_fraction: float = 0.2        # image folders without test/: stratified test share
    seed: int = 0
    out_dir: str = "features"
    variant: str | None = None
    output: str | None = None        # explicit path overrides out_dir/variant naming
    shard: tuple[int, int] | None = None
    download: bool = True
    force: bool = False
    wait: bool = False
    threads: int | None = None       # OpenVINO inference threads (None: all cores)

    def resolved(self) -> "ExtractConfig":
        spec = get_backbone(self.backbone)
        # None (not given) means the backbone's default; 0 is a bad size like any other
        size = spec.default_size if self.size is None else check_size(self.size, self.backbone)
        pre = self.preprocess or spec.preprocess
        if pre not in PREPROCESS_MODES:
            raise ConfigError(f"unknown preprocessing {pre!r}; choose one of "
                              f"{', '.join(PREPROCESS_MODES)}")
        runtime = resolve_runtime(self.runtime)
        precision = resolve_precision(self.precision, runtime)
        if self.xla and runtime != "tensorflow":
            raise ConfigError("--xla compiles TensorFlow's graph; it needs --runtime tensorflow")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {self.pooling!r}; choose one of {POOLINGS}")
        if self.dtype not in ("float32", "float16"):
            raise ConfigError(f"--dtype must be float32 or float16, not {self.dtype!r}")
        if self.batch < 1:
            raise ConfigError(f"--batch must be at least 1, not {self.batch}")
        return replace(self, size=size, preprocess=pre, runtime=runtime, precision=precision)

    @property
    def keras_precision(self) -> str:
        """The Keras dtype policy the backbone is built with (OpenVINO converts float32)."""
        return self.precision if self.runtime == "tensorflow" else "float32"

    # -- naming -------------------------------------------------------------------------
    def auto_variant(self) -> str:
        """The settings that differ from the defaults, as a file-name suffix."""
        spec = get_backbone(self.backbone)
        parts = []
        if self.preprocess and self.preprocess != spec.preprocess:
            parts.append(self.preprocess)
        if self.pooling != "avg":
            parts.append(f"{self.pooling}pool")
        if self.weights != "imagenet":
            parts.append("random" if self.weights == "none" else weights_tag(self.weights))
        if self.runtime == "openvino":
            parts.append("ov")
        if self.precision != "float32":
            parts.append({"mixed_bfloat16": "bf16", "mixed_float16": "mf16",
                          "bf16": "bf16"}[self.precision])
        if self.dtype != "float32":
            parts.append("f16")
        if self.flip:
            parts.append("flip")
        if self.limit:
            parts.append(f"n{self.limit}")
        return "_".join(parts)

    @property
    def stem(self) -> str:
        cfg = self.resolved()
        variant = self.variant if self.variant is not None else cfg.auto_variant()
        name = f"{dataset_name(cfg.dataset)}_{cfg.backbone}_{cfg.size}"
        return f"{name}_{variant}" if variant else name

    @property
    def output_path(self) -> Path:
        if self.output:
            base = Path(self.output)
        else:
            base = Path(self.out_dir) / f"{self.stem}.h5"
        if self.shard:
            from .merge import part_path  # merge owns the part-file name
            return part_path(base, self.shard)
        return base

    @property
    def merged_path(self) -> Path:
        """Where the shards of this configuration are merged to."""
        return replace(self, shard=None).output_path

    # -- cache key ----------------------------------------------------------------------
    def cache_key(self, *, dataset_sha256: str, weights_sha256: str,
                  runtime_version: str | None) -> dict:
        """Everything that changes the numbers (batch size, XLA, paths do not).

        ``runtime_version=None`` gives the key of files made before runtimes were recorded
        (no ``runtime``/``runtime_version``): a TensorFlow run still accepts those.
        """
        cfg = self.resolved()
        runtime = {} if runtime_version is None else {"runtime": cfg.runtime,
                                                      "runtime_version": runtime_version}
        return {**runtime,
            "dataset": dataset_name(cfg.dataset), "dataset_sha256": dataset_sha256,
            "backbone": cfg.backbone, "weights": weights_tag(cfg.weights),
            "weights_sha256": weights_sha256, "image_size": cfg.size,
            "preprocess": cfg.preprocess, "pooling": cfg.pooling, "dtype": cfg.dtype,
            "precision": cfg.precision, "flip": cfg.flip, "limit": cfg.limit or 0,
            "val_fraction": cfg.val_fraction, "seed": cfg.seed,
        }


def config_sha256(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


SEARCH_MODES = ("fast", "exhaustive")


def default_workers() -> int:
    """Stage two's default number of worker processes: the cores this process may run on
    (``os.sched_getaffinity``; a container's or ``taskset``'s limit counts). The one place
    that default is decided (the CLI and the Makefile pass nothing when not told)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class HeadsConfig:
    """Stage two's settings."""

    feature_file: str
    heads: tuple[str, ...] = ()       # empty: the registry's defaults
    val_fraction: float = 0.1
    seed: int = 0
    flip: str = "auto"                # auto | off | train | tta | both
    out_dir: str | None = None        # None: features/<stem>/ beside the feature file
    workers: int | None = None        # None: default_workers(); 0: in this process, serially
    search: str = "fast"              # fast | exhaustive (every grid point, dense refit)

    @property
    def n_workers(self) -> int:
        """The worker count to use (``workers``, else :func:`default_workers`)."""
        if self.workers is None:
            return default_workers()
        if int(self.workers) < 0:
            raise ConfigError(f"--workers must be 0 or more, not {self.workers}")
        return int(self.workers)

    @property
    def report_dir(self) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        p = Path(self.feature_file)
        return p.with_suffix("")

    def to_dict(self) -> dict:
        return asdict(self)
