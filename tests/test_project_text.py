"""Project text speaks of the project to its users and contributors: no tracked file (code,
tests, docs, benchmarks, README, BENCHMARKS.md) names an absolute path of the machine a
measurement ran on, or an issue number. Commands in the docs use relative paths or
placeholders."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# built from pieces, so that this file does not match itself
MACHINE_PATH = re.compile(r"(?<![\w.~$-])/(" + "|".join(["wo" + "rk", "ho" + "me", "ro" + "ot"])
                          + r")/\S")
ISSUE_NUMBER = re.compile(r"\b[Ii]" + r"ssues? #?\d+|\(#\d+\)")


def _tracked_text() -> dict[str, str]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    texts = {}
    for name in names:
        path = ROOT / name
        if path.suffix in (".png", ".h5", ".npz") or not path.is_file():
            continue
        try:
            texts[name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
    return texts


def _hits(pattern: re.Pattern) -> list[str]:
    return [f"{name}:{i}: {line.strip()[:120]}"
            for name, text in _tracked_text().items()
            for i, line in enumerate(text.splitlines(), 1) if pattern.search(line)]


def test_no_absolute_machine_path():
    hits = _hits(MACHINE_PATH)
    assert not hits, "absolute machine paths (write them relative, or as a placeholder):\n" \
        + "\n".join(hits)


def test_no_issue_number():
    hits = _hits(ISSUE_NUMBER)
    assert not hits, "issue numbers (say what the thing is instead):\n" + "\n".join(hits)


@pytest.mark.parametrize("line, bad", [
    ("cd /" + "work/main && make", True), ("--data-dir /" + "home/me/data", True),
    ("see i" + "ssue 12", True), ("fixed (#" + "5)", True),
    ("--data-dir ../shared/data", False), ("~/.cache/featcache", False),
    ("$XDG_CACHE_HOME/featcache", False), ("the #1 head", False), ('color="#999"', False),
])
def test_the_patterns_catch_what_they_should(line, bad):
    assert bool(MACHINE_PATH.search(line) or ISSUE_NUMBER.search(line)) is bad
