"""Atomic file replacement for stage two's outputs.

Writes ``data`` to ``.<name>.tmp`` in the target's folder, fsyncs it, then ``os.replace``s
it over the target: a reader sees the old file or the new one, never half of either.
Reads nothing.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))
