"""``global_mutex``: a named mutex between processes, threads and nodes.

The lock is an exclusive ``flock`` on ``base_dir/toil-mutex-<name>``. Each
process keeps its lock file open between acquisitions, so an acquisition
costs a lock, two stats and an unlock, with no create or unlink (those cost
most of the time on a local disk, and on NFS two server round trips and a
silly-renamed ``.nfsXXXX`` file per acquisition).

The file may be unlinked at any time by someone holding its lock: by a
process leaving at exit, by ``cleanup``, or by Toil's own mutex, which
unlinks on every release. So a holder checks after every lock that the file
it locked is still the one at the path, and starts again on the new file if
not. On network filesystems that check forces a lookup at the server (an
exclusive create cannot be answered from a cached name), and a lock on a
file another node unlinked is seen by its link count, which the lock makes
the client fetch afresh.

Threads of one process queue on an in-process lock per file first: flock
is per open file, and this process's one file is shared by its threads.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import functools
import logging
import os
import stat
import threading
import time
from typing import Dict, List, Optional

from .locks import (
    ForeignFileError,
    LockTimeout,
    PathArg,
    _OPEN_OR_CREATE,
    _close_tracked,
    _create_if_free,
    _lock_until,
    _open_tracked,
    check_name,
    ensure_filesystem_lockable,
    safe_lock,
)
from .files import unlink_if_present
from .holder import check_purpose, confirm, describe, lock_table, read_record, write_record
from .mounts import names_may_be_stale

__all__ = ["global_mutex", "reap_unheld_mutex_files", "retire_mutex_files"]

logger = logging.getLogger(__name__)

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
    the thread that holds it owns the rest: ``fd``, the kept lock file (-1
    when none); ``members``, the arena memberships held through it;
    fairness bookkeeping (whether the last lock had to wait, whether the
    file is on a network filesystem, when it was last released). A gate
    taken out of the table (``retired``) is never used again."""

    __slots__ = ("lock", "fd", "retired", "members", "waited", "network", "released", "announce")

    def __init__(self) -> None:
        self.lock = threading.Lock()
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
            raise LockTimeout(f"timed out after {timeout} s waiting for {path}: another thread of this "
                              f"process (pid {os.getpid()}) holds it or waits for it")
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
        return gate.fd >= 0 and _remove_unheld(path, gate)
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


def _lock(gate: _Gate, path: str, deadline: Optional[float], block: bool, shared: bool) -> bool:
    """Lock the kept fd; False only if not *block* and someone holds it."""
    operation = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    announce = gate.announce and not shared
    if gate.network is False and block and deadline is None and not announce:
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
    if announce:
        _wait_announced(gate, path, deadline)
    elif deadline is not None:
        _lock_until(gate.fd, path, deadline, shared)
    else:
        safe_lock(gate.fd, shared=shared)
    return True


def _wait_announced(gate: _Gate, path: str, deadline: Optional[float]) -> None:
    """Wait for the exclusive lock on ``gate.fd`` while holding the file's
    writer-intent file exclusively: shared holders pass through that file
    (a brief shared lock) before taking theirs, so none starts while we
    wait, and we get in once those inside leave (see :mod:`.rwlock`)."""
    intent_path = path + INTENT_SUFFIX
    intent = _hold_gate(intent_path, None if deadline is None else max(deadline - time.monotonic(), 0))
    try:
        intent.announce = False  # waiters on the intent file itself just queue
        _acquire(intent, intent_path, deadline)
        try:
            if deadline is None:
                safe_lock(gate.fd)
            else:
                _lock_until(gate.fd, path, deadline)
        finally:
            # Removed (while held, as every lock file), so that a mutex no
            # reader uses keeps no second file once nobody waits.
            unlink_if_present(intent_path)
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


