"""``ResourceSlots``: n of a node's GPUs, licences or bandwidth shares.

Each slot is a mutex (an exclusive ``flock`` on its own lock file, kept
open as the mutex keeps its files), so a holder that dies frees its slots
at once, and nothing in the protocol names a process: it works across
containers and PID namespaces as the mutex does.

Fairness: an acquirer first looks whether a *head* waiter is announced (the
file ``toil-mutex-<name>.slots-head`` exists). If none is, it takes free
slots without waiting; if it cannot get all it asked for, it lets them go
and queues on the mutex ``<name>.slots-turn``. Whoever holds that mutex is
the head: it announces itself (creates and locks the head file), takes
slots as they come free and keeps them until it has all it asked for. While
it is announced nobody else takes a slot (apart from one acquirer per
process that looked just before), so every slot let go is the head's, and
the head gets in once enough holders have let theirs go: no waiter starves
while others cycle, whatever it asks for. A head that dies leaves its head
file, which only sends acquirers through the queue until the next head
removes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from typing import Iterator, List, Optional, Sequence, Tuple, Union

from . import gates
from .gates import _MUTEX_PREFIX, _acquire, _Gate, _gate_for, _hold_gate, _unlink, _unlock, lock_file_exists
from .holder import check_purpose, write_record
from .locks import LockTimeout, PathArg, check_name
from .mutex import global_mutex

__all__ = ["ResourceSlots", "ids_environment"]

_SLOT = ".slot-"
_TURN = ".slots-turn"
_HEAD = ".slots-head"
#: The head polls for slots let go, from this pause up to the next.
_POLL_FIRST, _POLL_MAX = 0.001, 0.05


class ResourceSlots:
    """A node's slots named *name* in *base_dir*: *slots* is their number
    (ids "0" ... "n-1") or a sequence of distinct ids (str, such as GPU
    numbers). Every process naming the same *base_dir*, *name* and ids
    shares them. Bad arguments raise ValueError here, before anything on
    disk is touched."""

    def __init__(self, base_dir: PathArg, name: str, slots: Union[int, Sequence[str]]) -> None:
        self.ids = _slot_ids(slots)
        check_name(name, "slots name")
        for ident in self.ids:
            check_name(name + _SLOT + ident, "slots name plus a slot id")
        check_name(name + _TURN, "slots name")
        self.base_dir = os.fspath(base_dir)
        self.name = name
        directory = os.path.abspath(self.base_dir)
        self._paths = [os.path.join(directory, _MUTEX_PREFIX + name + _SLOT + ident) for ident in self.ids]
        self._head = os.path.join(directory, _MUTEX_PREFIX + name + _HEAD)
        self._head_in = (directory, _MUTEX_PREFIX + name + _HEAD)

    @contextlib.contextmanager
    def acquire(
        self, n: int = 1, timeout: Optional[float] = None, *, purpose: Optional[str] = None
    ) -> Iterator[Tuple[str, ...]]:
        """Hold *n* slots for the ``with`` block, which gets their ids.

        Waits in turn (see the module) for at most *timeout* seconds, then
        raises :class:`LockTimeout`; ValueError if *n* is not between 1 and
        the number of slots. Threads of one process hold slots apart, like
        processes. Not reentrant. Each slot held records who holds it, with
        *purpose*, as :func:`~.mutex.global_mutex` does (``status`` shows
        it)."""
        if type(n) is not int or not 1 <= n <= len(self.ids):
            raise ValueError(f"n must be an int from 1 to {len(self.ids)} (the number of slots), not {n!r}")
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be None or a number >= 0, not {timeout!r}")
        purpose = check_purpose(purpose)
        held = self._take(n, None if timeout is None else time.monotonic() + timeout)
        for _, gate in held:
            write_record(gate.fd, purpose, sync=bool(gate.network))
        epoch = gates._epoch
        try:
            yield tuple(self.ids[index] for index, _ in held)
        finally:
            if epoch == gates._epoch:  # not in a forked child of the holder
                _let_go(held)

    def _take(self, n: int, deadline: Optional[float]) -> List[Tuple[int, _Gate]]:
        held: List[Tuple[int, _Gate]] = []
        if not lock_file_exists(*self._head_in):  # no head waits: take free slots at once
            try:
                self._grab(held, n)
            finally:
                if len(held) < n:
                    _let_go(held)
                    held = []
            if held:
                return held
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
        with global_mutex(self.base_dir, self.name + _TURN, remaining):
            head = _hold_gate(self._head, remaining)
            try:
                head.announce = False  # only heads, one at a time, and cleanup's probes lock it
                _acquire(head, self._head, deadline)  # announced: the file exists
                try:
                    self._wait_for(held, n, deadline)
                finally:
                    _unlink(head)  # under its lock, as every lock file
                    _unlock(head)
            finally:
                head.lock.release()
        return held

    def _wait_for(self, held: List[Tuple[int, _Gate]], n: int, deadline: Optional[float]) -> None:
        """As the head: take slots as they come free until *n* are held."""
        delay = _POLL_FIRST
        try:
            while True:
                self._grab(held, n)
                if len(held) == n:
                    return
                pause = delay if deadline is None else min(delay, deadline - time.monotonic())
                if pause <= 0:
                    raise LockTimeout(f"timed out waiting for {n} of the slots {self.name!r} in {self.base_dir}")
                time.sleep(pause)
                delay = min(delay * 2, _POLL_MAX)
        except BaseException:
            _let_go(held)
            del held[:]
            raise

    def _grab(self, held: List[Tuple[int, _Gate]], n: int) -> None:
        """Add free slots to *held* (without waiting) until it has *n*."""
        taken = {index for index, _ in held}
        for index, path in enumerate(self._paths):
            if len(held) == n:
                return
            if index in taken:
                continue
            gate = _gate_for(path)
            if not gate.lock.acquire(blocking=False):
                continue  # another thread of ours holds or tries it
            try:
                got = not gate.retired and _acquire(gate, path, block=False)
            except BaseException:
                gate.lock.release()
                raise
            if got:
                held.append((index, gate))
            else:
                gate.lock.release()


def _let_go(held: Sequence[Tuple[int, _Gate]]) -> None:
    for _, gate in held:
        try:
            fcntl.flock(gate.fd, fcntl.LOCK_UN)
        except OSError:
            _unlock(gate)  # logs, and closes the fd (the lock goes with it)
        finally:
            gate.lock.release()


def _slot_ids(slots: Union[int, Sequence[str]]) -> List[str]:
    """The slot ids *slots* stands for; ValueError if it is no count >= 1
    nor a sequence of distinct ids usable in a file name."""
    if isinstance(slots, bool) or not isinstance(slots, (int, list, tuple)):
        raise ValueError(f"slots must be a count or a list or tuple of str ids, not {slots!r}")
    if isinstance(slots, int):
        if slots < 1:
            raise ValueError(f"slots must be at least 1, not {slots}")
        return [str(index) for index in range(slots)]
    ids = [check_name(ident, "slot id") for ident in slots]
    if not ids:
        raise ValueError("slots must name at least one slot id")
    if len(set(ids)) != len(ids):
        raise ValueError(f"slot ids must be distinct: {list(slots)!r}")
    return ids


def ids_environment(ids: Sequence[str], variable: str = "CUDA_VISIBLE_DEVICES") -> dict:
    """``{variable: "id,id,..."}``, to add to a child's environment so it
    uses the slots held (``env={**os.environ, **ids_environment(ids)}``)."""
    if not variable or "=" in variable or "\0" in variable:
        raise ValueError(f"not an environment variable name: {variable!r}")
    return {variable: ",".join(ids)}
