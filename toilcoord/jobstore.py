"""A job store in a directory, for shipping user code without Toil.

A job store is any object with ``write_shared_file_stream(shared_file_name,
encrypted=False)`` (a context manager yielding a binary writer) and
``get_shared_public_url(shared_file_name)``: :meth:`.resources.Resource.create`
saves to it and workers download from its URLs. Toil's job stores qualify;
:class:`LocalJobStore` is one backed by a local or shared directory, whose
URLs are ``file:`` URLs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import BinaryIO, Iterator

from .locks import check_name

__all__ = ["LocalJobStore"]


class LocalJobStore:
    """A job store in a local or shared directory, enough for
    :meth:`Resource.create`: shared files are written atomically (a reader
    sees the old file or the whole new one) and published as ``file:`` URLs.
    The directory is created if missing."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"LocalJobStore path must be a str or os.PathLike, not {type(path).__name__}")
        self.path = os.path.abspath(os.fspath(path))
        os.makedirs(self.path, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalJobStore({self.path!r})"

    def _shared_path(self, shared_file_name: str) -> str:
        return os.path.join(self.path, check_name(shared_file_name, "shared file name"))

    @contextmanager
    def write_shared_file_stream(self, shared_file_name: str, encrypted: bool = False) -> Iterator[BinaryIO]:
        """Yield a binary writer; on a clean exit its bytes replace the shared
        file *shared_file_name* at once, on an exception nothing changes.
        ``encrypted=True`` raises ValueError: this store cannot encrypt."""
        final = self._shared_path(shared_file_name)
        if encrypted:
            raise ValueError("LocalJobStore cannot encrypt shared files; pass encrypted=False")
        temp = f"{final}.{os.urandom(6).hex()}.tmp"
        # 0o666 under the umask, unlike mkstemp's 0o600: workers may read
        # the store as another user of a shared filesystem.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            with open(fd, "wb") as writer:
                yield writer
            os.replace(temp, final)
        except BaseException:
            os.unlink(temp)
            raise

    def get_shared_public_url(self, shared_file_name: str) -> str:
        """The ``file:`` URL of the shared file (which need not exist yet)."""
        from pathlib import Path

        return Path(self._shared_path(shared_file_name)).as_uri()
