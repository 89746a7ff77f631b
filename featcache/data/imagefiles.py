"""Image files: which files of a folder are images (:data:`IMAGE_SUFFIXES`, hidden names
ignored, regular files only, symlinks followed once and never into another class, featcache's
own output folders never: :func:`featcache_output`), and :func:`decode_image` — Pillow's decoding
for every format (EXIF orientation applied, the first frame of an animated GIF,
grayscale / RGBA / palette / 16-bit (scaled by bit depth) made 8-bit RGB; large images decoded
reduced or refused by the size policy of :func:`decode_scaled`), used by image-folder datasets
(:mod:`featcache.data.folders`) and by ``featcache predict`` (:mod:`featcache.ship.predict`).

Reads the files and folders it is given; writes nothing.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import stat
import threading
import warnings
from pathlib import Path

import numpy as np

from featcache.data.sizes import IMAGE_SUFFIXES
from featcache.errors import DataError

log = logging.getLogger(__name__)

#: a folder holding a file named like these is featcache's output (feature files, their
#: ``.partial`` and ``.lock`` files), never a class
OUTPUT_SUFFIXES = (".h5", ".h5.partial", ".h5.lock")
#: the files that mark a report folder of ``featcache heads``/``curve`` (and the Makefile's)
REPORT_MARKERS = frozenset({"results.json", "curve.json", ".staging", ".make-folder-listing",
                            ".make-heads-settings"})
_BYTESIO_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


# ---------------------------------------------------------------------------- pixels

#: a reduced decode keeps at least this many times the input size on the shorter side
REDUCE_TO = 4
#: Image.reduce's modes; an image of another mode is made RGB (16-bit: 32-bit "I") first
_REDUCIBLE = frozenset({"L", "LA", "RGB", "RGBA", "I", "F", "CMYK"})
_16BIT = ("I;16", "I;16B", "I;16L", "I;16N")
#: Pillow's size check (a warning above Image.MAX_IMAGE_PIXELS) runs in Image.open and reads
#: the process-wide warning filters: featcache's opens take turns, so that each one's
#: catch_warnings() restores what it found. No file is read while the lock is held (a
#: slow file, a pipe, must not hold up the others): see :data:`READ_WHOLE`
_OPEN_LOCK = threading.Lock()
#: a file up to this size (and any file that is not a regular one) is read into memory
#: before Image.open takes the lock; a larger one is opened by Pillow, its header read
#: under the lock
READ_WHOLE = 64 * 2**20
#: one reduced (large) image decoded at a time, whatever the thread count: its full-size
#: pixels (a PNG has no draft mode) are the memory the policy bounds
_LARGE = threading.BoundedSemaphore(1)


class ImageTooLarge(DataError):
    """An image with more pixels than the limit (``--max-pixels``, or Pillow's own)."""


def reduction(width: int, height: int, size: int) -> int:
    """The whole factor a ``width`` x ``height`` image is reduced by before it is resized to
    ``size``: as large as keeps the shorter side at least ``REDUCE_TO * size`` (1: none)."""
    return max(1, min(width, height) // (REDUCE_TO * max(1, int(size))))


def _open(source, name: str):
    from PIL import Image

    if not isinstance(source, bytes):
        with open(source, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size <= READ_WHOLE:
                source = f.read()
    with _OPEN_LOCK, warnings.catch_warnings():
        # featcache's own limits decide (decode_scaled); never Pillow's raw warning
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"{name} is too large for Pillow to open "
                                f"({str(exc).split(', could')[0]})") from None


def decode_scaled(source: bytes | str | os.PathLike, name: str | None = None, *,
                  size: int | None = None, reduce_pixels: int | None = None,
                  max_pixels: int | None = None) -> tuple[np.ndarray, bool]:
    """Decode an image file (path or bytes) to an (H, W, 3) uint8 RGB array, and whether it
    was decoded reduced.

    The size policy (stage one's ``--reduce-pixels`` and ``--max-pixels``, for images that
    are resized to ``size`` next): an image of more than ``max_pixels`` pixels is refused
    (:class:`ImageTooLarge`, before any pixel is decoded); one of more than
    ``reduce_pixels`` is decoded reduced by :func:`reduction`'s factor — a JPEG by Pillow's
    draft mode (scaled by 1/2, 1/4 or 1/8 while decoding), the rest by ``Image.reduce``
    (box averages) — so its shorter side stays at least ``REDUCE_TO * size``. Without them
    (None) the image is decoded at full size. Raises
    :class:`~featcache.errors.DataError` when it cannot be decoded; its message names
    ``name`` (default: the path, or "image bytes").
    """
    from PIL import ImageOps

    name = name or ("image bytes" if isinstance(source, bytes) else str(source))
    reduced = False
    try:
        with _open(source, name) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageTooLarge(f"{name} is too large ({w}x{h} = {w * h:,} pixels, more "
                                    f"than --max-pixels {max_pixels:,}); raise --max-pixels "
                                    f"to read it, or make the image smaller")
            big = bool(size) and reduce_pixels is not None and w * h > reduce_pixels \
                and reduction(w, h, size) > 1
            with _LARGE if big else contextlib.nullcontext():
                im.seek(0)  # the first frame of an animation
                if big:
                    k = reduction(w, h, size)
                    im.draft(None, (max(1, w // k), max(1, h // k)))  # JPEG only
                im.load()
                if big and (r := reduction(*im.size, size)) > 1:
                    if im.mode in _16BIT:
                        im = im.convert("I")
                    elif im.mode not in _REDUCIBLE:
                        im = im.convert("RGB")
                    im = im.reduce(r)
                reduced = big and im.size != (w, h)
                im = ImageOps.exif_transpose(im)
                if im.mode in (*_16BIT, "I"):
                    # 16-bit samples (a PNG's "I" is 16-bit too): scaled by the bit depth,
                    # never by the image's own values (a dark image stays dark)
                    arr = np.asarray(im).astype(np.int64)
                    arr = np.clip(arr >> 8, 0, 255).astype(np.uint8)
                    rgb = np.repeat(arr[..., None], 3, axis=2)
                else:
                    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{name} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        # Pillow names the file it was given: for bytes that is "<_io.BytesIO object at 0x…>"
        first = _BYTESIO_REPR.sub(lambda _: repr(name), first)
        raise DataError(f"{name} cannot be decoded as an image ({first[:120]})") from None
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise DataError(f"{name} is an empty image ({rgb.shape})")
    return np.ascontiguousarray(rgb), reduced


def decode_image(source: bytes | str | os.PathLike, name: str | None = None,
                 **policy) -> np.ndarray:
    """:func:`decode_scaled`'s pixels: an (H, W, 3) uint8 RGB array (``policy``: its
    ``size``, ``reduce_pixels``, ``max_pixels``; none: the full image)."""
    return decode_scaled(source, name, **policy)[0]


# ---------------------------------------------------------------------------- scanning

def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def featcache_output(d: str | os.PathLike, exclude: frozenset[str] = frozenset()) -> str | None:
    """Why the folder ``d`` is featcache's own output, never data (None: it is not): one of
    ``exclude`` (real paths: where this run writes, its ``--out-dir``), or a folder holding
    a feature file (:data:`OUTPUT_SUFFIXES`) or a report (:data:`REPORT_MARKERS`) — run
    inside the image folder (``--dataset .``), stage one would otherwise read its own
    ``features/`` as a class."""
    if os.path.realpath(d) in exclude:
        return "it is where this run writes (--out-dir)"
    try:
        names = os.listdir(d)
    except OSError:
        return None
    for n in sorted(names):
        if n.endswith(OUTPUT_SUFFIXES):
            return f"it holds featcache's feature files ({n})"
        if n in REPORT_MARKERS:
            return f"it is a featcache report folder ({n})"
    return None


def _log_skipped_output(parent, path, why: str) -> None:
    # the run's own --out-dir is expected there; anything else is worth a warning
    level = logging.INFO if why.startswith("it is where this run writes") else logging.WARNING
    log.log(level, "%s: not reading %s: %s", parent, path, why)


def subdirs(d: Path, exclude: frozenset[str] | None = None) -> list[Path]:
    """The visible sub-folders of ``d``, sorted; with ``exclude`` (see :func:`featcache_output`)
    without featcache's own output folders, each skipped with a log line naming it."""
    out = sorted((p for p in d.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)
    if exclude is None:
        return out
    keep = []
    for p in out:
        why = featcache_output(p, exclude)
        if why:
            _log_skipped_output(d, p, why)
        else:
            keep.append(p)
    return keep


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def images_under(d: Path, *, others: tuple[str, ...] = (), seen: set[str] | None = None,
                 exclude: frozenset[str] = frozenset()) -> tuple[list[Path], int]:
    """Image files anywhere under ``d`` (sorted), and how many other files were ignored.

    Only regular files are read: a FIFO, socket or device named like an image is skipped
    with a warning (reading it could block forever). Symlinked sub-folders and files are
    followed like real ones, but never into another class: a link whose target lies in one
    of ``others`` (the other class folders' real paths) or contains ``d`` itself (a link
    back up the tree, ``ln -s .. dog/up``) is skipped with a warning, so no image is read
    under a second label. ``seen`` (shared by the whole data set) holds the real paths
    already read: a folder or file reached a second time is skipped with a warning. A
    sub-folder that is featcache's own output (:func:`featcache_output` with ``exclude``) is
    not read."""
    found, ignored = [], 0
    seen = set() if seen is None else seen
    own = os.path.realpath(d)
    seen.add(own)

    def foreign(real: str) -> str | None:
        if _inside(own, real):
            return "it contains the class folder itself"
        hit = next((o for o in others if _inside(real, o) or _inside(o, real)), None)
        return f"it leads into another class ({hit})" if hit else None

    for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
        keep = []
        for n in sorted(dirnames):
            if n.startswith("."):
                continue
            link = os.path.join(dirpath, n)
            real = os.path.realpath(link)
            why = foreign(real) if os.path.islink(link) else None
            if why is None and real in seen:
                why = f"a folder already read ({real})"
            if why:
                log.warning("%s: not reading %s: %s", d, link, why)
                continue
            output = featcache_output(link, exclude)
            if output:
                _log_skipped_output(d, link, output)
                continue
            seen.add(real)
            keep.append(n)
        dirnames[:] = keep
        for n in sorted(filenames):
            if n.startswith("."):
                continue
            if not n.lower().endswith(IMAGE_SUFFIXES):
                ignored += 1
                continue
            path = os.path.join(dirpath, n)
            real = os.path.realpath(path)
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError:
                regular = True        # a broken link: decoding names it as unreadable
            if not regular:
                log.warning("%s: skipping %s: not a regular file", d, path)
                ignored += 1
                continue
            why = foreign(real) if os.path.islink(path) else None
            if why is None and real in seen:
                why = f"a file already read ({real})"
            if why:
                log.warning("%s: not reading %s: %s", d, path, why)
                ignored += 1
                continue
            seen.add(real)
            found.append(Path(path))
    return sorted(found), ignored


def loose_files(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if p.is_file() and _visible(p)]


def no_images(d: Path) -> str:
    return f"{d} holds no images ({' '.join(IMAGE_SUFFIXES)})"
