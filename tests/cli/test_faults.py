"""Faults, each one a test: nothing is lost, nothing half-written looks complete.

Most tests drive the real CLI in a subprocess (``python -c DRIVER ...``): the driver
registers a test-only dataset ``faulty`` (the synthetic images, optionally slowed down per
batch and with a changeable seed) and then runs ``featcache.cli.main``, so a run can be
killed, interrupted or raced mid-way. Results are compared array by array with an
uninterrupted in-process run of the same settings. Writes only under ``tmp_path``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from featcache.cache.lock import partial_path
from featcache.cache.progress import read_progress
from featcache.cache.reader import load_features
from featcache.config import ExtractConfig
from featcache.data.datasets import Synthetic
from featcache.errors import (
    CacheError,
    CorruptFeatureFile,
    DiskFullError,
    IncompleteFeatureFile,
)

ROOT = Path(__file__).resolve().parents[2]

N_TRAIN = 320   # 20 batches of 16 + 3 test batches: long enough to interrupt when slowed
BATCH = 16
DRIVER = textwrap.dedent("""
    import os, signal, sys, time
    # Ctrl-C as an interactive shell delivers it: a test run started in the background
    # (`make test &` in a script) ignores SIGINT, its children inherit that, and Python then
    # installs no KeyboardInterrupt handler: the interrupted writer would never see it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from featcache.data.datasets import Synthetic, register_dataset

    class Slow(Synthetic):
        # FC_SLEEP: seconds per batch; FC_HOLD: after the first batch, wait while this
        # file exists (the test removes it to let the run go on)
        hashing = False

        def fingerprint(self):
            self.hashing = True
            try:
                return super().fingerprint()
            finally:
                self.hashing = False

        def batches(self, split, start, stop, batch_size):
            if self.hashing:
                yield from super().batches(split, start, stop, batch_size)
                return
            hold = os.environ.get("FC_HOLD")
            for k, b in enumerate(super().batches(split, start, stop, batch_size)):
                time.sleep(float(os.environ.get("FC_SLEEP", "0")))
                while hold and k > 0 and os.path.exists(hold):
                    time.sleep(0.05)
                yield b

    @register_dataset("faulty")
    def _faulty(data_dir, *, download=True, limit=None):
        return Slow(n_train=int(os.environ.get("FC_N", "120")), n_test=40,
                    seed=int(os.environ.get("FC_SEED", "0")), name="faulty")

    from featcache.cli.main import main
    sys.exit(main(sys.argv[1:]))
""")


def faulty_dataset(seed: int = 0) -> Synthetic:
    """The driver's dataset, in-process (for reference runs)."""
    return Synthetic(n_train=N_TRAIN, n_test=40, seed=seed, name="faulty")


def cli_args(out_dir: Path, *extra: str) -> list[str]:
    return ["features", "--dataset", "faulty", "--weights", "none", "--backbone",
            "mobilenet_025", "--size", "32", "--batch", str(BATCH), "--out-dir", str(out_dir),
            *extra]


def env(sleep: float = 0.0, seed: int = 0, hold: Path | None = None, **more) -> dict:
    e = dict(os.environ, FC_SLEEP=str(sleep), FC_N=str(N_TRAIN), FC_SEED=str(seed),
             FC_HOLD=str(hold or ""),
             TF_CPP_MIN_LOG_LEVEL="2", PYTHONDONTWRITEBYTECODE="1")
    e.update({k: str(v) for k, v in more.items()})
    return e


def start(args: list[str], **env_kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, *args], cwd=ROOT, env=env(**env_kw),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(args: list[str], timeout: float = 300, **env_kw) -> subprocess.CompletedProcess:
    p = start(args, **env_kw)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Non-zero exit, no traceback, stderr ends with one ``featcache: error:`` line."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("featcache: error: "), proc.stderr
    for frag in fragments:
        assert frag in last, last
    return last


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def output_path(out_dir: Path) -> Path:
    """``faulty_mobilenet_025_32_random[_ov[_bf16]].h5``: the default runtime's name."""
    return ExtractConfig(dataset="faulty", backbone="mobilenet_025", weights="none", size=32,
                         batch=BATCH, out_dir=str(out_dir)).output_path


