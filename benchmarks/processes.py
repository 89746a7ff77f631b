"""Sections 3 and 5: stage one in child processes — peak RSS at two dataset sizes, and
the time of a repeated run with nothing changed (the cache hit).

Each run is the real command line a user types (``python -m featcache features …``, then
``make features …``) in its own process, so its peak resident memory is its own: it is
read from the kernel's accounting of that child (``os.wait4`` rusage ``ru_maxrss``),
which catches short peaks a poller would miss. Children are started through a small
middleman interpreter so that this (large) process's own peak is not inherited at exec.

Reads the dataset and weights of :class:`~benchmarks.env.Settings`; writes feature files
into ``<work_dir>/s3_rss/`` (emptied first, so the first runs are never cache hits).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .env import ROOT, Settings

log = logging.getLogger(__name__)

_SUMMARY = re.compile(r"(\d+) images in ([\d.]+) s \(([\d.]+) img/s\)")


def features_args(s: Settings, *, size: int, limit: int | None, out_dir: Path) -> list[str]:
    args = ["--dataset", s.dataset, "--backbone", s.backbone, "--size", str(size),
            "--batch", str(s.batch), "--weights", s.weights, "--out-dir", str(out_dir),
            "--no-flip"]  # plain features, as `make … FLIP=0` below
    if s.dataset == "cifar10":
        args += ["--data-dir", s.data_dir]
    if limit:
        args += ["--limit", str(limit)]
    return args


#: Runs argv[2:], waits for it, writes its exit code, wall time and own peak RSS to argv[1].
#: Why a middleman: at exec, Linux carries the forking process's memory high-water mark
#: into the child's ``ru_maxrss``, so a child forked straight from this (TensorFlow-sized)
#: process would report *our* peak. Forked from this small interpreter, it reports its own.
_MIDDLEMAN = """
import json, os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(p.pid, 0)
seconds = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "seconds": seconds,
               "maxrss_kib": usage.ru_maxrss}, f)
"""


def run_child(cmd: list[str]) -> dict:
    """Run ``cmd`` in ``ROOT``; its wall seconds, exit code, own peak RSS and output."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "out", "w+") as out:
        stats = Path(tmp) / "stats.json"
        proc = subprocess.run([sys.executable, "-c", _MIDDLEMAN, str(stats), *map(str, cmd)],
                              cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        out.seek(0)
        text = out.read()
        if proc.returncode != 0 or not stats.is_file():
            return {"cmd": cmd, "seconds": float("nan"), "rc": proc.returncode or -1,
                    "peak_rss_mib": float("nan"), "output": text[-2000:]}
        st = json.loads(stats.read_text())
    return {"cmd": cmd, "seconds": st["seconds"], "rc": st["rc"],
            "peak_rss_mib": st["maxrss_kib"] / 1024.0, "output": text[-2000:]}


def _check(run: dict) -> dict:
    if run["rc"] != 0:
        raise RuntimeError(f"`{' '.join(map(str, run['cmd']))}` exited {run['rc']}:\n"
                           f"{run['output']}")
    m = _SUMMARY.search(run["output"])
    if m:
        run["images"], run["extract_s"], run["images_per_s"] = \
            int(m.group(1)), float(m.group(2)), float(m.group(3))
    return run


def rss_pairs(s: Settings) -> list[tuple[int, int | None, int | None]]:
    """``(size, small limit, big limit)`` pairs; consecutive same-size runs pair up."""
    runs = list(s.rss_runs)
    return [(runs[i][0], runs[i][1], runs[i + 1][1]) for i in range(0, len(runs) - 1, 2)]


def expected_images(s: Settings, limit: int | None) -> int:
    full = {"cifar10": (50000, 10000), "synthetic": (120, 40)}[s.dataset]
    return sum(min(n, limit) if limit else n for n in full)


def run_memory(s: Settings) -> dict:
    """Section 3: peak RSS of ``featcache features`` at two dataset sizes, per input size."""
    out_dir = Path(s.work_dir).resolve() / "s3_rss"
    shutil.rmtree(out_dir, ignore_errors=True)
    pairs = []
    last = None
    for size, small, big in rss_pairs(s):
        pair = {"size": size, "runs": []}
        for limit in (small, big):
            args = features_args(s, size=size, limit=limit, out_dir=out_dir)
            run = _check(run_child([sys.executable, "-m", "featcache", "features", *args]))
            run.update(limit=limit, n_images=expected_images(s, limit))
            log.info("features %d px, %d images: %.1f s, peak RSS %.0f MiB", size,
                     run["n_images"], run["seconds"], run["peak_rss_mib"])
            pair["runs"].append(run)
            last = (size, limit)
        a, b = pair["runs"]
        pair["rss_ratio"] = b["peak_rss_mib"] / a["peak_rss_mib"]
        pair["images_ratio"] = b["n_images"] / a["n_images"]
        pairs.append(pair)
    return {"pairs": pairs, "out_dir": str(out_dir), "last": last}


def run_cache_hit(s: Settings, memory: dict) -> dict:
    """Section 5: section 3's last command again, then ``make features`` with the same
    settings; both find the complete file and do nothing."""
    out_dir = Path(memory["out_dir"])
    size, limit = memory["last"]
    first = memory["pairs"][-1]["runs"][-1]
    args = features_args(s, size=size, limit=limit, out_dir=out_dir)
    again = _check(run_child([sys.executable, "-m", "featcache", "features", *args]))
    result = {"cli_first_s": first["seconds"], "cli_repeat_s": again["seconds"],
              "cli_repeat_output": again["output"].strip().splitlines()[-1:],
              "cli_cmd": "python -m featcache features " + " ".join(args)}
    result.update(_make_repeat(s, size=size, limit=limit, out_dir=out_dir))
    return result


def _make_repeat(s: Settings, *, size: int, limit: int | None, out_dir: Path) -> dict:
    """Time ``make features`` with the settings of an existing complete file — only after
    ``make -q`` says it is up to date (so the timed run cannot start real work)."""
    if not shutil.which("make"):
        return {"make_note": "make is not installed; not timed"}
    vars_ = [f"DATASET={s.dataset}", f"BACKBONE={s.backbone}", f"SIZE={size}",
             f"BATCH={s.batch}", f"WEIGHTS={s.weights}", "FLIP=0", f"OUT_DIR={out_dir}",
             f"LIMIT={limit or ''}", f"DATA_DIR={s.data_dir or 'data'}"]
    base = ["make", "--no-print-directory", "-C", str(ROOT)]
    q = subprocess.run(base + ["-q", "features", *vars_], capture_output=True, text=True)
    target = subprocess.run(base + ["-s", "help", *vars_], capture_output=True, text=True)
    path = target.stdout.rsplit("-> ", 1)[-1].strip() if "-> " in target.stdout else ""
    if q.returncode != 0 or not path or not Path(path).is_file():
        return {"make_note": f"`make -q features` says not up to date (rc {q.returncode}, "
                            f"target {path or '?'}; is the venv stamp there?); not timed"}
    run = run_child(base + ["features", *vars_])
    if run["rc"] != 0:
        return {"make_note": f"make features exited {run['rc']}; not timed"}
    return {"make_repeat_s": run["seconds"], "make_cmd": "make features " + " ".join(vars_),
            "make_target": path}
