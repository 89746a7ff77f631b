"""The ``featcache`` command (also ``python -m featcache``): argparse front end for every stage.

The only modules that print or exit: this one (the command registry, the parser, ``main``,
the progress bar) and the commands it loads, :mod:`featcache.cli_commands` (stage one, stage
two, the registries) and :mod:`featcache.cli_ship` (merge, export, predict). The options of
the stage commands are generated from the settings table (:mod:`featcache.settings`): no
default is written here. A :class:`~featcache.errors.FeatcacheError` from below becomes one
line on stderr (``featcache: error: …``) and a non-zero exit, Ctrl-C exits 130. Heavy imports
(TensorFlow, scikit-learn) happen inside the commands, so ``--help`` and ``path`` are fast
and work without them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from typing import Callable

from .errors import FeatcacheError
from .quiet import quiet_tensorflow

log = logging.getLogger("featcache")

COMMANDS: dict[str, tuple[Callable, Callable, str]] = {}


def command(name: str, help: str):
    """Register ``fn(args) -> int`` as a sub-command; ``fn.configure(parser)`` adds options."""
    def deco(fn):
        COMMANDS[name] = (fn, getattr(fn, "configure", lambda p: None), help)
        return fn
    return deco


def options(configure: Callable):
    """Attach an argparse configurator to a command function."""
    def deco(fn):
        fn.configure = configure
        return fn
    return deco


class ProgressBar:
    """Draws ``split [#####.....] 1234/60000 115.2 img/s ETA 8m40s`` on stderr (stage one's
    ``Progress``), or ``heads [#####.....] 3/8 elapsed 0m41s ETA 1m02s`` for a progress
    object with ``elapsed_s`` instead of ``images_per_s`` (stage two's ``HeadsProgress``).
    A progress object's ``message`` (e.g. a finished row) is printed on a line of its own
    above the bar."""

    def __init__(self, stream=sys.stderr, width: int = 28):
        self.stream, self.width = stream, width
        self.tty = stream.isatty()
        self._last = 0.0
        self._final = False

    def __call__(self, p) -> None:
        now = time.monotonic()
        final = p.done >= p.total
        message = getattr(p, "message", "")
        if message:
            self.stream.write(("\r\033[K" if self.tty else "") + message + "\n")
        elif self._final or (not final and now - self._last < (0.2 if self.tty else 15.0)):
            return
        self._last = now
        self._final = final
        frac = p.done / p.total if p.total else 1.0
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        eta = "--" if p.eta_s == float("inf") else f"{int(p.eta_s // 60)}m{int(p.eta_s % 60):02d}s"
        rate = (f"{p.images_per_s:6.1f} img/s" if hasattr(p, "images_per_s") else
                f"elapsed {int(p.elapsed_s // 60)}m{int(p.elapsed_s % 60):02d}s")
        line = f"{p.split:>5} [{bar}] {p.done}/{p.total} {rate} ETA {eta}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def escape_name(name: str) -> str:
    """A file name on one line of text output: backslash and control characters (a newline
    in a name) are written as escapes (``\\n``, ``\\x1b``); other characters as they are."""
    out = []
    for ch in str(name):
        if ch == "\\":
            out.append("\\\\")
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, cli_commands, cli_ship  # noqa: F401 - they register commands

    parser = argparse.ArgumentParser(
        prog="featcache",
        description="Run a pretrained backbone once, cache its features, compare heads on them.")
    parser.add_argument("--version", action="version", version=f"featcache {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (fn, configure, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
        p.add_argument("-v", "--verbose", action="store_true",
                       help="debug logging, and TensorFlow's own start-up lines")
        configure(p)
        p.set_defaults(func=fn)
    return parser


def _warn_line(message, category, *args, **kw) -> None:
    print(f"featcache: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():  # a deprecated option says so on one line
        warnings.simplefilter("always", FutureWarning)
        warnings.showwarning = _warn_line
        args = build_parser().parse_args(argv)
    quiet_tensorflow(args.verbose)  # before any command imports TensorFlow
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("tensorflow", "absl", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    try:
        return args.func(args)
    except FeatcacheError as exc:
        print(f"featcache: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("featcache: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
