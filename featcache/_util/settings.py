"""The settings table: dataclass fields with metadata, and what is generated from them.

Reads and writes nothing; imports only the standard library (the Makefile asks for paths
before any virtualenv exists).

A stage's settings are the fields of a frozen dataclass (:class:`featcache.config.ExtractConfig`,
:class:`featcache.config.HeadsConfig`); each is declared with :func:`setting`, which stores in
the field's metadata everything the rest of featcache needs to know about it:

- ``help`` — the one description (``--help``, ``featcache settings``, the docs);
- ``choices`` — allowed values (a tuple, or a callable returning one, for registries);
- ``flag`` — the CLI option (default ``--<name with dashes>``; ``None`` = not on the CLI);
  ``aliases`` — deprecated spellings that still work and warn;
- ``key`` — whether the setting is part of the feature file's cache key, with ``attr`` (its
  name in the file, default the field name), ``to_key`` (how the value is written there)
  and ``companion`` (a measured value stored beside it, e.g. ``dataset_sha256``);
  ``key_if_set`` — in the key only when its value is not ``None`` (a setting added later,
  e.g. ``cut``: files made without it keep their key and name); ``key_when`` — in the key
  only when ``key_when(config)`` is true (a setting that matters only beside another, e.g.
  ``calibration`` only with ``--precision int8``);
- ``make`` — the Makefile variable that passes it (empty by default there);
- ``env`` — an environment variable that overrides the default.

The default is the field's own default: it is written nowhere else (not in the CLI, not in
the Makefile). Generated from the table: argparse options (:func:`add_options`), a config
from parsed arguments (:func:`from_args`), the cache key's fields (:func:`key_fields`) and
the listing ``featcache settings`` prints (:func:`describe_settings`).
"""

from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable


def setting(default: Any = MISSING, *, help: str, choices=None, flag: str | None | bool = True,
            aliases: tuple[str, ...] = (), key: bool = False, attr: str | None = None,
            to_key: Callable | None = None, companion: str | None = None,
            key_if_set: bool = False, key_when: Callable | None = None,
            make: str | None = None, env: str | None = None,
            type: Callable | None = None, parse: Callable | None = None,
            metavar: str | None = None, positional: bool = False,
            bounds: tuple | None = None):
    """A dataclass field carrying its row of the settings table (see the module docstring).

    ``type`` converts the CLI string (default: from the default's type); ``parse`` turns the
    converted value into the field's value (e.g. ``"0/4"`` -> ``(0, 4)``). ``bounds`` is
    ``(low, high)`` (inclusive; ``None`` for no limit on that side), or ``(low, high,
    "open")`` for a fraction strictly between the two; :func:`check_bounds` applies it."""
    meta = dict(help=help, choices=choices, flag=flag, aliases=tuple(aliases), key=key,
                attr=attr, to_key=to_key, companion=companion, key_if_set=key_if_set,
                key_when=key_when, make=make, env=env, type=type, parse=parse, metavar=metavar,
                positional=positional, bounds=bounds)
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for a sequence default")
    return field(default=default, metadata={"setting": meta})


@dataclass(frozen=True)
class Setting:
    """One row of the table, as read back from a field."""

    name: str
    default: Any
    help: str
    choices: Any
    flag: str | None
    aliases: tuple[str, ...]
    key: bool
    attr: str
    to_key: Callable | None
    companion: str | None
    key_if_set: bool
    make: str | None
    env: str | None
    type: Callable | None
    parse: Callable | None
    metavar: str | None
    positional: bool
    bounds: tuple | None = None
    key_when: Callable | None = None

    @property
    def allowed(self) -> tuple | None:
        c = self.choices() if callable(self.choices) else self.choices
        return tuple(c) if c is not None else None

    @property
    def is_bool(self) -> bool:
        return isinstance(self.default, bool)

    @property
    def default_value(self) -> Any:
        """The default, after the environment variable (if any) overrides it."""
        if self.env and os.environ.get(self.env):
            return os.environ[self.env]
        return self.default


def table(cls) -> tuple[Setting, ...]:
    """The settings of a config dataclass, in declaration order."""
    out = []
    for f in fields(cls):
        meta = f.metadata.get("setting")
        if meta is None:
            continue
        flag = meta["flag"]
        if flag is True:
            flag = "--" + f.name.replace("_", "-")
        elif flag is False:
            flag = None
        out.append(Setting(name=f.name, default=None if f.default is MISSING else f.default,
                           **{**meta, "flag": flag, "attr": meta["attr"] or f.name}))
    return tuple(out)


def bounds_text(s: Setting) -> str:
    """What ``s.bounds`` allows, as an error message says it."""
    lo, hi, *kind = s.bounds
    if kind:
        return f"between {lo:g} and {hi:g} (exclusive)"
    if hi is None:
        return f"{lo} or more"
    return f"between {lo} and {hi}" if lo is not None else f"at most {hi}"


