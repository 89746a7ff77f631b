"""What every command module shares: the command registry (``COMMANDS``, :func:`command`,
:func:`options`), the progress bar stage one and stage two draw on stderr, and
:func:`escape_name` for file names on one line of output.

Reads nothing; writes to stderr (the progress bar).
"""

from __future__ import annotations

import sys
import time
from typing import Callable

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
    above the bar; :meth:`clear` erases the bar so that other lines can be written (predict's
    results when stdout is the same terminal)."""

    def __init__(self, stream=None, width: int = 28):
        # sys.stderr as it is now (a default argument would keep the one at import)
        self.stream, self.width = stream or sys.stderr, width
        self.tty = self.stream.isatty()
        self._last = 0.0
        self._final = False

    def clear(self) -> None:
        """Erase the bar's line on a terminal (elsewhere its lines stay); the next update
        draws it again at once."""
        if self.tty and self._last and not self._final:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._last = 0.0

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
