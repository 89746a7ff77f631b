"""The feature-file contract: layout, chunking, partial naming, refusal of stale, corrupt,
incomplete, newer-schema and non-finite files, and the writer lock."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from featcache.cache import lock, reader, writer
from featcache.errors import (
    CacheError,
    CorruptFeatureFile,
    IncompleteFeatureFile,
    LockedError,
    StaleCacheError,
)

D = 16


def _attrs(sha="a" * 64, **kw):
    return {"config_sha256": sha, "dataset": "toy", "backbone": "toy", **kw}


def _write(path, *, rows=(10, 4), sha="a" * 64, flip=False, complete=True, dtype="float32",
           fill=None):
    rng = np.random.default_rng(0)
    data = {}
    with writer.FeatureWriter.open(path, attrs=_attrs(sha), classes=["a", "b"],
                                  splits={"train": rows[0], "test": rows[1]}, dim=D,
                                  flip=flip, dtype=dtype) as w:
        for split, n in zip(("train", "test"), rows):
            f = (rng.normal(size=(n, D)).astype("float32") if fill is None
                 else np.full((n, D), fill, "float32"))
            y = rng.integers(0, 2, n)
            data[split] = (f, y)
            for i in range(0, n, 4):
                w.write(split, f[i:i + 4], y[i:i + 4], f[i:i + 4] * -1 if flip else None)
        if complete:
            w.mark_complete()
    return data


def test_round_trip_layout_and_provenance(tmp_path):
    path = tmp_path / "x.h5"
    data = _write(path, flip=True)
    assert path.exists() and not lock.partial_path(path).exists()
    fs = reader.load_features(path)
    assert fs.classes == ["a", "b"]
    for split in ("train", "test"):
        np.testing.assert_array_equal(fs[split].features, data[split][0])
        np.testing.assert_array_equal(fs[split].labels, data[split][1])
        np.testing.assert_array_equal(fs[split].features_flip, -data[split][0])
        assert fs[split].features.dtype == np.float32 and fs[split].labels.dtype == np.int64
    assert fs.has_flip
    assert fs.attrs["complete"] is True and fs.attrs["schema_version"] == reader.SCHEMA_VERSION
    assert fs.attrs["rows_done"] == [10, 4] and fs.attrs["splits"] == ["train", "test"]
    assert fs.provenance["feature_file"] == str(path)
    with h5py.File(path) as f:
        assert f["train/features"].chunks[1] == D
        assert f["train/features"].chunks[0] == min(10, reader.chunk_rows(D, 4))


def test_chunks_are_about_one_mebibyte():
    assert (reader.chunk_rows(1280, 4) * 1280 * 4 <= 2**20
            < (reader.chunk_rows(1280, 4) + 1) * 1280 * 4)


def test_float16_storage(tmp_path):
    _write(tmp_path / "h.h5", dtype="float16")
    assert reader.load_features(tmp_path / "h.h5")["train"].features.dtype == np.float16


def test_incomplete_file_lives_at_partial_and_is_refused(tmp_path):
    path = tmp_path / "x.h5"
    _write(path, complete=False)
    assert not path.exists() and lock.partial_path(path).exists()
    with pytest.raises(IncompleteFeatureFile, match="incomplete.*make features"):
        reader.load_features(lock.partial_path(path))
    fs = reader.load_features(lock.partial_path(path), require_complete=False)
    assert len(fs["train"]) == 10


def test_same_config_resumes_where_it_stopped(tmp_path):
    path = tmp_path / "x.h5"
    with writer.FeatureWriter.open(path, attrs=_attrs(), classes=["a"], splits={"train": 8},
                                  dim=D) as w:
        w.write("train", np.ones((4, D), "float32"), np.zeros(4))
    with writer.FeatureWriter.open(path, attrs=_attrs(), classes=["a"], splits={"train": 8},
                                  dim=D) as w:
        assert not w.complete and w.rows_done("train") == 4
        w.write("train", np.full((4, D), 2, "float32"), np.ones(4))
        w.mark_complete()
    f = reader.load_features(path)["train"].features
    assert (f[:4] == 1).all() and (f[4:] == 2).all()


def test_other_config_is_refused_unless_forced(tmp_path):
    path = tmp_path / "x.h5"
    _write(path)
    before = path.read_bytes()
    with pytest.raises(StaleCacheError, match="different configuration.*--force"):
        _write(path, sha="b" * 64)
    assert path.read_bytes() == before  # nothing overwritten
    with writer.FeatureWriter.open(path, attrs=_attrs("b" * 64), classes=["a"],
                                  splits={"train": 1}, dim=D, force=True) as w:
        assert path.read_bytes() == before  # the old file stays until the new one is complete
        w.write("train", np.zeros((1, D), "float32"), np.zeros(1))
        w.mark_complete()
    assert reader.read_attrs(path)["config_sha256"] == "b" * 64


def test_truncated_file_is_refused_clearly(tmp_path):
    path = tmp_path / "x.h5"
    _write(path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CorruptFeatureFile, match="truncated or not an HDF5.*--force"):
        reader.load_features(path)
    with pytest.raises(StaleCacheError, match="truncated or unreadable.*--force"):
        _write(path)


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "x.h5"
    path.write_text("not hdf5")
    with pytest.raises(CorruptFeatureFile):
        reader.load_features(path)


def test_missing_file_says_run_stage_one(tmp_path):
    with pytest.raises(CacheError, match="does not exist.*make features"):
        reader.load_features(tmp_path / "nope.h5")


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "x.h5"
    _write(path)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = reader.SCHEMA_VERSION + 1
    with pytest.raises(CorruptFeatureFile, match="newer featcache.*upgrade"):
        reader.load_features(path)


def test_non_finite_features_are_refused(tmp_path):
    path = tmp_path / "x.h5"
    _write(path, fill=np.nan)
    with pytest.raises(CorruptFeatureFile, match="NaN or Inf.*--precision float32"):
        reader.load_features(path)


def test_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    path = tmp_path / "x.h5"
    with writer.FeatureWriter.open(path, attrs=_attrs(), classes=["a"], splits={"train": 4}, dim=D):
        with pytest.raises(LockedError, match="another featcache process.*--wait"):
            writer.FeatureWriter.open(path, attrs=_attrs(), classes=["a"], splits={"train": 4},
                                      dim=D)
    # released: opens again
    with writer.FeatureWriter.open(path, attrs=_attrs(), classes=["a"], splits={"train": 4}, dim=D):
        pass


def test_writing_past_the_preallocated_rows_is_an_error(tmp_path):
    with writer.FeatureWriter.open(tmp_path / "x.h5", attrs=_attrs(), classes=["a"],
                                  splits={"train": 2}, dim=D) as w:
        with pytest.raises(CacheError, match="exceed"):
            w.write("train", np.zeros((3, D), "float32"), np.zeros(3))
        with pytest.raises(CacheError, match="cannot mark it complete"):
            w.mark_complete()


def test_newer_schema_at_the_output_path_is_never_offered_to_force(tmp_path):
    path = tmp_path / "x.h5"
    _write(path)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = reader.SCHEMA_VERSION + 1
    before = path.read_bytes()
    with pytest.raises(CorruptFeatureFile, match="newer featcache.*upgrade") as err:
        _write(path, sha="b" * 64)
    assert "--force" not in str(err.value)
    assert path.read_bytes() == before


def test_the_writer_reopens_a_file_another_process_briefly_holds_locked(tmp_path, monkeypatch):
    """A forked child (a subprocess between fork and exec) can hold an inherited HDF5 lock on
    a file the writer just closed: ``open_owned`` waits for it, and still gives up in the
    end if the lock stays."""
    import subprocess
    import sys

    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        f.attrs["x"] = 1
    hold = ("import sys, time, h5py; f = h5py.File(sys.argv[1], 'r'); print('held', flush=True);"
            " time.sleep(float(sys.argv[2]))")
    child = subprocess.Popen([sys.executable, "-c", hold, str(path), "0.5"],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    with pytest.raises(BlockingIOError):
        h5py.File(path, "r+")          # what a plain reopen meets
    with writer.open_owned(path) as f:  # waits the half second out
        assert f.attrs["x"] == 1
    child.wait(timeout=30)

    monkeypatch.setattr(writer, "OWNED_RETRY_S", (0.01, 0.01))
    child = subprocess.Popen([sys.executable, "-c", hold, str(path), "5"],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    with pytest.raises(BlockingIOError):
        writer.open_owned(path)
    child.kill()
    child.wait(timeout=30)


@pytest.mark.parametrize("dataset,rows", [("labels", 21), ("ids", 20), ("features_flip", 23),
                                          ("features", 22)])
def test_row_counts_that_disagree_are_a_damaged_file(tmp_path, dataset, rows):
    """Labels 3 shorter than the features used to be accepted (heads trained on 21 of 24
    rows); every split's datasets must agree with each other and with rows_done."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from stage_two_util import make_feature_file

    path = make_feature_file(tmp_path / "f.h5", n_train=24, n_test=12)
    reader.load_features(path)                                   # whole: accepted
    with h5py.File(path, "r+") as f:
        data = f["train"][dataset][:rows]
        del f["train"][dataset]
        f["train"].create_dataset(dataset, data=data)
    with pytest.raises(CorruptFeatureFile) as e:
        reader.load_features(path)
    msg = str(e.value)
    assert "\n" not in msg and "row counts disagree" in msg and f"{dataset} {rows}" in msg
    assert "--force" in msg


def test_splits_of_different_widths_are_a_damaged_file(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from stage_two_util import make_feature_file

    path = make_feature_file(tmp_path / "f.h5", n_train=24, n_test=12, dim=16)
    with h5py.File(path, "r+") as f:
        for k in ("features", "features_flip"):
            data = f["test"][k][:, :8]
            del f["test"][k]
            f["test"].create_dataset(k, data=data)
    with pytest.raises(CorruptFeatureFile, match="different widths.*--force"):
        reader.load_features(path)