def _acquire(gate: _Gate, path: str, deadline: Optional[float] = None, block: bool = True,
             shared: bool = False) -> bool:
    """Lock the file at *path* through ``gate.fd`` (exclusively unless
    *shared*), opening or creating it as needed; False only if not *block*
    and another process holds it."""
    gate.waited = False
    while True:
        if gate.fd < 0:
            _check_directory(os.path.dirname(path))
            ensure_filesystem_lockable(os.path.dirname(path), hint="Keep lock files on other storage.")  # cached
            gate.fd = _open_tracked(path, _OPEN_OR_CREATE, owned=True)
            gate.network = None
        try:
            if not _lock(gate, path, deadline, block, shared):
                return False
            if _still_linked(gate, path):
                return True
        except OSError as error:
            if error.errno != errno.ESTALE:  # its file is gone from the server
                raise
        _drop(gate)


# Directories checked by _check_directory: each is refused or warned about once.
_checked_directories: Dict[str, bool] = {}


def _check_directory(directory: str) -> None:
    """Refuse a lock directory anyone can write without the sticky bit
    (they could unlink a held lock file: two holders), or one of another
    user's; warn once about one others can write (a sticky /tmp): they can
    plant files where ours go, which are then refused."""
    if _checked_directories.get(directory):
        return
    info = os.stat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", directory)
    euid = os.geteuid()
    if info.st_uid not in (euid, 0):
        raise ForeignFileError(errno.EPERM, f"the directory belongs to uid {info.st_uid}, not to this user "
                               f"(uid {euid}): a coordination directory must belong to one user", directory)
    if info.st_mode & 0o002 and not info.st_mode & stat.S_ISVTX:
        raise ForeignFileError(errno.EPERM, "anyone may remove files in this directory (writable by all, "
                               "not sticky): use a directory of your own for coordination", directory)
    if info.st_mode & 0o022:
        logger.warning("%s is writable by other users, who can put files where toilcoord keeps its own "
                       "(those are refused, never used); a directory of your own is safer", directory)
    _checked_directories[directory] = True


def _still_linked(gate: _Gate, path: str) -> bool:
    """True if the locked ``gate.fd`` is the file linked at *path*. Where
    the file was replaced, ``gate.fd`` may be swapped for the new one."""
    opened = os.fstat(gate.fd)  # after the lock: fresh from an NFS server
    if opened.st_nlink == 0:
        return False
    if gate.network is None:  # once per opened file
        gate.network = names_may_be_stale(opened.st_dev, path)
    if gate.network:
        # An exclusive create makes the client look the name up at the
        # server. If it succeeds, our file was unlinked and the new one
        # is the lock file now: lock that instead.
        fresh = _create_if_free(path)
        if fresh is not None:
            _drop(gate)
            gate.fd = fresh  # on the same device: gate.network stands
            return False
    try:
        linked = os.lstat(path)
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
            return False
        raise
    return linked.st_ino == opened.st_ino and linked.st_dev == opened.st_dev


def _unlock(gate: _Gate) -> None:
    try:
        fcntl.flock(gate.fd, fcntl.LOCK_UN)
    except OSError as error:
        _unlock_failed(gate, error)


def _unlock_failed(gate: _Gate, error: OSError) -> None:
    # Closing releases the lock all the same; the next acquisition reopens.
    logger.warning("unlocking %d failed with %s; closing it instead",
                   gate.fd, errno.errorcode.get(error.errno, error.errno))
    _drop(gate)


def _remove_unheld(path: str, gate: _Gate) -> bool:
    """Remove the lock file if no process holds it, and close ``gate.fd``;
    True if removed. The unlink happens while holding the lock, as every
    unlink of a lock file must: whoever waits on it then sees it gone and
    starts again. The lock is taken as any acquirer takes it, so on NFS
    the file is known to be linked at the server, not only in a cache."""
    try:
        if _acquire(gate, path, block=False):
            unlink_if_present(path)
            return True
    except OSError as error:
        logger.debug("not removing lock file %s: %s", path, error)
    finally:
        _drop(gate)
    return False


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
    return _remove_unheld(path, _Gate())


