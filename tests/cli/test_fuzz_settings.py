"""Every numeric setting of the table, fed its bad values through the real CLI: a non-zero
exit, one line on stderr, no traceback, before any work (within a time bound).

The values come from the table itself (each setting's ``bounds``): just below and above
the range, absurdly large, non-numeric, empty; a numeric setting without ``bounds`` fails
this test, so a new setting cannot skip the check.
"""

from __future__ import annotations

import time

import pytest

from featcache._util.settings import table
from featcache.config import ExtractConfig, HeadsConfig

COMMANDS = {ExtractConfig: ["features", "--dataset", "synthetic"],
            HeadsConfig: ["heads", "no-such-file.h5"]}
# numeric settings whose range lives elsewhere (checked against the backbone, the CLI)
OWN_CHECK = {"size"}


def _numeric(s) -> bool:
    kinds = (int, float)
    return (s.type in kinds or (isinstance(s.default, kinds) and not s.is_bool)) \
        and s.flag is not None and not s.positional


def _bad_values(s) -> list[str]:
    lo, hi, *kind = s.bounds
    out = ["abc", "", "1e400" if isinstance(s.default, float) else "99999999999999999999"]
    if lo is not None:
        out.append(str(lo) if kind else str(lo - 1))
        out.append("-1")
    if hi is not None:
        out.append(str(hi) if kind else str(hi + 1))
    return sorted(set(out))


CASES = [(cls, s.name, s.flag, v) for cls in COMMANDS for s in table(cls)
         if _numeric(s) and s.name not in OWN_CHECK for v in _bad_values(s)]


def test_every_numeric_setting_has_bounds():
    missing = [f"{cls.__name__}.{s.name}" for cls in COMMANDS for s in table(cls)
               if _numeric(s) and s.name not in OWN_CHECK and s.bounds is None]
    assert not missing, f"numeric settings without bounds in the settings table: {missing}"
    assert len(CASES) > 40


@pytest.mark.parametrize("cls,name,flag,value", CASES,
                         ids=[f"{c[2]}={c[3] or 'EMPTY'}" for c in CASES])
def test_a_bad_value_is_one_line_and_a_non_zero_exit(cls, name, flag, value, capsys):
    from featcache.cli.main import main

    t0 = time.monotonic()
    try:
        rc = main([*COMMANDS[cls], f"{flag}={value}"])
    except SystemExit as exc:          # argparse: the value is not a number at all
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc not in (0, None)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert flag in err or flag.lstrip("-") in err
    assert time.monotonic() - t0 < 10


def test_bounds_hold_in_the_notebook_api_too():
    from featcache.errors import ConfigError

    with pytest.raises(ConfigError, match="--workers must be between 0 and"):
        HeadsConfig("f.h5", workers=-3)
    with pytest.raises(ConfigError, match="--batch must be"):
        ExtractConfig(batch=0)
    with pytest.raises(ConfigError, match="--seed must be"):
        HeadsConfig("f.h5", seed=1.5)
    assert HeadsConfig("f.h5", seed=7).seed == 7 and ExtractConfig(batch=1).batch == 1