def wait_for_rows(path: Path, proc: subprocess.Popen, timeout: float = 180) -> dict:
    """Poll the file a running writer has open until some rows are flushed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"writer exited early ({proc.returncode}): {proc.stderr.read()}")
        if path.exists():
            try:
                prog = read_progress(path)
            except CacheError:
                prog = None  # caught mid-rename or mid-create: poll again
            if prog and sum(prog["rows_done"].values()) > 0:
                return prog
        time.sleep(0.1)
    pytest.fail(f"no rows written to {path} within {timeout} s")


def assert_same_features(a: Path, b: Path) -> None:
    fa, fb = load_features(a), load_features(b)
    assert fa.attrs["config_sha256"] == fb.attrs["config_sha256"]
    assert list(fa.splits) == list(fb.splits)
    for split in fa.splits:
        assert fa[split].features.dtype == np.float32
        assert np.array_equal(fa[split].features, fb[split].features), split
        assert np.array_equal(fa[split].labels, fb[split].labels), split


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of the driver's settings, in-process."""
    from featcache.extract.run import extract_features

    out = tmp_path_factory.mktemp("reference")
    cfg = ExtractConfig(dataset="faulty", backbone="mobilenet_025", weights="none", size=32,
                        batch=BATCH, out_dir=str(out))
    path = extract_features(cfg, dataset=faulty_dataset()).path
    assert path == output_path(out)
    return path


# ------------------------------------------------------------------ killed and interrupted

@pytest.mark.parametrize("busy", [False, True], ids=["between-batches", "while-writing"])
def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path, reference, busy):
    """Killed while held between batches, or at a random moment of a running loop
    (possibly mid-write): either way the resumed file equals an uninterrupted run's."""
    out = output_path(tmp_path)
    hold = tmp_path / "hold"
    if not busy:
        hold.touch()
    proc = start(cli_args(tmp_path), hold=hold, sleep=0.05 if busy else 0)
    try:
        wait_for_rows(partial_path(out), proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run must not leave a file under the final name"
    prog = read_progress(partial_path(out))
    assert not prog["complete"]
    kept = sum(prog["rows_done"].values())
    assert 0 < kept < N_TRAIN + 40
    with pytest.raises(IncompleteFeatureFile, match="incomplete"):
        load_features(partial_path(out))

    again = run(cli_args(tmp_path))
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    done = int(re.search(r"(\d+) images in", again.stdout).group(1))
    assert done == N_TRAIN + 40 - kept, "the resumed run must do only the missing rows"
    assert not partial_path(out).exists()
    assert_same_features(out, reference)


def test_ctrl_c_stops_cleanly_after_flushing(tmp_path, reference):
    out = output_path(tmp_path)
    hold = tmp_path / "hold"
    hold.touch()
    proc = start(cli_args(tmp_path), hold=hold)
    try:
        wait_for_rows(partial_path(out), proc)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=150)   # a loaded 2-core CI machine
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    last = assert_one_line_error(subprocess.CompletedProcess(proc.args, 130, stdout, stderr),
                                 "interrupted", "run the same command again to resume")
    prog = read_progress(partial_path(out))
    # what the message says is saved is what the file says is done: whole batches
    said = {k: int(v) for k, v in re.findall(r"'(\w+)': (\d+)", last)}
    assert said == prog["rows_done"]
    assert prog["rows_done"]["train"] % BATCH == 0 and prog["rows_done"]["train"] > 0
    assert run(cli_args(tmp_path)).returncode == 0
    assert_same_features(out, reference)


# ------------------------------------------------------------------ two writers, readers

def _has_open(pid: int, path: Path) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(os.readlink(fd) == str(path) for fd in fds.iterdir())
    except OSError:
        return False


def test_second_writer_refuses_or_waits_and_readers_see_nothing_half_written(tmp_path,
                                                                             reference):
    out = output_path(tmp_path)
    hold = tmp_path / "hold"
    hold.touch()
    first = start(cli_args(tmp_path), hold=hold)
    try:
        wait_for_rows(partial_path(out), first)
        second = run(cli_args(tmp_path))
        assert_one_line_error(second, "is being written by another featcache process",
                              f"pid {first.pid}", "--wait")
        # stage two readers: no complete file exists yet, the partial one is refused
        with pytest.raises(CacheError, match="does not exist"):
            load_features(out)
        with pytest.raises(CacheError):
            load_features(partial_path(out))
        waiter = start(cli_args(tmp_path, "--wait"))
        lock = Path(str(out) + ".lock")
        deadline = time.monotonic() + 180
        while not _has_open(waiter.pid, lock):  # it reached the lock and queues behind it
            assert waiter.poll() is None, waiter.communicate()
            assert time.monotonic() < deadline, "the waiting writer never reached the lock"
            time.sleep(0.1)
        time.sleep(0.5)
        assert waiter.poll() is None, "--wait must block while the first writer runs"
        hold.unlink()
        stdout, stderr = waiter.communicate(timeout=300)
        assert waiter.returncode == 0, stderr
        assert "up to date" in stdout, "the waiting writer must find the first one's file"
    finally:
        hold.unlink(missing_ok=True)
        first.communicate(timeout=300)
    assert first.returncode == 0
    assert_same_features(out, reference)


