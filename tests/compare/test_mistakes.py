"""mistakes.png: stage two traces its most confident wrong test rows to their images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from featcache.cache.writer import FeatureWriter
from featcache.compare.comparison import compare_heads
from featcache.compare.mistakes import confident_mistakes, load_images
from featcache.config import HeadsConfig
from featcache.data.datasets import Synthetic


def test_confident_mistakes_ranks_wrong_rows_by_probability():
    y = np.array([0, 1, 2, 0, 1])
    pred = np.array([1, 1, 0, 2, 0])            # rows 0, 2, 3, 4 are wrong
    proba = np.array([[.3, .7, 0], [0, 1, 0], [.9, 0, .1], [.2, 0, .8], [.6, .4, 0]])
    assert confident_mistakes(y, pred, proba, n=3).tolist() == [2, 3, 0]
    assert confident_mistakes(y, pred, None, n=2).tolist() == [0, 2]   # no probabilities
    assert confident_mistakes(y, y).tolist() == []


def test_load_images_by_index_and_by_path(tmp_path):
    want, _ = next(Synthetic().batches("test", 5, 6, 1))
    got = load_images({"dataset": "synthetic"}, "test", np.array([5]))
    assert np.array_equal(got[0], want[0])
    img = np.full((6, 9, 3), 77, np.uint8)
    (tmp_path / "cat").mkdir()
    Image.fromarray(img).save(tmp_path / "cat" / "x.png")
    got = load_images({"source_dir": str(tmp_path)}, "test", np.array(["cat/x.png"], object))
    assert np.array_equal(got[0], img)


@pytest.fixture
def synthetic_file(tmp_path):
    """Overlapping blobs as the features of the synthetic data set's 40 test images."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)).astype(np.float32) * 0.8
    attrs = {"config_sha256": "0" * 64, "dataset": "synthetic", "backbone": "toy",
             "image_size": 32, "weights": "none"}
    ds = Synthetic()
    path = tmp_path / "synthetic_toy_32.h5"
    with FeatureWriter.open(path, attrs=attrs, classes=ds.classes,
                            splits={"train": 120, "test": 40}, dim=8) as w:
        for split, n in (("train", 120), ("test", 40)):
            y = ds.labels(split)[:n]
            w.write(split, (centres[y] + rng.normal(size=(n, 8))).astype(np.float32), y)
        w.mark_complete()
    return path


def test_report_writes_mistakes_png(synthetic_file):
    cfg = HeadsConfig(str(synthetic_file), heads=("logreg",), flip="off", workers=0)
    results = compare_heads(cfg)
    out = cfg.report_dir
    best = results["rows"][0]
    assert best["test_accuracy"] < 1.0                      # there are mistakes to show
    png = out / "mistakes.png"
    assert png.is_file() and results["plots"]["mistakes"] == "mistakes.png"
    assert json.loads((out / "results.json").read_text())["plots"]["mistakes"] == "mistakes.png"
    with Image.open(png) as im:
        assert im.size[0] > 200 and im.size[1] > 200


def test_comparison_hands_its_probabilities_over_without_predicting_again(synthetic_file,
                                                                        monkeypatch):
    """The report's mistakes come from the comparison's own test probabilities: the saved
    head is not loaded again (for the dense head that would import TensorFlow)."""
    import featcache.heads as heads_pkg

    def no_reload(*a, **k):
        raise AssertionError("mistakes.png loaded the saved head again")

    monkeypatch.setattr(heads_pkg, "load_head", no_reload)
    cfg = HeadsConfig(str(synthetic_file), heads=("logreg",), flip="off", workers=0)
    results = compare_heads(cfg)
    assert results["plots"]["mistakes"] == "mistakes.png"


def test_no_images_no_file_and_no_failure(synthetic_file, tmp_path):
    """A data set stage two cannot reach (here: an unknown name) leaves the report whole."""
    import h5py

    with h5py.File(synthetic_file, "r+") as f:
        f.attrs["dataset"] = "nowhere"
    cfg = HeadsConfig(str(synthetic_file), heads=("logreg",), flip="off", workers=0)
    results = compare_heads(cfg)
    assert not (cfg.report_dir / "mistakes.png").exists()
    assert "mistakes" not in results["plots"] and (cfg.report_dir / "results.json").is_file()


