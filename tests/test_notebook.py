"""docs/notebook.md and the README's Python API example run as written: their ``python``
blocks, in order, in one namespace, in a folder holding ``data/my_photos``. The README's
example on a small generated folder (with the real ImageNet weights where they are present,
random ones otherwise); the notebook on real CIFAR-10 photos written as JPEG files (marked
``real``), and on the generated folder with random weights where the real ones are absent."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from image_folders import make_image_folder

from featcache._util import paths

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def python_blocks(path: Path, section: str | None = None) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if section is not None:
        m = re.search(rf"^## {re.escape(section)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
        assert m, f"{path.name} has no '## {section}' section"
        text = m.group(1)
    return BLOCK.findall(text)


def run_blocks(blocks: list[str], cwd: Path, monkeypatch, rewrite=lambda code: code) -> dict:
    """Execute the blocks one after another (like notebook cells); returns the namespace,
    with everything they printed under ``"_stdout"``."""
    monkeypatch.chdir(cwd)
    ns: dict = {"__name__": "__notebook__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for code in blocks:
            exec(compile(rewrite(code), "<notebook cell>", "exec"), ns)
    ns["_stdout"] = out.getvalue()
    return ns


def _offline_weights(code: str) -> str:
    """Without the ImageNet file here: the same cells with random weights."""
    return code.replace("extract_features(dataset=", 'extract_features(weights="none", dataset=')


def _check(ns: dict, classes) -> None:
    result, model = ns["result"], ns["model"]
    assert {r["head"] for r in result.rows} == {"logreg", "dense", "finetune"}
    assert result.best_row in ns["_stdout"] and "| head | test accuracy" in ns["_stdout"]
    assert model.path.is_file() and model.path.with_suffix(".keras.json").is_file()
    assert list(model.classes) == sorted(classes)


def test_the_notebook_and_the_readme_example_run_as_written(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "data" / "my_photos", copies=2, corrupt=False)
    shutil.copy(folder / "cat" / "a0.jpg", folder / "cat" / "1.jpg")  # the README's file
    home = os.environ.get("KERAS_HOME")   # conftest points it at a writable copy when found
    real = bool(home) and (Path(home) / "models" / paths.MOBILENET_V2_FILE).is_file()
    rewrite = (lambda c: c) if real else _offline_weights
    if not real:   # with the weights, the notebook runs on real photos (the test below)
        ns = run_blocks(python_blocks(ROOT / "docs" / "notebook.md"), tmp_path, monkeypatch,
                        rewrite)
        _check(ns, ("bird", "cat", "dog"))
        assert len([line for line in ns["_stdout"].splitlines() if line.endswith("]")]) >= 4
    readme = run_blocks(python_blocks(ROOT / "README.md", "Python API"), tmp_path,
                        monkeypatch, rewrite)
    _check(readme, ("bird", "cat", "dog"))
    if real:   # three colours of picture, 9 test images: well above chance (0.33)
        assert readme["result"].best["test_accuracy"] >= 0.6
    assert "'class'" in readme["_stdout"] and "cat/1.jpg" in readme["_stdout"]


@pytest.mark.real
@pytest.mark.slow
def test_the_notebook_on_real_photos(real_data_dir, keras_home, tmp_path, monkeypatch):
    """60 CIFAR-10 training photos of each of three classes, as JPEG files in class folders."""
    import pickle

    from PIL import Image

    with open(real_data_dir / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    labels = np.asarray(batch[b"labels"])
    pixels = np.asarray(batch[b"data"]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    keep = ("airplane", "cat", "frog")
    for cls in keep:
        for i, row in enumerate(np.flatnonzero(labels == names.index(cls))[:60]):
            path = tmp_path / "data" / "my_photos" / cls / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[row]).save(path, quality=95)
    ns = run_blocks(python_blocks(ROOT / "docs" / "notebook.md"), tmp_path, monkeypatch)
    _check(ns, keep)
    assert len([line for line in ns["_stdout"].splitlines() if line.endswith("]")]) >= 4
    assert ns["result"].best["test_accuracy"] >= 0.75   # chance: 0.33
