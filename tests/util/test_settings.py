"""The settings table (featcache/_util/settings.py + the config fields): one default per setting,
shared by config.py, the CLI and the Makefile; the cache key, argparse and the Makefile's
arguments generated from it. No TensorFlow: the path command and `make -n` only."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from featcache._util import settings
from featcache.cli.main import build_parser
from featcache.config import ExtractConfig, HeadsConfig, cache_key_fields, config_sha256

ROOT = Path(__file__).resolve().parents[2]
MAKE = ["make", "--no-print-directory", "-s", "-C", str(ROOT), f"PYTHON={sys.executable}"]


def make(*args: str, env=None) -> str:
    e = {k: v for k, v in os.environ.items() if not k.startswith("FEATCACHE_")}
    r = subprocess.run([*MAKE, *args], capture_output=True, text=True, env={**e, **(env or {})},
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def makefile_defaults() -> dict[str, str]:
    text = (ROOT / "Makefile").read_text()
    return {m[1]: m[2].strip() for m in re.finditer(r"^([A-Z_]+)\s*\?=(.*)$", text, re.M)}


def test_every_field_is_in_the_table():
    for cls in (ExtractConfig, HeadsConfig):
        assert [s.name for s in settings.table(cls)] == [f.name for f in fields(cls)]


@pytest.mark.parametrize("cls, command", [(ExtractConfig, "features"), (ExtractConfig, "path"),
                                          (HeadsConfig, "heads")])
def test_cli_defaults_are_the_configs(cls, command):
    args = build_parser().parse_args([command] + (["f.h5"] if cls is HeadsConfig else []))
    built = settings.from_args(cls, args)
    want = cls(**({"feature_file": "f.h5"} if cls is HeadsConfig else {}))
    assert built == want
    for s in settings.table(cls):
        if s.flag and not s.positional:
            assert getattr(args, s.name) == s.default, s.name


def test_makefile_variables_default_to_empty_and_pass_their_flag():
    defaults = makefile_defaults()
    table = [s for cls in (ExtractConfig, HeadsConfig) for s in settings.table(cls) if s.make]
    assert {s.make for s in table} >= {"FLIP", "SIZE", "BACKBONE", "HEADS", "WORKERS"}
    for s in table:
        assert defaults.get(s.make) == "", f"{s.make} ?= {defaults.get(s.make)!r}"
    # no variables: no arguments, so the CLI's (= config's) defaults apply
    assert make("args").split() == ["features:", "heads:"]
    values = {s.make: ("0" if s.is_bool else f"v{i}") for i, s in enumerate(table)}
    out = make("args", *(f"{k}={v}" for k, v in values.items())).splitlines()
    line = {ln.split(":")[0]: ln.split(":", 1)[1].split() for ln in out}
    for s in table:
        words = line["features" if s in settings.table(ExtractConfig) else "heads"]
        if s.is_bool:
            assert "--no-" + s.flag[2:] in words, s.make
        else:
            i = words.index(s.flag)
            assert words[i + 1] == values[s.make], s.make


@pytest.mark.parametrize("variables, flags", [
    ((), ()),                                              # the defaults: mirrored features
    (("FLIP=0",), ("--no-flip",)),
    (("FLIP=1", "SIZE=96", "BACKBONE=mobilenet_025"), ("--flip", "--size", "96",
                                                       "--backbone", "mobilenet_025")),
])
def test_make_and_featcache_name_the_same_file(variables, flags):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATCACHE_")}
    cli = subprocess.run([sys.executable, "-m", "featcache", "path", *flags], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert make("path", *variables).strip() == cli
    if not variables:
        # the defaults: mirrored features and mobilenet_v2's recommended cut
        assert cli == str(ExtractConfig().output_path)
        assert cli.endswith("_flip_cut-block_13.h5")


def test_main_job_installs_the_package_alone_and_test_adds_dev(tmp_path):
    venv = tmp_path / "venv"
    out = make("-n", "features", f"VENV={venv}")
    assert "pip install -q -e ." in out and "[dev]" not in out
    venv.mkdir()
    (venv / ".installed-featcache").touch()  # after `make features`: only the extra
    out = make("-n", "test", f"VENV={venv}")
    assert "pip install -q -e '.[dev]'" in out
    assert "-m venv" not in out and not re.search(r"pip install -q -e \.$", out, re.M)


def test_cache_key_is_generated_from_the_table():
    names = cache_key_fields()
    assert names[:2] == ("dataset", "dataset_sha256") and "image_size" in names
    assert "test_fraction" in names and "val_fraction" not in names
    assert not {"batch", "xla", "out_dir", "size"} & set(names)
    key = ExtractConfig(runtime="openvino", precision="float32", test_fraction=0.3,
                        cut="none").cache_key(
        dataset_sha256="d", weights_sha256="w", runtime_version="1")
    # cut: only when set; calibration: only at int8
    assert tuple(key) == tuple(n for n in names if n not in ("cut", "calibration"))
    assert ExtractConfig(precision="int8", calibration=50).cache_key(
        dataset_sha256="d", weights_sha256="w", runtime_version="1")["calibration"] == 50
    assert names[-1] == "cut" and ExtractConfig(cut="block_16").cache_key(
        dataset_sha256="d", weights_sha256="w", runtime_version="1")["cut"] == "block_16"
    assert key["test_fraction"] == 0.3 and key["image_size"] == 224 and key["limit"] == 0
    other = ExtractConfig(runtime="openvino", precision="float32", batch=7, cut="none").cache_key(
        dataset_sha256="d", weights_sha256="w", runtime_version="1")
    assert config_sha256(other) != config_sha256(key)   # test_fraction differs
    assert config_sha256(other) == config_sha256({**key, "test_fraction": 0.2})


def test_resolved_once():
    r = ExtractConfig().resolved()
    assert r.resolved() is r and r.size == 224 and r.preprocess == "tf"
    assert r.output_path == ExtractConfig().output_path


def test_val_fraction_is_a_deprecated_alias_of_test_fraction(capsys):
    from featcache.cli.main import main

    assert main(["path", "--val-fraction", "0.3", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["test_fraction"] == 0.3
    assert "--val-fraction is deprecated; use --test-fraction" in out.err


def test_settings_command_lists_the_table(capsys):
    from featcache.cli.main import main

    assert main(["settings", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    flip = {(r["stage"], r["name"]): r for r in rows}
    assert flip[("ExtractConfig", "flip")]["default"] is True
    assert flip[("ExtractConfig", "flip")]["make"] == "FLIP"
    assert flip[("HeadsConfig", "flip")]["choices"] == ["auto", "off", "train", "tta", "both"]
    assert flip[("ExtractConfig", "size")]["cache_key"] == "image_size"


def test_info_shows_the_cache_key_first(tmp_path, capsys):
    from stage_two_util import make_feature_file

    from featcache.cli.main import main

    path = make_feature_file(tmp_path / "f.h5")
    assert main(["info", str(path)]) == 0
    shown = list(json.loads(capsys.readouterr().out))
    key = [k for k in cache_key_fields() if k in shown]
    assert {"dataset", "backbone", "image_size", "weights"} <= set(key)
    assert shown[:len(key)] == key and "complete" in shown[len(key):]


@pytest.mark.parametrize("keras_home, want",
                         [(None, ""), ("/some/keras", "KERAS_HOME=/some/keras")])
def test_make_passes_keras_home_only_when_it_is_set(keras_home, want):
    """An empty KERAS_HOME would make Keras write keras.json and download weights into the
    current folder; unset, make must leave it unset."""
    import shutil

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_HOME", "MAKEFLAGS")}
    if keras_home:
        env["KERAS_HOME"] = keras_home
    r = subprocess.run(["make", "-s", "-C", str(ROOT), "--eval",
                        "envcheck: ; @env | grep ^KERAS_HOME= || true", "envcheck"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want