# ------------------------------------------------------------------ unusable inputs

def _truncate(p: Path):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])


def _garbage(p: Path):
    p.write_bytes(os.urandom(p.stat().st_size))


def _newer_schema(p: Path):
    with h5py.File(p, "r+") as f:
        f.attrs["schema_version"] = 99


def _nan(p: Path):
    with h5py.File(p, "r+") as f:
        f["train/features"][3, 5] = np.nan


def _inf(p: Path):
    with h5py.File(p, "r+") as f:
        f["test/features"][0, 0] = np.inf


@pytest.mark.parametrize("damage, reader_says, writer_says", [
    (_truncate, "truncated", ("truncated or unreadable", "--force")),
    (_garbage, "truncated", ("truncated or unreadable", "--force")),
    # a newer featcache's file is never offered to --force: that would destroy its work
    (_newer_schema, "upgrade featcache", ("schema 99", "upgrade featcache")),
    (_nan, "NaN or Inf", None),
    (_inf, "NaN or Inf", None),
])
def test_damaged_feature_file_is_refused_and_kept(tmp_path, reference, damage, reader_says,
                                                  writer_says):
    out = output_path(tmp_path)
    shutil.copy(reference, out)
    damage(out)
    before = sha256(out)
    # stage two refuses it with one line naming the fix
    with pytest.raises(CorruptFeatureFile) as info:
        load_features(out)
    msg = str(info.value)
    assert reader_says in msg and "\n" not in msg
    assert any(fix in msg for fix in ("--force", "upgrade featcache"))
    if writer_says:
        # stage one refuses to overwrite it (without --force, or at all if newer)
        proc = run(cli_args(tmp_path))
        assert_one_line_error(proc, *writer_says)
    # and so does the stage-two command, before writing anything
    proc = run(["heads", str(out), "--heads", "logreg"])
    assert_one_line_error(proc, reader_says)
    assert not out.with_suffix("").exists(), "no report may be written from a damaged file"
    assert sha256(out) == before, "nothing may be overwritten"
    assert not partial_path(out).exists()


def test_wrong_shaped_weights_file_is_a_one_line_error(tmp_path):
    import keras

    weights = tmp_path / "mobilenet_025.weights.h5"
    keras.applications.MobileNet(alpha=0.25, include_top=False, weights=None,
                                 input_shape=(None, None, 3), pooling="avg"
                                 ).save_weights(weights)
    args = cli_args(tmp_path / "out", "--backbone", "mobilenet", "--weights", str(weights))
    args.remove("none")
    args.remove("--weights")  # the defaults list has --weights none; ours follows
    proc = run(args)
    assert_one_line_error(proc, "does not fit mobilenet", "no-top weights")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.h5*"))


def test_changed_dataset_is_refused_and_the_cache_kept(tmp_path, reference):
    out = output_path(tmp_path)
    shutil.copy(reference, out)
    before = sha256(out)
    proc = run(cli_args(tmp_path), seed=1)  # same name, other pixels
    assert_one_line_error(proc, "dataset_sha256", "--force")
    assert sha256(out) == before
    assert not partial_path(out).exists()


# ------------------------------------------------------------------ disk full

