"""``make finetune`` and ``make export`` after it, as make plans them (``make -n``: nothing
runs): no CUT= needed (the default file already holds the backbone's recommended cut, so
the backbone runs once; else make finetune makes the file with it), BUDGET= passed, and
export takes the report of whichever of make heads / make finetune ran last."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _dry(*targets, out: Path, **variables) -> str:
    args = ["make", "-n", "-C", str(ROOT), *targets, f"OUT_DIR={out}", "DATASET=synthetic",
            "SIZE=32", "RUNTIME=tensorflow", f"VENV={sys.prefix}", f"PYTHON={sys.executable}",
            *(f"{k}={v}" for k, v in variables.items())]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    return r.stdout


def _export_line(out: str) -> str:
    return next(line for line in out.splitlines() if "-m featcache export" in line)


def test_after_make_features_heads_make_finetune_runs_no_second_extraction(tmp_path):
    out = tmp_path / "features"
    the_file = out / "synthetic_mobilenet_v2_32_flip_cut-block_13.h5"   # the default cut
    plan = _dry("features", "heads", "finetune", out=out, BUDGET="90s")
    assert plan.count("-m featcache features") == 1, plan       # the backbone runs once
    assert f"-m featcache heads {the_file}" in plan
    assert f"-m featcache finetune {the_file} " in plan and "--budget '90s'" in plan
    # the file made: make finetune needs nothing more from stage one
    out.mkdir(parents=True)
    the_file.write_bytes(b"")
    plan = _dry("finetune", out=out)
    assert "-m featcache features" not in plan and f"-m featcache finetune {the_file}" in plan
    assert str(the_file) in _export_line(_dry("finetune", "export", out=out))


def test_make_finetune_makes_the_cut_file_when_make_features_stored_none(tmp_path):
    out = tmp_path / "features"
    cut_file = out / "synthetic_mobilenet_v2_32_flip_cut-block_13.h5"
    plan = _dry("finetune", out=out, BUDGET="90s", CUT="none")
    assert "-m featcache features" in plan and "--cut recommended" in plan
    assert f"-m featcache finetune {cut_file} " in plan and "--budget '90s'" in plan
    # `make finetune export` in one go: the fine-tuned report
    assert str(cut_file) in _export_line(_dry("finetune", "export", out=out, CUT="none"))

    plain_report = out / "synthetic_mobilenet_v2_32_flip" / "results.json"
    done = out / ".synthetic_mobilenet_v2_32_flip_cut-block_13.make-finetune-done"
    out.mkdir(parents=True)
    plain_report.parent.mkdir()
    plain_report.write_text("{}")
    assert str(cut_file) not in _export_line(_dry("export", out=out, CUT="none"))  # heads only
    time.sleep(0.05)
    done.write_text("")                                              # then make finetune
    assert str(cut_file) in _export_line(_dry("export", out=out, CUT="none"))
    time.sleep(0.05)
    plain_report.write_text("{}")                                    # then make heads again
    assert str(cut_file) not in _export_line(_dry("export", out=out, CUT="none"))
