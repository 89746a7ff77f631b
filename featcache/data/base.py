"""What every dataset is: :class:`Dataset`, a source of uint8 image batches with labels per
split (``batches``, ``take``, ``fingerprint``, ``ids``, ``file_sha256``, ``labels``), and
:data:`Batch`.

Reads and writes nothing; subclasses (:mod:`featcache.data.datasets`,
:mod:`featcache.data.folders`) read their data.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

Batch = tuple[np.ndarray, np.ndarray]  # (N, H, W, 3) uint8 or float32, (N,) int64


class Dataset:
    """Base class. Subclasses set ``name``, ``classes``, ``splits`` (rows per split)."""

    name: str
    classes: list[str]
    splits: dict[str, int]
    #: attrs to store in the feature file (e.g. skipped files of a folder)
    extra_attrs: dict

    def fingerprint(self) -> str:
        raise NotImplementedError

    def batches(self, split: str, start: int, stop: int, batch_size: int) -> Iterator[Batch]:
        raise NotImplementedError

    def ids(self, split: str) -> np.ndarray:
        """Each row's identity, stored in the feature file: its index in ``split`` (int64).
        Image folders return relative paths instead."""
        return np.arange(self.splits[split], dtype=np.int64)

    def file_sha256(self, split: str) -> np.ndarray | None:
        """Each row's file's sha256 (hex), for data sets made of files (image folders);
        None: the rows are not files."""
        return None

    def labels(self, split: str) -> np.ndarray:
        """All labels of ``split`` (small: N int64)."""
        return np.concatenate([y for _, y in self.batches(split, 0, self.splits[split], 4096)]) \
            if self.splits[split] else np.zeros(0, np.int64)

    def take(self, split: str, rows) -> Batch:
        """The images and labels of ``rows`` (sorted row indices of ``split``), in that
        order. Reads only those rows (one small read each); a data set held in large files
        overrides it with one pass."""
        parts = [next(iter(self.batches(split, int(r), int(r) + 1, 1))) for r in rows]
        if not parts:
            raise ValueError(f"no rows of {split} asked for")
        return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
