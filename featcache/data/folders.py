"""Image-folder datasets: one sub-folder per class, streamed through tf.data.

Reads ``<root>/<class>/**/<image>`` (the split drawn per class, seeded and stratified), or
``<root>/train/<class>/…`` and ``<root>/test/<class>/…`` when the folder holds both
``train/`` and ``test/``. Images in sub-folders of a class folder belong to that class
("nested classes"); symlinked folders are followed, each real folder read once (loops
are safe); hidden files and folders (``.name``) and files that are not
``.jpg .jpeg .png .bmp .gif`` are ignored, and so are featcache's own output folders inside
the folder (``exclude``, the run's ``--out-dir``, and any folder holding feature files or a
report: :func:`featcache.data.imagefiles.featcache_output`), each named in a log line. A
folder needs two classes or more and every class ``MIN_TRAIN_PER_CLASS`` usable training
images (stage two fits on some and validates on others). Large images follow the size
policy of :func:`featcache.data.imagefiles.decode_scaled` (``reduce_pixels``, ``max_pixels``:
stage one's ``--reduce-pixels``, ``--max-pixels``): decoded reduced, or skipped like an
undecodable file. Writes nothing.

Decoding is Pillow's, for every format: EXIF orientation applied, the first frame of an
animated GIF, grayscale / RGBA (alpha dropped) / palette / 16-bit images made 8-bit RGB.
(TensorFlow's own BMP decoder silently returns palette indices as gray for palette BMPs,
so it is not used.) :func:`decode_image` is also what ``featcache predict`` uses.

When the dataset is opened every candidate file is read once, hashed (the fingerprint:
relative paths, labels, splits and file contents) and decoded once to find the files that
cannot be decoded: those are skipped, counted, named in a warning and in ``extra_attrs``
(which stage one writes into the feature file), so each split's row count is known before
anything is written. ``batches`` then streams: a tf.data pipeline decodes in parallel and
resizes each image with :func:`featcache.data.resize.resize_images` (bilinear, antialiased)
to ``image_size``, yielding float32 batches (not rounded to uint8), so an exported model
that resizes raw uint8 pixels in-graph with the same function reproduces the features.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from featcache.data.base import Batch, Dataset
from featcache.data.imagefiles import (
    IMAGE_SUFFIXES,
    ImageTooLarge,
    decode_image,
    decode_scaled,
    images_under,
    loose_files,
    no_images,
    subdirs,
)
from featcache.data.resize import FOLDER_ANTIALIAS, describe, resize_images
from featcache.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: at most this many skipped files are named in the feature file (all are counted)
MAX_LISTED_SKIPS = 200
FINGERPRINT_VERSION = b"featcache-folder-v1"
#: a folder of these names beside train/ is a validation split, not a class
VAL_NAMES = frozenset({"val", "valid", "validation"})
#: every class needs this many usable training images: one to fit a head, one to validate it
MIN_TRAIN_PER_CLASS = 2


def _others(class_dirs: list[Path], d: Path) -> tuple[str, ...]:
    """The real paths of the class folders other than ``d`` (links must not lead there)."""
    return tuple(os.path.realpath(o) for o in class_dirs if o != d)


def _interleave(per_class: list[list[tuple[str, int]]]) -> list[tuple[str, int]]:
    """Round-robin over classes (each in path order): balanced prefixes for ``--limit``."""
    out = []
    for i in range(max((len(c) for c in per_class), default=0)):
        out.extend(c[i] for c in per_class if i < len(c))
    return out


def stratified_split(n: int, test_fraction: float, seed: int, stream: int) -> np.ndarray:
    """Boolean mask (n,): True = test. ``round(n * test_fraction)`` test items, but at least
    one of each part when n >= 2; seeded per ``stream`` (the class index)."""
    n_test = int(round(n * test_fraction))
    if n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    else:
        n_test = 0
    mask = np.zeros(n, bool)
    mask[np.random.default_rng([seed, stream]).permutation(n)[:n_test]] = True
    return mask


# ---------------------------------------------------------------------------- dataset

@dataclass
class FolderDataset(Dataset):
    """An image folder as a :class:`~featcache.data.base.Dataset` (see the module docstring).

    ``image_size``: the side every image is resized to (stage one passes the backbone's
    input size). ``limit``: at most this many files per split (taken from a class-balanced,
    round-robin order; undecodable ones among them are skipped, not replaced).
    ``test_fraction``/``seed``: the stratified test share when there is no ``train/``+``test/``.
    ``exclude``: folders never read, as featcache's output (stage one passes where it
    writes: ``featcache features --dataset .`` inside the folder writes ``./features/``).
    ``reduce_pixels``/``max_pixels``: the size policy (see the module docstring; None: off,
    every image at full size). An image decoded reduced, or skipped for its size, is
    marked so in the fingerprint: another policy that changes its pixels makes a feature
    file of it stale, and a folder without such images keeps its fingerprint.
    """

    root: Path
    limit: int | None = None
    test_fraction: float = 0.2
    seed: int = 0
    image_size: int = 224
    workers: int | None = None
    name: str = ""
    extra_attrs: dict = field(default_factory=dict)
    exclude: tuple = ()
    reduce_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self):
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist or is not a folder")
        own = os.path.realpath(self.root)
        #: real paths of the output folders inside the image folder (never the folder itself)
        self._exclude = frozenset(r for r in map(os.path.realpath, self.exclude) if r != own)
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"--limit must be positive, not {self.limit}")
        if int(self.image_size) < 1:
            raise ConfigError(f"image size must be positive, not {self.image_size}")
        self._policy = dict(size=int(self.image_size), reduce_pixels=self.reduce_pixels,
                            max_pixels=self.max_pixels)
        self.name = self.name or (self.root.resolve().name.replace(" ", "_") or "folder")
        candidates = self._scan()
        if self.limit is not None:
            candidates = {s: f[:self.limit] for s, f in candidates.items()}
        #: per split, every file considered (undecodable ones included), in row order
        self.candidates = candidates
        self._files, skipped, self._fingerprint = self._validate(candidates)
        self.splits = {s: len(f) for s, f in self._files.items()}
        if self.limit is None:
            for split, files in self._files.items():
                have = {label for _, label in files}
                wanted = {label for _, label in candidates[split]}
                lost = [self.classes[i] for i in sorted(wanted - have)]
                if lost:
                    raise DataError(f"{self.root}: no image of class {', '.join(lost)} in the "
                                    f"{split} split can be decoded; fix or remove those files")
        self._check_train_rows()
        if skipped:
            shown = "; ".join(f"{p} ({why})" for p, why in skipped[:10])
            more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
            log.warning("%s: skipped %d file(s) that cannot be decoded or are too large: "
                        "%s%s",
                        self.root, len(skipped), shown, more)
        listed = [f"{p}: {why}" for p, why in skipped[:MAX_LISTED_SKIPS]]
        if len(skipped) > MAX_LISTED_SKIPS:
            listed.append(f"... and {len(skipped) - MAX_LISTED_SKIPS} more")
        self.extra_attrs = {
            "source_dir": str(self.root.resolve()),
            "folder_layout": self.layout,
            "skipped_count": len(skipped),
            "skipped_files": listed,
            "resize": describe(FOLDER_ANTIALIAS),
        }

    def _check_train_rows(self) -> None:
        """Every class needs ``MIN_TRAIN_PER_CLASS`` usable training images: stage two fits
        on some and validates on others (a class with one row has no validation row)."""
        counts = np.bincount(self.labels("train"), minlength=len(self.classes))
        few = [f"{self.classes[i]} ({n})" for i, n in enumerate(counts)
               if n < MIN_TRAIN_PER_CLASS]
        if not few:
            return
        if self.limit is not None:
            fix = "raise --limit"
        elif self.layout == "train/test":
            fix = "add images to train/<class>/ or remove the class"
        else:  # the split also puts one image of every class of two or more into test
            fix = (f"add images (a class needs {MIN_TRAIN_PER_CLASS + 1}: one goes to the "
                   f"test split) or remove the class")
        raise DataError(f"{self.root}: too few usable training images for class "
                        f"{', '.join(few)}; every class needs at least {MIN_TRAIN_PER_CLASS} "
                        f"(one to fit a head, one to validate it): {fix}")

    @staticmethod
    def _check_classes(root: Path, classes: list[str]) -> None:
        if len(classes) < 2:
            raise DataError(f"image folder {root} has only one class ({classes[0]}): a "
                            f"classifier needs at least two class sub-folders")

    # -- listing ------------------------------------------------------------------------
    def _scan(self) -> dict[str, list[tuple[str, int]]]:
        """Candidate (relative path, label) per split, in the dataset's fixed order."""
        root, ex = self.root, self._exclude
        dirs = subdirs(root, ex)
        names = {d.name for d in dirs}
        if not dirs:
            what = "is empty" if not loose_files(root) else "has files but no class sub-folders"
            raise DataError(f"image folder {root} {what}: put each class's images in its own "
                            f"sub-folder (<folder>/<class>/<image>), optionally inside "
                            f"train/ and test/")
        val = sorted(names & VAL_NAMES)
        if "train" in names and "test" not in names:
            fix = (f"rename {val[0]}/ to test/" if val else
                   "add test/<class>/ beside it, or put the class folders at the top level "
                   "to have featcache draw the test split")
            raise DataError(f"{root} has train/ but no test/ (featcache reads train/ + test/"
                            f"{', not ' + val[0] + '/' if val else ''}): {fix}")
        if {"train", "test"} <= names:
            self.layout = "train/test"
            others = sorted(names - {"train", "test"})
            if others:
                log.warning("%s: has train/ and test/; ignoring the other folders %s",
                            root, ", ".join(others))
            split_dirs = {split: subdirs(root / split, ex) for split in ("train", "test")}
            self.classes = [d.name for d in split_dirs["train"]]
            index = {c: i for i, c in enumerate(self.classes)}
            unknown = [d.name for d in split_dirs["test"] if d.name not in index]
            if unknown:
                raise DataError(f"{root / 'test'} has classes that train/ lacks: "
                                f"{', '.join(unknown)}; rename them or add them to train/")
            out = {}
            class_dirs = [d for split in ("train", "test") for d in split_dirs[split]]
            seen: set[str] = set()
            for split in ("train", "test"):
                if not split_dirs[split]:
                    raise DataError(f"{root / split} has no class sub-folders: put each "
                                    f"class's images in {split}/<class>/")
                per_class = []
                for d in split_dirs[split]:
                    files, _ = images_under(d, others=_others(class_dirs, d), seen=seen,
                                            exclude=ex)
                    if not files:
                        raise DataError(f"empty class: {no_images(d)}; add images or remove "
                                        f"the folder")
                    per_class.append([(p.relative_to(root).as_posix(), index[d.name])
                                      for p in files])
                out[split] = _interleave(per_class)
            self._check_classes(root / "train", self.classes)
            return out

        self.layout = "split"
        if not 0.0 < float(self.test_fraction) < 1.0:
            raise ConfigError(f"--test-fraction must be between 0 and 1 (exclusive) to split "
                              f"{root} into train and test, not {self.test_fraction}")
        loose = [p for p in loose_files(root) if p.name.lower().endswith(IMAGE_SUFFIXES)]
        if loose:
            log.warning("%s: ignoring %d image(s) outside the class sub-folders (e.g. %s)",
                        root, len(loose), loose[0].name)
        self.classes = [d.name for d in dirs]
        train, test = [], []
        seen = set()
        for ci, d in enumerate(dirs):
            files, _ = images_under(d, others=_others(dirs, d), seen=seen, exclude=ex)
            if not files:
                raise DataError(f"empty class: {no_images(d)}; add images or remove the folder")
            mask = stratified_split(len(files), float(self.test_fraction), int(self.seed), ci)
            rel = [(p.relative_to(root).as_posix(), ci) for p in files]
            train.append([r for r, m in zip(rel, mask) if not m])
            test.append([r for r, m in zip(rel, mask) if m])
        self._check_classes(root, self.classes)
        return {"train": _interleave(train), "test": _interleave(test)}

    def _validate(self, candidates):
        """Read, hash and decode every candidate once: (kept files, skipped, fingerprint)."""
        order = [(s, rel, lab) for s, files in candidates.items() for rel, lab in files]

        def check(rel: str) -> tuple[str, str | None, str]:
            """(content hash, why it is skipped or None, what the fingerprint adds)."""
            path = self.root / rel
            try:
                data = path.read_bytes()
            except OSError as exc:
                return "", f"unreadable: {exc.strerror or exc}", ""
            digest = hashlib.sha256(data).hexdigest()
            try:
                rgb, reduced = decode_scaled(data, name=rel, **self._policy)
            except ImageTooLarge as exc:
                return digest, str(exc).removeprefix(f"{rel} "), "\0too large"
            except DataError as exc:
                return digest, str(exc).removeprefix(f"{rel} "), ""
            return digest, None, f"\0reduced to {rgb.shape[1]}x{rgb.shape[0]}" if reduced else ""

        workers = self.workers or min(8, (os.cpu_count() or 1) + 2)
        h = hashlib.sha256(FINGERPRINT_VERSION)
        kept: dict[str, list[tuple[str, int]]] = {s: [] for s in candidates}
        self._sha256: dict[str, list[str]] = {s: [] for s in candidates}
        skipped: list[tuple[str, str]] = []
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(check, (rel for _, rel, _ in order))
            for (split, rel, lab), (digest, problem, note) in zip(order, results):
                h.update(f"{split}\0{rel}\0{lab}\0{digest}{note}\n".encode())
                if problem is None:
                    kept[split].append((rel, lab))
                    self._sha256[split].append(digest)
                else:
                    skipped.append((rel, problem))
        return kept, skipped, h.hexdigest()

    # -- Dataset interface ----------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 over split, relative path, label and content hash of every candidate file
        (skipped ones included), computed when the folder was opened."""
        return self._fingerprint

    def files(self, split: str) -> list[tuple[str, int]]:
        """(path relative to the root, label) of ``split``'s rows, in row order."""
        return list(self._files[split])

    def labels(self, split: str) -> np.ndarray:
        return np.array([lab for _, lab in self._files[split]], dtype=np.int64)

    def ids(self, split: str) -> np.ndarray:
        """Each row's path relative to the root (POSIX, UTF-8), in row order: the id stage
        one stores, so a row of the feature file can be traced back to its image."""
        return np.array([rel for rel, _ in self._files[split]], dtype=object)

    def file_sha256(self, split: str) -> np.ndarray:
        """The sha256 (hex) of each row's file as it was read when the folder was opened, in
        row order: stage one stores it beside the ids, so stage two can tell whether the
        file at a row's path is still the one whose features it has."""
        return np.array(self._sha256[split], dtype=object)

    def batches(self, split: str, start: int, stop: int, batch_size: int) -> Iterator[Batch]:
        """float32 (B, size, size, 3) RGB 0-255 batches and int64 labels, rows start..stop."""
        import tensorflow as tf

        rows = self._files[split][start:min(stop, self.splits[split])]
        if not rows:
            return
        size = int(self.image_size)
        paths = [str(self.root / rel) for rel, _ in rows]
        labels = np.array([lab for _, lab in rows], dtype=np.int64)

        policy = self._policy

        def load(path: bytes) -> np.ndarray:
            return decode_image(path.decode(), **policy)  # a DataError here names the file

        @tf.autograph.experimental.do_not_convert  # plain TF ops; nothing to convert
        def one(path):
            img = tf.numpy_function(load, [path], tf.uint8, stateful=False)
            img.set_shape([None, None, 3])
            return resize_images(tf.cast(img, tf.float32), size)

        ds = (tf.data.Dataset.from_tensor_slices(paths)
              .map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
              .batch(batch_size)
              .prefetch(1))
        i = 0
        try:
            for images in ds.as_numpy_iterator():
                yield images, labels[i:i + len(images)]
                i += len(images)
        except tf.errors.OpError as exc:
            why = next((ln for ln in str(exc).splitlines() if "cannot be decoded" in ln
                        or "does not exist" in ln), str(exc).splitlines()[0])
            raise DataError(f"{self.root} changed while it was read ({why.strip()[:200]}); "
                            f"run the same command again") from None
