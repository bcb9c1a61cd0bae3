"""Errors that users see as one clear sentence (printed without a traceback by the CLI)."""

from __future__ import annotations


class LorafitError(Exception):
    """A problem the user can fix; the message names the file/field and the fix."""

    exit_code = 1


class UsageError(LorafitError):
    """Bad command-line input or configuration (exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration field that is unknown, ill-typed or out of range."""


class DataError(UsageError):
    """Input data that cannot be used at all (for example: no documents left)."""


class ModelError(UsageError):
    """A base model that cannot be found or loaded."""


class TrainingInterruptedError(LorafitError):
    """Stopped by Ctrl-C or SIGTERM after writing a checkpoint (exit code 130, as for SIGINT)."""

    exit_code = 130
