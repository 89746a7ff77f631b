"""``featcache upgrade FILE``: migrate a feature file of an older schema, in place.

Reads the old file (and, for an image folder, the folder named in its ``source_dir``
attribute); writes the migrated copy beside it under a temporary name, then renames it
over the original (:mod:`featcache._util.atomic`), holding the writer's lock
(:mod:`featcache.cache.lock`): a reader sees the old file or the new one, never half of either,
and an interrupted upgrade leaves the old file as it was.

Schema 1 -> 2 adds each split's per-row ``ids`` (see :mod:`featcache.cache.reader`):

- registry datasets (CIFAR-10, synthetic): the row's index in the split (a ``--limit``
  run holds the first rows, a shard part starts at its ``row_start``);
- image folders: the relative paths, listed again from the folder, which must still be
  there with the same fingerprint (else: re-run stage one with ``--force``).

Root attributes renamed since are renamed by the table :data:`ATTR_RENAMES`, and
``config_sha256`` is recomputed over the cache key of this featcache
(:meth:`featcache.config.ExtractConfig.cache_key`'s names), so stage one finds the upgraded
file up to date — after checking that the stored hash matches the file's own attributes
(if not, the hash is left alone and stage one will say the file is stale).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from featcache._util import atomic
from featcache.cache.lock import FileLock
from featcache.cache.reader import SCHEMA_VERSION, attrs_dict, open_h5
from featcache.cache.writer import open_owned, write_ids
from featcache.config import cache_key_fields, config_sha256
from featcache.errors import CacheError, DataError, DiskFullError

log = logging.getLogger(__name__)

#: Root attributes renamed since schema 1: old name -> new name. Stage one's test share of
#: an image folder is ``test_fraction`` (it was ``val_fraction``, which also named stage
#: two's validation share). A rename is applied once this featcache's cache key uses the
#: new name, so upgrading is right before and after that rename.
ATTR_RENAMES = {"val_fraction": "test_fraction"}


def cache_key_names() -> list[str]:
    """The attribute names this featcache's cache key can be made of (runtime ones
    included; ``cut`` and ``calibration`` too: they are in a file's key when the file has
    them)."""
    return list(cache_key_fields())


def _renames(attrs: dict, key_names: list[str]) -> dict[str, str]:
    return {old: new for old, new in ATTR_RENAMES.items()
            if old in attrs and new not in attrs and new in key_names}


def _rehash(attrs: dict, renames: dict[str, str], key_names: list[str]) -> str | None:
    """The new ``config_sha256``, or None if the stored one does not match the file's own
    attributes under the old names (then it is not ours to vouch for)."""
    back = {new: old for old, new in renames.items()}
    old_key = {back.get(k, k): attrs[back.get(k, k)] for k in key_names
               if back.get(k, k) in attrs}
    if config_sha256(old_key) != attrs.get("config_sha256"):
        return None
    return config_sha256({k: attrs[back.get(k, k)] for k in key_names if back.get(k, k) in attrs})


def _folder_ids(path: Path, attrs: dict, splits: dict[str, tuple[int, int]]) -> dict:
    """Relative paths of an image-folder file's rows, listed from its source folder."""
    from featcache.data.folders import FolderDataset

    root = Path(str(attrs.get("source_dir", "")))
    redo = "re-run stage one with --force to rebuild the file with ids"
    if not root.is_dir():
        raise DataError(f"{path} was made from the image folder {root}, which is not there: "
                        f"its row ids (relative paths) cannot be recovered; {redo}")
    fields = {f.name for f in dataclasses.fields(FolderDataset)}
    frac_name = "test_fraction" if "test_fraction" in fields else "val_fraction"
    frac = attrs.get("test_fraction", attrs.get("val_fraction", 0.2))
    limit = int(attrs.get("limit") or 0) or None
    ds = FolderDataset(root, limit=limit, seed=int(attrs.get("seed", 0)),
                       image_size=int(attrs.get("image_size", 224)), **{frac_name: frac})
    if ds.fingerprint() != attrs.get("dataset_sha256"):
        raise DataError(f"the image folder {root} changed since {path} was made (its "
                        f"fingerprint differs): the rows cannot be matched to files; {redo}")
    out = {}
    for split, (start, rows) in splits.items():
        ids = ds.ids(split)[start:start + rows]
        if len(ids) != rows:
            raise DataError(f"{root} lists {len(ids)} {split} images where {path} has "
                            f"{rows} rows; {redo}")
        out[split] = ids
    return out


def upgrade(path: str | os.PathLike, *, wait: bool = False) -> str:
    """Migrate the feature (or ``.partial``) file at ``path`` in place; return what was done."""
    path = Path(path)
    final = path.with_name(path.name[:-len(".partial")]) if path.name.endswith(".partial") \
        else path
    key_names = cache_key_names()
    with FileLock(final, wait=wait):
        with open_h5(path, "r") as f:
            attrs = attrs_dict(f.attrs)
            version = attrs.get("schema_version")
            if version is None:
                raise CacheError(f"{path} has no schema_version: not a featcache feature file")
            if int(version) > SCHEMA_VERSION:
                raise CacheError(f"{path} has schema {version}, newer than this featcache's "
                                 f"{SCHEMA_VERSION}; upgrade featcache instead")
            splits = {str(s): (int(f[str(s)].attrs.get("row_start", 0)),
                               int(f[str(s)]["labels"].shape[0])) for s in attrs["splits"]}
            need_ids = [s for s in splits if "ids" not in f[s]]
        renames = _renames(attrs, key_names)
        if int(version) == SCHEMA_VERSION and not need_ids and not renames:
            return f"{path} is already schema {SCHEMA_VERSION}; nothing to do"
        if "source_dir" in attrs:
            ids = _folder_ids(path, attrs, {s: splits[s] for s in need_ids})
        else:
            ids = {s: np.arange(start, start + rows, dtype=np.int64)
                   for s, (start, rows) in splits.items() if s in need_ids}
        new_hash = _rehash(attrs, renames, key_names)
        free = shutil.disk_usage(path.parent).free
        if path.stat().st_size > free:
            raise DiskFullError(f"upgrading {path} needs {path.stat().st_size / 2**20:.0f} MiB "
                                f"free beside it (a copy is written, then renamed); only "
                                f"{free / 2**20:.0f} MiB are free")
        with atomic.replacing(path) as tmp:
            shutil.copyfile(path, tmp)
            with open_owned(tmp) as f:
                for split, arr in ids.items():
                    write_ids(f[split], arr)
                for old, new in renames.items():
                    f.attrs[new] = f.attrs[old]
                    del f.attrs[old]
                if new_hash is not None:
                    f.attrs["config_sha256"] = new_hash
                f.attrs["upgraded_from_schema"] = int(version)
                f.attrs["schema_version"] = SCHEMA_VERSION
    if new_hash is None:
        log.warning("%s: its config_sha256 does not match its attributes; left as it is "
                    "(stage one may find the file stale)", path)
    done = [f"ids for {', '.join(need_ids)}" if need_ids else "",
            ", ".join(f"{o} -> {n}" for o, n in renames.items())]
    return (f"upgraded {path} from schema {version} to {SCHEMA_VERSION} "
            f"({'; '.join(d for d in done if d) or 'attributes'})")
