"""The project's own error classes: problems a user caused and can fix.

Jobs and the CLI print these as one line without a traceback (``--debug`` shows it); anything else is a bug
or an environment problem and keeps its full traceback. Every message names the input and the fix.
"""

from __future__ import annotations


class MavilError(Exception):
    """Base of every user-fixable error."""


class ConfigError(MavilError, ValueError):
    """A bad config key, type or value, or a missing config file."""


class DatasetError(MavilError, ValueError):
    """A prepared dataset directory is missing or malformed."""


class CheckpointError(MavilError, FileNotFoundError):
    """A checkpoint path that does not hold what the step needs (names what is missing and who writes it)."""


class BundleError(MavilError, ValueError):
    """A model bundle that cannot be loaded, or a request a bundle cannot answer."""


class InputError(MavilError, ValueError):
    """Bad input to a job: a path that does not exist, an argument out of range, an unreadable file."""


class StorageError(MavilError, OSError):
    """A storage location that cannot be opened, read or written (a missing bucket, missing credentials)."""
