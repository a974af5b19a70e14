"""Last-process-standing election: the last process to leave runs the cleanup."""
from __future__ import annotations

import errno
import os
from typing import Iterator, Optional, Tuple

from .locks import (
    PathArg,
    _OPEN_OR_CREATE,
    _close_tracked,
    _open_tracked,
    check_name,
    discard_taken,
    fork_epoch,
    locked_file_is,
    release_taken,
    safe_lock,
    take_over,
)
from .mutex import global_mutex

__all__ = ["LastProcessStandingArena", "reap_dead_arenas"]

_LOCK_SUFFIX = "-arena-lock"
#: Every live member holds a shared lock on ``base_dir/<name><_LIVE_SUFFIX>``.
_LIVE_SUFFIX = "-arena-live"


class LastProcessStandingArena:
    """Processes enter and leave (or die); the last to leave cleans up.

    Every member holds a shared ``flock`` on one file,
    ``base_dir/<name>-arena-live``; entering and leaving are serialised by
    the mutex ``<name>-arena-lock``. A leaver tries to turn its shared lock
    into an exclusive one: that succeeds only if no other live member holds
    the file (the dead hold nothing), so entering and leaving cost the same
    however many members there are or have died, and nothing has to be
    reaped. ``leave()`` yields once to the last live member, while no
    process can enter; once it has left, nothing of the arena is left in
    *base_dir*. A forked child is not a member of its parent's arenas.

    Always leave after entering (try/finally), and iterate what ``leave()``
    returns: the leaving happens as the loop runs::

        arena.enter()
        try:
            work()
        finally:
            for _ in arena.leave():
                cleanup()   # only the last process standing gets here
    """

    def __init__(self, base_dir: PathArg, name: str) -> None:
        check_name(name, "arena name")
        # The arena's mutex has the longer name: refuse here, not in enter().
        check_name(name + _LOCK_SUFFIX, f"arena name plus the suffix {_LOCK_SUFFIX!r} of its mutex")
        self.base_dir = os.fspath(base_dir)
        self.name = name
        self.mutex = name + _LOCK_SUFFIX
        self._live_path = os.path.join(self.base_dir, name + _LIVE_SUFFIX)
        self._member: Optional[_Member] = None

    def enter(self, timeout: Optional[float] = None) -> None:
        """Join the arena, waiting (at most *timeout* seconds, then
        LockTimeout) while a last member is cleaning up.

        Raises RuntimeError if this process is in the arena already.
        """
        if self._member is not None and self._member.ours:
            raise RuntimeError(f"this process is already in arena {self.name!r}; leave it first")
        with global_mutex(self.base_dir, self.mutex, timeout):
            self._member = _Member(_hold_shared(self._live_path))

    def leave(self) -> Iterator[bool]:
        """Leave the arena; yields once (True) if this was the last live
        member. Raises RuntimeError at once if this process is not in it."""
        member = self._member
        if member is None or not member.ours:
            raise RuntimeError(f"this process is not in arena {self.name!r}; enter it first")
        return self._leave(member)

    def _leave(self, member: "_Member") -> Iterator[bool]:
        # Membership ends here, as the loop runs: a leave() never iterated
        # leaves this process in the arena, free to leave() again.
        mutex = global_mutex(self.base_dir, self.mutex)
        with mutex:
            if self._member is not member:
                return  # left already, through another leave()
            self._member = None
            if not _last_to_leave(member.fd):
                return
            try:
                yield True
            finally:
                # Unlinked while held exclusively, like the mutex's file,
                # so that nothing of the arena is left.
                discard_taken(member.fd, self._live_path)
                mutex.remove_file()


class _Member:
    """This process's shared lock on an arena's live file."""

    __slots__ = ("fd", "_epoch")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._epoch = fork_epoch()

    @property
    def ours(self) -> bool:
        """False in a forked child: the fd was closed there."""
        return self._epoch == fork_epoch()


def _hold_shared(path: str) -> int:
    """Open (creating) the live file and lock it shared; called holding the
    arena's mutex, so only a crash can leave it unlinked meanwhile."""
    while True:
        fd = _open_tracked(path, _OPEN_OR_CREATE)
        try:
            safe_lock(fd, shared=True)
            if locked_file_is(fd, path):
                return fd
        except BaseException:
            _close_tracked(fd)
            raise
        _close_tracked(fd)  # a stale name on a network filesystem: look again


def _last_to_leave(fd: int) -> bool:
    """Turn our shared lock into an exclusive one if nobody else holds one.
    True: we hold it exclusively; False: others live, and *fd* is closed."""
    try:
        safe_lock(fd, block=False)
        return True
    except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EACCES):
            release_taken(fd)
            raise
    release_taken(fd)
    return False


def reap_dead_arenas(base_dir: PathArg) -> Iterator[Tuple[str, bool]]:
    """For each arena in *base_dir*, remove its live file if every member
    is dead, under the arena's own mutex; yield ``(name, members live)``.
    Safe while the arenas are in use."""
    with os.scandir(base_dir) as entries:
        names = sorted(entry.name[:-len(_LIVE_SUFFIX)] for entry in entries
                       if entry.name.endswith(_LIVE_SUFFIX) and len(entry.name) > len(_LIVE_SUFFIX)
                       and entry.is_file(follow_symlinks=False))
    for name in names:
        path = os.path.join(os.fspath(base_dir), name + _LIVE_SUFFIX)
        mutex = global_mutex(base_dir, name + _LOCK_SUFFIX)
        with mutex:
            try:
                fd = take_over(path)
            except FileNotFoundError:
                fd = -1  # its last member left meanwhile
            if fd is not None:
                if fd >= 0:
                    discard_taken(fd, path)
                mutex.remove_file()
            yield name, fd is None
