"""Shard part files: their names, finding them, and merging them into one feature file.

``featcache features --shard i/n`` writes ``<stem>.part<i>of<n>.h5`` beside where the
single-process file ``<stem>.h5`` would go (the name is :func:`featcache.config.part_path`,
parsed back by :func:`featcache.config.parse_part`). :func:`merge_parts` checks that complete parts
tile the dataset and copies their rows, labels and per-row ids into ``<stem>.h5`` through
:class:`featcache.cache.writer.FeatureWriter`. Reads the part files; writes the merged file (and
deletes the parts only when asked). No TensorFlow ever.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from featcache.config import parse_part
from featcache.errors import CacheError, IncompleteFeatureFile

log = logging.getLogger(__name__)

MERGE_BLOCK_BYTES = 16 << 20


@dataclass
class _Part:
    path: Path
    attrs: dict
    index: int
    count: int
    classes: list
    dim: int
    starts: dict      # split -> row_start
    rows: dict        # split -> rows in this part
    ids: dict         # split -> this part's row ids
    sha256: dict      # split -> this part's file hashes (image folders), or None


#: Root attributes that describe one part, not the merged file.
_PART_ONLY_ATTRS = ("shard", "total_rows", "complete", "rows_done", "splits",
                    "schema_version")
#: Attributes that must agree across the parts of one merge (config_sha256 covers the rest).
_MERGE_MUST_AGREE = ("config_sha256", "batch_size", "dtype", "flip", "splits", "total_rows")


def _read_part(path: Path) -> _Part:
    from featcache.cache.reader import attrs_dict, check_schema, open_h5, read_ids, read_sha256

    with open_h5(path, "r") as f:
        check_schema(path, f.attrs)
        attrs = attrs_dict(f.attrs)
        shard = attrs.get("shard")
        if not shard:
            raise CacheError(f"{path} is not a shard part file (no 'shard' attribute); merge "
                             f"only the .partIofN.h5 files of `featcache features --shard I/N`")
        if not attrs.get("complete"):
            done = dict(zip(attrs.get("splits", []), attrs.get("rows_done", [])))
            raise IncompleteFeatureFile(
                f"part {path} is incomplete (rows done: {done}); finish it with the same "
                f"`featcache features --shard {shard}` command, then merge again")
        i, n = (int(p) for p in str(shard).split("/"))
        splits = [str(s) for s in attrs["splits"]]
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in f["classes"][()]]
        starts = {s: int(f[s].attrs.get("row_start", 0)) for s in splits}
        rows = {s: int(f[s]["labels"].shape[0]) for s in splits}
        dim = int(f[splits[0]]["features"].shape[1])
        ids = {s: read_ids(f[s]) for s in splits}
        hashes = {s: read_sha256(f[s]) for s in splits}
    return _Part(path, attrs, i, n, classes, dim, starts, rows, ids, hashes)


def _check_parts(parts: list[_Part]) -> None:
    """Refuse (one line, naming the fix) missing, duplicate, mismatched or gapped parts."""
    first = parts[0]
    n = first.count
    counts = sorted({p.count for p in parts})
    if len(counts) > 1:
        raise CacheError(f"the parts come from different shard counts ({counts}); merge the "
                         f"parts of one --shard I/N run only")
    seen: dict[int, Path] = {}
    for p in parts:
        if p.index in seen:
            raise CacheError(f"{seen[p.index]} and {p.path} are both part {p.index}/{n}; "
                             f"keep one of them")
        seen[p.index] = p.path
    missing = [i for i in range(n) if i not in seen]
    if missing:
        names = ", ".join(f"{i}/{n}" for i in missing)
        raise CacheError(f"missing part(s) {names}; run `featcache features --shard I/{n}` "
                         f"with the same settings for each, then merge again")
    for p in parts[1:]:
        bad = [k for k in _MERGE_MUST_AGREE if p.attrs.get(k) != first.attrs.get(k)]
        if p.classes != first.classes:
            bad.append("classes")
        if p.dim != first.dim:
            bad.append("feature dimension")
        if bad:
            detail = ""
            if "config_sha256" in bad:
                from featcache.config import cache_key_fields

                changed = [k for k in cache_key_fields()
                           if p.attrs.get(k) != first.attrs.get(k)]
                detail = f" ({', '.join(changed)} differ)" if changed else ""
            raise CacheError(
                f"part {p.path} does not match {first.path}: {', '.join(bad)}{detail}; "
                f"re-extract it with the same settings (--force) before merging")
    splits = [str(s) for s in first.attrs["splits"]]
    totals = dict(zip(splits, [int(t) for t in first.attrs["total_rows"]]))
    for split in splits:
        expect = 0
        for p in sorted(parts, key=lambda q: q.index):
            if p.starts[split] != expect:
                raise CacheError(
                    f"{p.path}: {split} rows start at {p.starts[split]}, expected {expect}; "
                    f"the parts do not tile the dataset, re-extract them with one --batch")
            expect += p.rows[split]
        if expect != totals[split]:
            raise CacheError(f"the parts hold {expect} {split} rows, the dataset has "
                             f"{totals[split]}; re-extract the parts with the same settings")


def _joined_ids(parts: list[_Part], split: str):
    """The ids of ``split`` across the parts (in part order): int64 or ``str`` objects."""
    import numpy as np

    arrays = [p.ids[split] for p in parts]
    kinds = {a.dtype == object for a in arrays}
    if len(kinds) > 1:
        raise CacheError(f"the parts mix index and path ids in {split}; re-extract them "
                         f"with the same settings")
    return np.concatenate(arrays) if arrays else None


def _joined_sha256(parts: list[_Part], split: str):
    """The file hashes of ``split`` across the parts, or None unless every part has them."""
    import numpy as np

    arrays = [p.sha256[split] for p in parts]
    return None if not arrays or any(a is None for a in arrays) else np.concatenate(arrays)


def merge_parts(parts: Iterable[str | os.PathLike], out: str | os.PathLike, *,
                force: bool = False, wait: bool = False) -> Path:
    """Join complete shard part files into one feature file at ``out``; return its path.

    The result has the layout, chunking, attributes (less ``shard``/``total_rows``, plus
    ``merged_from``) and array bytes a single-process run of the same settings writes, so
    it is an up-to-date cache for that configuration. Rows are copied block by block
    (``MERGE_BLOCK_BYTES``) through :class:`FeatureWriter`: the output is locked while it
    is built, lives at ``<out>.partial`` until complete, and an interrupted merge resumes.
    Missing, incomplete, duplicate or mismatched parts are refused before anything is written.
    """
    import numpy as np

    from featcache.cache.reader import open_h5
    from featcache.cache.writer import FeatureWriter, SplitSpec

    out = Path(out)
    read = [_read_part(Path(p)) for p in parts]
    if not read:
        raise CacheError(f"no part files to merge into {out}; run `featcache features "
                         f"--shard I/N` first")
    read.sort(key=lambda q: q.index)
    _check_parts(read)
    first = read[0]
    splits = [str(s) for s in first.attrs["splits"]]
    totals = dict(zip(splits, [int(t) for t in first.attrs["total_rows"]]))
    attrs = {k: v for k, v in first.attrs.items() if k not in _PART_ONLY_ATTRS}
    attrs["merged_from"] = int(first.count)
    flip = bool(first.attrs.get("flip", False))
    dtype = str(first.attrs.get("dtype", "float32"))
    block = max(1, MERGE_BLOCK_BYTES // max(1, first.dim * np.dtype(dtype).itemsize))
    with FeatureWriter.open(out, attrs=attrs, classes=first.classes,
                            splits={s: SplitSpec(totals[s], 0, _joined_ids(read, s),
                                                 _joined_sha256(read, s))
                                    for s in splits}, dim=first.dim, dtype=dtype,
                            flip=flip, force=force, wait=wait) as writer:
        if writer.complete:
            log.info("%s is already complete (same configuration); nothing to merge", out)
            return writer.path
        for split in splits:
            for p in read:
                lo = max(0, writer.rows_done(split) - p.starts[split])
                if lo >= p.rows[split]:
                    continue
                with open_h5(p.path, "r") as f:
                    g = f[split]
                    for a in range(lo, p.rows[split], block):
                        b = min(a + block, p.rows[split])
                        writer.write(split, g["features"][a:b], g["labels"][a:b],
                                     g["features_flip"][a:b] if flip else None)
        writer.mark_complete()
        log.info("merged %d parts into %s", len(read), writer.path)
        return writer.path


# --------------------------------------------------------------------------- finding

def is_part(path: str | Path) -> bool:
    return parse_part(path) is not None


def merged_name(part: str | Path) -> Path:
    """``x.part1of4.h5`` -> ``x.h5`` (same folder)."""
    parsed = parse_part(part)
    if parsed is None:
        raise CacheError(f"{part} is not named like a part file (<name>.partIofN.h5)")
    return parsed[0]


def find_parts(out: str | Path) -> list[Path]:
    """The complete part files ``<stem>.part*of*.h5`` of the feature file ``out``."""
    out = Path(out)
    stem = out.name[:-3] if out.name.endswith(".h5") else out.name
    found = []
    for p in sorted(out.parent.glob(f"{stem}.part*of*.h5")):
        parsed = parse_part(p)
        if parsed and parsed[0].name == f"{stem}.h5":
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
