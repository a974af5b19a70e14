"""Who holds a mutex: the record a holder writes into its lock file.

A :class:`~toilcoord.mutex.global_mutex` holder writes one fixed-size record
at offset 0 of the lock file right after locking it (one ``pwrite`` per
acquisition; the per-process parts are gathered once). Nothing clears it at
release, so a record outlives its holder: it says who held the file *last*,
and only a reader that knows the file is locked now may take it for the
holder, and then only after :func:`confirm` found nothing against it (on
this host: the recorded process is the one the kernel lists as the lock's
holder, and it still runs).

Layout (little-endian, :data:`RECORD_SIZE` bytes): magic ``tcH1``, CRC-32
of the rest (4 bytes), wall time locked (8, nanoseconds), pid (4), PID-namespace inode (8),
process start time (8, clock ticks since boot), then host, command and purpose
as UTF-8, NUL-separated, NUL-padded.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

__all__ = [
    "PURPOSE_MAX_BYTES",
    "RECORD_SIZE",
    "Holder",
    "LockTable",
    "check_purpose",
    "confirm",
    "describe",
    "lock_table",
    "read_record",
    "record_for",
    "write_record",
]

RECORD_SIZE = 512
#: The longest purpose string, in UTF-8 bytes.
PURPOSE_MAX_BYTES = 200
_MAGIC = b"tcH1"
# Plain int.to_bytes, not struct: importing toilcoord must stay light.
_FIELDS = ((8, 8), (16, 4), (20, 8), (28, 8))  # since, pid, PID namespace, start time: (offset, size)
_TEXT_AT = 36
_HOST_MAX = 64  # HOST_NAME_MAX
_COMMAND_MAX = 64


class Holder(NamedTuple):
    """A decoded record. ``verified``: this host confirmed the recorded
    process holds the lock now (else it is the holder as recorded, from
    another host or PID namespace, where nothing can be checked)."""

    pid: int
    host: str
    command: str
    since: float
    purpose: Optional[str]
    verified: bool = False
    pid_namespace: int = 0
    start_ticks: int = 0

    def public(self) -> dict:
        """The fields a report shows."""
        return {
            "pid": self.pid,
            "host": self.host,
            "command": self.command,
            "since": self.since,
            "purpose": self.purpose,
            "verified": self.verified,
        }


def check_purpose(purpose: object) -> Optional[str]:
    """Return *purpose* if it may go in a record: None, or a non-empty
    printable str of at most :data:`PURPOSE_MAX_BYTES` UTF-8 bytes; else
    TypeError or ValueError."""
    if purpose is None:
        return None
    if not isinstance(purpose, str):
        raise TypeError(f"purpose must be a str or None, not {type(purpose).__name__}")
    if not purpose or not purpose.isprintable():
        raise ValueError(f"purpose must be non-empty printable text (no newlines or control characters): {purpose!r}")
    try:
        size = len(purpose.encode("utf-8"))
    except UnicodeError:
        raise ValueError(f"purpose cannot be encoded as UTF-8: {purpose!r}") from None
    if size > PURPOSE_MAX_BYTES:
        raise ValueError(f"purpose is {size} bytes long; at most {PURPOSE_MAX_BYTES} are allowed: {purpose[:40]!r}...")
    return purpose


# ------------------------------------------------------------- writing

# purpose -> the record's bytes after the time. Filled once per purpose per
# process; a forked child starts again (its pid differs).
_tails: Dict[Optional[str], bytes] = {}
_crc32 = None


def _this_process() -> Tuple[int, int, int, bytes, bytes]:
    pid = os.getpid()
    return (pid, _pid_namespace("self"), _start_ticks("self"), _host(), _command())


def _host() -> bytes:
    return os.uname().nodename.encode("utf-8", "replace")[:_HOST_MAX]


def _command() -> bytes:
    try:
        with open("/proc/self/comm", "rb") as comm:
            return comm.read(_COMMAND_MAX).strip()
    except OSError:  # no /proc (macOS)
        return os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else sys.executable).encode("utf-8", "replace")[
            :_COMMAND_MAX
        ]


def _tail(purpose: Optional[str]) -> bytes:
    global _crc32
    tail = _tails.get(purpose)
    if tail is None:
        if _crc32 is None:
            import zlib

            _crc32 = zlib.crc32
        pid, namespace, ticks, host, command = _this_process()
        text = b"\0".join((host, command, (purpose or "").encode("utf-8")))
        tail = pid.to_bytes(4, "little") + namespace.to_bytes(8, "little") + ticks.to_bytes(8, "little") + text
        tail += bytes(RECORD_SIZE - _TEXT_AT - len(text))
        if len(_tails) >= 64:
            _tails.clear()
        _tails[purpose] = tail
    return tail


def record_for(purpose: Optional[str]) -> bytes:
    """This process's record, locked now, with *purpose* (checked already)."""
    body = time.time_ns().to_bytes(8, "little") + _tail(purpose)
    return _MAGIC + _crc32(body).to_bytes(4, "little") + body


