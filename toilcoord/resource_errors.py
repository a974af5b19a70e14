"""The exceptions of shipping user code (:mod:`.modules`, :mod:`.resources`).

They live apart from the classes that raise them so that :mod:`.archives`,
which :mod:`.resources` imports, can raise them too without an import cycle.
"""

from __future__ import annotations

from .errors import NotADirectoryRuntimeError

__all__ = ["ResourceException", "ResourceRootError"]


class ResourceException(RuntimeError):
    """A module or resource cannot be shipped, found or verified."""


class ResourceRootError(NotADirectoryRuntimeError):
    """``JTRES_ROOT`` names something that is not a directory. Both a
    NotADirectoryError and the RuntimeError Toil raises there, so either
    ``except`` clause catches it."""
