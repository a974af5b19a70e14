"""Torture: every primitive at once under random SIGKILLs, then proof.

``python -m toilcoord torture --seconds S --procs N [--dir PATH] [--seed X]``
runs N worker processes for S seconds. Each loops at random over the
primitives, often nesting them: it takes ``global_mutex`` and checks a shared
potato; enters and leaves an arena whose last member checks and removes
every member's marker; registers deferred functions that append a unique id
to a journal; gets and polls process names; now and then runs ``cleanup``
on the directory, as a batch system's epilog would while other jobs still
use it. Meanwhile the supervisor
SIGKILLs random workers at random moments and starts new ones in their
place. At the end it cleans up as a batch system's epilog would
(``cleanup``) and checks, from the journal, that every guarantee held.

How the evidence survives the kills
-----------------------------------
Everything is recorded in one journal opened with O_APPEND, one short
record per ``os.write``: the kernel orders the writes, so the journal is a
linearisation of what happened, and a SIGKILL loses at most the record being
written (torn records are counted and ignored). Each record starts with its
writer's *incarnation* (the unique id of one worker process; ``sup`` is the
supervisor, ``final`` the final checks). Facts used below:

* A writer that has a record at position q was alive at every earlier
  position: it is *certified alive* there.
* The supervisor writes ``killed X`` only after reaping X: X is dead there.

Each worker has an identity file (its incarnation, pid and start time);
the potato and the arena markers are hard links to it, so whoever finds one
knows exactly whose it is, and whether that process still lives
(``/proc/<pid>/stat``: same start time, not a zombie, not exiting -- a
SIGKILLed process is marked exiting before its locks are released).

What is checked, and why each check is sound:

* Mutex: inside the mutex the holder links the potato with ``link(2)``
  (an atomic create-with-content) and unlinks it on the way out after
  checking it is still its own. A potato already there is legitimate only
  if its holder is dead (checked live, and later from the journal: it
  never wrote again and the supervisor killed it).
* Arena: a member links ``<marker>.in`` after ``enter()`` returns and
  renames it to ``.out`` before ``leave()``. The last member's cleanup
  finds no ``.in`` marker of a live process, and, from the journal, no
  member had its "entered" record before the cleanup's "begin" and its
  "leaving" record (or any record) after it. A cleaner's own "entered"
  record comes after the previous cleanup's "begin" (no generation is
  cleaned twice); a cleanup killed midway is redone by the next last
  member; the final checks enter and leave once more, must be elected,
  and must find every marker gone.
* Deferred functions: ``registered <id>`` is recorded before ``defer()``
  and ``deferred <id>`` after it returned; the function's one effect is
  appending ``ran <id>`` (written by whichever process runs it). Every
  ``deferred`` id must have run. "None that had returned ran twice" is
  checked where returning is provable: the manager marks a record done
  right after its function returns and before it does anything else, so a
  run is *certified finished* if its runner wrote anything later in the
  journal. A second run after a certified one is a violation; a second run
  after an uncertified one (its runner was killed before the done mark) is
  the at-least-once the contract allows for interrupted functions. A run by
  another process while the owner was certified alive is a violation too.
* Process names: a poll that said "dead" while the name's owner was
  certified alive, or "alive" after the owner was reaped, is a violation.
  (A poller writes "polling" before its probes, since a poll's own record
  comes after the probe: the owner may be killed in between.)
* Progress: the supervisor sees one byte per finished iteration from every
  worker; a worker silent for longer than the bound gets its stack dumped
  (SIGUSR1, faulthandler) and is killed, and the run fails.
* After the final ``cleanup`` the coordination directory must be empty,
  and long-lived workers (never killed) must have as many fds at the end
  as after their first round.
"""
from __future__ import annotations

import logging
import os
import random
import select
import signal
import sys
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

from ..arena import LastProcessStandingArena
from ..deferred import DeferredFunction, DeferredFunctionManager
from ..mutex import global_mutex, kept_lock_files, retire_mutex_files
from ..smoke import left_in
from ..procnames import NAME_PREFIX, destroy_all_process_names, get_process_name, process_name_exists

__all__ = ["Invariant", "check_journal", "main", "run_torture"]

logger = logging.getLogger(__name__)

MUTEX = "torture"
ARENA = "torture"

# What a worker is doing, kept in shared memory (one byte per slot) so the
# supervisor can say where its kills landed.
_PHASES = (
    "starting",
    "between operations",
    "waiting for the mutex",
    "holding the mutex",
    "entering the arena",
    "inside the arena",
    "leaving the arena",
    "cleaning up the arena",
    "running orphans at open()",
    "registering deferred functions",
    "leaving open() (running functions)",
    "inside a deferred function",
    "getting its process name",
    "polling process names",
    "running cleanup (as an epilog would)",
    "stopping",
)
(_STARTING, _IDLE, _MUTEX_WAIT, _MUTEX_HELD, _ARENA_ENTER, _ARENA_INSIDE, _ARENA_LEAVE, _ARENA_CLEAN,
 _OPEN, _DEFER, _OPEN_EXIT, _RUNNING, _NAME_GET, _NAME_POLL, _CLEANUP, _STOPPING) = range(len(_PHASES))

# Mean life of a killable worker, unless run_torture is told otherwise.
_LIFETIME = 0.2

_PF_EXITING = 0x4  # include/linux/sched.h: set by do_exit() before files are closed


