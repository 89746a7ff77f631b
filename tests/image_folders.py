"""Small generated image folders for the tests (class-per-folder trees of varied images:
sizes, JPEG/PNG/BMP/GIF, grey/RGBA/palette, nested folders, a corrupt file, ignored files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("bird", "cat", "dog")
COLOURS = {"bird": (200, 40, 40), "cat": (40, 180, 60), "dog": (50, 60, 210)}
#: (relative name, size (w, h), PIL mode, format) - one of each kind per class
KINDS = [
    ("a.jpg", (40, 30), "RGB", "JPEG"),
    ("b.png", (25, 50), "L", "PNG"),
    ("indoor/c.png", (33, 33), "RGBA", "PNG"),
    ("indoor/deeper/d.bmp", (64, 20), "P", "BMP"),
    ("e.gif", (30, 30), "P", "GIF"),  # animated: the first frame counts
    ("f.PNG", (48, 36), "P", "PNG"),
    ("g.bmp", (17, 23), "RGB", "BMP"),
    ("h.jpeg", (90, 70), "L", "JPEG"),
]


def picture(cls: str, size, seed: int) -> Image.Image:
    w, h = size
    rng = np.random.default_rng(seed)
    base = np.array(COLOURS[cls], float)
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = ((xx if cls == "cat" else yy) // 4) % 2
    img = base * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_image(path: Path, cls: str, size, mode: str, fmt: str, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = picture(cls, size, seed).convert(mode)
    if fmt == "GIF":
        second = Image.fromarray(255 - np.asarray(img.convert("RGB"))).convert("P")
        img.save(path, format="GIF", save_all=True, append_images=[second])
    else:
        img.save(path, format=fmt)


def make_image_folder(root: Path, *, copies: int = 1, corrupt: bool = True,
                      split_dirs: bool = False) -> Path:
    """A small class-per-folder tree under ``root``; ``copies`` times every kind per class."""
    splits = ("train", "test") if split_dirs else ("",)
    seed = 0
    for split in splits:
        for cls in CLASSES:
            for k in range(copies):
                for name, size, mode, fmt in KINDS:
                    stem, _, ext = name.rpartition(".")
                    seed += 1
                    write_image(root / split / cls / f"{stem}{k}.{ext}", cls, size, mode, fmt,
                                seed)
    first = root / splits[0]
    if corrupt:
        good = (first / "dog" / "a0.jpg").read_bytes()
        (first / "dog" / "broken.jpg").write_bytes(good[:len(good) // 3])
    (first / "dog" / "notes.txt").write_text("not an image")
    (first / "dog" / ".hidden.png").write_bytes(b"ignored")
    (first / "cat" / ".thumbs").mkdir()
    (first / "cat" / ".thumbs" / "x.png").write_bytes(b"ignored too")
    return root
