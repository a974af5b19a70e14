"""What is in a coordination directory: mutexes and their holders, process
names, arenas, deferred functions. Read-only, for ``python -m toilcoord
status`` and for programs.

Safe on a hostile directory: the directory is opened once and everything
in it relative to that fd, never through a symbolic link; only regular
files are opened (O_NONBLOCK, so a FIFO swapped in cannot hang the open),
and only a bounded number of bytes of each is read; nothing is locked
except by a brief non-blocking shared probe, nothing is unpickled, written
or removed. A hung network filesystem can still hang any system call.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import Callable, Dict, List, Optional, Tuple, Union

from .gates import _MUTEX_PREFIX
from .holder import Holder, LockTable, confirm, describe, lock_table, read_record
from .locks import held_exclusively
from .mounts import names_may_be_stale

__all__ = ["directory_status", "format_status"]

_NAME_PREFIX = "toil-proc-"  # as procnames.NAME_PREFIX
_SLOT = ".slot-"  # as slots._SLOT
_ARENA_SUFFIX = "-arena-live"  # as arena._LIVE_SUFFIX
_DEFERRED_DIR = "deferred"  # as DeferredFunctionManager.STATE_DIR_STEM
#: Entries looked at, at most, in the directory and in its deferred/.
_MAX_ENTRIES = 100_000
#: Deferred-function files larger than this are not read (pending: None).
_MAX_STATE_BYTES = 16 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


def directory_status(path: str) -> dict:
    """Everything toilcoord keeps in the directory *path*, as a dict that
    ``json.dumps`` takes as it is:

    * ``mutexes``: ``name``, ``owner_uid``, ``held`` (None if the probe
      failed), ``holder`` (pid, host, command, since, purpose, verified; None
      when not held or not known), ``waiters`` (from /proc/locks; None when
      the file is not listed there: a network filesystem, or no lock on it
      seen from this PID namespace);
    * ``slots``: one per slot of a :class:`~.slots.ResourceSlots`, as a
      mutex is, with ``name`` the slots' name and ``slot`` its id;
    * ``process_names``: ``name``, ``owner_uid``, ``alive``;
    * ``arenas``: ``name``, ``owner_uid``, ``members`` (live members listed in
      /proc/locks), ``live`` (None where that cannot tell: not local);
    * ``deferred``: ``files`` (``name``, ``owner_uid``, ``format``
      "toilcoord", "toil" or "damaged", ``owner_alive``, ``pending`` (None if not
      counted)) and ``owners`` (``uid``, ``files``, ``pending``, ``uncounted``);
    * ``skipped``: entries not used, with why (``name``, ``reason``);
    * ``directory``, ``host``, ``time``, ``truncated``.

    OSError (FileNotFoundError, NotADirectoryError, PermissionError, ELOOP
    for a symbolic link) if *path* cannot be opened as a directory.
    """
    dir_fd = os.open(path, _DIR_FLAGS)
    try:
        local = not names_may_be_stale(os.fstat(dir_fd).st_dev, path)
        report: dict = {
            "directory": os.path.abspath(path),
            "host": os.uname().nodename,
            "time": time.time(),
            "mutexes": [],
            "slots": [],
            "process_names": [],
            "arenas": [],
            "skipped": [],
            "truncated": False,
        }
        table = lock_table()
        names, report["truncated"] = _listing(dir_fd)
        for name in names:
            _add_entry(report, dir_fd, name, table, local)
        report["deferred"] = _deferred(dir_fd, report)
    finally:
        os.close(dir_fd)
    return report


def _listing(dir_fd: int) -> Tuple[List[str], bool]:
    """The sorted names in *dir_fd* (at most _MAX_ENTRIES), and whether
    there were more."""
    names = []
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if len(names) == _MAX_ENTRIES:
                return sorted(names), True
            names.append(entry.name)
    return sorted(names), False


def _kind(name: str) -> Optional[str]:
    if name.startswith(_MUTEX_PREFIX) and len(name) > len(_MUTEX_PREFIX):
        return "mutexes"
    if name.startswith(_NAME_PREFIX):
        return "process_names"
    if name.endswith(_ARENA_SUFFIX) and len(name) > len(_ARENA_SUFFIX):
        return "arenas"
    return None


def _add_entry(report: dict, dir_fd: int, name: str, table: LockTable, local: bool) -> None:
    kind = _kind(name)
    if kind is None:
        return  # not toilcoord's (deferred/ is read apart)
    opened = _open_regular(dir_fd, name)
    if isinstance(opened, str):
        report["skipped"].append({"name": name, "reason": opened})
        return
    fd, info = opened
    try:
        entry = _DESCRIBE[kind](fd, info, name, table, local)
    finally:
        os.close(fd)
    entry["owner_uid"] = info.st_uid
    slots, slot_mark, slot = entry["name"].rpartition(_SLOT) if kind == "mutexes" else ("", "", "")
    if slot_mark and slots and slot:  # one slot of a ResourceSlots: a lock file like a mutex's
        entry["name"], entry["slot"] = slots, slot
        kind = "slots"
    report[kind].append(entry)


def _open_regular(dir_fd: int, name: str) -> Union[Tuple[int, os.stat_result], str]:
    """An fd on the regular file *name* and its fstat, or why not. A
    non-regular file is looked at with lstat first, so a device is never
    opened."""
    try:
        seen = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(seen.st_mode):
            return _not_regular(seen.st_mode)
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as error:
        return "a symbolic link" if error.errno == errno.ELOOP else f"cannot be opened: {error.strerror}"
    try:
        info = os.fstat(fd)
    except OSError as error:
        os.close(fd)
        return f"cannot be examined: {error.strerror}"
    if not stat.S_ISREG(info.st_mode):  # swapped since the lstat: the fd is what counts
        os.close(fd)
        return _not_regular(info.st_mode)
    return fd, info


def _not_regular(mode: int) -> str:
    kinds = (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((what for test, what in kinds if test(mode)), "not a regular file")


def _locked(fd: int) -> Optional[bool]:
    """:func:`~.locks.held_exclusively`, or None if the probe failed."""
    try:
        return held_exclusively(fd)
    except OSError:
        return None


def _mutex(fd: int, info: os.stat_result, name: str, table: LockTable, local: bool) -> dict:
    key = table.key(info)
    held = _locked(fd)
    holder = confirm(read_record(fd), table.holders.get(key, [])) if held else None
    listed = key in table.holders or key in table.waiters
    return {
        "name": name[len(_MUTEX_PREFIX) :],
        "held": held,
        "holder": None if holder is None else holder.public(),
        "waiters": table.waiters.get(key, 0) if listed else None,
    }


def _process_name(fd: int, info: os.stat_result, name: str, table: LockTable, local: bool) -> dict:
    return {"name": name, "alive": _locked(fd)}


def _arena(fd: int, info: os.stat_result, name: str, table: LockTable, local: bool) -> dict:
    # Never probed with a lock: a leaver converting its shared lock to an
    # exclusive one (unlock, then lock without waiting) would take our
    # probe for a live member, and nobody would clean up.
    members = len(table.holders.get(table.key(info), []))
    live = True if members else (False if local and table.readable else None)
    return {"name": name[: -len(_ARENA_SUFFIX)], "members": members if table.readable else None, "live": live}


_DESCRIBE = {"mutexes": _mutex, "process_names": _process_name, "arenas": _arena}


# ------------------------------------------------------------ deferred


def _deferred(dir_fd: int, report: dict) -> dict:
    """The deferred-function state files in ``deferred/``, and per owner."""
    files: List[dict] = []
    try:
        folder = os.open(_DEFERRED_DIR, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as error:
        if error.errno != errno.ENOENT:
            reason = "not a directory" if error.errno in (errno.ELOOP, errno.ENOTDIR) else error.strerror
            report["skipped"].append({"name": _DEFERRED_DIR, "reason": f"cannot be read: {reason}"})
        return {"files": files, "owners": []}
    try:
        names, truncated = _listing(folder)
        report["truncated"] = report["truncated"] or truncated
        for name in names:
            if _is_state_file(name):
                _add_state_file(files, folder, name, report)
    finally:
        os.close(folder)
    return {"files": files, "owners": _per_owner(files)}


def _is_state_file(name: str) -> bool:
    from .deferred import DeferredFunctionManager as Manager

    return name.startswith((Manager.OWN_PREFIX + Manager.PREFIX, Manager.PREFIX)) and not name.endswith(
        Manager.WIP_SUFFIX
    )


def _add_state_file(files: List[dict], folder: int, name: str, report: dict) -> None:
    shown = f"{_DEFERRED_DIR}/{name}"
    opened = _open_regular(folder, name)
    if isinstance(opened, str):
        report["skipped"].append({"name": shown, "reason": opened})
        return
    fd, info = opened
    try:
        format_, pending = _count_pending(fd, info, name, shown)
        files.append(
            {"name": name, "owner_uid": info.st_uid, "format": format_, "owner_alive": _locked(fd), "pending": pending}
        )
    finally:
        os.close(fd)


def _count_pending(fd: int, info: os.stat_result, name: str, where: str) -> Tuple[str, Optional[int]]:
    """The file's format and how many of its functions have not run (None
    if not counted: Toil's dill pickles, or too large to read). Records
    are framed by deferred's own reader; none is unpickled."""
    from . import deferred_records as records
    from .deferred import DeferredFunctionManager as Manager

    records.load_codec()
    if info.st_size == 0:  # nothing deferred yet, in either format
        return ("toil" if name.startswith(Manager.PREFIX) else "toilcoord"), 0
    if not records.starts_with_a_record(os.pread(fd, records.HEADER_SIZE, 0)):
        return ("damaged" if name.startswith(Manager.OWN_PREFIX) else "toil"), None
    data = _read_bounded(fd, _MAX_STATE_BYTES)
    if len(data) > _MAX_STATE_BYTES:
        return "toilcoord", None
    return "toilcoord", sum(1 for _ in records.pending_records(data, where))


