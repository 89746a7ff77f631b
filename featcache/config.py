"""Frozen settings for each stage, and the one place output paths are derived.

Reads nothing but an image folder's listing (``--precision auto`` counts its images:
:mod:`featcache.data.sizes`), writes nothing, imports no TensorFlow (the Makefile asks it
for paths before any virtualenv exists).

File names: ``<out_dir>/<dataset>_<backbone>_<size>[_<variant>].h5``. When no variant is
given, every setting that changes the numbers and differs from its default is spelled into
the variant (``scale01``, ``ov``, ``bf16``, ``f16``, ``flip``, ``n5000``…), so different
configurations land in different files and the cache key check only has to catch what a
name cannot show (changed data, changed weights, another runtime version). The runtime is
spelled as resolved: ``ov`` for OpenVINO, nothing for TensorFlow (so files made before
runtimes existed keep their names), and ``bf16`` is the precision of either runtime
(OpenVINO's ``bf16``, TensorFlow's ``mixed_bfloat16``); ``--runtime``/``--precision auto``
are resolved cheaply (:mod:`featcache.backbones.runtime`) so naming still needs no TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from featcache._util import settings
from featcache._util.settings import setting
from featcache.backbones.cut import check_cut_name
from featcache.backbones.registry import (
    AUTO_CUT,
    BACKBONES,
    POOLINGS,
    PREPROCESS_MODES,
    get_backbone,
    resolve_cut,
    weights_tag,
)
from featcache.backbones.runtime import (
    DEFAULT_PRECISION,
    DEFAULT_RUNTIME,
    INT8_AUTO_MIN_IMAGES,
    PRECISIONS,
    RUNTIMES,
    resolve_precision,
    resolve_runtime,
)
from featcache.data.sizes import count_images
from featcache.errors import ConfigError

DEFAULT_BACKBONE = "mobilenet_v2"
DEFAULT_BATCH = 64
FEATURE_DTYPES = ("float32", "float16")
#: where stage one runs (``--engine``)
ENGINES = ("local", "ray")
#: The largest input size (px) stage one accepts: one 1024-px float32 image through a
#: backbone already takes ~0.2 GiB of activations; 10,000 px took 4.7 GiB for one image.
MAX_SIZE = 1024
#: Upper bounds of the numeric settings (``bounds`` in the table): a value past them is a
#: typo, not a request (a batch of 10^8 images, 10^5 threads or workers).
MAX_BATCH = 4096
MAX_THREADS = 1024
MAX_SEED = 2 ** 32 - 1
MAX_PIXELS = 10 ** 10


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


#: a shard's part file: ``<stem>.part<i>of<n>.h5``
PART_RE = re.compile(r"^(?P<stem>.+)\.part(?P<i>\d+)of(?P<n>\d+)\.h5$")


def part_path(base: str | Path, shard: tuple[int, int]) -> Path:
    """``x.h5`` and shard (i, n) -> ``x.part<i>of<n>.h5`` (same folder)."""
    base = Path(base)
    i, n = shard
    return base.with_name(f"{base.stem}.part{int(i)}of{int(n)}.h5")


def parse_part(path: str | Path) -> tuple[Path, int, int] | None:
    """``x.part1of4.h5`` -> (``x.h5``, 1, 4); None when ``path`` is not named like a part."""
    p = Path(path)
    m = PART_RE.match(p.name)
    if not m:
        return None
    return p.with_name(m["stem"] + ".h5"), int(m["i"]), int(m["n"])


def data_dir_setting(help: str):
    """The ``--data-dir`` setting, one declaration for both stages: stage one reads (or
    downloads) CIFAR-10 there, stage two's ``mistakes.png`` reads the images of a CIFAR-10
    file's mistakes there (a feature file stores no paths). Same default, environment
    variable and Makefile variable (``DATA_DIR``) for both."""
    return setting("data", env="FEATCACHE_DATA_DIR", make="DATA_DIR", help=help)


VARIANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def check_names(cfg) -> None:
    """Refuse an empty ``--dataset`` (it used to read the current folder), an ``--output``
    without ``.h5`` (its report folder would be the file itself) and a ``--variant`` that is
    not a plain file-name part (``../../x`` wrote outside ``--out-dir``)."""
    if not str(cfg.dataset).strip():
        raise ConfigError("--dataset is empty; give cifar10, synthetic or the path of an "
                          "image folder (one sub-folder per class; `.` for this folder)")
    if cfg.output and not str(cfg.output).endswith(".h5") and not Path(cfg.output).is_dir():
        raise ConfigError(f"--output {cfg.output!r} must be a file name ending in .h5 (its "
                          f"report folder is the same name without it)")
    if cfg.variant is not None and cfg.variant != "" and not VARIANT_RE.match(cfg.variant):
        raise ConfigError(f"--variant {cfg.variant!r} must be a plain file-name part "
                          f"(letters, digits, . _ + -, not starting with . or -)")


@dataclass(frozen=True)
class ExtractConfig:
    """Stage one's settings: the settings table's first half (:mod:`featcache._util.settings`).

    Each field's default is THE default (the CLI and the Makefile pass nothing when not
    told). ``resolved()`` fills the backbone's defaults and validates, once: it returns a
    :class:`ResolvedExtractConfig`, whose ``resolved()`` is itself."""

    def __post_init__(self):
        settings.check_bounds(self, ConfigError)   # every numeric setting, wherever set
        check_names(self)

    dataset: str = setting(
        "cifar10", env="FEATCACHE_DATASET", make="DATASET", key=True, to_key=dataset_name,
        companion="dataset_sha256",
        help="cifar10, synthetic, or a folder with one sub-folder per class")
    data_dir: str = data_dir_setting("where cifar-10-batches-py is (or is downloaded to)")
    backbone: str = setting(
        DEFAULT_BACKBONE, choices=lambda: sorted(BACKBONES), metavar="NAME", make="BACKBONE",
        key=True, help="the pretrained network")
    size: int | None = setting(
        None, type=int, make="SIZE", key=True, attr="image_size",
        help="input size in px the images are resized to (default: the backbone's own; "
             "the file attribute image_size)")
    batch: int = setting(DEFAULT_BATCH, make="BATCH", bounds=(1, MAX_BATCH),
                         help="images per forward pass")
    weights: str = setting(
        "imagenet", make="WEIGHTS", key=True, to_key=weights_tag, companion="weights_sha256",
        help="imagenet (Keras cache / KERAS_HOME), none (random), or a .h5 path")
    preprocess: str | None = setting(
        None, choices=lambda: sorted(PREPROCESS_MODES), make="PREPROCESS", key=True,
        help="override the backbone's own preprocessing (scale01 = the tutorial's /255; "
             "default: the backbone's)")
    pooling: str = setting("avg", choices=POOLINGS, make="POOLING", key=True,
                           help="how the last feature map becomes one vector")
    dtype: str = setting("float32", choices=FEATURE_DTYPES, make="DTYPE", key=True,
                         help="stored feature dtype")
    runtime: str = setting(
        DEFAULT_RUNTIME, choices=RUNTIMES, make="RUNTIME", key=True,
        companion="runtime_version",
        help="what runs the backbone: auto = openvino on a CPU, tensorflow when a GPU is "
             "visible")
    precision: str = setting(
        DEFAULT_PRECISION, choices=PRECISIONS, make="PRECISION", key=True,
        help="auto = with openvino, int8 on a CPU with VNNI/AMX, else "
             "bf16 on a CPU with AVX512-BF16/AMX, else float32; bf16, int8 (openvino; int8 = "
             "the graph quantized by NNCF, calibrated on training images), mixed_bfloat16 / "
             "mixed_float16 (tensorflow Keras policies)")
    calibration: int = setting(
        300, make="CALIBRATION", key=True, key_when=lambda c: c.precision == "int8",
        bounds=(1, 100_000),
        help="--precision int8: how many training images (never test ones; drawn with "
             "--seed) calibrate the quantization")
    flip: bool = setting(
        True, make="FLIP", key=True,
        help="stage one's yes/no: also store the features of horizontally mirrored images "
             "(files get _flip; stage two's --flip MODE chooses how rows use them); "
             "--no-flip stores plain features only (half the time)")
    xla: bool = setting(False, help="compile the forward pass with XLA (tensorflow runtime)")
    limit: int | None = setting(None, type=int, make="LIMIT", key=True, bounds=(1, 10 ** 9),
                                to_key=lambda n: n or 0, help="at most N images per split")
    test_fraction: float = setting(
        0.2, aliases=("--val-fraction",), key=True, bounds=(0, 1, "open"),
        help="image folders without train/ and test/: the stratified TEST share (not stage "
             "two's validation share)")
    seed: int = setting(0, key=True, bounds=(0, MAX_SEED),
                        help="seed of an image folder's train/test split (and of the "
                             "int8 calibration sample)")
    # The size policy for large images (featcache.data.imagefiles.decode_scaled). Not in the
    # cache key: an image it changes is marked in the folder's fingerprint (dataset_sha256).
    reduce_pixels: int = setting(
        25_000_000, bounds=(1, MAX_PIXELS), metavar="N",
        help="image folders: an image of more pixels than this (a 48-megapixel photo, not a "
             "24-megapixel one) is decoded reduced (JPEG: Pillow's draft mode while decoding; "
             "other formats: Image.reduce) by the largest whole factor that keeps its "
             "shorter side a few times --size (REDUCE_TO in featcache/data/imagefiles.py), "
             "then resized as usual: a fraction of the memory, about the same pixels")
    max_pixels: int = setting(
        150_000_000, bounds=(1, MAX_PIXELS), metavar="N",
        help="image folders: an image of more pixels than this is skipped, with one warning, "
             "and listed in the feature file's skipped_files (Pillow itself opens at most "
             "twice its Image.MAX_IMAGE_PIXELS)")
    cut: str | None = setting(
        AUTO_CUT, make="CUT", key=True, key_if_set=True, metavar="BLOCK",
        help="also store float16 activations after this block (and mirrored), so the "
             "finetune head trains from the same file as the frozen heads (`featcache cuts "
             "BACKBONE` lists the blocks); auto: the backbone's recommended cut where its "
             "activations are small (mobilenet_v2: block_13), else none; recommended: the "
             "recommended cut whatever its size; none: pooled features only")
    out_dir: str = setting("features", make="OUT_DIR", help="where feature files go")
    variant: str | None = setting(
        None, make="VARIANT", help="file name suffix (default: derived from the non-default "
                                   "settings)")
    output: str | None = setting(None, help="explicit output path (overrides naming)")
    shard: tuple[int, int] | None = setting(
        None, type=str, parse=parse_shard, metavar="I/N",
        help="extract only the i-th of n slices (then `featcache merge`)")
    download: bool = setting(True, flag="--no-download", help="never try to download data")
    force: bool = setting(False, help="rebuild a feature file made with another "
                                      "configuration")
    wait: bool = setting(False, help="wait for another process writing the same file "
                                     "instead of refusing")
    threads: int | None = setting(None, type=int, bounds=(1, MAX_THREADS),
                                  help="OpenVINO inference threads (default: all cores)")
    engine: str = setting(
        "local", choices=ENGINES,
        help="local: this process; ray: --shards parts as Ray tasks, then one merge (the "
             "same file, bit for bit)")
    shards: int = setting(2, bounds=(1, 4096), help="with --engine ray: how many parts")
    ray_address: str | None = setting(
        None, help="with --engine ray: a running cluster (auto, ray://host:10001, "
                   "host:6379; default: a local one-node cluster)")

    def resolved(self) -> "ResolvedExtractConfig":
        """Backbone defaults filled in and every value checked (a one-line ConfigError)."""
        spec = get_backbone(self.backbone)
        # None (not given) means the backbone's default; 0 is a bad size like any other
        size = spec.default_size if self.size is None else check_size(self.size, self.backbone)
        pre = self.preprocess or spec.preprocess
        if pre not in PREPROCESS_MODES:
            raise ConfigError(f"unknown preprocessing {pre!r}; choose one of "
                              f"{', '.join(PREPROCESS_MODES)}")
        runtime = resolve_runtime(self.runtime)
        cut = resolve_cut(self.cut, self.backbone,
                          sharded=self.shard is not None or self.engine == "ray")
        precision = resolve_precision(
            self.precision, runtime,
            images=lambda: count_images(self.dataset, limit=self.limit,
                                        stop_at=INT8_AUTO_MIN_IMAGES))
        if self.xla and runtime != "tensorflow":
            raise ConfigError("--xla compiles TensorFlow's graph; it needs --runtime tensorflow")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {self.pooling!r}; choose one of {POOLINGS}")
        if self.dtype not in FEATURE_DTYPES:
            raise ConfigError(f"--dtype must be float32 or float16, not {self.dtype!r}")
        if self.batch < 1:
            raise ConfigError(f"--batch must be at least 1, not {self.batch}")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, not "
                              f"{self.engine!r}")
        if self.shards < 1:
            raise ConfigError(f"--shards must be at least 1, not {self.shards}")
        check_cut_name(cut, self.backbone, self.shard)
        values = {**{f.name: getattr(self, f.name) for f in fields(self)},
                  "size": size, "preprocess": pre, "runtime": runtime, "precision": precision,
                  "cut": cut}
        return ResolvedExtractConfig(**values)

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
                          "bf16": "bf16", "int8": "int8"}[self.precision])
        if self.precision == "int8" and self.calibration != _default("calibration"):
            parts.append(f"cal{self.calibration}")
        if self.dtype != "float32":
            parts.append("f16")
        if self.flip:
            parts.append("flip")
        if self.limit:
            parts.append(f"n{self.limit}")
        if self.cut:
            parts.append(f"cut-{self.cut}")
        return "_".join(parts)

    @property
    def stem(self) -> str:
        cfg = self.resolved()  # itself when already resolved
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
            return part_path(base, self.shard)
        return base

    @property
    def merged_path(self) -> Path:
        """Where the shards of this configuration are merged to."""
        return replace(self, shard=None).output_path

    # -- cache key ----------------------------------------------------------------------
    def cache_key(self, *, dataset_sha256: str, weights_sha256: str,
                  runtime_version: str | None) -> dict:
        """Everything that changes the numbers (batch size, XLA, paths do not): the table's
        ``key`` settings (:func:`cache_key_fields`), with their measured companions.

        ``runtime_version=None`` gives the key of files made before runtimes were recorded
        (no ``runtime``/``runtime_version``): a TensorFlow run still accepts those.
        """
        return settings.cache_key(self.resolved(), {
            "dataset_sha256": dataset_sha256, "weights_sha256": weights_sha256,
            "runtime_version": runtime_version})


@dataclass(frozen=True)
class ResolvedExtractConfig(ExtractConfig):
    """An :class:`ExtractConfig` after ``resolved()``: size, preprocessing, runtime and
    precision are concrete. Change only paths, shard or flags with ``replace()`` on it."""

    def resolved(self) -> "ResolvedExtractConfig":
        return self


def _default(name: str, cls=None):
    """The table's default of setting ``name`` (of :class:`ExtractConfig` unless ``cls``)."""
    return next(f.default for f in fields(cls or ExtractConfig) if f.name == name)


