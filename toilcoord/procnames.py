"""Process names: like PIDs, but valid across containers and PID namespaces.

A process's name in a directory is the basename of a file it created there
and holds an exclusive ``flock`` on. Any process that can see the directory
can tell whether the name's owner lives by trying to lock the file, whatever
PID namespace either of them is in, and a reused PID can never revive a
name: the file's lock dies with the process that took it.
"""

from __future__ import annotations

import atexit
import logging
import os
import stat
import threading
from typing import Dict, List

from .folders import hold_folder, let_go, renewing
from .heldfiles import HeldFile, discard_taken, take_over
from .locks import PathArg, check_name, held_exclusively

__all__ = [
    "NAME_PREFIX",
    "collect_process_name_garbage",
    "current_process_name_for",
    "current_process_name_lock",
    "destroy_all_process_names",
    "get_process_name",
    "process_name_exists",
    "reap_dead_process_names",
]

logger = logging.getLogger(__name__)

#: Every process name starts with this, so that nothing else in a shared
#: directory is ever mistaken for one (and deleted as dead).
NAME_PREFIX = "toil-proc-"

#: Guards the two tables below. Reentrant, so a caller holding it (as Toil
#: asks of callers of collect_process_name_garbage) may call anything here.
current_process_name_lock = threading.RLock()
#: Absolute base directory -> this process's name in it.
current_process_name_for: Dict[str, str] = {}
_held_names: Dict[str, HeldFile] = {}


def _key(base_dir: PathArg) -> str:
    return os.path.abspath(os.fspath(base_dir))


def _still_ours(held: HeldFile) -> bool:
    return held.is_linked()


def get_process_name(base_dir: PathArg) -> str:
    """This process's name in *base_dir*, created on first use.

    Stable for the life of the process (unless its file is removed from
    under it, say by deleting the directory, when a new one is made); never
    shared with another process, a forked child included.

    *base_dir* is checked before the first name file is made in it, as
    ``global_mutex`` checks its directory: one of another user's (root's
    excepted), or one anyone may write that is not sticky (anyone could
    remove a live name), raises :class:`~toilcoord.locks.ForeignFileError`
    (a PermissionError); one others may write, such as a sticky ``/tmp``,
    is used with one warning.
    """
    key = _key(base_dir)
    with current_process_name_lock:
        held = _held_names.get(key)
        if held is not None and _still_ours(held):
            return current_process_name_for[key]
        _forget(key)
        folder = hold_folder(key)  # opened and checked once per directory
        try:
            folder, held = renewing(folder, lambda folder: HeldFile.create(key, prefix=NAME_PREFIX, dir_fd=folder.fd))
        finally:
            let_go(folder)
        _held_names[key] = held
        current_process_name_for[key] = held.name
        return held.name


def process_name_exists(base_dir: PathArg, name: str) -> bool:
    """True while the process named *name* in *base_dir* lives.

    A dead process's file is removed here. A name that get_process_name
    cannot have made gives False and nothing is touched: not a str, or not
    a single path component. One that is a file name but not ours (a name
    Toil's own ``get_process_name`` made, during a migration) is probed
    read-only: True while a process holds an exclusive lock on that regular
    file, else False; such a file is never removed.

    *base_dir* is opened and checked once (as by ``get_process_name``) and
    the name looked up, locked and removed relative to it, so a *base_dir*
    (or a parent of it) swapped for a symlink meanwhile never makes us
    remove a file in another directory. A missing *base_dir* (or one that
    is not a directory) gives False; one that fails the check raises
    :class:`~toilcoord.locks.ForeignFileError`; a file of ours there that
    cannot be opened (another user's, a FIFO, a symlink) raises OSError.
    """
    try:
        check_name(name, "process name")
    except ValueError:
        return False
    key = _key(base_dir)
    if _is_ours(key, name):
        return True
    try:
        folder = hold_folder(key)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        return _lives(folder.fd, name)
    finally:
        let_go(folder)


def _is_ours(key: str, name: str) -> bool:
    """Whether *name* is this process's live name in directory *key*. Never
    probed: on filesystems that emulate flock with per-process POSIX locks
    (NFS) our own probe would succeed and delete our file."""
    with current_process_name_lock:
        return current_process_name_for.get(key) == name and _still_ours(_held_names[key])


def _lives(directory: int, name: str) -> bool:
    """Whether the process named *name* in the directory open as
    *directory* lives; a dead one of ours has its file removed."""
    if not name.startswith(NAME_PREFIX):
        return _foreign_name_lives(directory, name)
    try:
        fd = take_over(name, shared=True, dir_fd=directory)
    except FileNotFoundError:
        return False
    if fd is None:
        return True
    discard_taken(fd, name, directory)
    return False


def _foreign_name_lives(directory: int, name: str) -> bool:
    """Whether a process holds the regular file *name* in *directory* (an
    fd) locked (as Toil's names are held), found with a shared,
    non-blocking probe that changes nothing on disk."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory)
    except OSError:
        return False  # missing, a symlink, unreadable: no process of ours to speak of
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        return held_exclusively(fd)
    finally:
        os.close(fd)


def reap_dead_process_names(base_dir: PathArg) -> List[str]:
    """Remove the name files of dead processes in *base_dir*; return their
    names. Live processes' files are left alone, and so is (with one log
    line) any file that cannot be probed: another user's, or not a regular
    file. *base_dir* is opened and checked once; everything happens
    relative to it."""
    key = _key(base_dir)
    folder = hold_folder(key)
    try:
        return [
            name
            for name in sorted(os.listdir(folder.fd))
            if name.startswith(NAME_PREFIX) and not _lives_or_skipped(folder.fd, key, name)
        ]
    finally:
        let_go(folder)


def _lives_or_skipped(directory: int, key: str, name: str) -> bool:
    if _is_ours(key, name):
        return True
    try:
        return _lives(directory, name)
    except OSError as error:
        logger.warning("leaving %s in %s alone: it cannot be probed (%s)", name, key, error)
        return True


def _forget(key: str) -> None:
    held = _held_names.pop(key, None)
    current_process_name_for.pop(key, None)
    if held is not None:
        held.release(unlink=False)


def collect_process_name_garbage() -> None:
    """Forget this process's names whose files no longer exist (their
    directory was removed, say)."""
    with current_process_name_lock:
        for key in [key for key, held in _held_names.items() if not _still_ours(held)]:
            _forget(key)


def destroy_all_process_names() -> None:
    """Remove all of this process's name files; runs at interpreter exit."""
    with current_process_name_lock:
        for key in list(_held_names):
            _held_names.pop(key).release()
            current_process_name_for.pop(key, None)


def _forget_parent_names() -> None:
    # The HeldFiles are already inert here: locks closed their fds.
    _held_names.clear()
    current_process_name_for.clear()
    current_process_name_lock.release()


# Fork only between operations (the lock is held briefly and never across a
# wait), so the child's tables and lock are consistent; the lock object is
# kept, since callers import it by name.
os.register_at_fork(
    before=current_process_name_lock.acquire,
    after_in_parent=current_process_name_lock.release,
    after_in_child=_forget_parent_names,
)
atexit.register(destroy_all_process_names)
