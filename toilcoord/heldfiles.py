"""Files held locked for as long as their process lives.

A :class:`HeldFile` is a new, randomly named file its process creates and
holds an exclusive ``flock`` on: process names and the deferred-function
manager's state files are such files. It exists, and nobody else can lock
it, for as long as its process lives; once that process is dead, however it
died, :func:`take_over` succeeds on it, and the taker reads what it left,
then removes it (:func:`discard_taken`) or leaves it for the next taker
(:func:`release_taken`).

This module is the one implementation of that pattern, built on the locks,
the fork-aware fd tracking and the NFS-safe checks of :mod:`.locks` (which
never imports it). :class:`~.mutex.global_mutex`, unlike a held file, keeps
its lock file open between acquisitions (see :mod:`.gates`).
"""

from __future__ import annotations

import errno
import os
from typing import Optional

from .files import unlink_if_present
from .locks import (
    _CREATE_NEW,
    _FILE_MODE,
    _OPEN_EXISTING,
    PathArg,
    _close_tracked,
    _create_if_free,
    _held_fds,
    _open_tracked,
    _own_directory_fd,
    fork_epoch,
    locked_file_is,
    safe_lock,
    safe_unlock_and_close,
)
from .mounts import names_may_be_stale

__all__ = ["HeldFile", "discard_taken", "release_taken", "take_over"]


class HeldFile:
    """A file this process holds an exclusive ``flock`` on.

    While the process lives, the file exists and cannot be locked by anyone
    else; once it dies, :func:`take_over` succeeds on it. ``release()``
    unlinks the file while still holding it, then unlocks. In a forked child
    the object is inert: ``held`` is False and ``release()`` does nothing.
    The file is reached relative to its directory, opened once by
    ``create`` (``dir_fd``), never by ``path`` (for messages).
    """

    __slots__ = ("path", "fd", "dir_fd", "_epoch")

    #: ``create`` names a file *prefix*, this many random lowercase hex
    #: characters, then *suffix*.
    RANDOM_CHARS = 16

    def __init__(self, path: str, fd: int, dir_fd: int) -> None:
        # *fd* and *dir_fd* are ours, tracked in _held_fds from their open on.
        self.path = path
        self.fd = fd
        self.dir_fd = dir_fd
        self._epoch = fork_epoch()

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def held(self) -> bool:
        """True in the process that locked the file, until ``release()``."""
        return self.fd >= 0 and self._epoch == fork_epoch()

    def is_linked(self) -> bool:
        """Whether the held file is still the one at its name (see
        :func:`~.locks.locked_file_is`)."""
        return self.held and locked_file_is(self.fd, self.name, self.dir_fd)

    @classmethod
    def create(
        cls,
        directory: str,
        prefix: str = "",
        suffix: str = "",
        mode: int = _FILE_MODE,
        verify: bool = True,
        dir_fd: Optional[int] = None,
    ) -> "HeldFile":
        """Create a new, randomly named file in *directory* and lock it.

        *dir_fd*, an fd of *directory* the caller opened and checked, is
        used (a copy of it) if given; else *directory* is opened here.
        The name is made with O_EXCL; the lock is taken and verified before
        returning, so a concurrent :func:`take_over` that got in between
        (and unlinked the fresh, unlocked file) makes us try another name.
        A caller that creates and takes over files only under one mutex
        may pass ``verify=False`` and save the two stat calls.
        """
        folder = _own_directory_fd(directory, dir_fd)
        try:
            while True:
                name = prefix + os.urandom(cls.RANDOM_CHARS // 2).hex() + suffix
                try:
                    fd = os.open(name, _CREATE_NEW, mode, dir_fd=folder)
                except FileExistsError:
                    continue
                _held_fds.add(fd)
                try:
                    locked = _lock_new(fd, name, folder, os.path.join(directory, name), verify)
                except BaseException:
                    unlink_if_present(name, folder)  # ours: made with O_EXCL, never locked
                    raise
                if locked:
                    return cls(os.path.join(directory, name), fd, folder)
        except BaseException:
            _close_tracked(folder)
            raise

    def release(self, unlink: bool = True) -> None:
        """Unlink the file (if *unlink*) while holding it, then unlock it."""
        if not self.held:
            self.fd = -1
            return
        fd, self.fd = self.fd, -1
        _held_fds.discard(fd)
        try:
            if unlink:
                unlink_if_present(self.name, self.dir_fd)
        finally:
            try:
                safe_unlock_and_close(fd)
            finally:
                _close_tracked(self.dir_fd)

    def __repr__(self) -> str:
        return f"HeldFile({self.path!r}, held={self.held})"


def _lock_new(fd: int, name: str, dir_fd: int, path: str, verify: bool) -> bool:
    """Lock the tracked, freshly created *fd* without waiting and check it
    is still linked at *name* in *dir_fd* (whose path is *path*); on False
    or on an exception *fd* has been closed and untracked."""
    try:
        try:
            safe_lock(fd, block=False)
        except OSError as error:
            # Taken by someone else, or (ESTALE) already removed on the
            # NFS server by someone who took it: either way not ours.
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.ESTALE):
                raise
            _close_tracked(fd)
            return False
        if not verify or _new_file_is_linked(fd, name, dir_fd, path):
            return True
    except BaseException:
        _close_tracked(fd)
        raise
    # A taker-over unlinked the fresh, not yet locked file between our
    # create and our lock: it is garbage, and so is our fd.
    _close_tracked(fd)
    return False


