"""Named exceptions. Anything derived from SeqclustError is a user-facing problem:
the CLI prints its message on one line and exits non-zero, without a traceback."""

from __future__ import annotations


class SeqclustError(Exception):
    """A problem the user can fix (bad input, bad config); message is shown as is."""

    exit_code = 2


class ConfigError(SeqclustError):
    """Configuration is invalid: unknown key, wrong type, value out of range."""


class InputError(SeqclustError):
    """Input data is missing, unreadable or lacks required columns."""


class MissingColumnError(InputError):
    """A required column is absent from the source (named as in chispa/quinn)."""


class ReconciliationError(SeqclustError):
    """Row accounting does not add up: input != clean + quarantined + duplicates."""

    exit_code = 3


class ArtifactError(SeqclustError):
    """An encoder artifact is missing, corrupt, tampered with or incompatible."""
