"""Exceptions that name the offending input, so a user can fix it without reading a traceback."""


class ConfigError(ValueError):
    """An impossible or unknown setting in a config or a study file."""


class DataError(ValueError):
    """A data file that is missing, malformed, or too short for the requested windows."""


class CacheError(OSError):
    """The feature cache cannot be created or written (a read-only or full disk, a bad URI)."""
