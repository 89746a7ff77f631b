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


PLANTED = [
    # (module, the planted line, the contract it breaks)
    ("featcache.cache.lock", "import featcache.compare.report",
     "layers: each room imports only the rooms below it"),
    # folders imports resize; resize importing folders closes a cycle inside data/
    ("featcache.data.resize", "import featcache.data.folders",
     "no import cycles: not between rooms, nor between the modules of one room"),
    ("featcache.compare.stats", "import featcache.extract.run",
     "stage two runs on the feature file alone: no stage one, no data sets"),
    ("featcache.compare.report", "import h5py",
     "the feature file is read and written only by featcache.cache (h5py)"),
]


@pytest.mark.parametrize("module, line, contract", PLANTED,
                         ids=["upward import", "cycle in a room", "stage two -> stage one",
                              "h5py outside the cache"])
def test_a_planted_import_breaks_its_contract(tree, module, line, contract):
    _plant(tree, module, line)
    r = _lint(tree)
    assert r.returncode != 0
    assert f"{contract} BROKEN" in r.stdout
    broken = [c for _, _, c in PLANTED if f"{c} BROKEN" in r.stdout]
    if contract.startswith("no import cycles"):
        assert broken == [contract]   # a cycle inside a room breaks no layer
    if contract.startswith("layers"):
        assert f"{module} -> {line.split()[1]}" in r.stdout