def write_record(fd: int, purpose: Optional[str], sync: bool) -> None:
    """Write this process's record into the lock file *fd* it just locked:
    one system call. With *sync* (a network filesystem, whose client would
    otherwise send the write only at unlock, when the record is stale) it
    reaches the server before this returns. A failure (a full disk) is
    ignored: the lock is held all the same, and readers check records."""
    record = record_for(purpose)
    try:
        if sync and _RWF_DSYNC:
            os.pwritev(fd, [record], 0, _RWF_DSYNC)
        else:
            os.pwrite(fd, record, 0)
    except OSError:
        pass


_RWF_DSYNC = getattr(os, "RWF_DSYNC", 0)
os.register_at_fork(after_in_child=_tails.clear)


# ------------------------------------------------------------- reading


def _printable(raw: bytes) -> str:
    # A record may be anyone's bytes: nothing reaches a terminal unescaped.
    return "".join(char if char.isprintable() else "\ufffd" for char in raw.decode("utf-8", "replace"))


def read_record(fd: int) -> Optional[Holder]:
    """The record at the start of the open file *fd* (one bounded read),
    or None if there is none intact (empty, Toil's, garbage, torn)."""
    try:
        data = os.pread(fd, RECORD_SIZE, 0)
    except OSError:
        return None
    if len(data) != RECORD_SIZE:
        return None
    import zlib

    if data[:4] != _MAGIC or zlib.crc32(data[8:]) != int.from_bytes(data[4:8], "little"):
        return None
    since, pid, namespace, ticks = (int.from_bytes(data[at : at + size], "little") for at, size in _FIELDS)
    fields = data[_TEXT_AT:].rstrip(b"\0").split(b"\0")
    if len(fields) < 2:
        return None
    host, command, purpose = (fields + [b""])[:3]
    return Holder(
        pid, _printable(host), _printable(command), since / 1e9, _printable(purpose) or None, False, namespace, ticks
    )


def _pid_namespace(pid: str) -> int:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return 0


def _start_ticks(pid: str) -> int:
    """When process *pid* started (clock ticks since boot), 0 if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read(4096).rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def confirm(record: Optional[Holder], lock_pids: List[int]) -> Optional[Holder]:
    """The holder of a file known to be locked now, from its *record*, or
    None where the record cannot be this holder's. *lock_pids*: the pids
    /proc/locks lists as holding the file (empty if unknown).

    A record of this host and PID namespace is the holder only if that
    process still runs (the same start time: not a reused pid) and, where
    /proc/locks names holders, is one of them: a previous holder's record
    stays in the file until the next holder writes its own. A record of
    another host or PID namespace cannot be checked: it is returned
    unverified (a new holder's first instant shows its predecessor)."""
    if record is None:
        return None
    if record.host != _printable(_host()) or record.pid_namespace != _pid_namespace("self"):
        return record._replace(verified=False)
    if _start_ticks(str(record.pid)) != record.start_ticks or record.start_ticks == 0:
        return None  # the recorded holder is gone
    if lock_pids and record.pid not in lock_pids:
        return None  # it released; another process (not recording, or not yet) holds it
    return record._replace(verified=bool(lock_pids))


def describe(holder: Holder) -> str:
    """One line naming *holder*, for messages."""
    purpose = f", purpose {holder.purpose!r}" if holder.purpose else ""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.since))
    checked = "" if holder.verified else ", as recorded"
    return f"pid {holder.pid} ({holder.command}) on {holder.host}{purpose}, since {when}{checked}"


# ---------------------------------------------------------- /proc/locks


class LockTable(NamedTuple):
    """/proc/locks by file: (major, minor, inode) -> holder pids, and ->
    how many wait. ``readable`` is False where there is no /proc/locks."""

    holders: Dict[Tuple[int, int, int], List[int]]
    waiters: Dict[Tuple[int, int, int], int]
    readable: bool

    def key(self, info: os.stat_result) -> Tuple[int, int, int]:
        return os.major(info.st_dev), os.minor(info.st_dev), info.st_ino


_LOCKS_MAX_BYTES = 16 << 20


def lock_table(path: str = "/proc/locks") -> LockTable:
    """This node's flock locks as the kernel lists them (only those of
    processes visible in this PID namespace; on NFS, only this client's)."""
    holders: Dict[Tuple[int, int, int], List[int]] = {}
    waiters: Dict[Tuple[int, int, int], int] = {}
    try:
        with open(path, "rb") as table:
            text = table.read(_LOCKS_MAX_BYTES)
    except OSError:
        return LockTable(holders, waiters, False)
    for line in text.splitlines():
        fields = line.split()
        waiting = len(fields) > 1 and fields[1] == b"->"
        fields = fields[2:] if waiting else fields[1:]
        if len(fields) < 5 or fields[0] != b"FLOCK":
            continue
        try:
            major, minor, inode = fields[4].split(b":")
            key = (int(major, 16), int(minor, 16), int(inode))
            pid = int(fields[3])
        except ValueError:
            continue
        if waiting:
            waiters[key] = waiters.get(key, 0) + 1
        elif pid > 0:
            holders.setdefault(key, []).append(pid)
    return LockTable(holders, waiters, True)
