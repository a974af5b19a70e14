"""Coordination directories opened once and checked: the lock files of
:mod:`.gates` (mutexes, arenas, slots) and process names are reached
relative to a directory fd, never by path.

A process opens each directory it coordinates in once (it stays open as
long as lock files in it are kept open: in practice, for the process's
life), checks what it opened (a directory of this user's, or root's, from
which nobody else can remove our files, on a filesystem whose locks work),
and from then on creates, opens, stats and unlinks its files there with
``dir_fd=``. A
directory, or a parent of it, swapped for a symlink afterwards changes
nothing for it. The caller's path is followed once, at that open: it is
the caller's choice, and what it leads to is checked.

If the directory is removed (its files with it), an operation that must
find or create a file there fails; :func:`renewed` then opens and checks
whatever is at the path now. A directory renamed while in use is followed
by the processes that had it open; processes opening the path later use
whatever is there then.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from typing import Callable, Dict, List, Set, Tuple, TypeVar

from .locks import ForeignFileError, ensure_filesystem_lockable

__all__: List[str] = []  # internal: the layer under gates and process names

logger = logging.getLogger(__name__.rpartition(".")[0] + ".mutex")  # what users configure

_OPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOCTTY

T = TypeVar("T")


class Folder:
    """A directory this process opened and checked: ``fd`` for ``dir_fd=``;
    ``path``, what it was opened as, for messages and the mount table only.
    Held by its users (``users``: the gates keeping lock files in it, and
    callers for the time of one operation); closed when the last lets go.
    ``private``: nobody but its owner (this user or root) may rename or
    remove its entries (not writable by others, or sticky). ``by_access``:
    ``faccessat`` answers lookups here (see :func:`exists_in`)."""

    __slots__ = ("path", "fd", "users", "private", "by_access")

    def __init__(self, path: str, fd: int, private: bool, by_access: bool) -> None:
        self.path = path
        self.fd = fd
        self.users = 0
        self.private = private
        self.by_access = by_access

    def __repr__(self) -> str:
        return f"Folder({self.path!r}, fd={self.fd})"


# Absolute path -> the folder open for it, while held.
_folders: Dict[str, Folder] = {}
_guard = threading.Lock()
# Folders whose directory was removed or replaced, still held by someone.
_replaced_held: List[Folder] = []
# (st_dev, st_ino) of directories warned about as writable by others.
_warned: Set[Tuple[int, int]] = set()


def hold_folder(path: str) -> Folder:
    """The checked folder of the absolute *path*, held until
    :func:`let_go`; opened and checked on first use (see :func:`_check`).
    FileNotFoundError, NotADirectoryError, or the errors of :func:`_check`."""
    with _guard:
        folder = _folders.get(path)
        if folder is None:
            folder = _folders[path] = _open_checked(path)
        folder.users += 1
        return folder


def let_go(folder: Folder) -> None:
    """End a hold of *folder*; the last closes it."""
    with _guard:
        folder.users -= 1
        if folder.users > 0:
            return
        if _folders.get(folder.path) is folder:
            del _folders[folder.path]
        elif folder in _replaced_held:
            _replaced_held.remove(folder)
        _close(folder)


def renewed(folder: Folder) -> Folder:
    """After an operation relative to *folder* found its directory gone (it
    raised FileNotFoundError or ESTALE): the folder now at its path, held
    in place of *folder*, if the directory was removed or replaced; else
    *folder* itself (the error stands)."""
    if not _replaced(folder):
        return folder
    with _guard:
        if _folders.get(folder.path) is folder:
            del _folders[folder.path]
            _replaced_held.append(folder)
    let_go(folder)
    return hold_folder(folder.path)


def renewing(folder: Folder, action: Callable[[Folder], T]) -> Tuple[Folder, T]:
    """``action(folder)``; if it fails because the directory was removed,
    once more in the directory at the path now. Returns the folder used
    (held in place of *folder*) and the result."""
    try:
        return folder, action(folder)
    except OSError as error:
        if not isinstance(error, FileNotFoundError) and error.errno != errno.ESTALE:
            raise
        fresh = renewed(folder)
        if fresh is folder:
            raise
    return fresh, action(fresh)


def exists_in(folder: Folder, name: str) -> bool:
    """Whether a file is at *name* in *folder*: a hint for fairness (is a
    writer or a head announced?). Asked with a plain ``faccessat``, which
    answers a missing name, the common case, without the cost of an
    exception, where it was seen to work when the folder was opened (a
    seccomp filter or an old libc can make it fail every time: then
    ``stat``). A symlink counts as what it points to."""
    if folder.by_access:
        return os.access(name, os.F_OK, dir_fd=folder.fd)
    try:
        os.stat(name, dir_fd=folder.fd)
    except FileNotFoundError:
        return False
    return True


def regular_files_in(path: str) -> List[str]:
    """The names of the regular files in the absolute *path*, listed through
    its checked folder (by the entries' own types: a symlink is not a
    regular file), sorted."""
    folder = hold_folder(path)
    try:
        with os.scandir(folder.fd) as entries:
            return sorted(entry.name for entry in entries if entry.is_file(follow_symlinks=False))
    finally:
        let_go(folder)


def _replaced(folder: Folder) -> bool:
    """Whether *folder*'s directory was removed, or is no longer the one at
    its path (looked at only to decide to open it again, then checked)."""
    try:
        opened = os.fstat(folder.fd)
    except OSError as error:
        if error.errno == errno.ESTALE:  # removed at the NFS server
            return True
        raise
    if opened.st_nlink == 0:
        return True
    try:
        now = os.stat(folder.path)
    except (FileNotFoundError, NotADirectoryError):
        return False  # nothing to renew to: the caller's error stands
    return (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino)


def _open_checked(path: str) -> Folder:
    fd = os.open(path, _OPEN_DIRECTORY)
    try:
        mode = _check(fd, path).st_mode
    except BaseException:
        os.close(fd)
        raise
    private = not mode & 0o022 or bool(mode & stat.S_ISVTX)
    return Folder(path, fd, private, os.access(".", os.F_OK, dir_fd=fd))


def _check(fd: int, path: str) -> os.stat_result:
    """Raise unless the directory open as *fd* (opened as *path*) can hold
    this user's lock files: ForeignFileError (a PermissionError) for one of
    another user's (root's excepted), or one anyone may write that is not
    sticky (anyone could unlink a held lock file: two holders);
    UnsafeFilesystemError where locks cannot be trusted. One others may
    write, such as a sticky /tmp, is warned about once: they can plant
    files where ours go, which are then refused. Returns its fstat."""
    info = os.fstat(fd)  # a directory: opened with O_DIRECTORY
    euid = os.geteuid()
    if info.st_uid not in (euid, 0):
        raise ForeignFileError(
            errno.EPERM,
            f"the directory belongs to uid {info.st_uid}, not to this user "
            f"(uid {euid}): a coordination directory must belong to one user",
            path,
        )
    if info.st_mode & 0o002 and not info.st_mode & stat.S_ISVTX:
        raise ForeignFileError(
            errno.EPERM,
            "anyone may remove files in this directory (writable by all, "
            "not sticky): use a directory of your own for coordination",
            path,
        )
    if info.st_mode & 0o022 and (info.st_dev, info.st_ino) not in _warned:
        _warned.add((info.st_dev, info.st_ino))
        logger.warning(
            "%s is writable by other users, who can put files where toilcoord keeps its own "
            "(those are refused, never used); a directory of your own is safer",
            path,
        )
    ensure_filesystem_lockable(path, hint="Keep lock files on other storage.", dir_fd=fd)  # cached per device
    return info


def _close(folder: Folder) -> None:
    fd, folder.fd = folder.fd, -1
    if fd >= 0:
        os.close(fd)


def _forget_in_child() -> None:
    # Another thread may have held the guard at fork time. The holds were
    # the parent's (its gates and callers), forgotten in the child too.
    global _guard
    _guard = threading.Lock()
    for folder in [*_folders.values(), *_replaced_held]:
        _close(folder)
    _folders.clear()
    del _replaced_held[:]


os.register_at_fork(after_in_child=_forget_in_child)