def cache_key_fields() -> tuple[str, ...]:
    """The file attributes that make up the cache key, in order (stage one's ``key``
    settings, each followed by its measured companion): the list the stale-file message,
    ``featcache info``, the report header and the merge check use."""
    return settings.key_fields(ExtractConfig)


def provenance_fields() -> tuple[str, ...]:
    """What a report header and an exported model's metadata show of a feature file."""
    return (*cache_key_fields(), "config_sha256", "created_utc")


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


def parse_heads(text) -> tuple[str, ...]:
    """``"logreg, knn"`` (or a sequence) -> ``("logreg", "knn")``; ``None`` -> ``()`` (the
    registry's defaults). A text that names no head is a one-line error."""
    if text is None:
        return ()
    if not isinstance(text, str):
        return tuple(text)
    heads = tuple(h for h in text.replace(" ", "").split(",") if h)
    if not heads:
        raise ConfigError(f"--heads {text!r} names no head; give comma-separated names "
                          f"(`featcache heads --list` shows them), or leave --heads out for "
                          f"the defaults")
    return heads


FLIP_MODES = ("auto", "off", "train", "tta", "both")

#: the longest time budget (``--budget``) taken: a week, in seconds
MAX_BUDGET_S = 7 * 24 * 3600
_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text) -> float | None:
    """``"90s"``, ``"30m"``, ``"1h"``, ``"1h30m"`` (or a number of seconds) -> seconds;
    ``None``/empty -> ``None`` (no budget). Anything else is a one-line error with an
    example; the range is the setting's ``bounds``."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    t = str(text).strip().lower().replace(" ", "")
    m = _DURATION_RE.match(t)
    if re.fullmatch(r"\d+(?:\.\d+)?", t):
        return float(t)
    if not t or m is None or not any(m.groups()):
        raise ConfigError(f"--budget takes a duration such as 30m, 90s, 1h or 1h30m (BUDGET=30m "
                          f"for make), not {text!r}")
    h, mins, sec = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mins * 60 + sec


def format_duration(seconds: float) -> str:
    """Seconds as ``1h30m``, ``30m``, ``1m30s``, ``90s``-style text (the report's budget)."""
    total = int(round(float(seconds)))
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v) or "0s"