@pytest.fixture
def folder_file(tmp_path):
    """A feature file of an image folder, as stage one writes one (ids: paths under
    ``source_dir``, each test row's file sha256, ``created_utc``), with blob features:
    40 small distinct test images, 4 classes."""
    import hashlib
    from datetime import datetime, timezone

    from featcache.cache.writer import SplitSpec

    root = tmp_path / "pets"
    classes = ["a", "b", "c", "d"]
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 8)).astype(np.float32) * 0.8
    y = {"train": np.arange(120) % 4, "test": np.arange(40) % 4}
    ids = {s: [f"{classes[c]}/{s}{i}.png" for i, c in enumerate(y[s])] for s in y}
    for rel in ids["test"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(root / rel)
    sha = [hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in ids["test"]]
    attrs = {"config_sha256": "0" * 64, "dataset": str(root), "backbone": "toy",
             "image_size": 32, "weights": "none", "source_dir": str(root.resolve()),
             "created_utc": datetime.now(timezone.utc).isoformat()}
    path = tmp_path / "pets_toy_32.h5"
    with FeatureWriter.open(path, attrs=attrs, classes=classes, dim=8,
                            splits={"train": SplitSpec(120, 0, ids["train"]),
                                    "test": SplitSpec(40, 0, ids["test"], sha)}) as w:
        for s in ("train", "test"):
            w.write(s, (centres[y[s]] + rng.normal(size=(len(y[s]), 8))).astype(np.float32),
                    y[s].astype(np.int64))
        w.mark_complete()
    return path, root


def _shown(monkeypatch, cfg, caplog) -> tuple[list[str] | None, list[str]]:
    """(the ids mistakes.png shows, None when it is not drawn; its warnings) of one run."""
    import re

    from featcache.compare import mistakes

    got = {"ids": None}
    real = mistakes.plot_grid

    def capture(images, titles, path, suptitle):
        got["ids"] = [re.search(r"id (\S+)$", t).group(1) for t in titles]
        assert len(images) == len(titles)
        return real(images, titles, path, suptitle)

    monkeypatch.setattr(mistakes, "plot_grid", capture)
    caplog.clear()
    with caplog.at_level("WARNING", logger="featcache.compare.mistakes"):
        results = compare_heads(cfg)
    assert ("mistakes" in results["plots"]) == (got["ids"] is not None)
    return got["ids"], [r.getMessage() for r in caplog.records
                        if r.name == "featcache.compare.mistakes"]


def test_mistakes_png_leaves_out_images_changed_since_stage_one(folder_file, monkeypatch,
                                                              caplog):
    """The image folder changed after stage one (files rewritten, one deleted): the figure
    used to show the new files as if they were the ones classified; now each file is
    checked against the sha256 stage one stored for its row, and changed or missing ones
    are left out with one warning that counts them; with none left, no figure."""
    path, root = folder_file
    cfg = HeadsConfig(str(path), heads=("logreg",), flip="off", workers=0)
    first, warned = _shown(monkeypatch, cfg, caplog)
    assert first and len(first) >= 4 and warned == []
    changed, gone = first[:2], first[2]
    for rel in changed:                                       # same name, other pixels
        Image.fromarray(np.full((6, 6, 3), 7, np.uint8)).save(root / rel)
    (root / gone).unlink()
    shown, warned = _shown(monkeypatch, cfg, caplog)
    assert shown == [i for i in first if i not in (*changed, gone)]
    assert len(warned) == 1 and f"leaves out 3 of the {len(first)} most confident" in warned[0]
    assert f"{changed[0]} (changed)" in warned[0] and f"{gone} (gone)" in warned[0]
    for rel in first[3:]:
        Image.fromarray(np.full((6, 6, 3), 9, np.uint8)).save(root / rel)
    shown, warned = _shown(monkeypatch, cfg, caplog)
    assert shown is None and not (cfg.report_dir / "mistakes.png").exists()
    assert len(warned) == 1 and f"all {len(first)} most confident mistakes" in warned[0]


def test_a_file_without_hashes_trusts_only_files_not_modified_since(folder_file, monkeypatch,
                                                                   caplog):
    """A folder's feature file written before the hashes were stored: a file modified after
    the feature file was created is left out; the others are shown."""
    import os

    import h5py

    from featcache.cache.reader import read_attrs
    from featcache.compare.mistakes import _created

    path, root = folder_file
    with h5py.File(path, "r+") as f:
        del f["test"]["sha256"]
    made = _created(read_attrs(path))
    for p in root.rglob("*.png"):
        os.utime(p, (made - 100, made - 100))
    cfg = HeadsConfig(str(path), heads=("logreg",), flip="off", workers=0)
    first, warned = _shown(monkeypatch, cfg, caplog)
    assert first and warned == []
    os.utime(root / first[0], (made + 100, made + 100))
    shown, warned = _shown(monkeypatch, cfg, caplog)
    assert shown == first[1:] and len(warned) == 1
    assert f"{first[0]} (modified after the feature file was made)" in warned[0]
