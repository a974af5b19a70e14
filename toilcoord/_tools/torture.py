"""Torture: every primitive at once under random SIGKILLs, then proof.

``python -m toilcoord torture --seconds S --procs N [--dir PATH] [--seed X]``
runs N worker processes for S seconds. Each loops at random over the
primitives, often nesting them: it takes ``global_mutex`` and checks a shared
potato; enters and leaves an arena whose last member checks and removes
every member's marker; registers deferred functions that append a unique id
to a journal; gets and polls process names; holds 1 to 3 of 3
``ResourceSlots``; reads or writes under the shared mutex; now and then
runs ``cleanup`` on the directory, as a batch system's epilog would while
other jobs still use it. Meanwhile the supervisor SIGKILLs random workers
at random moments and starts new ones in their place. At the end it cleans
up as a batch system's epilog would (``cleanup``) and checks, from the
journal, that every guarantee held.

The parts: this module (supervisor, final phase, entry point),
torture_journal (the evidence each process writes), torture_workers (the
participants), torture_holds (what they do inside the locks proven
exclusive), torture_check (the journal parsed, the invariants).

How the evidence survives the kills
-----------------------------------
Everything is recorded in one journal opened with O_APPEND, one short
record per ``os.write``: the kernel orders the writes, so the journal is a
linearisation of what happened, and a SIGKILL loses at most the record being
written (torn records are counted and ignored; a write cut short by a
SIGKILL may end inside its writer's name). Each record starts with its
writer's *incarnation* (the unique id of one worker process; ``sup`` is the
supervisor, ``final`` the final checks). Facts used below:

* A writer that has a record at position q was alive at every earlier
  position: it is *certified alive* there.
* The supervisor writes ``killed X`` only after reaping X: X is dead there.

Each worker has an identity file (its incarnation, pid and start time);
the potato, the slot and reader-writer marks and the arena markers are
hard links to it, so whoever finds one
knows exactly whose it is, and whether that process still lives
(``/proc/<pid>/stat``: same start time, not a zombie, not exiting -- a
SIGKILLed process is marked exiting before its locks are released).

What is checked, and why each check is sound:

* Mutex: inside the mutex the holder links the potato with ``link(2)``
  (an atomic create-with-content) and unlinks it on the way out after
  checking it is still its own. A potato already there is legitimate only
  if its holder is dead (checked live, and later from the journal: it
  never wrote again and the supervisor killed it).
* Slots: inside ``acquire(n)`` the holder checks it got n distinct ids of
  the set, then marks each slot as the mutex's potato (a mark already
  there: legitimate only if its holder is dead, checked live and from the
  journal), records ``slots-held <ids>`` and, before unmarking,
  ``slots-free``. Every position between the two records lies inside the
  real hold (for a holder killed inside: up to its last record), so two
  such spans sharing an id, or more than n ids held in overlapping spans,
  are proven violations.
* Shared mutex: a reader links ``r-<incarnation>``, then finds no live
  writer's mark; the writer links ``writer``, then finds only dead
  readers' marks (removed, recorded as orphans, checked as above). Of a
  reader and a writer inside at once, the later to mark itself sees the
  other. Reads and writes are journaled as spans as slots are; a write
  span overlapping any other span is a violation.
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

import os
import random
import select
import signal
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

from ..arena import LastProcessStandingArena
from ..deferred import DeferredFunction
from ..mutex import global_mutex, retire_mutex_files
from ..slots import ResourceSlots
from ..smoke import left_in
from .torture_check import RunStats, check_journal
from .torture_holds import MUTEX, RW_MUTEX, SLOT_IDS, SLOTS, hold_slots, hold_the_potato, write_shared
from .torture_journal import PHASES, Layout, Me, become, make_identity, record
from .torture_workers import ARENA, deferred_effect, take_part_in_arena, worker_process

__all__ = ["main", "run_torture"]

# Mean life of a killable worker, unless run_torture is told otherwise.
_LIFETIME = 0.2

# -------------------------------------------------------- supervisor


class _Slot:
    __slots__ = ("index", "immortal", "pid", "incarnation", "pipe", "last_progress")

    def __init__(self, index: int, immortal: bool) -> None:
        self.index, self.immortal = index, immortal
        self.pid, self.incarnation, self.pipe, self.last_progress = -1, "", -1, 0.0


class _Supervisor:
    """Spawns workers, kills them at random moments, respawns them."""

    def __init__(
        self,
        layout: Layout,
        procs: int,
        seconds: float,
        seed: object,
        progress_bound: float,
        kill_interval: float,
        say: Callable[[str], None],
    ) -> None:
        import mmap

        self.layout, self.seconds, self.seed = layout, seconds, seed
        self.progress_bound, self.kill_interval, self.say = progress_bound, kill_interval, say
        self.rng = random.Random("%s:supervisor" % (seed,))
        immortal = max(1, procs // 4)
        self.slots = [_Slot(index, index < immortal) for index in range(procs)]
        self.phases = mmap.mmap(-1, procs)
        self.stats = RunStats()
        self.worker_deadline = 0.0

    def run(self) -> RunStats:
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
                status = worker_process(
                    self.layout,
                    self.seed,
                    incarnation,
                    slot.index,
                    slot.immortal,
                    write,
                    self.phases,
                    self.worker_deadline,
                )
            finally:
                os._exit(status)
        os.close(write)
        slot.pid, slot.incarnation, slot.pipe = pid, incarnation, read
        slot.last_progress = time.monotonic()
        record("spawned %s slot=%d pid=%d" % (incarnation, slot.index, pid))

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
                self.say(
                    "  ... %3.0f s: %d workers killed, %d iterations"
                    % (now - start, sum(self.stats.kills.values()), self.stats.iterations)
                )

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
            record("exited %s %d" % (slot.incarnation, status))
        if respawn:
            self._spawn(slot)

    def _stalled(self, slot: _Slot, respawn: bool) -> None:
        # Dump its stack for the post-mortem, then count it as a deadlock.
        os.kill(slot.pid, signal.SIGUSR1)
        time.sleep(1)
        self.stats.stalled.append("%s (%s)" % (slot.incarnation, PHASES[self.phases[slot.index]]))
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
        record("killed %s %d %s" % (slot.incarnation, phase, reason))
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


# ---------------------------------------------------------- final phase


def _final_checks(layout: Layout) -> Tuple[bool, List[str], List[str], List[str], List[str]]:
    """As the last process standing: take the arena once more, ``cleanup``,
    then the mutex, every slot and the shared mutex as writer. Returns
    (elected, arena markers left, what cleanup said, what is left in the
    coordination directory, slot and reader-writer marks left)."""
    from ..cleanup import cleanup_directory

    become("final", layout.journal)
    identity = make_identity(layout, "final")
    arena = LastProcessStandingArena(layout.coord, ARENA)
    elected = take_part_in_arena(layout, arena, identity, "final.a1", lambda: None)
    cleanup = list(cleanup_directory(layout.coord))
    record("cleanup-done")
    # Only now (a lock file left by a killed holder is cleanup's to remove):
    # a potato or mark still there must be a dead holder's.
    with global_mutex(layout.coord, MUTEX):
        hold_the_potato(layout, identity, 0)
    with ResourceSlots(layout.coord, SLOTS, list(SLOT_IDS)).acquire(len(SLOT_IDS)) as ids:
        hold_slots(layout, identity, ids, len(SLOT_IDS), lambda: None)
    with global_mutex(layout.coord, RW_MUTEX):
        write_shared(layout, identity, 0)
    retire_mutex_files()  # as at exit: this process keeps nothing open there
    left = left_in(layout.coord)  # cleanup removed files this process kept: NFS silly-renamed them
    marks = [
        os.path.join(os.path.basename(where), name)
        for where in (layout.slot_marks, layout.rw_marks)
        for name in sorted(os.listdir(where))
    ]
    return elected, sorted(os.listdir(layout.markers)), cleanup, left, marks


def _kills_line(stats: RunStats, seconds: float) -> str:
    total = sum(stats.kills.values())
    where = ", ".join(
        "%s %d" % (PHASES[phase], count) for phase, count in sorted(stats.kills.items(), key=lambda item: -item[1])
    )
    return "SIGKILLed %d workers at random moments in %g s (%d incarnations, %d iterations): %s" % (
        total,
        seconds,
        stats.incarnations,
        stats.iterations,
        where or "none",
    )


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
        ", ".join("%d %s" % (count, level) for level, count in sorted(levels.items())),
        entries[0][2][:160],
    )


def run_torture(
    directory: Optional[str] = None,
    seconds: float = 10.0,
    procs: int = 4,
    seed: object = None,
    progress_bound: float = 60.0,
    lifetime: float = _LIFETIME,
    say: Callable[[str], None] = print,
    split_dir: Optional[str] = None,
) -> bool:
    """Run the torture in a fresh subdirectory of *directory* (default: the
    system's temporary directory) and print (*say*) one line per invariant.

    With *split_dir* (*directory* seen through another mount, say a second
    NFS client of the same export), every other worker uses the
    coordination directory through it, and the evidence (journal, potato,
    markers) is kept in the system's temporary directory, which every
    worker sees coherently.

    *procs* workers (at least 2; a quarter of them, at least one, are never
    killed) run for *seconds*; each of the others is SIGKILLed after
    *lifetime* seconds on average (default: a fifth of a second, long
    enough for dozens of operations on a local disk; storage where an
    operation takes milliseconds needs longer, or workers die starting).
    Returns True iff every invariant held; then the subdirectory
    is removed, else it is kept for the post-mortem and its path printed.
    """
    import shutil
    import tempfile

    if procs < 2:
        raise ValueError("the torture needs at least 2 processes (one is never killed), not %d" % procs)
    if not seconds > 0 or not lifetime > 0:
        raise ValueError("the torture needs positive seconds and lifetime, not %r and %r" % (seconds, lifetime))
    if seed is None:
        seed = random.randrange(1 << 32)
    killable = procs - max(1, procs // 4)
    kill_interval = lifetime / killable
    if split_dir is None:
        layout = Layout.make(tempfile.mkdtemp(prefix="toilcoord-torture-", dir=directory))
    else:
        root = tempfile.mkdtemp(prefix="toilcoord-torture-")
        coord = os.path.join(directory or ".", os.path.basename(root) + "-coord")
        layout = Layout.make(root, coord, split_dir)
    say(
        "torture: %g s, %d processes (%d never killed), seed %s, in %s"
        % (seconds, procs, procs - killable, seed, layout.root)
    )
    DeferredFunction.create(deferred_effect, "", "", 0)  # load the codec once, before forking
    become("sup", layout.journal)
    stats = _Supervisor(layout, procs, seconds, seed, progress_bound, kill_interval, say).run()
    elected, markers_left, cleanup, left, marks_left = _final_checks(layout)
    with open(layout.journal, "rb") as stream:
        invariants = check_journal(stream.read(), stats, elected, markers_left, left, progress_bound, marks_left)
    say(_kills_line(stats, seconds))
    logged = _log_summary(layout.log)
    if logged:
        say(logged)
    for line in cleanup:
        say("  cleanup: " + line)
    for invariant in invariants:
        say(invariant.line())
    held = all(invariant.held for invariant in invariants)
    os.close(Me.journal_fd)
    Me.journal_fd = -1
    if held:
        shutil.rmtree(layout.root)
        if not layout.coord.startswith(layout.root + os.sep):
            os.rmdir(layout.coord)  # empty: checked by the invariants
        say("all %d invariants held" % len(invariants))
    else:
        say("FAILED; the journal, logs and stacks are kept in %s" % layout.records)
    return held


def main(
    directory: Optional[str],
    seconds: float,
    procs: int,
    seed: object,
    split_dir: Optional[str] = None,
    lifetime: float = _LIFETIME,
) -> int:
    """``python -m toilcoord torture``: exit status 0 iff every invariant held."""

    def say(line: str) -> None:
        print(line, flush=True)

    return 0 if run_torture(directory, seconds, procs, seed, lifetime=lifetime, say=say, split_dir=split_dir) else 1