@dataclass(frozen=True)
class HeadsConfig:
    """Stage two's settings: the settings table's second half (:mod:`featcache._util.settings`)."""

    def __post_init__(self):
        if isinstance(self.budget, str):          # the notebook's budget="30m"
            object.__setattr__(self, "budget", parse_duration(self.budget))
        settings.check_bounds(self, ConfigError)   # every numeric setting, wherever set

    feature_file: str = setting(positional=True, help="a complete feature file (.h5)")
    heads: tuple[str, ...] = setting(
        (), type=str, parse=parse_heads, make="HEADS",
        help="comma-separated heads (default: the registry's defaults; `featcache heads "
             "--list` shows them)")
    val_fraction: float = setting(
        0.1, bounds=(0, 1, "open"),
        help="stratified share of the training rows held out for selection "
             "(validation; not stage one's --test-fraction)")
    cv_below: int = setting(
        100, bounds=(0, 10 ** 9),
        help="k-fold cross-validation instead of the single validation split when that "
             "split would hold fewer than this many rows of the smallest class (0: "
             "always the single split; docs/stage-two.md, \"Selection on small data\")")
    cv_folds: int = setting(5, bounds=(2, 100), help="folds of the k-fold cross-validation")
    cv_repeats: int | None = setting(
        None, type=int, bounds=(1, 100),
        help="repeats of the k-fold, each a new shuffle (default: 3 below 1,000 training "
             "rows, else 1)")
    seed: int = setting(0, bounds=(0, MAX_SEED),
                        help="seed of the validation split and of the heads")
    flip: str = setting(
        "auto", choices=FLIP_MODES,
        help="stage two's mode (stage one's --flip only stores mirrored features): which "
             "rows use them; auto = a '<head>+flip' row (train on plain+mirrored, average "
             "both at test) when the file has them; off, train, tta, both")
    out_dir: str | None = setting(
        None, help="report folder (default: features/<stem>/ beside the feature file)")
    data_dir: str = data_dir_setting(
        "where cifar-10-batches-py is, for the images of mistakes.png (as in stage one; image "
        "folders are found by the file's source_dir)")
    workers: int | None = setting(
        None, type=int, bounds=(0, MAX_THREADS), make="WORKERS",
        help="worker processes, one thread each (default: the cores available to this "
             "process; 0: everything in this process, one row after another); any count "
             "gives the same results")
    budget: float | None = setting(
        None, type=str, parse=parse_duration, make="BUDGET", metavar="DURATION",
        bounds=(1, MAX_BUDGET_S),
        help="time budget of each fit of a head that takes one (finetune): 90s, 30m, 1h, "
             "1h30m; its phase-2 epochs are planned from the first steps' throughput so "
             "the fit, learning-rate schedule and all, ends within it (default: none, the "
             "head's own epochs)")
    search: str = setting(
        "fast", choices=SEARCH_MODES,
        help="fast: stop a C path once validation accuracy falls, keep the early-stopped "
             "dense model; exhaustive: every grid point, every head refit")

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


def with_settings(config, **settings):
    """``config`` (an :class:`ExtractConfig` or :class:`HeadsConfig`) with ``settings`` (its
    field names, as the notebook API takes them) on top; an unknown name is a one-line
    error listing the known ones. ``heads`` may be a comma-separated string."""
    known = {f.name for f in fields(config)} - {"feature_file"}
    unknown = sorted(set(settings) - known)
    if unknown:
        stage = "stage-one" if isinstance(config, ExtractConfig) else "stage-two"
        raise ConfigError(f"unknown {stage} setting {', '.join(map(repr, unknown))}; the "
                          f"settings are {', '.join(sorted(known))} (`featcache settings` "
                          f"says what each does)")
    if isinstance(settings.get("heads"), str):
        settings["heads"] = parse_heads(settings["heads"])
    return replace(config, **settings) if settings else config
