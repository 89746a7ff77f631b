"""The Makefile on an image folder whose file and class names have spaces, quotes and shell
or make characters (``$ # : %``, unicode): ``make features heads export`` and
``featcache predict`` go through, a repeated run does nothing, an added image re-runs stage
one, and no lock file is left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
CLASSES = {"ant photos": (200, 40, 40), "b$e#e:s% \"q\"": (40, 40, 200)}
NAMES = ["ant photo 1.jpg", "it's \"q\".jpg", "x$y#z:%.png", "ünï cödé.jpg", "plain.jpg",
         "more 2.jpg", "a (1).jpg", "semi;colon.jpg"]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@pytest.fixture
def odd_folder(tmp_path) -> Path:
    root = tmp_path / "my pics"
    for i, (cls, colour) in enumerate(CLASSES.items()):
        (root / cls).mkdir(parents=True)
        for j, name in enumerate(NAMES):
            noise = np.random.default_rng(10 * i + j).normal(0, 20, (40, 40, 3))
            Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(
                root / cls / name)
    return root


def _make(*targets, folder: Path, out: Path, dry: bool = False):
    args = ["make", "-C", str(ROOT), *(["-n"] if dry else []), *targets,
            f"DATASET={folder}", f"OUT_DIR={out}", "BACKBONE=mobilenet_025", "WEIGHTS=none",
            "SIZE=32", "HEADS=logreg", f"VENV={VENV}", f"PYTHON={sys.executable}"]
    return subprocess.run(args, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_make_reads_any_file_name_the_cli_accepts(odd_folder, tmp_path):
    r = _make("features", folder=odd_folder, out=tmp_path / "features", dry=True)
    assert r.returncode == 0, r.stderr
    assert "No rule to make target" not in r.stderr
    assert "-m featcache features --dataset" in r.stdout


def test_make_features_heads_export_and_predict_on_odd_names(odd_folder, tmp_path):
    stamp = VENV / ".installed-featcache"
    if not stamp.is_file() or stamp.stat().st_mtime < (ROOT / "pyproject.toml").stat().st_mtime:
        pytest.skip("the Makefile's virtualenv is not installed and current (make install)")
    out = tmp_path / "features"
    r = _make("features", "heads", "export", folder=odd_folder, out=out)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    [model] = out.glob("*/*.keras")
    again = _make("features", "heads", folder=odd_folder, out=out)
    assert again.returncode == 0 and "-m featcache" not in again.stdout   # up to date
    files = sorted(str(p) for p in odd_folder.rglob("*") if p.is_file())
    p = subprocess.run([str(VENV / "bin" / "featcache"), "predict", str(model), *files],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == len(files) == 2 * len(NAMES)
    assert all(line.startswith(f) for line, f in zip(lines, files))
    assert all("ant photos" in line and 'b$e#e:s% "q"' in line for line in lines)
    assert not list(tmp_path.rglob("*.lock"))
    # a new image: the listing changes, stage one runs and names the stale file
    shutil.copy(odd_folder / "ant photos" / "plain.jpg", odd_folder / "ant photos" / "new 1.jpg")
    changed = _make("features", folder=odd_folder, out=out)
    assert changed.returncode != 0 and "--force" in changed.stderr
