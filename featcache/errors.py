"""Project exceptions.

Every error a user can cause (unknown name, missing data offline, stale or corrupt cache,
bad folder) is raised as a :class:`FeatcacheError` whose message says what to do next.
The CLI prints ``str(error)`` on one line and exits non-zero; nothing below the CLI prints
or exits. Reads and writes nothing.
"""

from __future__ import annotations


class FeatcacheError(Exception):
    """Base class: a problem the user can fix; the message says how."""

    exit_code = 2


class ConfigError(FeatcacheError):
    """Unknown backbone/head/dataset name, bad option value or combination."""


class DataError(FeatcacheError):
    """Dataset missing, unreadable, empty, or changed since extraction."""


class WeightsError(FeatcacheError):
    """Backbone weights missing offline, unreadable or of the wrong shape."""


class CacheError(FeatcacheError):
    """A feature file exists but cannot be used as asked (stale, incomplete, locked)."""


class StaleCacheError(CacheError):
    """A feature file at the output path was made with another configuration."""


class IncompleteFeatureFile(CacheError):
    """The feature file is still being written or was interrupted."""


class OldSchemaError(CacheError):
    """A feature file of an older schema: ``featcache upgrade FILE`` migrates it."""


class LockedError(CacheError):
    """Another featcache process holds the output file."""


class CorruptFeatureFile(CacheError):
    """The feature file is truncated, unreadable, of a newer schema, or holds NaN/Inf."""


class ConversionError(FeatcacheError):
    """OpenVINO could not convert or compile a backbone; the TensorFlow runtime still can."""


class DiskFullError(FeatcacheError):
    """Writing failed for lack of space; what was written so far is kept and resumable."""


class Interrupted(FeatcacheError):
    """Ctrl-C: stopped cleanly after the last completed batch."""

    exit_code = 130
