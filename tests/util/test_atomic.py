"""The one atomic-write helper (featcache._util.atomic) and the writer's lock
(featcache.cache.lock)."""

from __future__ import annotations

import os
import time

import pytest

from featcache._util import atomic
from featcache.cache.lock import FileLock, check_output, partial_path
from featcache.errors import CacheError, LockedError


def _count_fsyncs(monkeypatch) -> list:
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    return synced


def test_write_bytes_replaces_durably(tmp_path, monkeypatch):
    synced = _count_fsyncs(monkeypatch)
    out = tmp_path / "r.json"
    out.write_text("old")
    atomic.write_text(out, "new")
    assert out.read_text() == "new"
    assert str(tmp_path / ".r.json.tmp") in synced and str(tmp_path) in synced  # file, folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "m.keras"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.replacing(out, ".keras") as tmp:
            assert tmp.name == ".m.keras.tmp.keras"
            tmp.write_text("half")
            raise RuntimeError("save failed")
    assert out.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["m.keras"]


def test_a_folder_replaces_a_folder(tmp_path, monkeypatch):
    synced = _count_fsyncs(monkeypatch)
    out = tmp_path / "saved"
    (out / "variables").mkdir(parents=True)
    (out / "old.pb").write_text("old")
    with atomic.replacing(out) as tmp:
        (tmp / "variables").mkdir(parents=True)
        (tmp / "variables" / "v.data").write_text("v")
        (tmp / "saved_model.pb").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["saved_model.pb", "variables"]
    assert (out / "variables" / "v.data").read_text() == "v"
    assert sorted(os.listdir(tmp_path)) == ["saved"]           # no .tmp, no .old left
    assert any(s.endswith("v.data") for s in synced)           # every file in it fsynced


def test_lock_records_the_pid_and_refuses_a_second_writer(tmp_path):
    target = tmp_path / "x.h5"
    with FileLock(target) as lock:
        assert lock.path == tmp_path / "x.h5.lock"
        assert lock.path.read_text() == str(os.getpid())
        with pytest.raises(LockedError, match=f"pid {os.getpid()}.*--wait"):
            FileLock(target).acquire()
    assert not (tmp_path / "x.h5.lock").exists()               # released: removed
    with FileLock(target):
        pass
    assert os.listdir(tmp_path) == []


def test_a_writer_that_waited_holds_the_lock_on_the_file_that_is_there(tmp_path):
    """The first writer removes its lock file as it ends; the one that was waiting on that
    file must then hold the lock a third writer meets, not a lock on the removed file."""
    import threading

    target = tmp_path / "x.h5"
    first = FileLock(target).acquire()
    got = threading.Event()
    second = FileLock(target, wait=True)
    t = threading.Thread(target=lambda: (second.acquire(), got.set()))
    t.start()
    time.sleep(0.3)
    assert not got.is_set()                                    # queued behind the first
    first.release()
    assert got.wait(10)
    with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
        FileLock(target).acquire()                             # the second really holds it
    assert (tmp_path / "x.h5.lock").read_text() == str(os.getpid())
    second.release()
    t.join()
    assert os.listdir(tmp_path) == []


def test_a_stale_lock_file_of_a_killed_writer_is_taken_over(tmp_path):
    (tmp_path / "x.h5.lock").write_text("12345")               # nobody holds it
    with FileLock(tmp_path / "x.h5") as lock:
        assert lock.path.read_text() == str(os.getpid())
    assert os.listdir(tmp_path) == []


def test_check_output_refuses_folders_and_makes_the_parent(tmp_path):
    out = tmp_path / "new" / "x.h5"
    assert check_output(out) == out and out.parent.is_dir() and not out.exists()
    assert os.listdir(out.parent) == []                       # the probe is gone
    partial_path(out).mkdir()
    with pytest.raises(CacheError, match="is a folder"):
        check_output(out)


def test_a_folder_replacement_killed_between_its_renames_is_repaired(tmp_path, monkeypatch):
    """Without an atomic exchange a folder is replaced by two renames; a kill between them
    leaves the target missing: the next writer puts the finished new folder in place (or,
    without it, the previous one back) before it starts."""
    out = tmp_path / "report"
    tmp, old = atomic.temp_name(out), atomic.old_name(out)
    for new_there in (True, False):
        old.mkdir()
        (old / "f").write_text("old")
        if new_there:
            tmp.mkdir()
            (tmp / "f").write_text("new")
        atomic.recover(tmp, out)
        assert (out / "f").read_text() == ("new" if new_there else "old")
        assert sorted(os.listdir(tmp_path)) == ["report"]
        atomic._remove(out)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)   # the two renames
    out.mkdir()
    (out / "f").write_text("old")
    with atomic.replacing(out) as t:
        t.mkdir()
        (t / "f").write_text("new")
    assert (out / "f").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["report"]


def test_carry_links_files_folders_and_links(tmp_path):
    src = tmp_path / "a"
    (src / "d").mkdir(parents=True)
    (src / "d" / "x").write_text("x")
    (src / "f").write_text("f")
    os.symlink("f", src / "l")
    dst = tmp_path / "b"
    dst.mkdir()
    for name in ("d", "f", "l"):
        atomic.carry(src / name, dst / name)
    assert (dst / "f").stat().st_ino == (src / "f").stat().st_ino
    assert (dst / "d" / "x").stat().st_ino == (src / "d" / "x").stat().st_ino
    assert os.readlink(dst / "l") == "f"
