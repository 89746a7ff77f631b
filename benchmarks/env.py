"""The benchmark's fixed settings and what it found on this machine.

Reads: CIFAR-10 (``--data-dir``, ``$FEATCACHE_REAL_DATA``, ``data/``, ``../shared/data``),
the ImageNet weights (``$KERAS_HOME`` or ``../shared/keras``), ``/proc/cpuinfo`` and the
load average. Writes: a copy of the weights into ``<work_dir>/keras_home`` when it has to
make ``../shared/keras`` writable for Keras, and nothing else.

Everything a number depends on is a field of :class:`Settings`, and all of it is printed
in the report, so two runs can be compared setting by setting.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from featcache._util import paths

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def default_feature_file() -> Path:
    """The real full-CIFAR-10 feature file stage two is timed on when it exists: the one
    ``make features`` writes with its defaults on this machine (the name carries the
    runtime, precision and cut that ``auto`` resolves to here)."""
    from featcache.config import ExtractConfig
    return ROOT / ExtractConfig().output_path


@dataclass(frozen=True)
class Settings:
    """Every setting of one benchmark run. ``quick()`` / ``full()`` are the two presets."""

    mode: str                      # "full" | "quick"
    backbone: str = "mobilenet_v2"
    size: int = 224                # featcache's input size (and the tutorial model's)
    tutorial_size: int = 32        # the tutorial's own input size
    batch: int = 64
    epochs: int = 10               # the dense head, both ways
    hidden: int = 1024             # Dense(hidden) -> Dense(classes), the tutorial's head
    seed: int = 0
    n_train: int = 2000            # section 1: first rows of each split
    n_test: int = 1000
    tp_images: int = 1280          # section 2: images per pipeline repetition
    tp_reps: int = 3               # A/B rounds
    tp_warmup: int = 2             # batches excluded from the steady-state window
    matmul_n: int = 4096
    matmul_reps: int = 2           # matmuls timed per round
    rt_images: int = 1024          # section 6: images per pipeline repetition (with mirrors)
    rt_reps: int = 2               # section 6: alternating rounds over the runtimes (and 8)
    pr_images: int = 1000          # section 8: image files `featcache predict` classifies
    pr_train: int = 1000           # section 8: training images the exported head is fitted on
    ft_head_epochs: int = 1        # section 9: phase 1 (the head alone), both ways
    ft_top_epochs: int = 2         # section 9: phase 2 (the top blocks and the head), both ways
    #: section 3: (input size, --limit per split) runs, consecutive pairs compared
    rss_runs: tuple = ((224, 500), (224, 2500), (32, 2500), (32, None))
    stage2_feature_file: str | None = None  # None: section 1's own feature file
    # what was found (filled by resolve())
    dataset: str = "cifar10"       # cifar10 | synthetic
    data_dir: str = ""
    weights: str = "imagenet"      # imagenet | none
    work_dir: str = "bench-out"
    notes: tuple = field(default_factory=tuple)

    @classmethod
    def full(cls, **kw) -> "Settings":
        return cls(mode="full", **kw)

    @classmethod
    def quick(cls, **kw) -> "Settings":
        base = dict(mode="quick", size=64, n_train=128, n_test=64, tp_images=384, tp_reps=2,
                    rt_images=256, rt_reps=1, pr_images=64, pr_train=128,
                    matmul_n=1024, matmul_reps=3, rss_runs=((64, 50), (64, 200)))
        base.update(kw)
        return cls(**base)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["notes"] = list(self.notes)
        d["rss_runs"] = [list(r) for r in self.rss_runs]
        return d


# ---------------------------------------------------------------------------- discovery

def find_cifar10(explicit: str | None) -> Path | None:
    """A folder holding ``cifar-10-batches-py`` (or being it): explicit, env, data/, ../shared
    (:func:`featcache._util.paths.find_cifar10`)."""
    return paths.find_cifar10(explicit, root=ROOT)


def find_weights(backbone_file: str, work_dir: Path) -> Path | None:
    """A writable KERAS_HOME holding ``models/<backbone_file>``; sets ``$KERAS_HOME``
    (:func:`featcache._util.paths.keras_home`: a copy from ``../shared/keras`` goes into
    ``<work_dir>/keras_home``, so Keras never writes into the shared folder)."""
    return paths.keras_home(backbone_file, work_dir=work_dir, root=ROOT)


def resolve(s: Settings, *, data_dir: str | None, dataset: str | None,
            weights: str | None, feature_file: str | None) -> Settings:
    """Fill in what was found; every fallback becomes a loud note in the report."""
    from featcache.backbones.registry import get_backbone

    notes = list(s.notes)
    work = Path(s.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    found = None if dataset == "synthetic" else find_cifar10(data_dir)
    if found is None:
        ds, dd = "synthetic", ""
        if dataset != "synthetic":
            notes.append("REAL CIFAR-10 NOT FOUND: the synthetic dataset was used instead; "
                         "accuracies are not CIFAR-10 accuracies.")
    else:
        ds, dd = "cifar10", str(found)

    spec = get_backbone(s.backbone)
    w = weights or "imagenet"
    if w == "imagenet" and find_weights(spec.weights_file, work) is None:
        w = "none"
        notes.append(f"IMAGENET WEIGHTS FOR {s.backbone} NOT FOUND (KERAS_HOME, ../shared/keras): "
                     f"random weights were used; timings hold, accuracies are meaningless.")
    elif w == "none":
        notes.append("random weights (--weights none): timings hold, accuracies are meaningless.")

    ff, default_ff = feature_file, default_feature_file()
    if ff is None and s.mode == "full" and default_ff.is_file():
        ff = str(default_ff)
    if ff is None and s.mode == "full":
        notes.append(f"{default_ff.relative_to(ROOT)} not found (run `make features`): "
                     f"stage two was timed on section 1's small feature file instead.")
    rss = s.rss_runs
    if ds == "synthetic":  # 160 images in all: the two sizes are 40 and 160 images
        rss = tuple(r for size in dict.fromkeys(r[0] for r in rss)
                    for r in ((size, 20), (size, None)))
    return replace(s, dataset=ds, data_dir=dd, weights=w, stage2_feature_file=ff,
                   rss_runs=rss, notes=tuple(notes))


# ---------------------------------------------------------------------------- machine

def device() -> dict:
    """The device TensorFlow runs the backbone on (a visible GPU is used automatically)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        try:
            name = tf.config.experimental.get_device_details(gpus[0]).get("device_name",
                                                                          gpus[0].name)
        except Exception:  # noqa: BLE001 - details are optional
            name = gpus[0].name
        return {"kind": "GPU", "name": str(name), "count": len(gpus)}
    return {"kind": "CPU", "name": cpu_model(), "count": os.cpu_count() or 1}


