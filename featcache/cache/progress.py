"""Polling a feature file that a writer has open: how far stage one (or a merge) got.

Reads the root attributes ``complete``, ``splits`` and ``rows_done`` of a feature or
``.partial`` file without HDF5 file locking; writes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from featcache.cache.reader import json_safe
from featcache.errors import CacheError, CorruptFeatureFile


def read_progress(path: str | os.PathLike) -> dict:
    """``{"complete": bool, "rows_done": {split: rows}}`` of a feature or ``.partial`` file.

    Opens without HDF5 file locking, so it works while a writer holds the file; the
    counts may be one batch behind. For progress displays and tests, not for reading data.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r", locking=False) as f:
            a = f.attrs
            splits = [str(s) for s in json_safe(a["splits"])]
            done = [int(r) for r in np.asarray(a["rows_done"]).tolist()]
            return {"complete": bool(a["complete"]), "rows_done": dict(zip(splits, done))}
    except FileNotFoundError:
        raise CacheError(f"{path} does not exist") from None
    except (OSError, KeyError, ValueError) as exc:
        raise CorruptFeatureFile(f"{path} is not a readable featcache file ({exc}); "
                                 f"delete it, or re-run stage one with --force") from None