def test_disk_full_mid_run_keeps_partial_resumable(tmp_path, reference, monkeypatch):
    """ENOSPC injected at the third batch's flush (the writer's only per-batch syscall
    that can meet a full disk, since chunks are preallocated): a clear error, the flushed
    rows are kept, the same call resumes to the same bytes, and a complete file beside it
    is untouched."""
    from featcache.extract.run import extract_features

    neighbour = tmp_path / "other_complete.h5"
    shutil.copy(reference, neighbour)
    before = sha256(neighbour)
    cfg = ExtractConfig(dataset="faulty", backbone="mobilenet_025", weights="none", size=32,
                        batch=BATCH, out_dir=str(tmp_path))
    real_flush = h5py.File.flush
    calls = {"n": 0}

    def flaky_flush(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_flush(self)

    monkeypatch.setattr(h5py.File, "flush", flaky_flush)
    with pytest.raises(DiskFullError) as info:
        extract_features(cfg, dataset=faulty_dataset())
    msg = str(info.value)
    assert "disk full" in msg and "run the same command again to resume" in msg
    monkeypatch.setattr(h5py.File, "flush", real_flush)
    out = output_path(tmp_path)
    assert not out.exists()
    prog = read_progress(partial_path(out))
    assert not prog["complete"] and prog["rows_done"]["train"] >= 2 * BATCH
    result = extract_features(cfg, dataset=faulty_dataset())
    assert result.images < N_TRAIN + 40, "it resumed rather than restarted"
    assert_same_features(out, reference)
    assert sha256(neighbour) == before


def test_disk_full_at_creation_is_a_one_line_error(tmp_path, reference):
    """A real EFBIG from the kernel (RLIMIT_FSIZE below the file's size): the partial file
    is never created half-way, nothing beside it is touched."""
    neighbour = tmp_path / "other_complete.h5"
    shutil.copy(reference, neighbour)
    before = sha256(neighbour)
    limit = 64 * 1024
    assert reference.stat().st_size > 2 * limit
    code = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "exec(compile(open(__import__('sys').argv.pop(1)).read(), 'driver', 'exec'))")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.run([sys.executable, "-c", code, str(driver), *cli_args(tmp_path)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc, "disk full", "--out-dir")
    out = output_path(tmp_path)
    assert not out.exists() and not partial_path(out).exists()
    assert not list(tmp_path.glob("*.tmp"))
    assert sha256(neighbour) == before
    # with room again, the same command works
    assert run(cli_args(tmp_path)).returncode == 0
    assert_same_features(out, reference)


# ------------------------------------------------------------------ determinism

def test_same_settings_give_identical_features_twice(tmp_path, reference):
    from featcache.extract.run import extract_features

    cfg = ExtractConfig(dataset="faulty", backbone="mobilenet_025", weights="none", size=32,
                        batch=BATCH, out_dir=str(tmp_path), flip=True)
    a = extract_features(cfg, dataset=faulty_dataset()).path
    b = extract_features(ExtractConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "b")}),
                         dataset=faulty_dataset()).path
    fa, fb = load_features(a), load_features(b)
    for split in fa.splits:
        assert np.array_equal(fa[split].features, fb[split].features)
        assert np.array_equal(fa[split].features_flip, fb[split].features_flip)
    # ...and identical to a run in another process (the reference, no flip)
    ref = load_features(reference)
    assert np.array_equal(ref["train"].features, fa["train"].features)


# ------------------------------------------------------------------ memory bound

PEAK_RSS = textwrap.dedent("""
    import json, sys
    import numpy as np
    from featcache.config import ExtractConfig

    def hwm_mb():
        # this process's own peak (VmHWM): ru_maxrss would include the parent's peak,
        # which a child inherits across fork/vfork + exec on Linux
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    from featcache.data.base import Dataset
    from featcache.extract.run import extract_features

    class Big(Dataset):
        # 96x96 random images, made per batch: holding them all would cost n * 27 KiB
        name = "big"
        extra_attrs = {}

        def __init__(self, n):
            self.classes = ["a", "b"]
            self.splits = {"train": n, "test": 64}

        def fingerprint(self):
            return f"big-{self.splits['train']}"

        def batches(self, split, start, stop, batch_size):
            for i in range(start, stop, batch_size):
                j = min(i + batch_size, stop)
                rng = np.random.default_rng(i)
                yield (rng.integers(0, 256, (j - i, 96, 96, 3), dtype=np.uint8),
                       np.arange(i, j, dtype=np.int64) % 2)

    n, out = int(sys.argv[1]), sys.argv[2]
    cfg = ExtractConfig(dataset="big", backbone="mobilenet_025", weights="none", size=32,
                        batch=64, out_dir=out)
    r = extract_features(cfg, dataset=Big(n))
    print(json.dumps({"images": r.images, "peak_mb": hwm_mb()}))
""")


