"""Errors raised by ``rnnserve.export``; each message says what went wrong and what to do next."""

from __future__ import annotations


class ExportError(Exception):
    """The model cannot be adapted or exported as asked."""


class ExportVerificationError(ExportError):
    """The exported artifact does not reproduce the eager reference within tolerance; nothing was written."""
