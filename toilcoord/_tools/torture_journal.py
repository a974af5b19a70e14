"""The torture's evidence, as every process of a run writes it: who this
process is (its *incarnation*), the journal it appends to (one record per
``os.write``), the phase byte the supervisor reads to say where a kill
landed, the run's directories, and identity files that say whether their
process still lives. See torture.py for how the evidence survives kills.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional, Tuple

from ..mutex import kept_lock_files

__all__ = [
    "PHASES",
    "Layout",
    "Me",
    "Phase",
    "become",
    "fd_count",
    "make_identity",
    "owner_alive",
    "record",
    "set_phase",
]

# What a worker is doing, kept in shared memory (one byte per worker) so the
# supervisor can say where its kills landed: Phase.X indexes PHASES.
PHASES = (
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
    "waiting for slots",
    "holding slots",
    "waiting to read (shared mutex)",
    "reading (shared mutex)",
    "waiting to write (shared mutex)",
    "writing (shared mutex)",
    "stopping",
)


class Phase:
    """Indexes of PHASES, by name."""

    (
        STARTING,
        IDLE,
        MUTEX_WAIT,
        MUTEX_HELD,
        ARENA_ENTER,
        ARENA_INSIDE,
        ARENA_LEAVE,
        ARENA_CLEAN,
        OPEN,
        DEFER,
        OPEN_EXIT,
        RUNNING,
        NAME_GET,
        NAME_POLL,
        CLEANUP,
        SLOTS_WAIT,
        SLOTS_HELD,
        READ_WAIT,
        READING,
        WRITE_WAIT,
        WRITING,
        STOPPING,
    ) = range(len(PHASES))


_PF_EXITING = 0x4  # include/linux/sched.h: set by do_exit() before files are closed


# ------------------------------------------------------ this process


class Me:
    """Who this process is in the run; set in each worker after fork."""

    incarnation = "pid%d" % os.getpid()
    journal_path = ""
    journal_fd = -1
    pid = -1
    phases: Any = None  # an mmap shared with the supervisor: one byte per slot
    slot = 0


def become(incarnation: str, journal_path: str, phases: Any = None, slot: int = 0) -> None:
    if Me.journal_fd >= 0:  # the parent's, in a forked worker
        os.close(Me.journal_fd)
    Me.incarnation, Me.journal_path, Me.phases, Me.slot = incarnation, journal_path, phases, slot
    Me.journal_fd = os.open(journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    Me.pid = os.getpid()


def record(text: str) -> None:
    """Append one journal record for this process: one write, one line."""
    os.write(Me.journal_fd, ("@%s %s\n" % (Me.incarnation, text)).encode())


def set_phase(phase: int) -> int:
    phases = Me.phases
    if phases is None or Me.pid != os.getpid():
        return Phase.IDLE
    previous = phases[Me.slot]
    phases[Me.slot] = phase
    return previous


def _start_time(pid: object = "self") -> Optional[str]:
    """Field 22 of /proc/<pid>/stat, or None if the process is gone or dying."""
    try:
        with open("/proc/%s/stat" % pid, "rb") as stream:
            data = stream.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X", b"x") or int(fields[6]) & _PF_EXITING:
        return None
    return fields[19].decode()


def owner_alive(identity_path: str) -> Tuple[str, bool]:
    """(incarnation, alive) of the process whose identity file is linked at
    *identity_path*. FileNotFoundError if nothing is linked there."""
    with open(identity_path) as stream:
        incarnation, pid, started = stream.read().split()
    return incarnation, _start_time(pid) == started


def fd_count() -> int:
    # Not the one listdir uses, nor the lock files mutexes keep open
    # between acquisitions (one per mutex: bounded, not a leak).
    return len(os.listdir("/proc/self/fd")) - 1 - kept_lock_files()


# ------------------------------------------------------------ layout


class Layout(NamedTuple):
    root: str
    coord: str  # the coordination directory: every primitive works here
    records: str  # evidence: journal, potatoes, markers, identities
    views: Tuple[str, ...]  # coord, and coord through another mount: workers alternate

    @classmethod
    def make(cls, root: str, coord: Optional[str] = None, split_dir: Optional[str] = None) -> "Layout":
        coord = coord or os.path.join(root, "coord")
        views = (coord, os.path.join(split_dir, os.path.basename(coord))) if split_dir else (coord,)
        layout = cls(root, coord, os.path.join(root, "records"), views)
        for path in (layout.coord, layout.records, layout.markers, layout.slot_marks, layout.rw_marks):
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
    def slot_marks(self) -> str:
        """Where a holder of slot <id> links its identity as the file <id>."""
        return os.path.join(self.records, "slots")

    @property
    def rw_marks(self) -> str:
        """Where the shared mutex's writer links its identity as ``writer``,
        each reader as ``r-<incarnation>``."""
        return os.path.join(self.records, "rw")

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


def make_identity(layout: Layout, incarnation: str) -> str:
    path = layout.identity(incarnation)
    with open(path, "w") as stream:
        stream.write("%s %d %s\n" % (incarnation, os.getpid(), _start_time()))
    return path