def cpu_model() -> str:
    """The CPU's model name plus its widest vector/matrix extensions (AVX-512, AMX…)."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [label for flag, label in (("avx2", "AVX2"), ("avx512f", "AVX-512"),
                                     ("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX"))
           if flag in flags]
    name = name or platform.processor() or platform.machine()
    return f"{name} ({', '.join(isa)})" if isa else name


def machine() -> dict:
    import h5py
    import keras
    import numpy as np
    import sklearn
    import tensorflow as tf

    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 0.0
    return {
        "host": platform.node(), "cpu": cpu_model(), "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1), "os": platform.platform(terse=True),
        "python": platform.python_version(), "tensorflow": tf.__version__,
        "keras": keras.__version__, "numpy": np.__version__, "sklearn": sklearn.__version__,
        "h5py": h5py.__version__, "device": device(),
    }


def load() -> list[float]:
    """The 1/5/15-minute load averages (how busy the machine was)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def open_subset(s: Settings, splits: dict[str, int]):
    """The dataset of ``s`` cut to the first ``splits[name]`` rows of each named split.

    Real CIFAR-10 when it was found, else the synthetic set with 10 classes (same seed).
    """
    from featcache.data.datasets import Synthetic, open_dataset

    if s.dataset == "cifar10":
        ds = open_dataset("cifar10", data_dir=s.data_dir, download=False)
    else:
        ds = Synthetic(n_train=splits.get("train", 0), n_test=splits.get("test", 0),
                       n_classes=10, seed=s.seed)
    full = dict(ds.splits)
    ds.splits = {k: min(int(n), full[k]) for k, n in splits.items()}
    return ds
