"""Lock files kept open per process: the layer under :mod:`.mutex`,
:mod:`.arena` and :mod:`.slots`.

A *gate* is this process's state for one lock file: the checked directory
it is reached in (:mod:`.folders`: every open, stat and unlink is relative
to it, never by path), the fd it keeps open between acquisitions (so an
acquisition costs a lock, a stat or two and an unlock, with no create
or unlink), and an in-process lock its threads queue
on first (flock is per open file, and this process's one file is shared by
its threads). The file may be unlinked at any time by someone holding its
lock (a process leaving at exit, ``cleanup``, Toil's unlink-on-release
mutex), so an acquirer checks after every lock that the file it locked is
still the one at the path, and starts again on the new file if not. On
network filesystems that check forces a lookup at the server (an exclusive
create cannot be answered from a cached name), and a lock on a file another
node unlinked is seen by its link count, which the lock makes the client
fetch afresh.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from typing import Dict, List, Optional

from .files import unlink_if_present
from .folders import Folder, exists_in, hold_folder, let_go, regular_files_in, renewing
from .locks import (
    _OPEN_OR_CREATE,
    LockTimeout,
    PathArg,
    _close_tracked,
    _create_if_free,
    _lock_until,
    _open_tracked,
    safe_lock,
)
from .mounts import hard_links_protected, names_may_be_stale

__all__ = ["kept_gate_files", "reap_unheld_mutex_files", "remove_unheld_lock_file", "retire_gates"]

logger = logging.getLogger(__name__.rpartition(".")[0] + ".mutex")  # what users configure

_MUTEX_PREFIX = "toil-mutex-"
#: A mutex's writer-intent file is its lock file's path plus this.
INTENT_SUFFIX = ".writer-intent"
#: Lock files kept open at most; the least recently used idle one is retired.
_KEEP_AT_MOST = 128
#: On a network filesystem, a process that had to wait for a mutex waits
#: this long after releasing it before taking it again, so that waiters on
#: other nodes (whose lock requests travel further) get their turn.
_HANDOFF = 0.01


class _Gate:
    """This process's state for one lock file. Threads queue on ``lock``;
    the thread that holds it owns the rest: ``folder`` and ``name``, where
    the file is (held from the first open until the gate is closed);
    ``fd``, the kept lock file (-1 when none); ``members``, the arena
    memberships held through it; fairness bookkeeping (whether the last lock had to wait, whether the
    file is on a network filesystem, when it was last released). A gate
    taken out of the table (``retired``) is never used again."""

    __slots__ = ("lock", "folder", "name", "fd", "retired", "members", "waited", "network", "released", "announce")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.folder: Optional[Folder] = None
        self.name = ""
        self.fd = -1
        self.retired = False
        self.members = 0
        self.waited = False
        self.network: Optional[bool] = None  # known once the fd has been checked
        self.released = 0.0
        self.announce = True  # an exclusive waiter holds the writer-intent file (not for that file itself)


# Lock-file path -> gate. Read without the guard (a dict lookup is atomic);
# gates are added and taken out only under it.
_gates: Dict[str, _Gate] = {}
_gates_guard = threading.Lock()
_epoch = 0  # changes in every forked child


def _gate_for(path: str) -> _Gate:
    gate = _gates.get(path)
    if gate is None:
        with _gates_guard:
            gate = _gates.get(path)
            if gate is None:
                gate = _gates[path] = _Gate()
                if len(_gates) > _KEEP_AT_MOST:
                    _retire_idle(len(_gates) - _KEEP_AT_MOST)
    return gate


def _hold_gate(path: str, timeout: Optional[float] = None) -> _Gate:
    """The current gate of *path*, its lock held (within *timeout* seconds,
    else LockTimeout)."""
    if timeout is None:
        gate = _gates.get(path)
        if gate is not None and gate.lock.acquire() and not gate.retired:
            return gate  # the common case
        if gate is not None:
            gate.lock.release()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        gate = _gate_for(path)
        if deadline is None:
            gate.lock.acquire()
        # Lock.acquire refuses timeouts beyond TIMEOUT_MAX (float("inf") too).
        elif not gate.lock.acquire(timeout=min(max(deadline - time.monotonic(), 0), threading.TIMEOUT_MAX)):
            raise LockTimeout(
                f"timed out after {timeout} s waiting for {path}: another thread of this "
                f"process (pid {os.getpid()}) holds it or waits for it"
            )
        if not gate.retired:
            return gate
        gate.lock.release()  # retired while we queued: take the new one


def _retire_gate(path: str, gate: _Gate) -> Optional[bool]:
    """Retire *gate* if no thread uses it and no membership holds it; the
    guard is held. None if it was not retired, else whether its file was
    removed."""
    if gate.members or not gate.lock.acquire(blocking=False):
        return None
    try:
        del _gates[path]
        gate.retired = True
        return _remove_and_close(path, gate)
    finally:
        gate.lock.release()


def _retire_idle(count: int) -> None:
    """Retire *count* idle gates, oldest first (guard held)."""
    for path, gate in list(_gates.items()):
        if count <= 0:
            return
        count -= _retire_gate(path, gate) is not None


# ------------------------------------------------------------ the lock file


def _drop(gate: _Gate) -> None:
    """Close the kept fd (releasing any lock on it): its file is garbage."""
    fd, gate.fd = gate.fd, -1
    if fd >= 0:
        _close_tracked(fd)


def _close_gate(gate: _Gate) -> None:
    """Close the kept fd and let go of the directory: the gate is done."""
    _drop(gate)
    folder, gate.folder = gate.folder, None
    if folder is not None:
        let_go(folder)


def _open(gate: _Gate, path: str) -> None:
    """Open the lock file at *path* (absolute), made if missing, relative
    to its checked directory (held from now on); opened anew if the
    directory was removed meanwhile."""
    if gate.folder is None:
        directory, gate.name = os.path.split(path)
        gate.folder = hold_folder(directory)
    name = gate.name
    gate.folder, gate.fd = renewing(gate.folder, lambda folder: _open_tracked(name, _OPEN_OR_CREATE, folder.fd, True))
    gate.network = None


def _unlink(gate: _Gate) -> None:
    """Unlink the gate's lock file, which the caller holds locked."""
    unlink_if_present(gate.name, gate.folder.fd)  # type: ignore[union-attr]