def _read_bounded(fd: int, limit: int) -> bytes:
    """At most *limit* + 1 bytes from the start of *fd* (one more than
    *limit* says it is larger)."""
    chunks, size = [], 0
    while size <= limit:
        chunk = os.pread(fd, limit + 1 - size, size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _per_owner(files: List[dict]) -> List[dict]:
    owners: Dict[int, dict] = {}
    for entry in files:
        owner = owners.setdefault(
            entry["owner_uid"], {"uid": entry["owner_uid"], "files": 0, "pending": 0, "uncounted": 0}
        )
        owner["files"] += 1
        if entry["pending"] is None:
            owner["uncounted"] += 1
        else:
            owner["pending"] += entry["pending"]
    return [owners[uid] for uid in sorted(owners)]


# ------------------------------------------------------------- the table


def format_status(report: dict) -> str:
    """*report* (from :func:`directory_status`) as a table for people;
    every name is shown with anything unprintable replaced."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report["time"]))
    lines = [f"{_shown(report['directory'])} on {_shown(report['host'])} at {when}"]
    lines += _section(
        "mutexes",
        report["mutexes"],
        lambda m: (
            f"{_shown(m['name'])}  {_yes_no(m['held'], 'held', 'free')}  waiters {_unknown(m['waiters'])}" + _held_by(m)
        ),
    )
    lines += _section(
        "slots",
        report["slots"],
        lambda m: f"{_shown(m['name'])} slot {_shown(m['slot'])}  {_yes_no(m['held'], 'held', 'free')}" + _held_by(m),
    )
    lines += _section(
        "process names",
        report["process_names"],
        lambda p: f"{_shown(p['name'])}  {_yes_no(p['alive'], 'alive', 'dead')}  uid {p['owner_uid']}",
    )
    lines += _section(
        "arenas",
        report["arenas"],
        lambda a: (
            f"{_shown(a['name'])}  {_yes_no(a['live'], 'live', 'no live member')}  members {_unknown(a['members'])}"
        ),
    )
    lines += _section(
        "deferred functions",
        report["deferred"]["owners"],
        lambda o: (
            f"uid {o['uid']}: {o['files']} state files, {o['pending']} functions pending"
            + (f" ({o['uncounted']} files not counted: Toil's or too large)" if o["uncounted"] else "")
        ),
    )
    lines += _section("skipped", report["skipped"], lambda s: f"{_shown(s['name'])}: {s['reason']}")
    if report["truncated"]:
        lines.append(f"(only the first {_MAX_ENTRIES} entries were read)")
    return "\n".join(lines)


def _held_by(entry: dict) -> str:
    """Who holds a mutex or slot *entry*, for the table."""
    if entry["holder"]:
        return f"  by {describe(Holder(**entry['holder']))}"
    return "  by an unrecorded holder" if entry["held"] else ""


def _section(title: str, items: List[dict], line: Callable[[dict], str]) -> List[str]:
    return [f"{title}: {len(items) or 'none'}"] + [f"  {line(item)}" for item in items]


def _yes_no(value: Optional[bool], yes: str, no: str) -> str:
    return "unknown" if value is None else (yes if value else no)


def _unknown(value: Optional[int]) -> str:
    return "unknown" if value is None else str(value)


def _shown(text: str) -> str:
    return "".join(char if char.isprintable() else "?" for char in text)