def retire_mutex_files() -> None:
    """Remove the lock files this process keeps open, of mutexes that no
    process holds, and close them. Runs at interpreter exit; a mutex used
    afterwards makes its file again."""
    with _gates_guard:
        for path, readers in list(_readers.items()):
            _retire_readers(path, readers)
        for path, gate in list(_gates.items()):
            _retire_gate(path, gate)


def kept_lock_files() -> int:
    """How many lock files this process keeps open between acquisitions."""
    shared = [gate for readers in list(_readers.values()) for gate in (readers.gate, readers.intent)]
    return sum(gate.fd >= 0 for gate in list(_gates.values()) + shared)


def reap_unheld_mutex_files(base_dir: PathArg) -> List[str]:
    """Remove the lock files in *base_dir* of mutexes nobody holds; return
    their paths. Safe at any time: a process that later locks a removed
    file sees it gone and makes a new one."""
    with os.scandir(base_dir) as entries:
        candidates = sorted(os.path.abspath(entry.path) for entry in entries
                            if entry.name.startswith(_MUTEX_PREFIX) and entry.is_file(follow_symlinks=False))
    return [path for path in candidates if remove_unheld_lock_file(path)]


def _forget_parent_gates() -> None:
    # The kept fds were closed by locks' own fork handler (they are in
    # _held_fds); another thread may have held the guard at fork time.
    global _gates_guard, _epoch
    _gates_guard = threading.Lock()
    _gates.clear()
    _readers.clear()
    _epoch += 1


# ----------------------------------------------------------- shared holders

class _Readers:
    """This process's shared holders of one lock file. Its threads share one
    shared flock on ``gate.fd``, a file description apart from the exclusive
    holders' gate, so the kernel excludes the two as it would two processes.
    ``entry`` lets one thread in at a time: it passes the writer-intent file
    (``intent``), and locks if it is the first. ``guard`` protects ``count``
    (threads inside), so leaving never waits behind an entering thread,
    which may be waiting for a writer that waits for us to leave."""

    __slots__ = ("gate", "intent", "entry", "guard", "count", "retired")

    def __init__(self) -> None:
        self.gate, self.intent = _Gate(), _Gate()
        self.entry, self.guard = threading.Lock(), threading.Lock()
        self.count = 0
        self.retired = False


# Lock-file path -> this process's shared holders; changed under _gates_guard.
_readers: Dict[str, _Readers] = {}