def _lock(gate: _Gate, path: str, deadline: Optional[float], block: bool, shared: bool) -> bool:
    """Lock the kept fd; False only if not *block* and someone holds it."""
    operation = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    may_announce = gate.announce and not shared
    if gate.network is False and block and deadline is None and not may_announce:
        # A local file: the kernel queues us; no need to know if we waited.
        try:
            fcntl.flock(gate.fd, operation)
        except OSError:
            safe_lock(gate.fd, shared=shared)  # retries EIO, ENOLCK; raises the rest
        return True
    try:  # the common case first, without safe_lock's retry machinery
        fcntl.flock(gate.fd, operation | fcntl.LOCK_NB)
        return True
    except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EACCES):
            safe_lock(gate.fd, block=block, shared=shared)  # retries EIO, ENOLCK; raises the rest
            return True
    if not block:
        return False
    gate.waited = True
    if may_announce and _readers_to_hold_off(gate, deadline):
        _wait_announced(gate, path, deadline)
    elif deadline is not None:
        _lock_until(gate.fd, path, deadline, shared)
    else:
        safe_lock(gate.fd, shared=shared)
    return True


def _readers_to_hold_off(gate: _Gate, deadline: Optional[float]) -> bool:
    """Whether a writer about to wait for *path* should announce itself:
    only where shared holders use the mutex (they make its writer-intent
    file), and only if it may wait at all (not with timeout 0). A mutex
    only ever held exclusively then keeps one file, and its waiters queue
    on it alone: a second queue, which a node near the NFS server rejoins
    faster, starved the far node (2.8% of the acquisitions between two
    VMs on NFSv3, against 28% with one queue)."""
    if deadline is not None and deadline <= time.monotonic():
        return False
    return exists_in(gate.folder, gate.name + INTENT_SUFFIX)  # type: ignore[arg-type]


