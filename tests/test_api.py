"""The notebook API: every name ``import featcache`` offers, what each takes and returns, and
the behaviour that lives below the CLI (the report-folder lock, the Ray engine as a
setting)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from stage_two_util import make_feature_file

import featcache
from featcache.errors import ConfigError, LockedError

ROOT = Path(__file__).resolve().parents[1]
API = ("extract_features", "load_features", "compare_heads", "list_backbones", "list_heads",
       "get_head", "export_model", "load_classifier", "predict_images", "ExtractConfig",
       "HeadsConfig", "FeatcacheError")


def test_every_api_name_is_listed_and_importing_needs_no_tensorflow():
    code = ("import sys, featcache as f; print(f.list_backbones('mobilenet*'), f.list_heads());"
            "print(sorted(set(f.__all__) - set(dir(f))));"
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    listed, missing, heavy = r.stdout.splitlines()
    assert listed.startswith("['mobilenet', 'mobilenet_025', 'mobilenet_v2',") and \
        "'logreg', 'linear_svm'" in listed
    assert missing == "[]" and heavy == "False False"
    assert set(API) <= set(featcache.__all__) <= set(dir(featcache))


def test_the_registries_are_listed_by_pattern():
    assert featcache.list_backbones("efficientnet_b?") == [
        "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3"]
    assert featcache.list_backbones("nope*") == []
    assert featcache.list_heads("*svm*") == ["linear_svm", "rbf_svm"]
    assert featcache.list_heads(defaults=True) == ["logreg", "linear_svm", "knn", "dense"]


def test_get_head_is_a_scikit_learn_estimator():
    from sklearn.base import clone
    from sklearn.model_selection import cross_val_score
    from sklearn.utils.estimator_checks import check_estimator

    head = featcache.get_head("logreg", C=0.1)
    assert head.get_params()["C"] == 0.1 and clone(head).get_params()["C"] == 0.1
    check_estimator(featcache.get_head("logreg"))
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 8)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    assert cross_val_score(featcache.get_head("knn"), X, y, cv=3).mean() > 0.7
    with pytest.raises(ConfigError, match="unknown head 'nope'"):
        featcache.get_head("nope")


def test_compare_heads_takes_a_path_a_feature_set_or_a_config(tmp_path):
    path = make_feature_file(tmp_path / "f.h5", n_train=120, n_test=60)
    by_path = featcache.compare_heads(path, heads="logreg", flip="off", workers=0)
    assert by_path.best_row == "logreg" and by_path.best["name"] == "logreg"
    assert by_path.report_dir == tmp_path / "f" and (tmp_path / "f" / "results.json").is_file()
    assert by_path.table.startswith("| head | test accuracy") and "**best**" in by_path.table
    assert by_path._repr_markdown_() == by_path.table and "best_row='logreg'" in repr(by_path)
    saved = json.loads((tmp_path / "f" / "results.json").read_text())
    assert by_path.to_dict()["rows"] == saved["rows"] and by_path["rows"] == saved["rows"]
    assert by_path.head().predict(np.zeros((2, 16), np.float32)).shape == (2,)

    fs = featcache.load_features(path)
    by_set = featcache.compare_heads(fs, heads=("logreg",), flip="off", workers=0,
                                     out_dir=str(tmp_path / "r2"))
    cfg = featcache.HeadsConfig(str(path), heads=("logreg",), flip="off", workers=0)
    by_cfg = featcache.compare_heads(cfg, write=False)
    assert by_cfg.report_dir is None and not (tmp_path / "r3").exists()
    assert not list(tmp_path.rglob("*.lock"))    # nor does a comparison leave its lock
    accs = {c.best["test_accuracy"] for c in (by_path, by_set, by_cfg)}
    assert len(accs) == 1                      # the same comparison three ways
    with pytest.raises(ConfigError, match="unknown stage-two setting 'hedas'.*heads"):
        featcache.compare_heads(path, hedas="logreg")
    with pytest.raises(ConfigError, match="takes a feature file's path"):
        featcache.compare_heads(42)


def test_two_compare_heads_on_one_report_refuse_or_wait(tmp_path):
    """Another process holding the report folder: compare_heads refuses in one line, or
    with wait=True runs once the other has finished; nothing of the report is mixed."""
    path = make_feature_file(tmp_path / "f.h5", n_train=120, n_test=60)
    hold = ("import sys, time; from featcache.cache.lock import FileLock;"
            "lock = FileLock(sys.argv[1]).acquire(); print('held', flush=True);"
            "time.sleep(float(sys.argv[2]))")
    other = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "f"), "3"],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline().strip() == "held"
    with pytest.raises(LockedError, match=r"is being written by another featcache process "
                                          rf"\(pid {other.pid}\).*wait") as info:
        featcache.compare_heads(path, heads="logreg", flip="off", workers=0)
    assert "\n" not in str(info.value) and not (tmp_path / "f").exists()
    t0 = time.monotonic()
    done = featcache.compare_heads(path, heads="logreg", flip="off", workers=0, wait=True)
    assert time.monotonic() - t0 > 1.0 and other.wait(timeout=30) == 0
    assert json.loads((tmp_path / "f" / "results.json").read_text())["rows"] == done.rows


def test_extract_features_takes_settings_as_keywords(tmp_path):
    r = featcache.extract_features(dataset="synthetic", backbone="mobilenet_025",
                                   weights="none", size=32, flip=False, runtime="tensorflow",
                                   out_dir=str(tmp_path))
    assert r.path.is_file() and r.images > 0
    again = featcache.extract_features(
        featcache.ExtractConfig(dataset="synthetic", backbone="mobilenet_025", weights="none",
                                size=32, flip=False, runtime="tensorflow"),
        out_dir=str(tmp_path))
    assert again.cached and again.path == r.path
    assert not list(tmp_path.rglob("*.lock"))    # the writer's lock goes with the writer
    with pytest.raises(ConfigError, match="unknown stage-one setting 'backbon'"):
        featcache.extract_features(backbon="mobilenet_v2")
    with pytest.raises(ConfigError, match="--engine must be one of local, ray"):
        featcache.extract_features(engine="spark", out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="--shards must be between 1 and 4096"):
        featcache.extract_features(engine="ray", shards=0, out_dir=str(tmp_path))


def test_the_ray_engine_is_a_setting_of_the_table():
    from featcache._util.settings import describe_settings

    rows = {r["name"]: r for r in describe_settings(featcache.ExtractConfig)}
    assert rows["engine"]["default"] == "local" and rows["engine"]["choices"] == ["local", "ray"]
    assert rows["shards"]["default"] == 2 and rows["ray_address"]["default"] is None
    assert not any(rows[k]["cache_key"] for k in ("engine", "shards", "ray_address"))
    r = subprocess.run([sys.executable, "-m", "featcache", "features", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert "--engine {local,ray}" in r.stdout and "--ray-address" in r.stdout
