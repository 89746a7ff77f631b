"""Image files: which files of a folder are images (:data:`IMAGE_SUFFIXES`, hidden names
ignored, symlinked sub-folders followed once), and :func:`decode_image` — Pillow's decoding
for every format (EXIF orientation applied, the first frame of an animated GIF,
grayscale / RGBA / palette / 16-bit made 8-bit RGB), used by image-folder datasets
(:mod:`featcache.data.folders`) and by ``featcache predict`` (:mod:`featcache.ship.predict`).

Reads the files and folders it is given; writes nothing.
"""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path

import numpy as np

from featcache.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_BYTESIO_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


# ---------------------------------------------------------------------------- pixels

def decode_image(source: bytes | str | os.PathLike, name: str | None = None) -> np.ndarray:
    """Decode an image file (path or bytes) to an (H, W, 3) uint8 RGB array.

    Raises :class:`~featcache.errors.DataError` when it cannot be decoded; its message names
    ``name`` (default: the path, or "image bytes").
    """
    from PIL import Image, ImageOps

    name = name or ("image bytes" if isinstance(source, bytes) else str(source))
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im.seek(0)  # the first frame of an animation
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                arr = np.asarray(im).astype(np.int64)
                arr = (arr >> 8) if arr.max(initial=0) > 255 else arr
                arr = np.clip(arr, 0, 255).astype(np.uint8)
                rgb = np.repeat(arr[..., None], 3, axis=2)
            else:
                rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{name} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        # Pillow names the file it was given: for bytes that is "<_io.BytesIO object at 0x…>"
        first = _BYTESIO_REPR.sub(lambda _: repr(name), first)
        raise DataError(f"{name} cannot be decoded as an image ({first[:120]})") from None
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise DataError(f"{name} is an empty image ({rgb.shape})")
    return np.ascontiguousarray(rgb)


# ---------------------------------------------------------------------------- scanning

def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def subdirs(d: Path) -> list[Path]:
    return sorted((p for p in d.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)


def images_under(d: Path) -> tuple[list[Path], int]:
    """Image files anywhere under ``d`` (sorted), and how many other files were ignored.

    Symlinked sub-folders are followed like real ones; a folder reached a second time (a
    link back up the tree, or two links to one folder) is not walked again, with a warning
    (its images are already counted once)."""
    found, ignored = [], 0
    seen = {os.path.realpath(d)}
    for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
        keep = []
        for n in sorted(dirnames):
            if n.startswith("."):
                continue
            real = os.path.realpath(os.path.join(dirpath, n))
            if real in seen:
                log.warning("%s: not walking %s again (a symlink to a folder already read: "
                            "%s)", d, os.path.join(dirpath, n), real)
                continue
            seen.add(real)
            keep.append(n)
        dirnames[:] = keep
        for n in sorted(filenames):
            if n.startswith("."):
                continue
            if n.lower().endswith(IMAGE_SUFFIXES):
                found.append(Path(dirpath) / n)
            else:
                ignored += 1
    return sorted(found), ignored


def loose_files(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if p.is_file() and _visible(p)]


def no_images(d: Path) -> str:
    return f"{d} holds no images ({' '.join(IMAGE_SUFFIXES)})"
