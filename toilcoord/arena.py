"""Last-process-standing election: the last process to leave runs the cleanup."""
from __future__ import annotations

import os
from typing import Iterator, Optional, Tuple

from .locks import HeldFile, PathArg, check_name, discard_taken, global_mutex, take_over

__all__ = ["MEMBER_INFIX", "LastProcessStandingArena", "reap_dead_arenas", "reap_dead_members"]

#: A member of arena *name* holds ``base_dir/<name><MEMBER_INFIX><16 hex>``.
MEMBER_INFIX = "-arena-member-"
_LOCK_SUFFIX = "-arena-lock"
_MEMBER_TAIL = len(MEMBER_INFIX) + HeldFile.RANDOM_CHARS


class LastProcessStandingArena:
    """Processes enter and leave (or die); the last to leave cleans up.

    Each member holds a locked file ``base_dir/<name>-arena-member-<hex>``;
    entering and leaving are serialised by the mutex ``<name>-arena-lock``.
    ``leave()`` yields once to the last live member, while no process can
    enter. Members that died without leaving do not count and their files
    are removed by whoever leaves next, so once the last member has left,
    nothing of the arena is left in *base_dir*. A forked child is not a
    member of its parent's arenas.

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
        self._member_prefix = name + MEMBER_INFIX
        self._member: Optional[HeldFile] = None

    def enter(self, timeout: Optional[float] = None) -> None:
        """Join the arena, waiting (at most *timeout* seconds, then
        LockTimeout) while a last member is cleaning up.

        Raises RuntimeError if this process is in the arena already.
        """
        if self._member is not None and self._member.held:
            raise RuntimeError(f"this process is already in arena {self.name!r}; leave it first")
        with global_mutex(self.base_dir, self.mutex, timeout):
            # Members are only reaped under this mutex: no take-over can
            # slip between our create and our lock, so nothing to verify.
            self._member = HeldFile.create(self.base_dir, prefix=self._member_prefix, verify=False)

    def leave(self) -> Iterator[bool]:
        """Leave the arena; yields once (True) if this was the last live
        member. Raises RuntimeError at once if this process is not in it."""
        member = self._member
        if member is None or not member.held:
            raise RuntimeError(f"this process is not in arena {self.name!r}; enter it first")
        return self._leave(member)

    def _leave(self, member: HeldFile) -> Iterator[bool]:
        # Membership ends here, as the loop runs: a leave() never iterated
        # leaves this process in the arena, free to leave() again.
        with global_mutex(self.base_dir, self.mutex):
            if self._member is not member:
                return  # left already, through another leave()
            self._member = None
            member.release()
            if not reap_dead_members(self.base_dir, self.name):
                yield True


def _is_member_file(entry: "os.DirEntry[str]", prefix: str) -> bool:
    return (entry.name.startswith(prefix) and len(entry.name) == len(prefix) + HeldFile.RANDOM_CHARS
            and entry.is_file(follow_symlinks=False))


def reap_dead_members(base_dir: PathArg, name: str) -> int:
    """Remove the files of arena *name*'s dead members in *base_dir*; return
    how many live members remain. Call it holding the arena's mutex."""
    prefix = name + MEMBER_INFIX
    live = 0
    with os.scandir(base_dir) as entries:
        members = [entry.path for entry in entries if _is_member_file(entry, prefix)]
    for path in members:
        try:
            fd = take_over(path)
        except FileNotFoundError:
            continue  # reaped meanwhile by a cleanup
        if fd is None:
            live += 1
        else:
            discard_taken(fd, path)
    return live


def reap_dead_arenas(base_dir: PathArg) -> Iterator[Tuple[str, int]]:
    """For each arena with members in *base_dir*, remove its dead members
    under the arena's own mutex; yield ``(name, live members left)``. Safe
    while the arenas are in use."""
    with os.scandir(base_dir) as entries:
        names = sorted({name for name in map(_arena_of, entries) if name})
    for name in names:
        with global_mutex(base_dir, name + _LOCK_SUFFIX):
            yield name, reap_dead_members(base_dir, name)


def _arena_of(entry: "os.DirEntry[str]") -> Optional[str]:
    """The name of the arena whose member file *entry* is, if it is one."""
    name = entry.name[:-_MEMBER_TAIL]
    return name if _is_member_file(entry, name + MEMBER_INFIX) else None
