"""The sidecar contract of an exported model: ``<model>.json`` beside every format holds the
class names (in the model's output order), the input contract and the feature file's
provenance. :mod:`featcache.ship.export` writes it, :mod:`featcache.ship.predict` reads it.

Reads ``<model>.json``; writes nothing (the exporter writes it atomically).
"""

from __future__ import annotations

import json
from pathlib import Path

from featcache.errors import DataError

#: the sidecar format's version; a newer one than this is refused with "upgrade featcache"
SIDECAR_VERSION = 1


def sidecar_path(model_path) -> Path:
    """Where the class names and input contract of an exported model are: ``<model>.json``."""
    return Path(str(Path(model_path)) + ".json")


def read_sidecar(path: Path) -> dict:
    side = sidecar_path(path)
    if not side.is_file():
        raise DataError(f"{path} has no {side.name} beside it (the class names and input "
                        f"size): it is not one exported by featcache, or the .json was not "
                        f"copied with it; export it again with `featcache export`")
    try:
        meta = json.loads(side.read_text())
        meta["class_names"] = [str(c) for c in meta["class_names"]]
        meta["input"]["image_size"] = int(meta["input"]["image_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{side} is not a featcache model description ({exc}); export the "
                        f"model again with `featcache export`") from None
    if int(meta.get("featcache_export", 0)) > SIDECAR_VERSION:
        raise DataError(f"{side} was written by a newer featcache; upgrade featcache")
    return meta
