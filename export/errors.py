"""Errors raised by ``rnnserve.export``; each message says what went wrong and what to do next."""

from __future__ import annotations


class ExportError(Exception):
    """The model cannot be adapted or exported as asked."""


class ExportVerificationError(ExportError):
    """The exported artifact does not reproduce the eager reference within tolerance; nothing was written."""


class ExportUsageError(ExportError):
    """An argument was given that cannot apply to what is exported (it would be silently ignored)."""

    def __init__(self, argument: str, reason: str) -> None:
        super().__init__(f"{argument}= cannot apply: {reason}")
        self.argument = argument
        self.reason = reason


class SizeInferenceError(ExportError):
    """A user cell's sizes could not be inferred. ``sizes_help``: whether passing sizes could help."""

    def __init__(self, message: str, *, sizes_help: bool) -> None:
        super().__init__(message)
        self.sizes_help = sizes_help