# ------------------------------------------------------ this process

class _Me:
    """Who this process is in the run; set in each worker after fork."""

    incarnation = "pid%d" % os.getpid()
    journal_path = ""
    journal_fd = -1
    pid = -1
    phases: Any = None  # an mmap shared with the supervisor: one byte per slot
    slot = 0


def _become(incarnation: str, journal_path: str, phases: Any = None, slot: int = 0) -> None:
    if _Me.journal_fd >= 0:  # the parent's, in a forked worker
        os.close(_Me.journal_fd)
    _Me.incarnation, _Me.journal_path, _Me.phases, _Me.slot = incarnation, journal_path, phases, slot
    _Me.journal_fd = os.open(journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    _Me.pid = os.getpid()


def _record(text: str) -> None:
    """Append one journal record for this process: one write, one line."""
    os.write(_Me.journal_fd, ("@%s %s\n" % (_Me.incarnation, text)).encode())


def _set_phase(phase: int) -> int:
    phases = _Me.phases
    if phases is None or _Me.pid != os.getpid():
        return _IDLE
    previous = phases[_Me.slot]
    phases[_Me.slot] = phase
    return previous


def _deferred_effect(journal_path: str, ident: str, delay: float) -> None:
    """The torture's deferred function: append ``ran <ident>``, written by
    whichever process runs it, to the journal. That append is its only
    effect and its last act."""
    previous = _set_phase(_RUNNING)
    if delay:
        time.sleep(delay)
    if _Me.pid == os.getpid() and _Me.journal_path == journal_path:
        _record("ran " + ident)
    else:  # a process outside the run (say, a later cleanup by hand)
        fd = os.open(journal_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.write(fd, ("@pid%d ran %s\n" % (os.getpid(), ident)).encode())
        finally:
            os.close(fd)
    _set_phase(previous)


def _start_time(pid: object = "self") -> Optional[str]:
    """Field 22 of /proc/<pid>/stat, or None if the process is gone or dying."""
    try:
        with open("/proc/%s/stat" % pid, "rb") as stream:
            data = stream.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X", b"x") or int(fields[6]) & _PF_EXITING:
        return None
    return fields[19].decode()


def _owner_alive(identity_path: str) -> Tuple[str, bool]:
    """(incarnation, alive) of the process whose identity file is linked at
    *identity_path*. FileNotFoundError if nothing is linked there."""
    with open(identity_path) as stream:
        incarnation, pid, started = stream.read().split()
    return incarnation, _start_time(pid) == started


def _fd_count() -> int:
    # Not the one listdir uses, nor the lock files mutexes keep open
    # between acquisitions (one per mutex: bounded, not a leak).
    return len(os.listdir("/proc/self/fd")) - 1 - kept_lock_files()


# ------------------------------------------------------------ layout

class _Layout(NamedTuple):
    root: str
    coord: str  # the coordination directory: every primitive works here
    records: str  # evidence: journal, potato, markers, identities
    views: Tuple[str, ...]  # coord, and coord through another mount: workers alternate

    @classmethod
    def make(cls, root: str, coord: Optional[str] = None, split_dir: Optional[str] = None) -> "_Layout":
        coord = coord or os.path.join(root, "coord")
        views = (coord, os.path.join(split_dir, os.path.basename(coord))) if split_dir else (coord,)
        layout = cls(root, coord, os.path.join(root, "records"), views)
        for path in (layout.coord, layout.records, layout.markers):
            os.mkdir(path)
        for view in views:  # (two mounts of one export differ in st_dev: no samefile)
            if not os.path.isdir(view):
                raise ValueError(f"{view} is not {coord} seen through another mount")
        return layout

    @property
    def journal(self) -> str:
        return os.path.join(self.records, "journal")

    @property
    def potato(self) -> str:
        return os.path.join(self.records, "potato")

    @property
    def markers(self) -> str:
        return os.path.join(self.records, "markers")

    @property
    def stop(self) -> str:
        return os.path.join(self.records, "stop")

    @property
    def stacks(self) -> str:
        return os.path.join(self.records, "stacks.txt")

    @property
    def log(self) -> str:
        return os.path.join(self.records, "toilcoord.log")

    def identity(self, incarnation: str) -> str:
        return os.path.join(self.records, "id-" + incarnation)


def _make_identity(layout: _Layout, incarnation: str) -> str:
    path = layout.identity(incarnation)
    with open(path, "w") as stream:
        stream.write("%s %d %s\n" % (incarnation, os.getpid(), _start_time()))
    return path


# ------------------------------------------------------- the checks inside

def _hold_the_potato(layout: _Layout, identity: str, hold: float) -> None:
    """Inside the mutex: make the potato ours, hold it, check it is still
    ours and remove it."""
    try:
        os.link(identity, layout.potato)
    except FileExistsError:
        if not _potato_left_by_the_dead(layout):
            return
        try:
            os.link(identity, layout.potato)
        except FileExistsError:
            _record("violation mutex-overlap a potato appeared while we held the mutex")
            return
    _record("mutex")
    if hold:
        time.sleep(hold)
    try:
        ours = os.path.samestat(os.stat(layout.potato), os.stat(identity))
    except FileNotFoundError:
        _record("violation mutex-overlap our potato vanished while we held the mutex")
        return
    if not ours:
        _record("violation mutex-overlap our potato was replaced while we held the mutex")
        return
    os.unlink(layout.potato)


def _potato_left_by_the_dead(layout: _Layout) -> bool:
    """A potato was there when we got the mutex: fine if its holder is dead
    (then it is removed and True returned), a violation otherwise."""
    try:
        holder, alive = _owner_alive(layout.potato)
    except FileNotFoundError:
        _record("violation mutex-overlap a potato vanished while we held the mutex")
        return False
    if alive:
        _record("violation mutex-overlap the potato of live %s was there when we got the mutex" % holder)
        return False
    _record("potato-orphan " + holder)
    os.unlink(layout.potato)
    return True


def _clean_arena(layout: _Layout, pause: float) -> None:
    """The last member's cleanup: no member may be inside; remove every
    marker. It takes *pause* seconds more, so that kills land in it too."""
    _record("arena-clean-begin")
    if pause:
        time.sleep(pause)
    removed = died_inside = 0
    for name in sorted(os.listdir(layout.markers)):
        path = os.path.join(layout.markers, name)
        try:
            if name.endswith(".in"):
                owner, alive = _owner_alive(path)
                if alive:
                    _record("violation arena-member-inside cleanup ran while %s was inside (%s)" % (owner, name))
                else:
                    died_inside += 1
            os.unlink(path)
        except FileNotFoundError:
            _record("violation arena-concurrent-cleanup marker %s vanished during the cleanup" % name)
            continue
        removed += 1
    _record("arena-clean-end removed=%d died-inside=%d" % (removed, died_inside))


def _take_part_in_arena(layout: _Layout, arena: LastProcessStandingArena, identity: str, marker: str,
                        inside: Callable[[], None], pause: float = 0) -> bool:
    """Enter, leave a marker, run *inside*, leave; True if elected last."""
    _set_phase(_ARENA_ENTER)
    arena.enter()
    _set_phase(_ARENA_INSIDE)
    marked = os.path.join(layout.markers, marker)
    os.link(identity, marked + ".in")
    _record("arena-entered " + marker)
    inside()
    _set_phase(_ARENA_INSIDE)
    try:
        os.rename(marked + ".in", marked + ".out")
    except FileNotFoundError:
        _record("violation arena-member-inside marker %s was removed while its member was inside" % marker)
    _record("arena-leaving " + marker)
    _set_phase(_ARENA_LEAVE)
    elected = False
    for _ in arena.leave():
        elected = True
        _set_phase(_ARENA_CLEAN)
        _clean_arena(layout, pause)
        _set_phase(_ARENA_LEAVE)
    return elected


# ------------------------------------------------------------ worker

class _Worker:
    """One worker process: loops over the primitives until told to stop."""

    def __init__(self, layout: _Layout, seed: object, incarnation: str, slot: int, immortal: bool,
                 progress_fd: int, deadline: float) -> None:
        self.layout = layout
        self.coord = layout.views[slot % len(layout.views)]
        self.incarnation = incarnation
        self.immortal = immortal
        self.progress_fd = progress_fd
        self.deadline = deadline
        self.rng = random.Random("%s:%s" % (seed, incarnation))
        self.parent = os.getppid()
        self.serial = 0
        self.identity = _make_identity(layout, incarnation)
        self.manager = DeferredFunctionManager(self.coord)
        self.arena = LastProcessStandingArena(self.coord, ARENA)
        self.name = ""

    def run(self) -> None:
        _record("start pid=%d immortal=%d" % (os.getpid(), self.immortal))
        self._names()
        for operation in dict.fromkeys(self._operations()):  # one of each first: lazy imports, caches
            operation()
        if self.immortal:
            _record("fds start %d" % _fd_count())
        while not self._told_to_stop():
            self.rng.choice(self._operations())()
            os.write(self.progress_fd, b".")
        _set_phase(_STOPPING)
        if self.immortal:
            _record("fds end %d" % _fd_count())
        self.manager.close()
        destroy_all_process_names()
        _record("stopped")

    def _operations(self) -> List[Callable[[], None]]:
        """What a worker does, each as often as it appears here."""
        return [self._mutex] * 3 + [self._arena] * 3 + [self._deferred] * 3 + [self._names] * 2 + [self._cleanup]

    def _told_to_stop(self) -> bool:
        return (os.path.exists(self.layout.stop) or os.getppid() != self.parent
                or time.monotonic() > self.deadline)

    def _next(self, kind: str) -> str:
        self.serial += 1
        return "%s.%s%d" % (self.incarnation, kind, self.serial)

    def _maybe(self, *operations: Callable[[], None]) -> None:
        """Now and then, nest another primitive inside the current one."""
        if self.rng.random() < 0.5:
            self.rng.choice(operations)()

    def _mutex(self) -> None:
        _set_phase(_MUTEX_WAIT)
        with global_mutex(self.coord, MUTEX):
            _set_phase(_MUTEX_HELD)
            _hold_the_potato(self.layout, self.identity, self.rng.choice((0, 0, 0.0005, 0.002)))
        _set_phase(_IDLE)

    def _arena(self) -> None:
        _take_part_in_arena(self.layout, self.arena, self.identity, self._next("a"),
                            lambda: self._maybe(self._mutex, self._names, self._deferred),
                            self.rng.choice((0, 0, 0.002)))
        _set_phase(_IDLE)

    def _deferred(self) -> None:
        _set_phase(_OPEN)
        with self.manager.open() as defer:
            _set_phase(_DEFER)
            for _ in range(self.rng.randint(1, 3)):
                ident = self._next("d")
                _record("registered " + ident)
                defer(_deferred_effect, self.layout.journal, ident, self.rng.choice((0, 0, 0.001, 0.004)))
                _record("deferred " + ident)
            self._maybe(self._mutex, self._names)
            _set_phase(_OPEN_EXIT)
        _set_phase(_IDLE)

    def _cleanup(self) -> None:
        """What a batch system's epilog runs, while every other worker
        still uses the directory."""
        from ..cleanup import cleanup_directory

        _set_phase(_CLEANUP)
        for _ in cleanup_directory(self.coord):
            pass
        _set_phase(_IDLE)

    def _names(self) -> None:
        _set_phase(_NAME_GET)
        name = get_process_name(self.coord)
        if not self.name:
            self.name = name
            _record("name " + name)
        elif name != self.name:
            _record("violation names-changed %s became %s" % (self.name, name))
        _set_phase(_NAME_POLL)
        if not process_name_exists(self.coord, name):
            _record("violation names-own-dead our own name %s read as dead" % name)
        others = [entry for entry in os.listdir(self.coord)
                  if entry.startswith(NAME_PREFIX) and entry != name]
        _record("polling")  # before the probes: a poll's own record comes after its probe
        for other in self.rng.sample(others, min(3, len(others))):
            _record("poll %s %d" % (other, process_name_exists(self.coord, other)))
        _set_phase(_IDLE)


def _worker_process(layout: _Layout, seed: object, incarnation: str, slot: int, immortal: bool,
                    progress_fd: int, phases: Any, deadline: float) -> int:
    """Body of a forked worker; returns its exit status."""
    import faulthandler
    import traceback

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    stacks = open(layout.stacks, "a")
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    logging.basicConfig(filename=layout.log, level=logging.WARNING,
                        format="%(process)d %(levelname)s %(name)s: %(message)s")
    _become(incarnation, layout.journal, phases, slot)
    _set_phase(_STARTING)
    try:
        _Worker(layout, seed, incarnation, slot, immortal, progress_fd, deadline).run()
        return 0
    except BaseException as error:
        with open(os.path.join(layout.records, "errors.txt"), "a") as errors:
            errors.write("%s (pid %d):\n%s\n" % (incarnation, os.getpid(), traceback.format_exc()))
        _record("error " + _one_word(repr(error)))
        return 1


def _one_word(text: str) -> str:
    return text.replace("@", "(at)").replace("\n", " ")[:300]


# -------------------------------------------------------- supervisor

class _Slot:
    __slots__ = ("index", "immortal", "pid", "incarnation", "pipe", "last_progress")

    def __init__(self, index: int, immortal: bool) -> None:
        self.index, self.immortal = index, immortal
        self.pid, self.incarnation, self.pipe, self.last_progress = -1, "", -1, 0.0


class _RunStats:
    """What only the supervisor sees: kills, progress, exits."""

    def __init__(self) -> None:
        self.incarnations = 0
        self.kills: Dict[int, int] = {}  # phase -> kills that landed in it
        self.iterations = 0
        self.longest_gap = 0.0
        self.stalled: List[str] = []
        self.crashed: List[str] = []


class _Supervisor:
    """Spawns workers, kills them at random moments, respawns them."""

    def __init__(self, layout: _Layout, procs: int, seconds: float, seed: object,
                 progress_bound: float, kill_interval: float, say: Callable[[str], None]) -> None:
        import mmap

        self.layout, self.seconds, self.seed = layout, seconds, seed
        self.progress_bound, self.kill_interval, self.say = progress_bound, kill_interval, say
        self.rng = random.Random("%s:supervisor" % (seed,))
        immortal = max(1, procs // 4)
        self.slots = [_Slot(index, index < immortal) for index in range(procs)]
        self.phases = mmap.mmap(-1, procs)
        self.stats = _RunStats()
        self.worker_deadline = 0.0

    def run(self) -> _RunStats:
        start = time.monotonic()
        end = start + self.seconds
        self.worker_deadline = end + self.progress_bound
        try:
            for slot in self.slots:
                self._spawn(slot)
            self._torture_until(end, start)
            self._stop_workers()
        finally:
            self._kill_all()
            self.phases.close()
        return self.stats

    def _spawn(self, slot: _Slot) -> None:
        self.stats.incarnations += 1
        incarnation = "i%d" % self.stats.incarnations
        read, write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            status = 70
            try:
                os.close(read)
                for other in self.slots:
                    if other.pipe >= 0:
                        os.close(other.pipe)
                status = _worker_process(self.layout, self.seed, incarnation, slot.index, slot.immortal,
                                         write, self.phases, self.worker_deadline)
            finally:
                os._exit(status)
        os.close(write)
        slot.pid, slot.incarnation, slot.pipe = pid, incarnation, read
        slot.last_progress = time.monotonic()
        _record("spawned %s slot=%d pid=%d" % (incarnation, slot.index, pid))

    def _torture_until(self, end: float, start: float) -> None:
        killable = [slot for slot in self.slots if not slot.immortal]
        next_kill = time.monotonic() + self._kill_delay()
        next_report = start + 60
        while True:
            now = time.monotonic()
            if now >= end:
                return
            self._drain(min(end, next_kill) - now, respawn=True)
            now = time.monotonic()
            if now >= next_kill and killable:
                self._kill(self.rng.choice(killable), respawn=True)
                next_kill = now + self._kill_delay()
            if self.seconds >= 120 and now >= next_report:
                next_report += 60
                self.say("  ... %3.0f s: %d workers killed, %d iterations"
                         % (now - start, sum(self.stats.kills.values()), self.stats.iterations))

    def _kill_delay(self) -> float:
        return self.rng.uniform(0, 2 * self.kill_interval)

    def _drain(self, timeout: float, respawn: bool) -> None:
        """Read progress bytes for up to *timeout* s; reap workers that
        exited; stop the ones that made no progress within the bound."""
        by_pipe = {slot.pipe: slot for slot in self.slots if slot.pipe >= 0}
        if not by_pipe:
            return
        ready, _, _ = select.select(list(by_pipe), [], [], max(0.0, min(timeout, 1.0)))
        now = time.monotonic()
        for pipe in ready:
            slot = by_pipe[pipe]
            data = os.read(pipe, 65536)
            if data:
                self.stats.iterations += len(data)
                self._progressed(slot, now)
            else:
                self._exited(slot, respawn)
        for slot in self.slots:
            if slot.pipe >= 0 and now - slot.last_progress > self.progress_bound:
                self._stalled(slot, respawn)

    def _progressed(self, slot: _Slot, now: float) -> None:
        self.stats.longest_gap = max(self.stats.longest_gap, now - slot.last_progress)
        slot.last_progress = now

    def _exited(self, slot: _Slot, respawn: bool) -> None:
        self._progressed(slot, time.monotonic())
        status = self._reap(slot)
        if status != 0 or respawn:  # before the stop, even a clean exit is unexpected
            self.stats.crashed.append("%s exited with status %d" % (slot.incarnation, status))
            _record("exited %s %d" % (slot.incarnation, status))
        if respawn:
            self._spawn(slot)

    def _stalled(self, slot: _Slot, respawn: bool) -> None:
        # Dump its stack for the post-mortem, then count it as a deadlock.
        os.kill(slot.pid, signal.SIGUSR1)
        time.sleep(1)
        self.stats.stalled.append("%s (%s)" % (slot.incarnation, _PHASES[self.phases[slot.index]]))
        self._kill(slot, respawn, reason="stalled")

    def _kill(self, slot: _Slot, respawn: bool, reason: str = "random") -> None:
        # Not stopped first: SIGSTOP waits for the end of a system call, and
        # a real SIGKILL may cut one short (a write between two pages). So the
        # phase is read a moment before the kill lands. Only this process
        # reaps, so the pid is the worker's even if it has just exited.
        phase = self.phases[slot.index]
        os.kill(slot.pid, signal.SIGKILL)
        self._reap(slot)
        if reason == "random":
            self.stats.kills[phase] = self.stats.kills.get(phase, 0) + 1
        _record("killed %s %d %s" % (slot.incarnation, phase, reason))
        if respawn:
            self._spawn(slot)

    def _reap(self, slot: _Slot) -> int:
        _, status = os.waitpid(slot.pid, 0)
        os.close(slot.pipe)
        slot.pid, slot.pipe = -1, -1
        return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)

    def _stop_workers(self) -> None:
        open(self.layout.stop, "w").close()
        for slot in self.slots:
            slot.last_progress = time.monotonic()  # the bound applies to stopping too
        while any(slot.pipe >= 0 for slot in self.slots):
            self._drain(1.0, respawn=False)

    def _kill_all(self) -> None:
        for slot in self.slots:
            if slot.pid > 0:
                os.kill(slot.pid, signal.SIGKILL)
                self._reap(slot)


# ------------------------------------------------------------ checks

class Invariant(NamedTuple):
    """One checked guarantee: its name, whether it held, and the counts."""

    name: str
    held: bool
    detail: str

    def line(self) -> str:
        return "%-4s  %-26s %s" % ("ok" if self.held else "FAIL", self.name, self.detail)


class _Event(NamedTuple):
    pos: int
    writer: str
    kind: str
    args: Tuple[str, ...]


# Records only counted, not kept (they are most of a long run's journal).
_COUNTED_ONLY = frozenset(("mutex", "spawned", "start", "stopped"))


class _Journal:
    """The parsed journal, with the facts every check uses."""

    def __init__(self, data: bytes) -> None:
        self.by_kind: Dict[str, List[_Event]] = {}
        self.writers: Dict[str, Set[str]] = {}  # kind -> who wrote such records
        self.last: Dict[str, int] = {}  # writer -> position of its last record
        torn: List[str] = []
        pieces = data.split(b"@")
        if pieces[0]:
            torn.append("?")
        pos = 0
        for piece in pieces[1:]:
            fields = piece[:-1].decode("utf-8", "replace").split(" ")
            if not piece.endswith(b"\n") or b"\n" in piece[:-1] or len(fields) < 2:
                torn.append(fields[0])
                continue
            writer, kind = sys.intern(fields[0]), sys.intern(fields[1])
            self.last[writer] = pos
            self.writers.setdefault(kind, set()).add(writer)
            if kind in _COUNTED_ONLY:
                self.by_kind.setdefault(kind, []).append(None)  # type: ignore[arg-type]
            else:
                self.by_kind.setdefault(kind, []).append(_Event(pos, writer, kind, tuple(fields[2:])))
            pos += 1
        self.killed = {event.args[0]: event.pos for event in self.of("killed") if event.writer == "sup"}
        # A SIGKILL can cut a write short (between two pages of the file):
        # only a torn record of a process that was killed is expected.
        self.torn = sum(writer not in self.killed for writer in torn)
        self.torn_by_killed = len(torn) - self.torn

    def of(self, kind: str) -> List[_Event]:
        return self.by_kind.get(kind, [])

    def count(self, kind: str) -> int:
        return len(self.by_kind.get(kind, ()))

    def violations(self, prefix: str) -> List[_Event]:
        return [event for event in self.of("violation") if event.args[0].startswith(prefix)]

    def alive_after(self, writer: str, pos: int) -> bool:
        """True if *writer* wrote something after *pos* (so it lived then)."""
        return self.last.get(writer, -1) > pos


def _owner(ident: str) -> str:
    return ident.split(".", 1)[0]


def _first(events: Sequence[_Event]) -> str:
    return "; first: %s %s %s" % (events[0].writer, events[0].kind, " ".join(events[0].args)) if events else ""


def _check_mutex(journal: _Journal) -> Invariant:
    holds = journal.count("mutex")
    orphans = journal.of("potato-orphan")
    bad = journal.violations("mutex-") + [
        event for event in orphans
        if journal.alive_after(event.args[0], event.pos) or event.args[0] not in journal.killed]
    return Invariant("mutex exclusion", not bad and bool(holds),
                     "%d holds by %d processes; %d overlaps; %d potatoes left by SIGKILLed holders, "
                     "each found only once its holder was dead%s"
                     % (holds, len(journal.writers.get("mutex", ())), len(bad), len(orphans), _first(bad)))


def _arena_memberships(journal: _Journal) -> List[Tuple[int, int, str, bool]]:
    """(entered, gone, marker, left) per arena membership: *gone* is the
    position of its "leaving" record (*left* True), or, for a member that
    died inside, of its owner's last record."""
    leaving = {event.args[0]: event.pos for event in journal.of("arena-leaving")}
    return [(event.pos, leaving.get(event.args[0], journal.last[event.writer]), event.args[0],
             event.args[0] in leaving) for event in journal.of("arena-entered")]


def _members_inside(memberships: List[Tuple[int, int, str, bool]]) -> Callable[[int], List[str]]:
    """A function giving the markers of the members inside at a position:
    entered before it and gone after it."""
    import bisect

    starts = sorted(entered for entered, _, _, _ in memberships)
    ends = sorted(gone for _, gone, _, _ in memberships)

    def inside(pos: int) -> List[str]:
        # gone >= entered, so every membership gone by *pos* entered before it.
        if bisect.bisect_left(starts, pos) - bisect.bisect_right(ends, pos) <= 0:
            return []
        return [marker for entered, gone, marker, _ in memberships if entered < pos < gone]

    return inside


def _check_arena(journal: _Journal, final_elected: bool, markers_left: List[str]) -> Invariant:
    memberships = _arena_memberships(journal)
    inside = _members_inside(memberships)
    bad = list(journal.violations("arena-"))
    cleanups = _arena_cleanups(journal)
    entered_by: Dict[str, List[int]] = {}
    for entered, _, marker, _ in memberships:
        entered_by.setdefault(_owner(marker), []).append(entered)
    previous = -1
    interrupted = 0
    for begin, finished in cleanups:
        bad += [_Event(begin.pos, begin.writer, "violation", ("arena-member-inside", marker))
                for marker in inside(begin.pos)]
        own = [entered for entered in entered_by.get(begin.writer, []) if entered < begin.pos]
        if not own or own[-1] < previous:  # the cleaner was inside at the previous cleanup
            bad.append(_Event(begin.pos, begin.writer, "violation", ("arena-generation-cleaned-twice",)))
        if not finished:
            interrupted += 1
            if journal.alive_after(begin.writer, begin.pos):
                bad.append(_Event(begin.pos, begin.writer, "violation", ("arena-cleanup-unfinished",)))
        previous = begin.pos
    if not final_elected:
        bad.append(_Event(-1, "final", "violation", ("arena-final-member-not-elected",)))
    if markers_left:
        bad.append(_Event(-1, "final", "violation", ("arena-markers-left", ",".join(markers_left[:5]))))
    died_inside = sum(not left for _, _, _, left in memberships)
    return Invariant("arena last one out", not bad and bool(cleanups),
                     "%d entries, %d cleanups (%d killed midway and redone by the next last member); "
                     "%d while a member was inside or twice per generation; %d members died inside%s"
                     % (len(memberships), len(cleanups), interrupted, len(bad), died_inside, _first(bad)))


def _arena_cleanups(journal: _Journal) -> List[Tuple[_Event, bool]]:
    """Every cleanup's "begin" record, in order, and whether it finished
    (its cleaner wrote "end" before it wrote anything else about the arena)."""
    marks = sorted(journal.of("arena-clean-begin") + journal.of("arena-clean-end"))
    cleanups: List[Tuple[_Event, bool]] = []
    open_by: Dict[str, int] = {}  # cleaner -> index of its unfinished cleanup
    for mark in marks:
        if mark.kind == "arena-clean-begin":
            open_by[mark.writer] = len(cleanups)
            cleanups.append((mark, False))
        elif mark.writer in open_by:
            index = open_by.pop(mark.writer)
            cleanups[index] = (cleanups[index][0], True)
    return cleanups


def _check_deferred(journal: _Journal) -> Invariant:
    registered = {event.args[0] for event in journal.of("registered")}
    confirmed = {event.args[0] for event in journal.of("deferred")}
    runs: Dict[str, List[_Event]] = {}
    for event in journal.of("ran"):
        runs.setdefault(event.args[0], []).append(event)
    bad = list(journal.violations("deferred-"))
    bad += [_Event(-1, "final", "violation", ("deferred-never-ran", ident)) for ident in sorted(confirmed - set(runs))]
    bad += [_Event(-1, "final", "violation", ("deferred-unknown", ident)) for ident in sorted(set(runs) - registered)]
    twice = by_others = 0
    for ident, ran in runs.items():
        twice += len(ran) > 1
        for index, run in enumerate(ran):
            if index + 1 < len(ran) and journal.alive_after(run.writer, run.pos):
                bad.append(_Event(run.pos, run.writer, "violation", ("deferred-returned-ran-again", ident)))
            if run.writer != _owner(ident):
                by_others += 1
                if journal.alive_after(_owner(ident), run.pos):
                    bad.append(_Event(run.pos, run.writer, "violation", ("deferred-ran-while-owner-lived", ident)))
    return Invariant("deferred functions", not bad and bool(confirmed),
                     "%d registered, %d confirmed by defer(); every confirmed one ran (%d runs by another "
                     "process after the owner was SIGKILLed); %d ran twice, each after a run cut by a kill, "
                     "%d after returning%s"
                     % (len(registered), len(confirmed), by_others, twice,
                        sum(e.args[0] == "deferred-returned-ran-again" for e in bad), _first(bad)))


def _check_names(journal: _Journal) -> Invariant:
    """A probe happens between its poller's "polling" record and its own
    "poll" record: "dead" is wrong if the owner wrote after the latter,
    "alive" is wrong if the owner was reaped before the former."""
    owners = {event.args[0]: event.writer for event in journal.of("name")}
    polls = journal.of("poll")
    bad = list(journal.violations("names-"))
    started: Dict[str, int] = {}  # poller -> position of its latest "polling" record
    for poll in sorted(journal.of("polling") + polls):
        if poll.kind == "polling":
            started[poll.writer] = poll.pos
            continue
        name, alive = poll.args[0], poll.args[1] == "1"
        owner = owners.get(name)
        if owner is None:
            continue  # its owner was killed before it could say its name
        if not alive and journal.alive_after(owner, poll.pos):
            bad.append(_Event(poll.pos, poll.writer, "violation", ("names-live-read-dead", name)))
        elif alive and owner in journal.killed and journal.killed[owner] < started.get(poll.writer, -1):
            bad.append(_Event(poll.pos, poll.writer, "violation", ("names-dead-read-alive", name)))
    dead = sum(poll.args[1] == "0" for poll in polls)
    return Invariant("process names", not bad and bool(owners),
                     "%d names, stable; %d polls (%d dead), %d wrong%s"
                     % (len(owners), len(polls), dead, len(bad), _first(bad)))


def _check_fds(journal: _Journal) -> Invariant:
    counts: Dict[str, Dict[str, int]] = {}
    for event in journal.of("fds"):
        counts.setdefault(event.writer, {})[event.args[0]] = int(event.args[1])
    pairs = ["%s %s->%s" % (w, c.get("start"), c.get("end")) for w, c in sorted(counts.items())]
    held = bool(counts) and all("end" in c and c.get("start") == c["end"] for c in counts.values())
    return Invariant("no fd leaks", held, "long-lived workers' open fds after their first round -> at the end: "
                     + ", ".join(pairs))


def check_journal(data: bytes, stats: Optional[_RunStats] = None, final_elected: bool = True,
                  markers_left: Sequence[str] = (), left_in_coord: Sequence[str] = (),
                  progress_bound: float = 60.0) -> List[Invariant]:
    """Check the invariants against a journal (and the supervisor's
    observations); one :class:`Invariant` per guarantee."""
    journal = _Journal(data)
    stats = stats or _RunStats()
    errors = journal.of("error")
    invariants = [
        _check_mutex(journal),
        _check_arena(journal, final_elected, list(markers_left)),
        _check_deferred(journal),
        _check_names(journal),
        Invariant("no deadlock", not stats.stalled,
                  "every worker progressed within %g s: longest gap %.2f s over %d incarnations%s"
                  % (progress_bound, stats.longest_gap, stats.incarnations,
                     "; stalled: " + ", ".join(stats.stalled[:5]) if stats.stalled else "")),
        Invariant("nothing left after cleanup", not left_in_coord,
                  "coordination directory empty" if not left_in_coord else "left: " + ", ".join(left_in_coord[:10])),
        _check_fds(journal),
        Invariant("no worker errors", not errors and not stats.crashed and not journal.torn,
                  "%d exceptions, %d unexpected exits, %d torn journal records (and %d cut short by "
                  "SIGKILL)%s%s" % (len(errors), len(stats.crashed), journal.torn, journal.torn_by_killed,
                                    _first(errors), "; " + stats.crashed[0] if stats.crashed else "")),
    ]
    return invariants


# ---------------------------------------------------------- final phase

def _final_checks(layout: _Layout) -> Tuple[bool, List[str], List[str], List[str]]:
    """As the last process standing: take the mutex and the arena once
    more, then ``cleanup``. Returns (elected, markers left, what cleanup
    said, what is left in the coordination directory)."""
    from ..cleanup import cleanup_directory

    _become("final", layout.journal)
    identity = _make_identity(layout, "final")
    arena = LastProcessStandingArena(layout.coord, ARENA)
    elected = _take_part_in_arena(layout, arena, identity, "final.a1", lambda: None)
    cleanup = list(cleanup_directory(layout.coord))
    _record("cleanup-done")
    # Only now (a mutex file left by a killed holder is cleanup's to remove):
    # a potato still there must be a dead holder's.
    with global_mutex(layout.coord, MUTEX):
        _hold_the_potato(layout, identity, 0)
    retire_mutex_files()  # as at exit: this process keeps nothing open there
    left = left_in(layout.coord)  # cleanup removed files this process kept: NFS silly-renamed them
    return elected, sorted(os.listdir(layout.markers)), cleanup, left


def _kills_line(stats: _RunStats, seconds: float) -> str:
    total = sum(stats.kills.values())
    where = ", ".join("%s %d" % (_PHASES[phase], count)
                      for phase, count in sorted(stats.kills.items(), key=lambda item: -item[1]))
    return ("SIGKILLed %d workers at random moments in %g s (%d incarnations, %d iterations): %s"
            % (total, seconds, stats.incarnations, stats.iterations, where or "none"))


def _log_summary(path: str) -> Optional[str]:
    """What toilcoord logged in the workers (say, torn deferred records
    skipped), in one line, or None."""
    try:
        with open(path, errors="replace") as stream:
            lines = stream.read().splitlines()
    except FileNotFoundError:
        return None
    entries = [line.split(" ", 2) for line in lines if line[:1].isdigit()]
    if not entries:
        return None
    levels: Dict[str, int] = {}
    for entry in entries:
        levels[entry[1]] = levels.get(entry[1], 0) + 1
    return "toilcoord logged %s; first: %s" % (
        ", ".join("%d %s" % (count, level) for level, count in sorted(levels.items())), entries[0][2][:160])


def run_torture(directory: Optional[str] = None, seconds: float = 10.0, procs: int = 4,
                seed: object = None, progress_bound: float = 60.0, kill_interval: Optional[float] = None,
                say: Callable[[str], None] = print, split_dir: Optional[str] = None) -> bool:
    """Run the torture in a fresh subdirectory of *directory* (default: the
    system's temporary directory) and print (*say*) one line per invariant.

    With *split_dir* (*directory* seen through another mount, say a second
    NFS client of the same export), every other worker uses the
    coordination directory through it, and the evidence (journal, potato,
    markers) is kept in the system's temporary directory, which every
    worker sees coherently.

    *procs* workers (at least 2; a quarter of them, at least one, are never
    killed) run for *seconds*; one of the others is SIGKILLed every
    *kill_interval* seconds on average (default: each one lives about a
    fifth of a second, long enough for dozens of operations). Returns True iff every invariant held; then the subdirectory
    is removed, else it is kept for the post-mortem and its path printed.
    """
    import shutil
    import tempfile

    if procs < 2:
        raise ValueError("the torture needs at least 2 processes (one is never killed), not %d" % procs)
    if not seconds > 0:
        raise ValueError("the torture needs a positive number of seconds, not %r" % (seconds,))
    if seed is None:
        seed = random.randrange(1 << 32)
    killable = procs - max(1, procs // 4)
    kill_interval = kill_interval if kill_interval is not None else _LIFETIME / killable
    if split_dir is None:
        layout = _Layout.make(tempfile.mkdtemp(prefix="toilcoord-torture-", dir=directory))
    else:
        root = tempfile.mkdtemp(prefix="toilcoord-torture-")
        coord = os.path.join(directory or ".", os.path.basename(root) + "-coord")
        layout = _Layout.make(root, coord, split_dir)
    say("torture: %g s, %d processes (%d never killed), seed %s, in %s"
        % (seconds, procs, procs - killable, seed, layout.root))
    DeferredFunction.create(_deferred_effect, "", "", 0)  # load the codec once, before forking
    _become("sup", layout.journal)
    stats = _Supervisor(layout, procs, seconds, seed, progress_bound, kill_interval, say).run()
    elected, markers_left, cleanup, left = _final_checks(layout)
    with open(layout.journal, "rb") as stream:
        invariants = check_journal(stream.read(), stats, elected, markers_left, left, progress_bound)
    say(_kills_line(stats, seconds))
    logged = _log_summary(layout.log)
    if logged:
        say(logged)
    for line in cleanup:
        say("  cleanup: " + line)
    for invariant in invariants:
        say(invariant.line())
    held = all(invariant.held for invariant in invariants)
    os.close(_Me.journal_fd)
    _Me.journal_fd = -1
    if held:
        shutil.rmtree(layout.root)
        if not layout.coord.startswith(layout.root + os.sep):
            os.rmdir(layout.coord)  # empty: checked by the invariants
        say("all %d invariants held" % len(invariants))
    else:
        say("FAILED; the journal, logs and stacks are kept in %s" % layout.records)
    return held


def main(directory: Optional[str], seconds: float, procs: int, seed: object, split_dir: Optional[str] = None) -> int:
    """``python -m toilcoord torture``: exit status 0 iff every invariant held."""
    def say(line: str) -> None:
        print(line, flush=True)

    return 0 if run_torture(directory, seconds, procs, seed, say=say, split_dir=split_dir) else 1
