"""Last-process-standing election: the last process to leave runs the cleanup."""

from __future__ import annotations

import errno
import os
import time
from typing import Iterator, Optional, Tuple

from .folders import regular_files_in
from .gates import _acquire, _Gate, _hold_gate, _unlock, remove_unheld_lock_file
from .locks import PathArg, check_name, fork_epoch, held_exclusively, safe_lock
from .mutex import global_mutex

__all__ = ["LastProcessStandingArena", "reap_dead_arenas"]

_LOCK_SUFFIX = "-arena-lock"
#: Every live member holds a shared lock on ``base_dir/<name><_LIVE_SUFFIX>``.
_LIVE_SUFFIX = "-arena-live"
#: Toil's arena keeps its members here, one file each, locked exclusively.
_TOIL_MEMBERS_SUFFIX = "-arena-members"


class LastProcessStandingArena:
    """Processes enter and leave (or die); the last to leave cleans up.

    Every member process holds a shared ``flock`` on one file,
    ``base_dir/<name>-arena-live``; leaving is serialised by the mutex
    ``<name>-arena-lock``. A leaver tries to turn its shared lock into an
    exclusive one: that succeeds only if no other live member holds the file
    (the dead hold nothing), so entering and leaving cost the same however
    many members there are or have died, and nothing is reaped. ``leave()``
    yields once to the last live member, holding the file exclusively, so
    no process can enter meanwhile. Like the mutex's, the arena's two files stay while a process
    that used the arena lives, kept open for its next entry; once every
    such process has exited normally (or after ``python -m toilcoord
    cleanup``) nothing of the arena is left in *base_dir*. A forked child
    is not a member of its parent's arenas.

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
        self._live_path = os.path.abspath(os.path.join(self.base_dir, name + _LIVE_SUFFIX))
        self._member: Optional[_Member] = None

    def enter(self, timeout: Optional[float] = None) -> None:
        """Join the arena, waiting (at most *timeout* seconds, then
        LockTimeout) while a last member is cleaning up.

        Raises RuntimeError if this process is in the arena already.
        """
        if self._member is not None and self._member.ours:
            raise RuntimeError(f"this process is already in arena {self.name!r}; leave it first")
        # No mutex needed here: a last member cleaning up holds the file
        # exclusively, so the shared lock waits for it. One shared lock per
        # process, through its kept fd, however many of its arenas are in.
        deadline = None if timeout is None else time.monotonic() + timeout
        gate = _hold_gate(self._live_path, timeout)
        try:
            if gate.members == 0:
                _acquire(gate, self._live_path, deadline, shared=True)
            gate.members += 1
        finally:
            gate.lock.release()
        self._member = _Member(gate)

    def leave(self, timeout: Optional[float] = None) -> Iterator[bool]:
        """Leave the arena; yields once (True) if this was the last live
        member. Raises RuntimeError at once if this process is not in it,
        and ValueError for a *timeout* that is not None or a number >= 0.

        Leaving waits for the arena's mutex, which other leavers hold
        briefly and the last member holds while it cleans up. With
        *timeout* (seconds), the loop raises :class:`LockTimeout` if the
        mutex is not had in time; this process is then still a member, and
        may ``leave()`` again.
        """
        member = self._member
        if member is None or not member.ours:
            raise RuntimeError(f"this process is not in arena {self.name!r}; enter it first")
        return self._leave(member, global_mutex(self.base_dir, self.mutex, timeout))

    def _leave(self, member: "_Member", mutex: global_mutex) -> Iterator[bool]:
        # Membership ends here, as the loop runs: a leave() never iterated,
        # or one that timed out waiting for the mutex, leaves this process
        # in the arena, free to leave() again.
        with mutex:
            if self._member is not member:
                return  # left already, through another leave()
            self._member = None
            gate = member.gate  # never retired while it has members
            # Not bounded by the timeout: its other users hold it briefly
            # (enter() waits in flock under it only when no member of this
            # process is inside, and then nobody here can be leaving).
            gate.lock.acquire()
            try:
                gate.members -= 1
                if (
                    gate.members == 0
                    and _last_to_leave(gate)
                    and not _toil_member_inside(gate, self.name + _TOIL_MEMBERS_SUFFIX)
                ):
                    try:
                        yield True
                    finally:
                        _unlock(gate)  # the file stays, kept for our next entry
            finally:
                gate.lock.release()


class _Member:
    """One membership: this process's gate on the arena's live file."""

    __slots__ = ("gate", "_epoch")

    def __init__(self, gate: _Gate) -> None:
        self.gate = gate
        self._epoch = fork_epoch()

    @property
    def ours(self) -> bool:
        """False in a forked child: the fd was closed there."""
        return self._epoch == fork_epoch()


def _last_to_leave(gate: _Gate) -> bool:
    """Turn our shared lock into an exclusive one if no other process holds
    one. True: we hold it exclusively; False: others live, and we hold
    nothing (a refused conversion drops the lock on Linux, keeps it on NFS:
    we unlock either way)."""
    try:
        safe_lock(gate.fd, block=False)
        return True
    except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EACCES):
            _unlock(gate)
            raise
    _unlock(gate)
    return False


def _toil_member_inside(gate: _Gate, members: str) -> bool:
    """Whether a member of Toil's own arena of the same name is inside (a
    process of an unmodified Toil, during a migration): one holding its
    file in ``<name>-arena-members/`` (*members*, in the live file's
    directory) locked. Asked under the arena's mutex,
    which Toil's members take to enter, by a leaver that holds the live file
    exclusively; if one is inside, that lock is let go (not the last)."""
    try:
        folder = os.open(
            members,
            os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
            dir_fd=gate.folder.fd,  # type: ignore[union-attr]
        )
    except OSError:
        return False  # no Toil member was ever here: the common case, one failed open
    try:
        inside = any(_held(folder, name) for name in os.listdir(folder))
    finally:
        os.close(folder)
    if inside:
        _unlock(gate)  # not the last: we hold nothing
    return inside


def _held(folder: int, name: str) -> bool:
    """Whether a process holds the file *name* in the directory *folder*
    locked exclusively (found with a brief shared probe)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
    except OSError:
        return False  # gone, or not a member's file
    try:
        return held_exclusively(fd)
    finally:
        os.close(fd)  # a dead member's file is Toil's to remove


def reap_dead_arenas(base_dir: PathArg) -> Iterator[Tuple[str, bool]]:
    """For each arena in *base_dir*, remove its live file if every member
    is dead, under the arena's own mutex; yield ``(name, members live)``.
    Safe while the arenas are in use."""
    directory = os.path.abspath(base_dir)
    names = [
        entry[: -len(_LIVE_SUFFIX)]
        for entry in regular_files_in(directory)
        if entry.endswith(_LIVE_SUFFIX) and len(entry) > len(_LIVE_SUFFIX)
    ]
    for name in names:
        path = os.path.join(directory, name + _LIVE_SUFFIX)
        with global_mutex(base_dir, name + _LOCK_SUFFIX):
            live = not remove_unheld_lock_file(path)
        yield name, live
