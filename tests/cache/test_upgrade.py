"""Feature-file schema 2 (per-row ids): old files are refused clearly, ``featcache upgrade``
migrates them in place (registry: indices; folders: relative paths from the folder), and
the upgraded file is found up to date by stage one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from featcache.cache import upgrade as upgrading
from featcache.cache.reader import SCHEMA_VERSION, attrs_dict, load_features, read_attrs
from featcache.config import ExtractConfig, config_sha256
from featcache.errors import DataError, OldSchemaError, StaleCacheError
from featcache.extract.run import extract_features

ROOT = Path(__file__).resolve().parents[2]


def as_schema_1(path: Path) -> None:
    """Turn a file into what featcache wrote before ids (schema 1, as at e6c9ec6): no
    ``ids`` datasets, ``schema_version`` 1, stage one's test share under its old name
    ``val_fraction`` and ``config_sha256`` over the key with that name, the rest as it is."""
    back = {new: old for old, new in upgrading.ATTR_RENAMES.items()}
    with h5py.File(path, "r+") as f:
        for split in f.attrs["splits"]:
            del f[str(split)]["ids"]
        f.attrs["schema_version"] = 1
        for new, old in back.items():
            if new in f.attrs:
                f.attrs[old] = f.attrs[new]
                del f.attrs[new]
        attrs = attrs_dict(f.attrs)   # as featcache reads them
        old_key = {back.get(k, k): attrs[back.get(k, k)] for k in upgrading.cache_key_names()
                   if back.get(k, k) in attrs}
        f.attrs["config_sha256"] = config_sha256(old_key)


def _cfg(out: Path, **kw) -> ExtractConfig:
    return ExtractConfig(dataset="synthetic", backbone="mobilenet_025", weights="none", size=32,
                         batch=32, out_dir=str(out), **kw)


@pytest.fixture(scope="module")
def new_file(tmp_path_factory) -> Path:
    return extract_features(_cfg(tmp_path_factory.mktemp("feat"), limit=50)).path


@pytest.fixture
def old_file(new_file, tmp_path) -> Path:
    cfg = _cfg(tmp_path, limit=50)
    path = cfg.output_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(new_file.read_bytes())
    as_schema_1(path)
    return path


def test_new_files_carry_index_ids(new_file):
    fs = load_features(new_file)
    assert fs.attrs["schema_version"] == SCHEMA_VERSION == 2
    for split in ("train", "test"):
        assert fs[split].ids.dtype == np.int64
        assert np.array_equal(fs[split].ids, np.arange(len(fs[split])))
    assert len(load_features(new_file, max_rows=7)["train"].ids) == 7


def test_old_schema_is_refused_with_one_line_naming_upgrade(old_file):
    for read in (load_features, read_attrs):
        with pytest.raises(OldSchemaError) as err:
            read(old_file)
        msg = str(err.value)
        assert "\n" not in msg and "schema 1" in msg and f"featcache upgrade {old_file}" in msg
    with pytest.raises(StaleCacheError, match="featcache upgrade"):  # stage one: same hint
        extract_features(_cfg(old_file.parent, limit=50))


def test_upgrade_round_trip(old_file, new_file):
    msg = upgrading.upgrade(old_file)
    assert "schema 1 to 2" in msg
    up, ref = load_features(old_file), load_features(new_file)
    assert up.attrs["upgraded_from_schema"] == 1
    assert up.attrs["config_sha256"] == ref.attrs["config_sha256"]
    for split in ("train", "test"):
        assert np.array_equal(up[split].features, ref[split].features)
        assert np.array_equal(up[split].labels, ref[split].labels)
        assert np.array_equal(up[split].ids, ref[split].ids)
    r = extract_features(_cfg(old_file.parent, limit=50))  # found up to date: nothing done
    assert r.cached and r.images == 0
    assert "nothing to do" in upgrading.upgrade(old_file)
    assert not list(old_file.parent.glob(".*.tmp*"))


def test_upgrade_cli_and_partial_shard_part(tmp_path):
    """A shard part's ids start at its row_start; the CLI prints what it did."""
    cfg = _cfg(tmp_path, shard=(1, 2))
    part = extract_features(cfg).path
    start = int(h5py.File(part, "r")["train"].attrs["row_start"])
    as_schema_1(part)
    proc = subprocess.run([sys.executable, "-m", "featcache", "upgrade", str(part)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "upgraded" in proc.stdout
    ids = load_features(part)["train"].ids
    assert start > 0 and np.array_equal(ids, np.arange(start, start + len(ids)))


def test_upgrade_renames_attributes_and_rehashes(old_file):
    """When the cache key names stage one's test share ``test_fraction``, the upgrade
    renames the attribute and recomputes ``config_sha256`` over the renamed key."""
    names = upgrading.cache_key_names()
    assert "test_fraction" in names and "val_fraction" not in names
    renamed = [upgrading.ATTR_RENAMES.get(n, n) for n in names]
    old = dict(h5py.File(old_file, "r").attrs)
    upgrading.upgrade(old_file)
    attrs = read_attrs(old_file)
    assert "val_fraction" not in attrs and attrs["test_fraction"] == old["val_fraction"]
    key = {n: attrs[n] for n in renamed if n in attrs}
    assert attrs["config_sha256"] == config_sha256(key) != old["config_sha256"]


def test_upgrade_is_atomic_when_interrupted(old_file, monkeypatch):
    before = old_file.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(upgrading, "write_ids", boom)
    with pytest.raises(KeyboardInterrupt):
        upgrading.upgrade(old_file)
    assert old_file.read_bytes() == before
    assert sorted(p.name for p in old_file.parent.iterdir()
                  if not p.name.endswith(".lock")) == [old_file.name]


def _folder_file(tmp_path):
    from image_folders import make_image_folder

    folder = make_image_folder(tmp_path / "pics", corrupt=True)
    cfg = ExtractConfig(dataset=str(folder), backbone="mobilenet_025", weights="none", size=32,
                        batch=8, out_dir=str(tmp_path / "out"))
    return folder, cfg, extract_features(cfg).path


def test_upgrade_folder_file_lists_paths_and_refuses_a_changed_folder(tmp_path):
    folder, cfg, path = _folder_file(tmp_path)
    ref = load_features(path)
    backup = tmp_path / "schema1.h5"
    as_schema_1(path)
    backup.write_bytes(path.read_bytes())
    upgrading.upgrade(path)
    up = load_features(path)
    for split in ("train", "test"):
        assert list(up[split].ids) == list(ref[split].ids)
        assert all((folder / rel).is_file() for rel in up[split].ids)
    assert extract_features(cfg).cached

    path.write_bytes(backup.read_bytes())   # schema 1 again; now the folder changes
    (folder / up["train"].ids[0]).unlink()
    with pytest.raises(DataError, match="changed.*re-run stage one with --force"):
        upgrading.upgrade(path)
    folder.rename(tmp_path / "moved")
    with pytest.raises(DataError, match="not there.*re-run stage one with --force"):
        upgrading.upgrade(path)
    assert path.read_bytes() == backup.read_bytes()


def test_upgraded_partial_file_resumes(tmp_path, new_file):
    """An interrupted schema-1 run (``.partial``) is upgraded, then the same command
    resumes it; the result equals an uninterrupted run."""
    from featcache.cache.lock import partial_path
    from featcache.errors import Interrupted

    cfg = _cfg(tmp_path, limit=50)
    with pytest.raises(Interrupted):
        extract_features(cfg, stop_after=32)
    partial = partial_path(cfg.output_path)
    as_schema_1(partial)
    assert "schema 1 to 2" in upgrading.upgrade(partial)
    r = extract_features(cfg)
    assert not r.cached and 0 < r.images < 100   # only the rows left were run
    up, ref = load_features(r.path), load_features(new_file)
    for split in ("train", "test"):
        assert np.array_equal(up[split].features, ref[split].features)
        assert np.array_equal(up[split].ids, ref[split].ids)