def check_bounds(cfg, error: type[Exception]) -> None:
    """Raise ``error`` (one line naming the flag and its range) for the first setting of
    ``cfg`` outside its ``bounds``; ``None`` values (not set) pass."""
    for s in table(type(cfg)):
        value = getattr(cfg, s.name)
        if s.bounds is None or value is None:
            continue
        lo, hi, *kind = s.bounds
        name = s.flag or s.name
        try:
            number = float(value)
            ok = (lo is None or (number > lo if kind else number >= lo)) and \
                 (hi is None or (number < hi if kind else number <= hi))
            ok = ok and (not isinstance(s.default, int) or isinstance(value, bool)
                         or float(int(value)) == number)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise error(f"{name} must be {bounds_text(s)}, not {value!r}")


def key_fields(cls) -> tuple[str, ...]:
    """The attribute names that make up the cache key, in table order (a setting's
    ``companion`` — a measured value such as ``dataset_sha256`` — right after it)."""
    names = []
    for s in table(cls):
        if s.key:
            names.append(s.attr)
            if s.companion:
                names.append(s.companion)
    return tuple(names)


def optional_key_fields(cls) -> tuple[str, ...]:
    """The key attributes a file has only when the setting was given (``key_if_set``) or
    matters (``key_when``)."""
    return tuple(s.attr for s in table(cls) if s.key and (s.key_if_set or s.key_when))


def cache_key(cfg, measured: dict) -> dict:
    """The cache key of a resolved config: each key setting as written by its ``to_key``,
    with its companion taken from ``measured``. A setting whose companion is given as
    ``None`` is left out with it (files made before that setting was recorded), and so is
    a ``key_if_set`` setting whose value is ``None`` and a ``key_when`` one whose condition
    is false."""
    key = {}
    for s in table(type(cfg)):
        if not s.key:
            continue
        if s.companion and measured.get(s.companion, ...) is None:
            continue
        value = getattr(cfg, s.name)
        if (s.key_if_set and value is None) or (s.key_when and not s.key_when(cfg)):
            continue
        key[s.attr] = s.to_key(value) if s.to_key else value
        if s.companion:
            key[s.companion] = measured[s.companion]
    return key


# ------------------------------------------------------------------------------ argparse

def _help(s: Setting) -> str:
    text = s.help
    allowed = s.allowed
    if allowed and s.metavar:
        text += f"; one of: {', '.join(map(str, allowed))}"
    d = s.default_value
    if s.env:
        text += f" (env {s.env})"
    if s.is_bool and d and not s.flag.startswith("--no-"):
        text += " (default: on)"
    elif not s.is_bool and d not in (None, ()):
        text += f" (default: {d})"
    return text.replace("%", "%%")


class _Deprecated(argparse.Action):
    """An old spelling of an option: works, and warns once with the new one."""

    def __init__(self, *args, new: str, convert: Callable, **kw):
        self.new, self.convert = new, convert
        super().__init__(*args, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(f"{option_string} is deprecated; use {self.new}", FutureWarning,
                      stacklevel=2)
        setattr(namespace, self.dest, self.convert(values))


def add_options(parser: argparse.ArgumentParser, cls, *, only=None, exclude=()) -> None:
    """Add one option per setting of ``cls`` that has a flag (``only``/``exclude``: names).
    The parser's default is the setting's default (the field's, or its env variable)."""
    for s in table(cls):
        if s.flag is None or s.name in exclude or (only is not None and s.name not in only):
            continue
        if s.positional:
            parser.add_argument(s.name, nargs="?", help=s.help)
            continue
        kw: dict[str, Any] = dict(dest=s.name, default=s.default_value, help=_help(s))
        if s.is_bool:
            if s.flag.startswith("--no-"):  # a default-on setting spelled as its opposite
                parser.add_argument(s.flag, action="store_false", **kw)
            elif s.default:
                parser.add_argument(s.flag, action=argparse.BooleanOptionalAction, **kw)
            else:
                parser.add_argument(s.flag, action="store_true", **kw)
            continue
        convert = s.type or (type(s.default) if s.default is not None
                             and not isinstance(s.default, tuple) else str)
        kw.update(type=convert)
        if s.allowed is not None:
            kw.update(choices=s.allowed)
        if s.metavar:
            kw.update(metavar=s.metavar)
        parser.add_argument(s.flag, **kw)
        for alias in s.aliases:
            parser.add_argument(alias, action=_Deprecated, new=s.flag, convert=convert,
                                dest=s.name, help=argparse.SUPPRESS)


def from_args(cls, args: argparse.Namespace, **extra):
    """``cls`` built from parsed arguments: every setting the parser knows (converted by
    its ``parse``), the rest at their defaults; ``extra`` overrides."""
    kw = {}
    for s in table(cls):
        if hasattr(args, s.name):
            value = getattr(args, s.name)
            kw[s.name] = s.parse(value) if s.parse else value
    kw.update(extra)
    return cls(**kw)


def describe_settings(*classes) -> list[dict]:
    """The table as plain data (``featcache settings --json``, the docs)."""
    rows = []
    for cls in classes:
        for s in table(cls):
            d = s.default
            rows.append({"stage": cls.__name__, "name": s.name, "flag": s.flag,
                         "default": list(d) if isinstance(d, tuple) else d,
                         "choices": list(s.allowed) if s.allowed else None,
                         "cache_key": s.attr if s.key else None, "make": s.make,
                         "env": s.env, "help": s.help})
    return rows
