"""Joining shard part files: find the parts of a feature file and merge them.

``featcache features --shard i/n`` writes ``<stem>.part<i>of<n>.h5`` beside where the
single-process file ``<stem>.h5`` would go (names derived in :mod:`pipeline.config`).
This module finds those parts and hands them to :func:`pipeline.store.merge_parts`, which
checks that they tile the dataset and copies them into ``<stem>.h5``. Reads the part
files; writes the merged file (and deletes the parts only when asked). Imports no
TensorFlow.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable

from .errors import CacheError
from .store import merge_parts

log = logging.getLogger(__name__)

PART_RE = re.compile(r"^(?P<stem>.+)\.part(?P<i>\d+)of(?P<n>\d+)\.h5$")


def is_part(path: str | Path) -> bool:
    return PART_RE.match(Path(path).name) is not None


def merged_name(part: str | Path) -> Path:
    """``x.part1of4.h5`` -> ``x.h5`` (same folder)."""
    p = Path(part)
    m = PART_RE.match(p.name)
    if not m:
        raise CacheError(f"{p} is not named like a part file (<name>.partIofN.h5)")
    return p.with_name(m["stem"] + ".h5")


def find_parts(out: str | Path) -> list[Path]:
    """The complete part files ``<stem>.part*of*.h5`` of the feature file ``out``."""
    out = Path(out)
    stem = out.name[:-3] if out.name.endswith(".h5") else out.name
    found = []
    for p in sorted(out.parent.glob(f"{stem}.part*of*.h5")):
        m = PART_RE.match(p.name)
        if m and m["stem"] == stem:
            found.append(p)
    return found


def merge(out: str | Path | None = None, parts: Iterable[str | Path] | None = None, *,
          force: bool = False, wait: bool = False, remove_parts: bool = False) -> Path:
    """Merge ``parts`` (default: those found beside ``out``) into ``out`` (default: the
    name the parts share). Returns the merged file's path."""
    parts = [Path(p) for p in parts] if parts else []
    if out is None:
        if not parts:
            raise CacheError("give the part files to merge, or the feature file to merge into")
        names = {merged_name(p) for p in parts}
        if len(names) > 1:
            raise CacheError(f"the parts belong to different feature files "
                             f"({', '.join(sorted(map(str, names)))}); merge one at a time")
        out = names.pop()
    out = Path(out)
    if not parts:
        parts = find_parts(out)
        if not parts:
            pending = sorted(out.parent.glob(out.name[:-3] + ".part*of*.h5.partial")) \
                if out.name.endswith(".h5") else []
            hint = (f" ({len(pending)} unfinished: finish them with the same `featcache "
                    f"features --shard I/N` commands)") if pending else ""
            raise CacheError(f"no complete part files <name>.partIofN.h5 found for {out}"
                             f"{hint}; run `featcache features --shard I/N` first")
    path = merge_parts(parts, out, force=force, wait=wait)
    if remove_parts:
        for p in parts:
            p.unlink(missing_ok=True)
            Path(str(p) + ".lock").unlink(missing_ok=True)
        log.info("removed %d part files", len(parts))
    return path
