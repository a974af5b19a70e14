"""Last-process-standing election: the last process to leave runs the cleanup."""
from __future__ import annotations

import errno
import logging
import os
from typing import Iterator, Optional, Tuple

from .locks import HeldFile, PathArg, check_name, discard_taken, global_mutex, take_over

__all__ = ["MEMBERS_SUFFIX", "LastProcessStandingArena", "reap_dead_arenas", "reap_dead_members"]

logger = logging.getLogger(__name__)

#: An arena *name* keeps its members in ``base_dir/<name><MEMBERS_SUFFIX>``.
MEMBERS_SUFFIX = "-arena-members"
_LOCK_SUFFIX = "-arena-lock"


class LastProcessStandingArena:
    """Processes enter and leave (or die); the last to leave cleans up.

    Each member holds a locked file in ``base_dir/<name>-arena-members``;
    entering and leaving are serialised by the mutex ``<name>-arena-lock``.
    ``leave()`` yields once to the last live member, while no process can
    enter, and then removes the members directory, so nothing of the arena
    is left in *base_dir*. Members that died without leaving do not count
    and their files are removed by whoever leaves next. A forked child is
    not a member of its parent's arenas.

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
        # The arena's mutex has a longer name: refuse here, not in enter().
        check_name(name + _LOCK_SUFFIX, f"arena name plus the suffix {_LOCK_SUFFIX!r} of its mutex")
        self.base_dir = os.fspath(base_dir)
        self.name = name
        self.mutex = name + _LOCK_SUFFIX
        self.lockfileDir = os.path.join(self.base_dir, name + MEMBERS_SUFFIX)
        self._member: Optional[HeldFile] = None

    def enter(self, timeout: Optional[float] = None) -> None:
        """Join the arena, waiting (at most *timeout* seconds, then
        LockTimeout) while a last member is cleaning up.

        Raises RuntimeError if this process is in the arena already.
        """
        if self._member is not None and self._member.held:
            raise RuntimeError(f"this process is already in arena {self.name!r}; leave it first")
        with global_mutex(self.base_dir, self.mutex, timeout):
            try:
                os.mkdir(self.lockfileDir)
            except FileExistsError:
                pass
            # Members are only reaped under this mutex: no take-over can
            # slip between our create and our lock, so nothing to verify.
            self._member = HeldFile.create(self.lockfileDir, verify=False)

    def leave(self) -> Iterator[bool]:
        """Leave the arena; yields once (True) if this was the last live
        member. Raises RuntimeError at once if this process is not in it."""
        member = self._member
        if member is None or not member.held:
            raise RuntimeError(f"this process is not in arena {self.name!r}; enter it first")
        self._member = None
        return self._leave(member)

    def _leave(self, member: HeldFile) -> Iterator[bool]:
        with global_mutex(self.base_dir, self.mutex):
            member.release()
            # Alone, the members folder is now empty and one rmdir both
            # proves it and removes it; only otherwise is a scan needed.
            removed = _rmdir_if_empty(self.lockfileDir)
            if not removed and reap_dead_members(self.lockfileDir):
                return
            try:
                yield True
            finally:  # also when the cleanup raises or the loop breaks
                if not removed:
                    _remove_empty_dir(self.lockfileDir)


def reap_dead_members(directory: PathArg) -> int:
    """Remove the files of dead members in an arena's members *directory*;
    return how many live members remain. Safe while others use the arena."""
    live = 0
    try:
        entries = os.scandir(directory)
    except FileNotFoundError:
        return 0
    with entries:
        for entry in entries:
            if not entry.is_file(follow_symlinks=False):
                continue
            try:
                fd = take_over(entry.path)
            except FileNotFoundError:
                continue  # another leaver reaped it first
            if fd is None:
                live += 1
            else:
                discard_taken(fd, entry.path)
    return live


def reap_dead_arenas(base_dir: PathArg) -> Iterator[Tuple[str, int]]:
    """For each arena in *base_dir*, remove its dead members (and its
    folder, if none live), under the arena's own mutex; yield ``(name,
    live members left)``. Safe while the arenas are in use."""
    for entry in sorted(os.listdir(base_dir)):
        if not entry.endswith(MEMBERS_SUFFIX):
            continue
        name = entry[: -len(MEMBERS_SUFFIX)]
        members = os.path.join(base_dir, entry)
        with global_mutex(base_dir, name + _LOCK_SUFFIX):
            live = reap_dead_members(members)
            if not live:
                _rmdir_if_empty(members)  # gone already if its last member left while we waited
        yield name, live


def _rmdir_if_empty(path: str) -> bool:
    """Remove the folder if it is empty (or already gone); False if not."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        return False
    return True


def _remove_empty_dir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError as error:
        # Someone put a foreign file there: leave the directory to them.
        if error.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
            raise
        if error.errno != errno.ENOENT:
            logger.warning("arena directory %s is not empty after the last member left; leaving it", path)