def _enter_shared(path: str, deadline: Optional[float]) -> _Readers:
    """Hold *path* shared for this thread (LockTimeout after *deadline*)."""
    while True:
        readers = _readers.get(path) or _readers_for(path)
        if deadline is None:
            readers.entry.acquire()
        elif not readers.entry.acquire(timeout=min(max(deadline - time.monotonic(), 0), threading.TIMEOUT_MAX)):
            raise LockTimeout(f"timed out waiting for {path}")
        if not readers.retired:
            break
        readers.entry.release()
    try:
        _pass_intent(readers.intent, path + INTENT_SUFFIX, deadline)
        with readers.guard:
            if readers.count:
                readers.count += 1  # our shared lock is held already
                return readers
        gate = readers.gate  # count is 0: nobody else touches gate.fd
        locked = False
        if gate.network is False and gate.fd >= 0:
            try:  # the common case first: a local file nobody holds exclusively
                fcntl.flock(gate.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                locked = _still_linked(gate, path)
            except OSError:
                pass  # the careful way below says what is wrong
        if not locked:
            _acquire(gate, path, deadline, shared=True)
        readers.count = 1
        return readers
    finally:
        readers.entry.release()


def _readers_for(path: str) -> _Readers:
    with _gates_guard:
        readers = _readers.get(path)
        if readers is None:
            readers = _readers[path] = _Readers()
            for old_path, old in list(_readers.items())[:max(len(_readers) - _KEEP_AT_MOST, 0)]:
                _retire_readers(old_path, old)
    return readers


def _pass_intent(gate: _Gate, path: str, deadline: Optional[float]) -> None:
    """Wait while a writer waits (holds the intent file at *path*), then go on."""
    if gate.network is False:
        # A local file, the common case: a non-blocking lock, and one fstat
        # to know it is still linked (lock files are never renamed).
        try:
            fcntl.flock(gate.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            pass  # a writer waits, or the fd is gone: the careful way below
        else:
            linked = os.fstat(gate.fd).st_nlink
            fcntl.flock(gate.fd, fcntl.LOCK_UN)
            if linked:
                return
    _acquire(gate, path, deadline, shared=True)
    _unlock(gate)


def _leave_shared(readers: _Readers) -> None:
    with readers.guard:
        readers.count -= 1
        if not readers.count:
            _unlock(readers.gate)


def _retire_readers(path: str, readers: _Readers) -> None:
    """Retire idle *readers* (guard held), removing their files if unheld."""
    if readers.count or not readers.entry.acquire(blocking=False):
        return
    try:
        if readers.count:
            return
        del _readers[path]
        readers.retired = True
        for gate, gate_path in ((readers.gate, path), (readers.intent, path + INTENT_SUFFIX)):
            if gate.fd >= 0:
                _remove_unheld(gate_path, gate)
    finally:
        readers.entry.release()


# ------------------------------------------------------------- the mutex

def _mutex_path(base_dir: PathArg, mutex: object) -> str:
    """The lock file's canonical path (the gate's key); ValueError for a bad
    *mutex*, TypeError for a bad *base_dir*."""
    if type(mutex) is str and type(base_dir) is str and base_dir.startswith("/"):
        return _checked_absolute_path(base_dir, mutex)  # the common case: cached
    check_name(mutex)
    directory = os.fspath(base_dir)
    if not isinstance(directory, str):
        raise TypeError(f"base_dir must be a str or os.PathLike[str], not {type(directory).__name__}")
    if directory.startswith("/"):
        return _checked_absolute_path(directory, mutex)
    # Relative to the current directory, which may change: not cached.
    return os.path.abspath(os.path.join(directory, _MUTEX_PREFIX + mutex))


# abspath and the name check cost microseconds on old Pythons, a cache hit a
# tenth of one. A bad name raises, and exceptions are not cached.
@functools.lru_cache(maxsize=256)
def _checked_absolute_path(base_dir: str, mutex: str) -> str:
    check_name(mutex)
    return os.path.normpath(os.path.join(base_dir, _MUTEX_PREFIX + mutex))


def _clearer_error(error: BaseException, path: str) -> Optional[OSError]:
    """The error to raise instead of *error*, met while opening lock file
    *path*. A missing or non-directory base directory is also the
    RuntimeError Toil raises there (see :mod:`.errors`)."""
    from .errors import MissingDirectoryError, NotADirectoryRuntimeError

    if isinstance(error, FileNotFoundError):
        return MissingDirectoryError(errno.ENOENT, "mutex base directory does not exist", os.path.dirname(path))
    if isinstance(error, NotADirectoryError):
        return NotADirectoryRuntimeError(errno.ENOTDIR, "mutex base directory is not a directory",
                                         os.path.dirname(path))
    if isinstance(error, OSError) and error.errno == errno.ELOOP and os.path.islink(path):
        return OSError(errno.ELOOP, "mutex lock file is a symbolic link, which is never followed", path)
    return None


def _record_holder(gate: _Gate, purpose: Optional[str]) -> None:
    """Say who holds the lock, in its file: one system call."""
    write_record(gate.fd, purpose, sync=bool(gate.network))


def _naming_holder(error: LockTimeout, fd: int) -> LockTimeout:
    """*error*, saying who holds the lock where its file's record and
    /proc/locks allow (see holder.confirm)."""
    try:
        table = lock_table()
        holder = confirm(read_record(fd), table.holders.get(table.key(os.fstat(fd)), []))
    except OSError:
        holder = None
    return error if holder is None else LockTimeout(f"{error}; held by {describe(holder)}")


class global_mutex:  # noqa: N801 - a context manager named like Toil's function
    """Context manager holding the mutex *mutex* scoped to *base_dir*.

    Excludes every process that shares *base_dir* (across containers too),
    every other thread of this process, and processes of other nodes where
    the filesystem's ``lock_scope`` is "cluster" (NFS with default mount
    options included). A holder that dies releases it. The lock file
    ``base_dir/toil-mutex-<mutex>`` may stay while any process that used the
    mutex lives; a process removes it at exit when nobody holds it, and
    ``python -m toilcoord cleanup`` removes any left by killed processes.
    With *timeout* (seconds) the wait raises :class:`LockTimeout`. Not
    reentrant: a thread that enters the same mutex twice waits for itself.

    With ``shared=True`` it is the reader side of a reader-writer lock:
    any number of shared holders (threads and processes) at once, or one
    exclusive holder (``shared=False``, the writer). A writer that waits
    keeps new shared holders out (they pass through the writer-intent file
    ``base_dir/toil-mutex-<mutex>.writer-intent``), so a stream of readers
    never starves it.
    A bad *mutex* raises ValueError here, before anything is touched; a
    missing *base_dir* raises FileNotFoundError on entry.

    Each holder records who it is in the lock file (pid, host, command,
    since when, and *purpose*: printable text of at most 200 UTF-8 bytes,
    else TypeError or ValueError here), which ``python -m toilcoord
    status`` and the message of a :class:`LockTimeout` show.
    """

    __slots__ = ("path", "timeout", "purpose", "shared", "_gate", "_readers", "_epoch")

    def __init__(self, base_dir: PathArg, mutex: str, timeout: Optional[float] = None, *,
                 purpose: Optional[str] = None, shared: bool = False) -> None:
        self.path = _mutex_path(base_dir, mutex)  # checks the name before anything else
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be None or a number >= 0, not {timeout!r}")
        self.timeout = timeout
        self.purpose = purpose if purpose is None else check_purpose(purpose)
        self.shared = bool(shared)
        self._gate: Optional[_Gate] = None
        self._readers: Optional[_Readers] = None
        self._epoch = -1

    def __enter__(self) -> None:
        timeout = self.timeout
        if self.shared:
            self._enter_shared()
            return
        if timeout is None:
            deadline = None
            gate = _gates.get(self.path)  # the common case, inline: a kept file
            if gate is None or not gate.lock.acquire() or gate.retired:
                if gate is not None:
                    gate.lock.release()
                gate = _hold_gate(self.path)
        else:
            deadline = time.monotonic() + timeout
            gate = _hold_gate(self.path, timeout)
        try:
            if gate.waited and gate.network:
                _let_others_in(gate, deadline)
            _acquire(gate, self.path, deadline)
        except LockTimeout as error:
            named = _naming_holder(error, gate.fd)  # while the gate, and so its fd, is ours
            gate.lock.release()
            raise named from None
        except BaseException as error:
            gate.lock.release()
            clearer = _clearer_error(error, self.path)
            if clearer is not None:
                raise clearer from None
            raise
        _record_holder(gate, self.purpose)
        self._gate, self._epoch = gate, _epoch

    def _enter_shared(self) -> None:
        try:
            readers = _enter_shared(self.path, None if self.timeout is None else time.monotonic() + self.timeout)
        except BaseException as error:
            clearer = _clearer_error(error, self.path)
            if clearer is not None:
                raise clearer from None
            raise
        self._readers, self._epoch = readers, _epoch

    def __exit__(self, *exc_info: object) -> None:
        readers, self._readers = self._readers, None
        if readers is not None:
            if self._epoch == _epoch:
                _leave_shared(readers)
            return
        gate, self._gate = self._gate, None
        if gate is None or self._epoch != _epoch:
            return  # entered in the parent of this forked child: not ours
        try:
            try:
                fcntl.flock(gate.fd, fcntl.LOCK_UN)
            except OSError as error:
                _unlock_failed(gate, error)
            if gate.network:
                gate.released = time.monotonic()
        finally:
            gate.lock.release()


os.register_at_fork(after_in_child=_forget_parent_gates)
atexit.register(retire_mutex_files)