@pytest.mark.slow
def test_stage_one_peak_memory_does_not_grow_with_the_dataset(tmp_path):
    """Peak RSS of stage one for N and 4N images (fresh processes): the difference must
    be far below what holding the extra raw images would cost."""
    peaks = {}
    for n in (1500, 6000):
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(n), str(tmp_path / str(n))],
                              cwd=ROOT, env=env(), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        assert res["images"] == n + 64
        peaks[n] = res["peak_mb"]
    extra_raw_mb = (6000 - 1500) * 96 * 96 * 3 / 2**20   # ~119 MiB of uint8 pixels
    growth = peaks[6000] - peaks[1500]
    print(f"peak RSS: {peaks}, growth {growth:.0f} MiB vs {extra_raw_mb:.0f} MiB of raw pixels")
    assert growth < 0.4 * extra_raw_mb, peaks


LOAD_RSS = textwrap.dedent("""
    import json, sys
    import numpy as np
    from featcache.cache.reader import load_features
    def rss():  # own peak (VmHWM), not ru_maxrss (which inherits the parent's peak)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    np.ones(1 << 20)  # warm up numpy's allocator
    before = rss()
    fs = load_features(sys.argv[1])
    after = rss()
    print(json.dumps({"before": before, "after": after, "dtype": str(fs["train"].features.dtype),
                      "mb": fs["train"].features.nbytes / 2**20}))
""")


