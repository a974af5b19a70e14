"""The torture's participants: a worker process looping at random over
every primitive (often nesting them) and recording in the journal, around
each, what the checks in torture_check.py need to prove its guarantee.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from typing import Any, Callable, List

from ..arena import LastProcessStandingArena
from ..deferred import DeferredFunctionManager
from ..mutex import global_mutex
from ..procnames import NAME_PREFIX, destroy_all_process_names, get_process_name, process_name_exists
from ..slots import ResourceSlots
from .torture_holds import MUTEX, RW_MUTEX, SLOT_IDS, SLOTS, hold_slots, hold_the_potato, read_shared, write_shared
from .torture_journal import Layout, Me, Phase, become, fd_count, make_identity, owner_alive, record, set_phase

__all__ = ["ARENA", "deferred_effect", "take_part_in_arena", "worker_process"]

ARENA = "torture"


def deferred_effect(journal_path: str, ident: str, delay: float) -> None:
    """The torture's deferred function: append ``ran <ident>``, written by
    whichever process runs it, to the journal. That append is its only
    effect and its last act."""
    previous = set_phase(Phase.RUNNING)
    if delay:
        time.sleep(delay)
    if Me.pid == os.getpid() and Me.journal_path == journal_path:
        record("ran " + ident)
    else:  # a process outside the run (say, a later cleanup by hand)
        fd = os.open(journal_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.write(fd, ("@pid%d ran %s\n" % (os.getpid(), ident)).encode())
        finally:
            os.close(fd)
    set_phase(previous)


# ------------------------------------------------------------ arena


def _clean_arena(layout: Layout, pause: float) -> None:
    """The last member's cleanup: no member may be inside; remove every
    marker. It takes *pause* seconds more, so that kills land in it too."""
    record("arena-clean-begin")
    if pause:
        time.sleep(pause)
    removed = died_inside = 0
    for name in sorted(os.listdir(layout.markers)):
        path = os.path.join(layout.markers, name)
        try:
            if name.endswith(".in"):
                owner, alive = owner_alive(path)
                if alive:
                    record("violation arena-member-inside cleanup ran while %s was inside (%s)" % (owner, name))
                else:
                    died_inside += 1
            os.unlink(path)
        except FileNotFoundError:
            record("violation arena-concurrent-cleanup marker %s vanished during the cleanup" % name)
            continue
        removed += 1
    record("arena-clean-end removed=%d died-inside=%d" % (removed, died_inside))


def take_part_in_arena(
    layout: Layout,
    arena: LastProcessStandingArena,
    identity: str,
    marker: str,
    inside: Callable[[], None],
    pause: float = 0,
) -> bool:
    """Enter, leave a marker, run *inside*, leave; True if elected last."""
    set_phase(Phase.ARENA_ENTER)
    arena.enter()
    set_phase(Phase.ARENA_INSIDE)
    marked = os.path.join(layout.markers, marker)
    os.link(identity, marked + ".in")
    record("arena-entered " + marker)
    inside()
    set_phase(Phase.ARENA_INSIDE)
    try:
        os.rename(marked + ".in", marked + ".out")
    except FileNotFoundError:
        record("violation arena-member-inside marker %s was removed while its member was inside" % marker)
    record("arena-leaving " + marker)
    set_phase(Phase.ARENA_LEAVE)
    elected = False
    for _ in arena.leave():
        elected = True
        set_phase(Phase.ARENA_CLEAN)
        _clean_arena(layout, pause)
        set_phase(Phase.ARENA_LEAVE)
    return elected


# ------------------------------------------------------------ worker


class _Worker:
    """One worker process: loops over the primitives until told to stop."""

    def __init__(
        self,
        layout: Layout,
        seed: object,
        incarnation: str,
        slot: int,
        immortal: bool,
        progress_fd: int,
        deadline: float,
    ) -> None:
        self.layout = layout
        self.coord = layout.views[slot % len(layout.views)]
        self.incarnation = incarnation
        self.immortal = immortal
        self.progress_fd = progress_fd
        self.deadline = deadline
        self.rng = random.Random("%s:%s" % (seed, incarnation))
        self.parent = os.getppid()
        self.serial = 0
        self.identity = make_identity(layout, incarnation)
        self.manager = DeferredFunctionManager(self.coord)
        self.arena = LastProcessStandingArena(self.coord, ARENA)
        self.slots = ResourceSlots(self.coord, SLOTS, list(SLOT_IDS))
        self.name = ""

    def run(self) -> None:
        record("start pid=%d immortal=%d" % (os.getpid(), self.immortal))
        self._names()
        for operation in dict.fromkeys(self._operations()):  # one of each first: lazy imports, caches
            operation()
        if self.immortal:
            record("fds start %d" % fd_count())
        while not self._told_to_stop():
            self.rng.choice(self._operations())()
            os.write(self.progress_fd, b".")
        set_phase(Phase.STOPPING)
        if self.immortal:
            record("fds end %d" % fd_count())
        self.manager.close()
        record("unnaming")  # from here on a probe may rightly read our name as dead
        destroy_all_process_names()
        record("stopped")

    def _operations(self) -> List[Callable[[], None]]:
        """What a worker does, each as often as it appears here."""
        return (
            [self._mutex] * 3
            + [self._arena] * 3
            + [self._deferred] * 3
            + [self._names] * 2
            + [self._cleanup]
            + [self._slots] * 2
            + [self._read] * 2
            + [self._write]
        )

    def _told_to_stop(self) -> bool:
        return os.path.exists(self.layout.stop) or os.getppid() != self.parent or time.monotonic() > self.deadline

    def _next(self, kind: str) -> str:
        self.serial += 1
        return "%s.%s%d" % (self.incarnation, kind, self.serial)

    def _maybe(self, *operations: Callable[[], None]) -> None:
        """Now and then, nest another primitive inside the current one."""
        if self.rng.random() < 0.5:
            self.rng.choice(operations)()

    def _mutex(self) -> None:
        set_phase(Phase.MUTEX_WAIT)
        with global_mutex(self.coord, MUTEX):
            set_phase(Phase.MUTEX_HELD)
            hold_the_potato(self.layout, self.identity, self.rng.choice((0, 0, 0.0005, 0.002)))
        set_phase(Phase.IDLE)

    def _slots(self) -> None:
        wanted = self.rng.choice((1, 1, 2, len(SLOT_IDS)))
        set_phase(Phase.SLOTS_WAIT)
        with self.slots.acquire(wanted) as ids:
            hold_slots(self.layout, self.identity, ids, wanted, self._briefly)
        set_phase(Phase.IDLE)

    def _read(self) -> None:
        set_phase(Phase.READ_WAIT)
        with global_mutex(self.coord, RW_MUTEX, shared=True):
            read_shared(self.layout, self.identity, self.incarnation, self._briefly)
        set_phase(Phase.IDLE)

    def _write(self) -> None:
        set_phase(Phase.WRITE_WAIT)
        with global_mutex(self.coord, RW_MUTEX):
            write_shared(self.layout, self.identity, self.rng.choice((0, 0, 0.0005, 0.002)))
        set_phase(Phase.IDLE)

    def _briefly(self) -> None:
        """Inside slots or a read: a moment, or the mutex or names nested."""
        if self.rng.random() < 0.3:
            time.sleep(self.rng.choice((0.0005, 0.002)))
        self._maybe(self._mutex, self._names)

    def _arena(self) -> None:
        take_part_in_arena(
            self.layout,
            self.arena,
            self.identity,
            self._next("a"),
            lambda: self._maybe(self._mutex, self._names, self._deferred, self._slots, self._read, self._write),
            self.rng.choice((0, 0, 0.002)),
        )
        set_phase(Phase.IDLE)

    def _deferred(self) -> None:
        set_phase(Phase.OPEN)
        with self.manager.open() as defer:
            set_phase(Phase.DEFER)
            for _ in range(self.rng.randint(1, 3)):
                ident = self._next("d")
                record("registered " + ident)
                defer(deferred_effect, self.layout.journal, ident, self.rng.choice((0, 0, 0.001, 0.004)))
                record("deferred " + ident)
            self._maybe(self._mutex, self._names)
            set_phase(Phase.OPEN_EXIT)
        set_phase(Phase.IDLE)

    def _cleanup(self) -> None:
        """What a batch system's epilog runs, while every other worker
        still uses the directory."""
        from ..cleanup import cleanup_directory

        set_phase(Phase.CLEANUP)
        for _ in cleanup_directory(self.coord):
            pass
        set_phase(Phase.IDLE)

    def _names(self) -> None:
        set_phase(Phase.NAME_GET)
        name = get_process_name(self.coord)
        if not self.name:
            self.name = name
            record("name " + name)
        elif name != self.name:
            record("violation names-changed %s became %s" % (self.name, name))
        set_phase(Phase.NAME_POLL)
        if not process_name_exists(self.coord, name):
            record("violation names-own-dead our own name %s read as dead" % name)
        others = [entry for entry in os.listdir(self.coord) if entry.startswith(NAME_PREFIX) and entry != name]
        record("polling")  # before the probes: a poll's own record comes after its probe
        for other in self.rng.sample(others, min(3, len(others))):
            record("poll %s %d" % (other, process_name_exists(self.coord, other)))
        set_phase(Phase.IDLE)


def worker_process(
    layout: Layout,
    seed: object,
    incarnation: str,
    slot: int,
    immortal: bool,
    progress_fd: int,
    phases: Any,
    deadline: float,
) -> int:
    """Body of a forked worker; returns its exit status."""
    import faulthandler
    import traceback

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    stacks = open(layout.stacks, "a")
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    logging.basicConfig(
        filename=layout.log, level=logging.WARNING, format="%(process)d %(levelname)s %(name)s: %(message)s"
    )
    become(incarnation, layout.journal, phases, slot)
    set_phase(Phase.STARTING)
    try:
        _Worker(layout, seed, incarnation, slot, immortal, progress_fd, deadline).run()
        return 0
    except BaseException as error:
        with open(os.path.join(layout.records, "errors.txt"), "a") as errors:
            errors.write("%s (pid %d):\n%s\n" % (incarnation, os.getpid(), traceback.format_exc()))
        record("error " + _one_word(repr(error)))
        return 1


def _one_word(text: str) -> str:
    return text.replace("@", "(at)").replace("\n", " ")[:300]
