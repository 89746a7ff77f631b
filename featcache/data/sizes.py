"""How many images a data set holds, told without opening it: the split sizes of the
registered data sets (:data:`KNOWN_SPLITS`, filled by ``register_dataset``), and a count of
an image folder's files (:func:`count_images`). ``--precision auto`` asks it while a file
is named (the Makefile names files with the system Python, so this module imports nothing
beyond the standard library).

Reads the listing of an image folder (no file opened, no link followed); writes nothing.
"""

from __future__ import annotations

import os

from featcache.errors import ConfigError

#: the file name suffixes of image files (any case)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
#: CIFAR-10's official split
CIFAR10_SPLITS = {"train": 50000, "test": 10000}
#: the generated ``synthetic`` data set's split (tests, ``make bench --quick``)
SYNTHETIC_SPLITS = {"train": 120, "test": 40}
#: rows per split of each registered data set that says them (``register_dataset``)
KNOWN_SPLITS: dict[str, dict[str, int]] = {"cifar10": CIFAR10_SPLITS,
                                           "synthetic": SYNTHETIC_SPLITS}


def limited(splits: dict[str, int], limit: int | None) -> dict[str, int]:
    """``splits`` with at most ``limit`` rows in each (``--limit``)."""
    if limit is None:
        return dict(splits)
    if limit <= 0:
        raise ConfigError(f"--limit must be positive, not {limit}")
    return {k: min(v, limit) for k, v in splits.items()}


def count_images(spec: str, *, limit: int | None = None,
                 stop_at: int | None = None) -> int | None:
    """How many images stage one reads from ``spec``: a registered data set's split sizes,
    or the image files (:data:`IMAGE_SUFFIXES`, hidden names left out) under a folder
    (``limit``: at most that many per split, as stage one takes them; a folder counts as
    its two splits). The walk stops once ``stop_at`` files are found, and answers
    ``stop_at``. None when it cannot be told: a name without known splits, no such folder."""
    if spec in KNOWN_SPLITS:
        return sum(limited(KNOWN_SPLITS[spec], limit).values())
    if not os.path.isdir(spec):
        return None
    caps = [x for x in (stop_at, None if limit is None else 2 * limit) if x is not None]
    n = 0
    for _parent, dirs, files in os.walk(spec):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        n += sum(1 for f in files
                 if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES))
        if caps and n >= min(caps):
            return min(caps)
    return n
