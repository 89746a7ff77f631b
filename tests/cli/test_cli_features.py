"""The stage-one CLI as a user meets it: one-line errors with a non-zero exit, the path
command the Makefile uses (no TensorFlow needed), and a real run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from featcache.config import ExtractConfig

ROOT = Path(__file__).resolve().parents[2]


def run(*args, env=None, cwd=None):
    e = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    return subprocess.run([sys.executable, "-m", "featcache", *args], capture_output=True,
                          text=True, env=e, cwd=cwd or ROOT, timeout=600)


def last_line(stderr: str) -> str:
    return [ln for ln in stderr.strip().splitlines() if ln.strip()][-1]


def test_path_needs_no_tensorflow():
    code = ("import sys, runpy; sys.modules['tensorflow'] = None; sys.modules['keras'] = None;"
            "sys.modules['numpy'] = None; sys.modules['h5py'] = None;"
            "sys.argv = ['featcache', 'path', '--size', '96', '--flip'];"
            "runpy.run_module('featcache', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    # the default runtime and precision as resolved here (_ov, _ov_bf16 or nothing)
    want = ExtractConfig(size=96, flip=True).output_path
    assert out.stdout.strip() == str(want), out.stderr
    assert want.name.startswith("cifar10_mobilenet_v2_96")
    assert want.name.endswith("_flip_cut-block_13.h5")


@pytest.mark.parametrize("args, msg", [
    (["features", "--backbone", "resnet9000"], "invalid choice"),
    (["features", "--dataset", "imagenet22k"], "unknown dataset 'imagenet22k'"),
    (["features", "--dataset", "synthetic", "--backbone", "inception_v3", "--size", "32"],
     "at least 75 px"),
    (["features", "--shard", "3/2"], "0 <= i < n"),
    (["info", "/nonexistent.h5"], "does not exist"),
])
def test_user_errors_are_one_line(args, msg):
    r = run(*args)
    assert r.returncode != 0
    assert msg in last_line(r.stderr)
    assert "Traceback" not in r.stderr


def test_offline_without_data_is_one_clear_line(tmp_path):
    r = run("features", "--data-dir", str(tmp_path), "--no-download")
    assert r.returncode == 2
    assert last_line(r.stderr).startswith("featcache: error: CIFAR-10 not found")
    assert "Traceback" not in r.stderr


def test_features_then_noop_then_stale(tmp_path):
    base = ["features", "--dataset", "synthetic", "--backbone", "mobilenet_025", "--weights",
            "none", "--size", "32", "--out-dir", str(tmp_path), "--variant", "v"]
    r = run(*base)
    assert r.returncode == 0, r.stderr
    assert "160 images" in r.stdout
    r = run(*base)
    assert r.returncode == 0 and "up to date" in r.stdout
    r = run(*base, "--preprocess", "scale01")
    assert r.returncode == 2
    assert "--force" in last_line(r.stderr) and "Traceback" not in r.stderr
    info = run("info", str(tmp_path / "synthetic_mobilenet_025_32_v.h5"))
    assert '"complete": true' in info.stdout


def test_backbones_table_lists_every_backbone():
    from featcache.backbones.registry import BACKBONES

    r = run("backbones")
    assert r.returncode == 0
    for name in BACKBONES:
        assert f"| {name} |" in r.stdout