def _new_file_is_linked(fd: int, name: str, dir_fd: int, path: str) -> bool:
    """:func:`~.locks.locked_file_is` for a file we created at *name* in
    *dir_fd* (at *path*) just now, even where the name may be cached by an
    NFS client."""
    try:
        device = os.fstat(fd).st_dev
    except OSError as error:
        if error.errno == errno.ESTALE:
            return False  # already removed at the NFS server by someone who took it over
        raise
    if names_may_be_stale(device, path):
        # A prober on another client may have taken the file over before we
        # locked it and unlinked it; while the prober has it open, its client
        # keeps it as .nfsXXXX, so it has one link, and our client may still
        # have our name cached. Only a lookup at the server tells.
        fresh = _create_if_free(name, dir_fd)
        if fresh is not None:
            _close_tracked(fresh)
            unlink_if_present(name, dir_fd)  # our probe, an empty file of a random name
            return False
    return locked_file_is(fd, name, dir_fd)


def take_over(path: PathArg, shared: bool = False, dir_fd: Optional[int] = None) -> Optional[int]:
    """Lock the file at *path* (relative to *dir_fd*, a directory fd, if
    given) if the process that held it is dead.

    Returns an fd holding a lock on the file (the caller reads what it
    needs, then calls :func:`discard_taken`), or None if a live process
    holds it. Raises FileNotFoundError if no file is (any longer) linked at
    *path*. Symlinks are never followed.

    The lock is exclusive, so two takers never both get a file, unless
    *shared*: for a mere liveness probe, which must not mistake another
    prober's brief lock for the owner's (only owners lock exclusively).
    """
    # Tracked: a child forked while we hold it must not keep it.
    fd = _open_tracked(os.fspath(path), _OPEN_EXISTING, dir_fd)
    try:
        safe_lock(fd, block=False, shared=shared)
    except OSError as error:
        _close_tracked(fd)
        if error.errno in (errno.EAGAIN, errno.EACCES):
            return None
        if error.errno == errno.ESTALE:  # removed on the NFS server meanwhile
            raise FileNotFoundError(
                errno.ENOENT, "removed meanwhile (a stale NFS file handle)", os.fspath(path)
            ) from error
        raise
    if locked_file_is(fd, path, dir_fd):
        return fd
    _close_tracked(fd)
    raise FileNotFoundError(errno.ENOENT, "file vanished while being taken over", os.fspath(path))


def release_taken(fd: int) -> None:
    """Unlock and close a file taken over with :func:`take_over`, leaving
    it for the next taker."""
    _held_fds.discard(fd)
    safe_unlock_and_close(fd)


def discard_taken(fd: int, path: PathArg, dir_fd: Optional[int] = None) -> None:
    """Unlink a file taken over with :func:`take_over`, then unlock it."""
    try:
        unlink_if_present(path, dir_fd)
    finally:
        release_taken(fd)
