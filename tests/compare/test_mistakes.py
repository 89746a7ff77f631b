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
