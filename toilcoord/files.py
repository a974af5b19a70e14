"""Remove a file or a whole tree, safely, while others may be removing it too.

:func:`robust_rmtree` works relative to directory file descriptors and
never follows a symbolic link, so nothing outside the tree can be reached
through one, however the tree changes while it runs. It needs no recursion
and keeps a bounded number of descriptors open, so depth is unlimited.

Entries that cannot be removed yet because they are busy (EBUSY; on NFS,
the ``.nfsXXXX`` names a client gives deleted files still held open) are
retried for a bounded time while everything else is removed; what is still
busy at the end is reported in one :class:`BusyEntriesError`.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import List, Optional, Union

__all__ = ["BusyEntriesError", "robust_rmtree"]

PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
PathStr = Union[str, bytes]

# O_NOFOLLOW with O_DIRECTORY opens only a real directory: a symlink (to a
# directory or not) fails with ENOTDIR (or ELOOP, as POSIX allows) instead.
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NOT_A_DIRECTORY = frozenset((errno.ENOTDIR, errno.ELOOP))

# Directories deeper than this many levels below the current one have their
# descriptors closed and are reopened through ".." on the way back up, so a
# 100,000-deep tree needs no more descriptors than a shallow one.
_OPEN_LEVELS = 24

# A directory moved within the tree while we were inside it makes us start
# over from the top; this many times at most, then give up.
_RESTARTS = 8

# Busy entries are retried after this long, then twice as long each time
# (but no longer than this): quick for a holder about to close its file,
# few system calls for one that takes seconds.
_FIRST_PAUSE = 0.005
_LONGEST_PAUSE = 0.5

# An NFS client "silly renames" a file unlinked while some process holds it
# open to .nfs followed by hex digits, in the same directory; the client
# removes it on the last close. Until then, unlinking it gives EBUSY.
_SILLY_PREFIX = ".nfs"

# POSIX lets rmdir of a non-empty directory fail with EEXIST too.
_NOT_EMPTY = frozenset((errno.ENOTEMPTY, errno.EEXIST))

# How many of the busy paths the message names; all are in .left.
_NAMED_IN_MESSAGE = 10


class BusyEntriesError(OSError):
    """Raised by :func:`robust_rmtree` when entries were still busy once its
    *busy_timeout* ran out; everything else has been removed.

    ``left`` lists the busy paths (``bytes`` if the path given was bytes,
    else ``str``); ``filename`` is the path given. On NFS these are mostly
    ``.nfsXXXX`` files: deleted files some process still holds open, gone
    when it closes them, so calling :func:`robust_rmtree` again later (or
    after that process exits) finishes the job. Others are mount points.

    Its errno is EBUSY, not ENOTEMPTY: "in use, try again later" is what
    happened, and it fits a single busy file as well as a tree, whereas
    ENOTEMPTY would say that something was added to the tree meanwhile,
    which is what a plain ``OSError(ENOTEMPTY)`` from it still means.
    """

    left: List[PathStr]


class _TreeMoved(Exception):
    """A directory was renamed while its subtree was being removed."""


class _Level:
    """A directory being emptied: its open fd (or -1 while closed to save
    descriptors), its name in its parent (the path given, for the top), the
    level it is in, the identity it had when opened, the subdirectories
    still to remove, whether a busy entry was left in it, and the list of
    busy paths left in the whole tree (one list, shared by all levels)."""

    __slots__ = ("fd", "name", "parent", "identity", "subdirs", "kept", "left")

    def __init__(self, fd: int, name: PathStr, parent: Optional[_Level] = None) -> None:
        self.fd = fd
        self.name = name
        self.parent = parent
        self.identity: Optional[tuple] = None
        self.subdirs: List[str] = []
        self.kept = False
        self.left: List[PathStr] = parent.left if parent is not None else []

    def path(self, name: Optional[str] = None) -> PathStr:
        """The path of *name* in this directory (of the directory itself if
        None), of the type the caller gave the top in."""
        names = [] if name is None else [name]
        level = self
        while level.parent is not None:
            names.append(level.name)
            level = level.parent
        if isinstance(level.name, bytes):
            return os.path.join(level.name, *map(os.fsencode, reversed(names)))
        return os.path.join(level.name, *reversed(names))

    def keep(self, name: Optional[str] = None) -> None:
        """Leave *name* in this directory (the directory itself if None)
        for a later pass, because it is busy."""
        self.left.append(self.path(name))
        self.kept = True


def robust_rmtree(path: PathArg, *, busy_timeout: float = 10.0, dir_fd: Optional[int] = None) -> None:
    """Remove *path*: a file, a symlink (dangling or not; never its target)
    or a directory tree.

    Parts that vanish while it runs (other processes removing the same tree)
    are fine, and so is a *path* that does not exist. Symbolic links inside
    the tree are unlinked, never followed, even one to a directory inside the
    tree. Undecodable names and trees of any depth are handled.

    Busy entries (unlink or rmdir says EBUSY: a mount point, or on NFS a
    ``.nfsXXXX`` file that a process still holds open after it was deleted;
    and ``.nfs*`` entries that appear in a directory as it is emptied) are
    retried, first after 5 ms, then backing off, for up to *busy_timeout*
    seconds in all, while everything else is removed. Still busy then, they
    are reported in one :class:`BusyEntriesError` (errno EBUSY), with all
    else gone. ``busy_timeout=0`` tries once. Permission and other errors
    propagate at once as OSError; so does ENOTEMPTY for a directory that
    something other than a ``.nfs*`` entry was added to meanwhile.

    The parent-directory caveat: nothing inside the tree is ever reached
    through a symlink, but the directories *above* it, every component of
    *path* but the last, are looked up by the kernel, which follows
    symlinks, at the start of each pass (and again for the final rmdir of
    the top). If another user can write a directory on the way, she can
    swap a parent for a symlink, and the tree removed, with your rights, is
    the one of the same name where it points. Where that matters, open a
    directory you trust once (``O_DIRECTORY|O_NOFOLLOW``, then check its
    owner and mode) and pass its fd as *dir_fd* with *path* relative to it:
    then every component of *path* is opened without following symlinks,
    relative to that fd, and a swap of any directory above it (its own
    name included) changes nothing. A component that is a symlink or not a
    directory means nothing is there to remove. With *dir_fd*, *path* must
    be relative and free of ``.`` and ``..`` components (ValueError), and
    *dir_fd* an open directory (NotADirectoryError); it is not closed.
    """
    path = _checked(os.fspath(path))
    if not busy_timeout >= 0:  # NaN too
        raise ValueError("busy_timeout must be a number of seconds >= 0, not %r" % (busy_timeout,))
    if dir_fd is not None:
        _check_relative(path, dir_fd)
    deadline = time.monotonic() + busy_timeout
    pause = _FIRST_PAUSE
    while True:
        left = _remove_restarting(path, dir_fd)
        remaining = deadline - time.monotonic()
        if not left:
            return
        if remaining <= 0:
            raise _busy_error(path, left, busy_timeout)
        time.sleep(min(pause, remaining))  # the last pass comes at the deadline
        pause = min(2 * pause, _LONGEST_PAUSE)


def _busy_error(path: PathStr, left: List[PathStr], busy_timeout: float) -> BusyEntriesError:
    named = ", ".join(map(repr, left[:_NAMED_IN_MESSAGE]))
    if len(left) > _NAMED_IN_MESSAGE:
        named += " and %d more" % (len(left) - _NAMED_IN_MESSAGE)
    message = (
        "robust_rmtree removed all but %d entries, still busy after %g s "
        "(on NFS: deleted files a process still holds open): %s" % (len(left), busy_timeout, named)
    )
    error = BusyEntriesError(errno.EBUSY, message, path)
    error.left = left  # an attribute, not an argument: pickling passes only errno, strerror, filename
    return error


def _remove_restarting(path: PathStr, dir_fd: Optional[int]) -> List[PathStr]:
    """One pass over the tree (restarted if it is moved around meanwhile);
    returns the busy paths left."""
    for _ in range(_RESTARTS):
        try:
            return _remove(path) if dir_fd is None else _remove_under(path, dir_fd)
        except _TreeMoved:
            continue
    raise OSError(errno.EBUSY, "the tree kept being moved around while robust_rmtree removed it", path)


def _checked(path: Union[str, bytes]) -> Union[str, bytes]:
    """*path* without trailing slashes (so that "link/" names the link, not
    its target); ValueError for paths nobody means to remove."""
    separator, dot = (b"/", b".") if isinstance(path, bytes) else ("/", ".")
    stripped = path.rstrip(separator)
    if not stripped or stripped.rsplit(separator, 1)[-1] in (dot, dot + dot):
        raise ValueError("robust_rmtree refuses to remove %r" % (path,))
    return stripped


def _check_relative(path: PathStr, dir_fd: int) -> None:
    """ValueError unless *path* is relative with no "." or ".." in it (the
    last is checked already); NotADirectoryError unless *dir_fd* is an open
    directory (else lookups relative to it would quietly find nothing)."""
    separator, dots = (b"/", (b".", b"..")) if isinstance(path, bytes) else ("/", (".", ".."))
    if path.startswith(separator) or any(part in dots for part in path.split(separator)):
        raise ValueError(
            "with dir_fd, robust_rmtree takes a path relative to it without . or .. components, not %r" % (path,)
        )
    if not stat.S_ISDIR(os.fstat(dir_fd).st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "dir_fd %d is not a directory" % dir_fd, path)


def _remove(path: PathStr, parent: Optional[_Level] = None) -> List[PathStr]:
    """Remove what can be removed of *path* (a name in *parent*, if given);
    return the busy paths left."""
    try:
        top = _Level(os.open(path, _OPEN_DIR, dir_fd=_fd_of(parent)), path, parent)
    except FileNotFoundError:
        return []
    except OSError as error:
        if error.errno not in _NOT_A_DIRECTORY:
            raise
        return _remove_file(path, parent)
    _empty_tree(top)
    _remove_dir(top, parent)
    return top.left


def _remove_under(path: PathStr, dir_fd: int) -> List[PathStr]:
    """:func:`_remove` of *path* relative to *dir_fd*, every directory on
    the way opened without following symlinks."""
    separator = b"/" if isinstance(path, bytes) else "/"
    parents, _, name = path.rpartition(separator)
    fd = dir_fd
    try:
        for part in filter(None, parents.split(separator)):
            try:
                opened = os.open(part, _OPEN_DIR, dir_fd=fd)
            except OSError as error:
                if error.errno in _NOT_A_DIRECTORY or error.errno == errno.ENOENT:
                    return []  # a symlink, a file or nothing: no tree of ours there
                raise
            if fd != dir_fd:
                os.close(fd)
            fd = opened
        return _remove(name, _Level(fd, parents))  # the parent, as the top of the paths shown
    finally:
        if fd != dir_fd:
            os.close(fd)


def _fd_of(parent: Optional[_Level]) -> Optional[int]:
    return parent.fd if parent is not None else None


def _remove_file(path: PathStr, parent: Optional[_Level]) -> List[PathStr]:
    try:
        unlink_if_present(path, _fd_of(parent))
    except NotADirectoryError:
        pass  # a path through a file ("file/x"): nothing there
    except OSError as error:
        if error.errno != errno.EBUSY:
            raise
        return [parent.path(path) if parent is not None else path]
    return []


def _empty_tree(top: _Level) -> None:
    """Remove everything in the directory *top*, and close it."""
    stack = [top]
    try:
        _list_and_unlink_files(stack[0])
        while stack:
            level = stack[-1]
            if level.subdirs:
                child = _open_subdir(level, level.subdirs.pop())
                if child is not None:
                    stack.append(child)
                    _save_descriptors(stack)
                    _list_and_unlink_files(child)
            else:
                stack.pop()
                if stack:
                    _leave(level, stack[-1])
                else:
                    os.close(level.fd)
                    level.fd = -1
    finally:
        for level in stack:
            if level.fd >= 0:
                os.close(level.fd)


def _list_and_unlink_files(level: _Level) -> None:
    """Unlink every non-directory in *level*, remember its subdirectories."""
    try:
        with os.scandir(level.fd) as listing:
            entries = list(listing)
    except FileNotFoundError:  # removed by someone else since we opened it
        return
    for entry in entries:
        # d_type from getdents; an lstat only where the filesystem gives none.
        if entry.is_dir(follow_symlinks=False):
            level.subdirs.append(entry.name)
        else:
            _unlink_entry(level, entry.name)


def _unlink_entry(level: _Level, name: str) -> None:
    try:
        unlink_if_present(name, level.fd)
    except OSError as error:
        if error.errno != errno.EBUSY:
            raise
        level.keep(name)


def _open_subdir(parent: _Level, name: str) -> Optional[_Level]:
    """Open *name* in *parent* as a new level; None if it is gone, and if it
    is now something other than a directory, unlink it instead."""
    try:
        return _Level(os.open(name, _OPEN_DIR, dir_fd=parent.fd), name, parent)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno not in _NOT_A_DIRECTORY:
            raise
    _unlink_entry(parent, name)
    return None


def _save_descriptors(stack: List[_Level]) -> None:
    """Close the fd of the level that just fell out of the open window,
    remembering its identity to check when it is reopened through ".."."""
    if len(stack) <= _OPEN_LEVELS + 1:  # the top's fd stays open
        return
    level = stack[-_OPEN_LEVELS - 1]
    if level.fd >= 0:  # else closed before, on an earlier way down
        level.identity = _identity(level.fd)
        os.close(level.fd)
        level.fd = -1


def _leave(level: _Level, parent: _Level) -> None:
    """Close the emptied *level* and remove it from *parent*."""
    try:
        if parent.fd < 0:
            parent.fd = _reopen_parent(level.fd, parent.identity)
    finally:
        os.close(level.fd)
        level.fd = -1
    _remove_dir(level, parent)


def _remove_dir(level: _Level, parent: Optional[_Level]) -> None:
    """rmdir the emptied (and closed) *level*, from *parent* (None: the
    top, by its path). What keeps it busy is kept for a later pass."""
    if not level.kept:  # else something busy is still in it
        try:
            _rmdir_if_present(level.name, _fd_of(parent))
        except OSError as error:
            if error.errno == errno.EBUSY:
                level.keep()
            elif error.errno in _NOT_EMPTY:
                _keep_silly_renamed(level, parent, error)
            else:
                raise
    if level.kept and parent is not None:
        parent.kept = True


def _keep_silly_renamed(level: _Level, parent: Optional[_Level], error: OSError) -> None:
    """*level* was not empty after all. On NFS, unlinking a file that some
    process holds open succeeds by renaming it to .nfsXXXX in the same
    directory: keep those for a later pass. Anything else was added since
    the listing, and *error* stands, as it always did."""
    try:
        names = _names_in(level.name, _fd_of(parent))
    except FileNotFoundError:
        return  # removed meanwhile by someone else: nothing left
    except OSError:
        raise error from None
    if not all(name.startswith(_SILLY_PREFIX) for name in names):
        raise error
    for name in names:
        level.keep(name)
    if not names:  # emptied by someone else since: rmdir it next pass
        level.keep()


def _names_in(name: PathStr, dir_fd: Optional[int]) -> List[str]:
    fd = os.open(name, _OPEN_DIR, dir_fd=dir_fd)
    try:
        with os.scandir(fd) as listing:
            return [entry.name for entry in listing]
    finally:
        os.close(fd)


def _reopen_parent(child_fd: int, identity: Optional[tuple]) -> int:
    # ".." of a directory is where it is now linked; if it is not the
    # directory we came down through, the subtree was moved (".." of a
    # removed directory is still its old parent, so removal is not a move).
    fd = os.open("..", _OPEN_DIR, dir_fd=child_fd)
    if _identity(fd) != identity:
        os.close(fd)
        raise _TreeMoved()
    return fd


def _identity(fd: int) -> tuple:
    status = os.fstat(fd)
    return (status.st_dev, status.st_ino)


def unlink_if_present(name: PathArg, dir_fd: Optional[int] = None) -> None:
    """Unlink *name* (relative to *dir_fd* if given); gone already is fine:
    someone else removed it."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _rmdir_if_present(name: PathStr, dir_fd: Optional[int] = None) -> None:
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
