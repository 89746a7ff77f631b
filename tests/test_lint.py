"""``make lint``'s import contracts (pyproject.toml, run by ``lint-imports``): they hold on the
package, and they fail on a copy of it with an upward import, an import cycle, or h5py
outside ``featcache.cache`` planted in it. The ruff half of ``make lint`` is CI's own step."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.is_file(),
                                reason="lint-imports (import-linter, the dev extra) not installed")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def tree(tmp_path) -> Path:
    """A copy of the package and its contracts, to plant imports in."""
    shutil.copytree(ROOT / "featcache", tmp_path / "featcache",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _plant(tree: Path, module: str, line: str) -> None:
    path = tree / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + f"\n{line}  # planted\n")


def test_the_package_keeps_every_contract(tree):
    r = _lint(tree)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "BROKEN" not in r.stdout and " 0 broken" in r.stdout


def test_a_lower_room_importing_a_higher_one_fails(tree):
    _plant(tree, "featcache.cache.lock", "import featcache.compare.report")
    r = _lint(tree)
    assert r.returncode != 0
    assert "layers: each room imports only the rooms below it BROKEN" in r.stdout
    assert "featcache.cache.lock -> featcache.compare.report" in r.stdout


def test_a_cycle_inside_a_room_fails(tree):
    # folders imports resize; resize importing folders closes a cycle inside data/
    _plant(tree, "featcache.data.resize", "import featcache.data.folders")
    r = _lint(tree)
    assert r.returncode != 0
    assert "no import cycles: not between rooms, nor between the modules of one room " \
           "BROKEN" in r.stdout
    assert "layers: each room imports only the rooms below it KEPT" in r.stdout


def test_stage_two_importing_stage_one_fails(tree):
    _plant(tree, "featcache.compare.stats", "import featcache.extract.run")
    r = _lint(tree)
    assert r.returncode != 0
    assert "stage two runs on the feature file alone: no stage one, no data sets " \
           "BROKEN" in r.stdout


def test_h5py_outside_the_cache_fails(tree):
    _plant(tree, "featcache.compare.report", "import h5py")
    r = _lint(tree)
    assert r.returncode != 0
    assert "the feature file is read and written only by featcache.cache (h5py) " \
           "BROKEN" in r.stdout