def test_stage_two_reads_features_without_copies(tmp_path):
    """load_features of a 120 MiB float32 file: arrays stay float32 and peak memory grows
    by about the arrays' size, not twice it (no float64 or duplicate copies)."""
    from featcache.cache.writer import FeatureWriter

    path = tmp_path / "big.h5"
    n, dim = 30000, 1024
    attrs = {"config_sha256": "x", "dataset": "big"}
    rng = np.random.default_rng(0)
    with FeatureWriter.open(path, attrs=attrs, classes=["a", "b"], splits={"train": n},
                            dim=dim) as w:
        for i in range(0, n, 5000):
            w.write("train", rng.standard_normal((5000, dim), dtype=np.float32),
                    np.arange(i, i + 5000) % 2)
        w.mark_complete()
    proc = subprocess.run([sys.executable, "-c", LOAD_RSS, str(path)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["dtype"] == "float32"
    growth = res["after"] - res["before"]
    assert growth < 1.4 * res["mb"], res


# ------------------------------------------------------------------ stage two

def _report_files_whole(d: Path) -> None:
    """Every report file under its final name is complete and parseable."""
    for f in d.rglob("*"):
        if not f.is_file() or f.name.startswith("."):
            continue  # dot-files are temporaries of an interrupted writer
        if f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".npz":
            with np.load(f) as z:
                [z[k] for k in z.files]
        elif f.suffix == ".png":
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.read_bytes()[-8:-4] == b"IEND"
        elif f.suffix == ".joblib":
            import joblib
            joblib.load(f)


def _snapshot(d: Path) -> dict:
    return {str(f.relative_to(d)): sha256(f) for f in sorted(d.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def toy_report(tmp_path_factory):
    """A feature file and a finished report on it (logreg + knn), plus its file hashes."""
    from stage_two_util import make_feature_file

    from featcache.compare.comparison import compare_heads
    from featcache.config import HeadsConfig

    d = tmp_path_factory.mktemp("heads")
    path = make_feature_file(d / "toy.h5", n_train=300, n_test=120)
    cfg = HeadsConfig(feature_file=str(path), heads=("logreg", "knn"), flip="off")
    compare_heads(cfg)
    return cfg, _snapshot(cfg.report_dir)


def _count_replaces(cfg) -> int:
    """The renames one comparison makes (over a copy of an existing report)."""
    from featcache.compare.comparison import compare_heads

    calls = []
    real = os.replace

    def counting(a, b):
        calls.append(Path(b).name)
        return real(a, b)

    os.replace = counting
    try:
        compare_heads(cfg)
    finally:
        os.replace = real
    assert "results.json" in calls, calls
    return len(calls)


def _beside(report: Path) -> list[str]:
    """What lies beside a report folder besides itself, its lock and the feature file."""
    return sorted(p.name for p in report.parent.iterdir() if p.name.startswith(f".{report.name}"))


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_interrupted_heads_leaves_the_previous_report_intact(tmp_path, toy_report,
                                                             monkeypatch, exchange):
    """Kill ``heads`` (simulated at each rename it makes, the swap of the report folder
    included; with the atomic exchange of two names, and with the two renames a
    filesystem without it gets): the previous report, heads and all, is byte-identical
    and nothing is left beside it; run to the end, the new report replaces it whole."""
    from dataclasses import replace as dc_replace

    from featcache._util import atomic
    from featcache.compare.comparison import compare_heads

    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    cfg0, before = toy_report
    report = tmp_path / "report"
    cfg = dc_replace(cfg0, out_dir=str(report), seed=1, workers=0)   # a different new report
    counting = tmp_path / "count"
    shutil.copytree(cfg0.report_dir, counting)
    n = _count_replaces(dc_replace(cfg, out_dir=str(counting)))
    real = os.replace
    for k in range(1, n + 1):
        shutil.rmtree(report, ignore_errors=True)
        shutil.copytree(cfg0.report_dir, report)
        calls = {"n": 0}

        def dying(a, b, k=k):
            calls["n"] += 1
            if calls["n"] == k:
                raise KeyboardInterrupt   # as if killed with the temporary fully written
            return real(a, b)

        monkeypatch.setattr(os, "replace", dying)
        with pytest.raises(KeyboardInterrupt):
            compare_heads(cfg)
        monkeypatch.setattr(os, "replace", real)
        assert _snapshot(report) == before, f"killed at rename {k} of {n}"
        _report_files_whole(report)
        assert _beside(report) == [], f"killed at rename {k} of {n}"
    # and the same command run to the end replaces it
    compare_heads(cfg)
    assert json.loads((report / "results.json").read_text())["config"]["seed"] == 1
    assert _beside(report) == []


def _killed_at(cfg, where: str) -> None:
    """Run ``compare_heads(cfg)`` in a forked child that SIGKILLs itself (no handler, no
    clean-up runs, as with ``kill -9``) at ``where``: ``results`` (as it renames
    results.json into the staging folder), ``swapped`` (just after the atomic exchange of
    the report folders, before the old one is removed), ``between`` (two renames: the old
    folder moved aside, the new one not yet in place)."""
    from featcache._util import atomic
    from featcache.compare.comparison import compare_heads

    pid = os.fork()
    if pid == 0:                                      # the child
        try:
            die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
            real_replace, real_exchange = os.replace, atomic._exchange
            if where == "swapped":
                atomic._exchange = lambda a, b: real_exchange(a, b) and die()
            if where == "between":
                atomic._exchange = lambda a, b: False

            def replace(a, b):
                if where == "results" and Path(b).name == "results.json" or \
                        where == "between" and Path(b) == cfg.report_dir:
                    die()
                return real_replace(a, b)

            os.replace = replace
            compare_heads(cfg)
        finally:
            os._exit(3)                                  # not killed: the parent fails
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


@pytest.mark.parametrize("where", ["results", "swapped", "between"])
def test_heads_killed_while_swapping_its_report_in(tmp_path, toy_report, where):
    """``kill -9`` at the report phase's critical moments: a reader finds the whole old
    report or the whole new one (results.json and the heads it names from one run; with
    two renames, for an instant, none), and the next run cleans up what the kill left (the
    staging folder, the old folder's remains) or finishes the swap."""
    from dataclasses import replace as dc_replace

    from featcache.compare.comparison import compare_heads

    cfg0, before = toy_report
    report = tmp_path / "report"
    shutil.copytree(cfg0.report_dir, report)
    cfg = dc_replace(cfg0, out_dir=str(report), seed=1, workers=0)
    _killed_at(cfg, where)
    if where == "results":
        assert _snapshot(report) == before            # the old one, untouched
        assert _beside(report) == [".report.tmp"]      # the killed run's staging folder
    elif where == "swapped":                          # the new one, whole
        new = json.loads((report / "results.json").read_text())
        assert new["config"]["seed"] == 1 and _snapshot(report) != before
        for row in new["rows"]:
            assert (report / row["saved"]).is_file()
        _report_files_whole(report)
        assert _beside(report) == [".report.tmp"]      # the old one, not yet removed
    else:
        assert not report.exists() and _beside(report) == [".report.old", ".report.tmp"]
    compare_heads(dc_replace(cfg, seed=2))
    assert json.loads((report / "results.json").read_text())["config"]["seed"] == 2
    assert _beside(report) == []
    _report_files_whole(report)


def test_the_new_report_keeps_what_heads_does_not_write(tmp_path, toy_report):
    """The new report folder replaces the old one whole: what ``heads`` does not write
    there (exported models, the curve's files, notes) is carried over (hard links), what it
    writes is not (a stale ``mistakes.png`` the new run did not draw goes)."""
    from dataclasses import replace as dc_replace

    from featcache.compare.comparison import compare_heads

    cfg0, _ = toy_report
    report = tmp_path / "report"
    shutil.copytree(cfg0.report_dir, report)
    (report / "notes.txt").write_text("mine")
    (report / "m.savedmodel" / "variables").mkdir(parents=True)
    (report / "m.savedmodel" / "variables" / "v.data").write_text("weights")
    (report / "mistakes.png").write_bytes(b"an old run's figure")
    (report / "heads" / "gone.joblib").write_bytes(b"an old run's head")
    (report / ".make-heads-settings").write_text("logreg\n")    # make's stamp: kept
    (report / ".results.json.tmp").write_text("{")                # a killed writer's: not
    inode = (report / "notes.txt").stat().st_ino
    compare_heads(dc_replace(cfg0, out_dir=str(report), seed=1, workers=0))
    assert (report / ".make-heads-settings").read_text() == "logreg\n"
    assert not (report / ".results.json.tmp").exists()
    assert (report / "notes.txt").read_text() == "mine"
    assert (report / "notes.txt").stat().st_ino == inode           # linked, not copied
    assert (report / "m.savedmodel" / "variables" / "v.data").read_text() == "weights"
    assert not (report / "mistakes.png").exists()
    assert not (report / "heads" / "gone.joblib").exists()
    assert json.loads((report / "results.json").read_text())["config"]["seed"] == 1


def _strip_timing(results: dict) -> list:
    timing = ("select_s", "fit_s", "predict_s", "predict_s_per_1000", "wall_s", "saved",
              "worker_pid")
    return [{k: v for k, v in row.items() if k not in timing} for row in results["rows"]]


def test_same_settings_give_identical_head_results_twice(toy_report):
    from featcache.compare.comparison import compare_heads

    cfg, _ = toy_report
    a = compare_heads(cfg, write=False)
    b = compare_heads(cfg, write=False)
    assert _strip_timing(a) == _strip_timing(b)
    assert a["mcnemar"] == b["mcnemar"]
    saved = json.loads((cfg.report_dir / "results.json").read_text())
    assert _strip_timing(saved) == json.loads(json.dumps(_strip_timing(a)))


@pytest.mark.slow
def test_keras_dense_head_and_svms_are_deterministic_too(toy_report):
    from dataclasses import replace as dc_replace

    from featcache.compare.comparison import compare_heads

    # one validation split (cv_below=0): determinism is per fit, k folds would only repeat it
    cfg = dc_replace(toy_report[0], heads=("dense", "linear_svm", "rbf_svm"), cv_below=0)
    a = compare_heads(cfg, write=False)
    b = compare_heads(cfg, write=False)
    assert _strip_timing(a) == _strip_timing(b)


def test_heads_killed_while_fitting_leave_report_and_saved_heads_untouched(tmp_path, toy_report,
                                                                           monkeypatch):
    """Killed after the first head is fitted and saved, during the second: the previous
    report and every fitted head it names are byte-identical (new heads are saved into the
    staging folder the new report is built in), so results.json never points at heads from
    another run."""
    from dataclasses import replace as dc_replace

    from featcache import heads as heads_mod
    from featcache.compare.comparison import compare_heads

    cfg0, before = toy_report
    report = tmp_path / "report"
    shutil.copytree(cfg0.report_dir, report)
    # workers=0: the rows run in this process, where the patched fit below can reach them
    cfg = dc_replace(cfg0, out_dir=str(report), seed=1, workers=0)
    saved = []
    real_save = heads_mod.LinearHead.save

    def save(self, directory, name):
        saved.append(Path(directory))
        return real_save(self, directory, name)

    def killed(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(heads_mod.LinearHead, "save", save)
    monkeypatch.setattr(heads_mod.CosineKNNHead, "fit", killed)   # knn runs after logreg
    with pytest.raises(KeyboardInterrupt):
        compare_heads(cfg)
    assert saved == [tmp_path / ".report.tmp" / "heads"]     # beside, not in, the report
    assert _snapshot(report) == before and _beside(report) == []
    monkeypatch.undo()
    compare_heads(cfg)
    assert _beside(report) == []
    assert json.loads((report / "results.json").read_text())["config"]["seed"] == 1


def _no_temporaries(d: Path) -> None:
    left = [str(f.relative_to(d)) for f in d.rglob(".*.tmp*")
            if ".staging" not in f.relative_to(d).parts]
    assert not left, left


@pytest.mark.parametrize("where", ["saving a head", "writing the report"])
def test_disk_full_in_heads_is_one_line_and_keeps_the_report(tmp_path, toy_report, monkeypatch,
                                                             where):
    """ENOSPC where a real disk reports it (the fsync of a finished temporary file): while a
    fitted head is saved (staged: the previous report is byte-identical) or a report file
    is written (its results.json, written last, is the previous run's): a one-line
    DiskFullError naming the file, no temporary left; with room again the command works."""
    from dataclasses import replace as dc_replace

    from featcache._util import atomic
    from featcache.compare.comparison import compare_heads

    cfg0, before = toy_report
    report = tmp_path / "report"
    shutil.copytree(cfg0.report_dir, report)
    cfg = dc_replace(cfg0, out_dir=str(report), seed=1, workers=0)
    real = atomic._fsync_path
    victim = ".knn.joblib.tmp.joblib" if where == "saving a head" else ".accuracy.png.tmp"

    def full(path, directory=False):
        if Path(path).name == victim:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, directory)

    monkeypatch.setattr(atomic, "_fsync_path", full)
    with pytest.raises(DiskFullError) as info:
        compare_heads(cfg)
    msg = str(info.value)
    assert msg.startswith("disk full while writing ") and victim[1:].split(".tmp")[0] in msg
    assert "free some space and run the same command again" in msg and "\n" not in msg
    now = _snapshot(report)
    assert now["results.json"] == before["results.json"]
    if where == "saving a head":
        assert {f: h for f, h in now.items() if not f.startswith(".staging")} == before
    _no_temporaries(report)
    _report_files_whole(report)
    monkeypatch.undo()
    compare_heads(cfg)
    assert json.loads((report / "results.json").read_text())["config"]["seed"] == 1


@pytest.mark.parametrize("workers, kib, named", [
    (0, 20, "knn.joblib"), (2, 20, "knn.joblib"), (2, 8, "FEATCACHE_TMPDIR")])
def test_disk_full_in_heads_from_the_kernel_is_one_line(tmp_path, toy_report, workers, kib,
                                                         named):
    """A real EFBIG from RLIMIT_FSIZE: at 20 KiB the shared arrays (19 KiB) and the small
    heads fit and the kNN head's 23 KiB do not (saved in this process, or in a worker); at
    8 KiB the shared arrays do not. One line naming the file (the shared arrays' folder:
    FEATCACHE_TMPDIR), exit 2, the previous report byte-identical (fitted heads are staged
    until all are done)."""
    cfg0, before = toy_report
    report = tmp_path / "report"
    shutil.copytree(cfg0.report_dir, report)
    limit = kib * 1024
    assert (cfg0.report_dir / "heads" / "knn.joblib").stat().st_size > 20 * 1024
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "from featcache.cli.main import main; sys.exit(main(sys.argv[1:]))")
    args = ["heads", cfg0.feature_file, "--heads", "logreg,knn", "--flip", "off", "--seed",
            "1", "--out-dir", str(report), "--workers", str(workers)]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env=env(FEATCACHE_TMPDIR=tmp_path))   # not the system's /tmp
    last = assert_one_line_error(proc, "disk full while writing", named, "free some space")
    assert proc.returncode == 2, last
    now = _snapshot(report)
    assert {f: h for f, h in now.items() if not f.startswith(".staging")} == before
    _no_temporaries(report)


def test_disk_full_in_export_keeps_the_previous_model(tmp_path, reference, monkeypatch):
    """ENOSPC while the exported model is made durable: a one-line DiskFullError naming
    it; the previous model and its sidecar are byte-identical, no temporary is left."""
    from featcache._util import atomic
    from featcache.compare.comparison import compare_heads
    from featcache.config import HeadsConfig
    from featcache.ship.export import export_model

    report = tmp_path / "report"
    compare_heads(HeadsConfig(str(reference), heads=("logreg",), flip="off", workers=0,
                              out_dir=str(report)))
    out = tmp_path / "m.keras"
    kw = dict(head="logreg", report_dir=report, output=out)
    export_model(reference, **kw)
    side = out.with_name(out.name + ".json")
    old = sha256(out), sha256(side)
    real = atomic._fsync_path

    def full(path, directory=False):
        if Path(path).name.startswith(".m.keras.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, directory)

    monkeypatch.setattr(atomic, "_fsync_path", full)
    with pytest.raises(DiskFullError) as info:
        export_model(reference, **kw)
    msg = str(info.value)
    assert msg.startswith(f"disk full while writing {out}") and "free some space" in msg
    assert (sha256(out), sha256(side)) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras", "m.keras.json", "report"]
