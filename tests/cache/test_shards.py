"""Scale-out by shards: ``--shard i/n`` part files and ``featcache merge``.

The parts of any shard count merge into a file whose arrays are bit-identical to a
single-process run's and whose provenance is the same (so it is an up-to-date cache for
that configuration); missing, incomplete, duplicate and mismatched parts are refused.
Writes only under ``tmp_path``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from featcache.cache.lock import partial_path
from featcache.cache.merge import find_parts, merge, merge_parts, merged_name
from featcache.cache.progress import read_progress
from featcache.cache.reader import load_features, read_attrs
from featcache.config import ExtractConfig
from featcache.data.datasets import Synthetic
from featcache.errors import CacheError, Interrupted
from featcache.extract.run import extract_features, shard_range

ROOT = Path(__file__).resolve().parents[2]
BATCH = 16


def dataset(seed: int = 0) -> Synthetic:
    return Synthetic(n_train=150, n_test=37, seed=seed)   # ragged last batches on purpose


def config(out: Path, **kw) -> ExtractConfig:
    base = dict(dataset="synthetic", backbone="mobilenet_025", weights="none", size=32,
                batch=BATCH, out_dir=str(out), flip=True)
    base.update(kw)
    return ExtractConfig(**base)


def extract_parts(cfg: ExtractConfig, n: int, ds=None) -> list[Path]:
    return [extract_features(replace(cfg, shard=(i, n)), dataset=ds or dataset()).path
            for i in range(n)]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    return extract_features(config(out), dataset=dataset()).path


@pytest.fixture(scope="module")
def made_parts(tmp_path_factory):
    """``made_parts(n, dest)``: the n part files of ``config``, extracted once per module
    and copied into ``dest`` (so each test can damage its own copies)."""
    cache: dict[int, list[Path]] = {}
    base = tmp_path_factory.mktemp("parts")

    def get(n: int, dest: Path) -> list[Path]:
        if n not in cache:
            cache[n] = extract_parts(config(base / str(n)), n)
        dest.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy(p, dest / p.name)) for p in cache[n]]
    return get


def assert_same(a: Path, b: Path) -> None:
    fa, fb = load_features(a), load_features(b)
    assert fa.classes == fb.classes
    for split in fa.splits:
        assert np.array_equal(fa[split].features, fb[split].features), split
        assert np.array_equal(fa[split].features_flip, fb[split].features_flip), split
        assert np.array_equal(fa[split].labels, fb[split].labels), split
        assert np.array_equal(fa[split].ids, fb[split].ids), split
        assert np.array_equal(fa[split].ids, np.arange(len(fa[split]))), split


@pytest.mark.parametrize("rows, batch, n", [(150, 16, 3), (37, 16, 2), (37, 16, 5),
                                            (64, 16, 4), (1, 8, 3), (50000, 64, 7)])
def test_shard_ranges_tile_the_rows_on_batch_boundaries(rows, batch, n):
    ranges = [shard_range(rows, batch, (i, n)) for i in range(n)]
    assert ranges[0][0] == 0 and ranges[-1][1] == rows
    for (lo, hi), (lo2, _) in zip(ranges, ranges[1:]):
        assert hi == lo2 and lo <= hi
    for lo, hi in ranges:
        assert lo % batch == 0
        assert hi % batch == 0 or hi == rows


@pytest.mark.parametrize("n", [2, 3])
def test_merged_parts_equal_a_single_process_run(tmp_path, single, n):
    cfg = config(tmp_path)
    parts = extract_parts(cfg, n)  # (made here: the naming is part of what is tested)
    assert [p.name for p in parts] == [f"{single.stem}.part{i}of{n}.h5" for i in range(n)]
    assert read_attrs(parts[1])["shard"] == f"1/{n}"
    assert find_parts(cfg.merged_path) == parts
    out = merge(cfg.merged_path)
    assert out == cfg.merged_path and out.name == single.name
    assert_same(out, single)
    a, b = read_attrs(single), read_attrs(out)
    differ = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert differ == {"created_utc", "merged_from"}, differ
    assert b["merged_from"] == n
    # the merged file is an up-to-date cache for the single-process configuration
    again = extract_features(cfg, dataset=dataset())
    assert again.cached and again.path == out


def test_part_files_hold_the_ids_of_their_rows(tmp_path, made_parts):
    """Each part stores the split indices of its own rows (row_start on); merged: all."""
    parts = made_parts(3, tmp_path)
    seen = {"train": [], "test": []}
    for p in parts:
        with h5py.File(p, "r") as f:
            for split in seen:
                start, n = int(f[split].attrs["row_start"]), f[split]["labels"].shape[0]
                ids = load_features(p)[split].ids
                assert ids.dtype == np.int64
                assert np.array_equal(ids, np.arange(start, start + n))
                seen[split].extend(ids.tolist())
    assert seen["train"] == list(range(150)) and seen["test"] == list(range(37))


def test_merge_cli_with_explicit_parts_and_remove(tmp_path, single, made_parts):
    parts = made_parts(2, tmp_path)
    target = tmp_path / "joined.h5"
    proc = subprocess.run([sys.executable, "-m", "featcache", "merge", *map(str, parts),
                           "-o", str(target), "--remove-parts"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "merged into" in proc.stdout
    assert_same(target, single)
    assert not any(p.exists() for p in parts)


def _cli_merge(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featcache", "merge", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def _one_line_error(proc, *fragments):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("featcache: error: ")
    for f in fragments:
        assert f in last, last


def test_missing_and_unfinished_parts_are_refused(tmp_path):
    cfg = config(tmp_path)
    p0 = extract_features(replace(cfg, shard=(0, 3)), dataset=dataset()).path
    with pytest.raises(Interrupted):
        extract_features(replace(cfg, shard=(2, 3)), dataset=dataset(), stop_after=1)
    out = cfg.merged_path
    proc = _cli_merge(out)
    _one_line_error(proc, "missing part(s) 1/3, 2/3", "--shard I/3")
    assert not out.exists() and not partial_path(out).exists()
    # an explicitly named unfinished part is refused too
    unfinished = partial_path(replace(cfg, shard=(2, 3)).output_path)
    assert unfinished.exists()
    with pytest.raises(CacheError, match="incomplete"):
        merge_parts([p0, unfinished], out)
    assert not out.exists() and not partial_path(out).exists()


def test_no_parts_at_all(tmp_path):
    _one_line_error(_cli_merge(tmp_path / "nothing.h5"), "no complete part files")


@pytest.mark.parametrize("other, says", [
    (dict(ds_seed=1), "dataset_sha256"),           # the data changed between parts
    (dict(flip=False), "flip"),                    # another configuration
    (dict(batch=8), "batch_size"),                 # rows would not line up batch-wise
])
def test_mismatched_part_is_refused(tmp_path, made_parts, other, says):
    cfg = config(tmp_path / "a")
    parts = made_parts(2, tmp_path / "a")
    kw = {k: v for k, v in other.items() if k != "ds_seed"}
    cfg_b = config(tmp_path / "b", **kw)
    part_b = extract_features(replace(cfg_b, shard=(1, 2)),
                              dataset=dataset(other.get("ds_seed", 0))).path
    shutil.copy(part_b, parts[1])   # an impostor under the expected name
    proc = _cli_merge(cfg.merged_path)
    _one_line_error(proc, "does not match", says)
    assert not cfg.merged_path.exists() and not partial_path(cfg.merged_path).exists()


def test_duplicate_and_foreign_parts_are_refused(tmp_path, made_parts, single):
    cfg = config(tmp_path)
    p2 = made_parts(2, tmp_path)
    p3 = made_parts(3, tmp_path)
    with pytest.raises(CacheError, match="different shard counts"):
        merge(cfg.merged_path)                 # finds 2 + 3 parts
    with pytest.raises(CacheError, match="both part 0/2"):
        merge(cfg.merged_path, [p2[0], p2[0], p2[1]])
    with pytest.raises(CacheError, match="not a shard part"):
        merge_parts([single], tmp_path / "m.h5")
    assert merged_name(p3[2]) == cfg.merged_path


def test_interrupted_merge_resumes(tmp_path, single, made_parts, monkeypatch):
    """A merge killed half-way leaves ``.partial``; the same merge finishes it."""
    import featcache.cache.merge as merging
    from featcache.cache import writer

    cfg = config(tmp_path)
    parts = made_parts(2, tmp_path)
    monkeypatch.setattr(merging, "MERGE_BLOCK_BYTES", 10 * 256 * 4)   # 10-row blocks
    real = writer.FeatureWriter.write
    calls = {"n": 0}

    def dying_write(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(writer.FeatureWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        merge(cfg.merged_path)
    assert not cfg.merged_path.exists()
    assert read_progress(partial_path(cfg.merged_path))["rows_done"]["train"] == 30
    monkeypatch.setattr(writer.FeatureWriter, "write", real)
    merge(cfg.merged_path, parts)
    assert_same(cfg.merged_path, single)


def test_merged_folder_parts_keep_each_rows_file_hash(tmp_path):
    """An image folder's parts store each row's path and file sha256; the merged file holds
    both for every row, in order (what ``mistakes.png`` checks the files against)."""
    from featcache.cache.writer import FeatureWriter, SplitSpec

    rows, ids = 10, [f"c{i % 2}/{i}.png" for i in range(10)]
    sha = [f"{i:064x}" for i in range(10)]
    parts = []
    for k, (lo, hi) in enumerate(((0, 6), (6, 10))):
        p = tmp_path / f"f.part{k}of2.h5"
        attrs = {"config_sha256": "0" * 64, "batch_size": 2, "shard": f"{k}/2",
                 "total_rows": [rows]}
        with FeatureWriter.open(p, attrs=attrs, classes=["c0", "c1"], dim=3,
                                splits={"test": SplitSpec(hi - lo, lo, ids[lo:hi],
                                                          sha[lo:hi])}) as w:
            w.write("test", np.ones((hi - lo, 3), np.float32), np.arange(lo, hi) % 2)
            w.mark_complete()
        parts.append(p)
    merged = load_features(merge_parts(parts, tmp_path / "f.h5"))["test"]
    assert list(merged.ids) == ids and list(merged.sha256) == sha