def lock_file_exists(directory: str, name: str) -> bool:
    """Whether a file is at *name* in the absolute *directory*, looked up
    relative to its checked folder (a hint: see :func:`.folders.exists_in`)."""
    folder = hold_folder(directory)
    try:
        return exists_in(folder, name)
    finally:
        let_go(folder)


def _wait_announced(gate: _Gate, path: str, deadline: Optional[float]) -> None:
    """Wait for the exclusive lock on ``gate.fd`` while holding the file's
    writer-intent file exclusively: shared holders pass through that file
    (a brief shared lock) before taking theirs, so none starts while we
    wait, and we get in once those inside leave. The intent file is kept,
    as the lock file is (retired at exit, reaped by ``cleanup``): making
    and removing it at every contended acquisition would put a create and
    an unlink, two server round trips on NFS, on the contended path."""
    intent_path = path + INTENT_SUFFIX
    intent = _hold_gate(intent_path, None if deadline is None else max(deadline - time.monotonic(), 0))
    try:
        intent.announce = False  # waiters on the intent file itself just queue
        _acquire(intent, intent_path, deadline)
        announce, gate.announce = gate.announce, False  # announced: just queue
        try:
            # Until the lock is on the file linked at the path: a lock on
            # one removed meanwhile (its last holder retired it) must not
            # let readers in while we lock the new one.
            _acquire(gate, path, deadline)
        finally:
            gate.announce, gate.waited = announce, True
            _unlock(intent)
    finally:
        intent.lock.release()


def _let_others_in(gate: _Gate, deadline: Optional[float]) -> None:
    """Called when the last lock had to wait, on a network filesystem:
    pause before taking the lock again, since the server grants it to
    whoever asks first, and this node's next request would mostly beat
    another node's waiter."""
    pause = gate.released + _HANDOFF - time.monotonic()
    if deadline is not None:
        pause = min(pause, deadline - time.monotonic())
    if pause > 0:
        time.sleep(pause)


def _acquire(
    gate: _Gate, path: str, deadline: Optional[float] = None, block: bool = True, shared: bool = False
) -> bool:
    """Lock the file at *path* through ``gate.fd`` (exclusively unless
    *shared*), opening or creating it as needed; False only if not *block*
    and another process holds it."""
    gate.waited = False
    while True:
        if gate.fd < 0:
            _open(gate, path)
        try:
            if not _lock(gate, path, deadline, block, shared):
                return False
            linked = _still_linked(gate, path)
            if linked:
                return True
            if linked is None:
                continue  # gate.fd is the new file at the path now: lock that
        except OSError as error:
            if error.errno != errno.ESTALE:  # its file is gone from the server
                raise
        _drop(gate)


def _still_linked(gate: _Gate, path: str) -> Optional[bool]:
    """True if the locked ``gate.fd`` is the file linked at *path*, False
    if not. None if it was not, and ``gate.fd`` is now the file just made
    at the path (on a network filesystem, whose name was found free)."""
    opened = os.fstat(gate.fd)  # after the lock: fresh from an NFS server
    if opened.st_nlink == 0:
        return False
    if gate.network is None:  # once per opened file
        gate.network = names_may_be_stale(opened.st_dev, path)
    if _linked_by_count(gate, opened):
        return True
    folder = gate.folder.fd  # type: ignore[union-attr]
    if gate.network:
        # An exclusive create makes the client look the name up at the
        # server. If it succeeds, our file was unlinked and the new one
        # is the lock file now: lock that instead.
        fresh = _create_if_free(gate.name, folder)
        if fresh is not None:
            _drop(gate)
            gate.fd = fresh  # on the same device: gate.network stands
            return None
    try:
        linked = os.stat(gate.name, dir_fd=folder, follow_symlinks=False)
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
            return False
        raise
    return linked.st_ino == opened.st_ino and linked.st_dev == opened.st_dev


