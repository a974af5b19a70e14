"""Exceptions that are two things at once, so that Toil's callers and
Python's both catch them.

Toil raises RuntimeError where a directory it needs is missing or is not a
directory; Python code expects FileNotFoundError or NotADirectoryError. The
classes here are both, so ``except RuntimeError`` (written for Toil) and
``except FileNotFoundError`` (or ``OSError``) both work.
"""

from __future__ import annotations

__all__ = ["MissingDirectoryError", "NotADirectoryRuntimeError"]


class MissingDirectoryError(FileNotFoundError, RuntimeError):
    """A directory toilcoord was given does not exist (Toil: RuntimeError)."""


class NotADirectoryRuntimeError(NotADirectoryError, RuntimeError):
    """A path toilcoord was given as a directory is something else (Toil:
    RuntimeError)."""
