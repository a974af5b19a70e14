"""Remove a file or a whole tree, safely, while others may be removing it too.

:func:`robust_rmtree` works relative to directory file descriptors and
never follows a symbolic link, so nothing outside the tree can be reached
through one, however the tree changes while it runs. It needs no recursion
and keeps a bounded number of descriptors open, so depth is unlimited.
"""
from __future__ import annotations

import errno
import os
from typing import List, Optional, Union

__all__ = ["robust_rmtree"]

PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

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


class _TreeMoved(Exception):
    """A directory was renamed while its subtree was being removed."""


class _Level:
    """A directory being emptied: its open fd (or -1 while closed to save
    descriptors), its name in its parent, the identity it had when opened,
    and the subdirectories still to remove."""

    __slots__ = ("fd", "name", "identity", "subdirs")

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.identity: Optional[tuple] = None
        self.subdirs: List[str] = []


def robust_rmtree(path: PathArg) -> None:
    """Remove *path*: a file, a symlink (dangling or not; never its target)
    or a directory tree.

    Parts that vanish while it runs (other processes removing the same tree)
    are fine, and so is a *path* that does not exist. Symbolic links inside
    the tree are unlinked, never followed, even one to a directory inside the
    tree. Undecodable names and trees of any depth are handled. Permission
    and other errors propagate as OSError.
    """
    path = _checked(os.fspath(path))
    for _ in range(_RESTARTS):
        try:
            _remove(path)
            return
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


def _remove(path: Union[str, bytes]) -> None:
    try:
        top = os.open(path, _OPEN_DIR)
    except FileNotFoundError:
        return
    except OSError as error:
        if error.errno not in _NOT_A_DIRECTORY:
            raise
        try:
            unlink_if_present(path)
        except NotADirectoryError:
            pass  # a path through a file ("file/x"): nothing there
        return
    _empty_tree(top)
    _rmdir_if_present(path)


def _empty_tree(top_fd: int) -> None:
    """Remove everything in the directory open as *top_fd*, and close it."""
    stack = [_Level(top_fd, "")]
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
            unlink_if_present(entry.name, level.fd)


def _open_subdir(parent: _Level, name: str) -> Optional[_Level]:
    """Open *name* in *parent* as a new level; None if it is gone, and if it
    is now something other than a directory, unlink it instead."""
    try:
        return _Level(os.open(name, _OPEN_DIR, dir_fd=parent.fd), name)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno not in _NOT_A_DIRECTORY:
            raise
    unlink_if_present(name, parent.fd)
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
    _rmdir_if_present(level.name, parent.fd)


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


def _rmdir_if_present(name: Union[str, bytes], dir_fd: Optional[int] = None) -> None:
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
