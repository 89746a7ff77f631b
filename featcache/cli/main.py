"""The ``featcache`` command (also ``python -m featcache``): argparse front end for every stage.

The only modules that print or exit: this one (the parser, ``main``), the commands it loads,
:mod:`featcache.cli.commands` (stage one, stage two, the registries) and
:mod:`featcache.cli.ship` (merge, export, predict), and what they share,
:mod:`featcache.cli.base` (the command registry, the progress bar). The options of
the stage commands are generated from the settings table (:mod:`featcache._util.settings`): no
default is written here. A :class:`~featcache.errors.FeatcacheError` from below becomes one
line on stderr (``featcache: error: …``) and a non-zero exit, Ctrl-C exits 130. Heavy imports
(TensorFlow, scikit-learn) happen inside the commands, so ``--help`` and ``path`` are fast
and work without them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from featcache import __version__
from featcache._util.quiet import quiet_tensorflow
from featcache.cli import commands, ship  # noqa: F401 - importing them registers their commands
from featcache.cli.base import COMMANDS
from featcache.errors import FeatcacheError

log = logging.getLogger("featcache")

class _OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (``featcache heads: error: …; see
    featcache heads --help``) instead of the usage block and the error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
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