def _linked_by_count(gate: _Gate, opened: os.stat_result) -> bool:
    """True if the locked ``gate.fd`` (*opened*: its fstat after the lock)
    is known to be the file at its name without looking the name up.

    A lock file has one link when opened (a second is refused), and
    toilcoord never links or renames one: it leaves its name only by an
    unlink, which on a local filesystem (whose link counts are current)
    leaves it none. So one link means still at its name, where nobody else
    can link or rename it: the folder is private (only its owner, this user
    or root, may rename in it), and no other user may link the file (the
    kernel refuses a link to a file its caller may not both read and write,
    ``fs.protected_hardlinks = 1``, and the file is writable by its owner
    alone: Toil makes its lock files with the umask's mode). Linked
    elsewhere first, it would keep that link after the unlink at its name.
    Everywhere else the name is looked up. Its owner and root can still
    link or rename it: documented, as for the directory."""
    return (
        opened.st_nlink == 1
        and gate.network is False
        and not opened.st_mode & 0o022
        and gate.folder.private  # type: ignore[union-attr]
        and hard_links_protected()
    )


def _unlock(gate: _Gate) -> None:
    try:
        fcntl.flock(gate.fd, fcntl.LOCK_UN)
    except OSError as error:
        _unlock_failed(gate, error)


def _unlock_failed(gate: _Gate, error: OSError) -> None:
    # Closing releases the lock all the same; the next acquisition reopens.
    logger.warning(
        "unlocking %d failed with %s; closing it instead", gate.fd, errno.errorcode.get(error.errno, error.errno)
    )
    _drop(gate)


def _remove_unheld(path: str, gate: _Gate) -> bool:
    """Remove the lock file if no process holds it, and close ``gate.fd``;
    True if removed. The unlink happens while holding the lock, as every
    unlink of a lock file must: whoever waits on it then sees it gone and
    starts again. The lock is taken as any acquirer takes it, so on NFS
    the file is known to be linked at the server, not only in a cache."""
    try:
        if _acquire(gate, path, block=False):
            _unlink(gate)
            return True
    except OSError as error:
        logger.debug("not removing lock file %s: %s", path, error)
    finally:
        _drop(gate)
    return False


def _remove_and_close(path: str, gate: _Gate) -> bool:
    """Close *gate* (being retired), first removing its lock file if it
    keeps one open and no process holds it; True if removed."""
    try:
        return gate.fd >= 0 and _remove_unheld(path, gate)
    finally:
        _close_gate(gate)


def remove_unheld_lock_file(path: str) -> bool:
    """Remove the lock file at *path* (absolute) if no process holds it, as
    a mutex acquirer would lock it; True if removed (if the file was gone,
    the one made to lock is removed again). A lock file this process keeps
    is retired with it; one it holds, or that an arena membership of it
    holds, is left."""
    with _gates_guard:
        gate = _gates.get(path)
        if gate is not None:
            return bool(_retire_gate(path, gate))
    gate = _Gate()
    try:
        return _remove_unheld(path, gate)
    finally:
        _close_gate(gate)


def reap_unheld_mutex_files(base_dir: PathArg) -> List[str]:
    """Remove the lock files in *base_dir* of mutexes nobody holds; return
    their paths. Safe at any time: a process that later locks a removed
    file sees it gone and makes a new one."""
    directory = os.path.abspath(base_dir)
    candidates = [
        os.path.join(directory, name) for name in regular_files_in(directory) if name.startswith(_MUTEX_PREFIX)
    ]
    return [path for path in candidates if remove_unheld_lock_file(path)]


def retire_gates() -> None:
    """Retire every idle gate of this process (guard held), removing the
    lock files nobody holds."""
    for path, gate in list(_gates.items()):
        _retire_gate(path, gate)


def kept_gate_files() -> int:
    """How many lock files this process's gates keep open."""
    return sum(gate.fd >= 0 for gate in list(_gates.values()))


def _forget_parent_gates() -> None:
    # The kept fds were closed by locks' own fork handler (they are in
    # _held_fds); another thread may have held the guard at fork time.
    global _gates_guard, _epoch
    _gates_guard = threading.Lock()
    _gates.clear()
    _epoch += 1


os.register_at_fork(after_in_child=_forget_parent_gates)
