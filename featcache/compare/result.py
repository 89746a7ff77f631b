"""What a comparison returns: :class:`Comparison`, the ``results.json`` dict with the names a
notebook reaches for (``table``, ``best``, ``rows``, ``head()``, ``to_dict()``).

Reads a saved head only when :meth:`Comparison.head` asks for one; writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from featcache.compare.report import format_table


class Comparison(Mapping):
    """A finished comparison. It is also the ``results.json`` dict (a read-only mapping:
    ``c["rows"]``, ``c["mcnemar"]`` …); in a notebook it shows as its table.

    ``report_dir`` is where the report and the fitted heads are (None when nothing was
    written)."""

    def __init__(self, results: dict, report_dir: Path | None):
        self._results = results
        self.report_dir = Path(report_dir) if report_dir is not None else None

    # -- the results dict -----------------------------------------------------------------
    def __getitem__(self, key):
        return self._results[key]

    def __iter__(self):
        return iter(self._results)

    def __len__(self) -> int:
        return len(self._results)

    def to_dict(self) -> dict:
        """The results as written to ``results.json`` (a copy of the top level)."""
        return dict(self._results)

    # -- what a notebook asks for ---------------------------------------------------------
    @property
    def rows(self) -> list[dict]:
        """One dict per row (a head, or a head's ``+flip`` row), in row order."""
        return self._results["rows"]

    @property
    def best_row(self) -> str:
        """The name of the row with the highest validation accuracy (ties: the first)."""
        return self._results["best_row"]

    @property
    def best(self) -> dict:
        """The best row's dict: ``test_accuracy``, ``ci95``, ``params``, ``saved`` …"""
        return next(r for r in self.rows if r["name"] == self.best_row)

    @property
    def table(self) -> str:
        """The comparison table as markdown, best test accuracy first."""
        return format_table(self._results)

    def head(self, name: str | None = None):
        """A fitted head saved by this comparison (default: the best row's), loaded."""
        from featcache.errors import ConfigError
        from featcache.heads import load_head

        name = name or self.best_row
        row = next((r for r in self.rows if r["name"] == name), None)
        if row is None:
            raise ConfigError(f"no row {name!r} in this comparison; its rows are "
                              f"{', '.join(r['name'] for r in self.rows)}")
        if self.report_dir is None or not row.get("saved"):
            raise ConfigError(f"row {name!r} was not saved (the comparison ran with "
                              f"write=False)")
        return load_head(self.report_dir / row["saved"])

    def __repr__(self) -> str:
        return (f"Comparison(best_row={self.best_row!r}, rows={len(self.rows)}, "
                f"report_dir={str(self.report_dir) if self.report_dir else None!r})")

    def _repr_markdown_(self) -> str:
        return self.table
