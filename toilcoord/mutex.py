"""``global_mutex``: a named mutex between processes, threads and nodes.

The lock is an exclusive ``flock`` on ``base_dir/toil-mutex-<name>``. Each
process keeps its lock file open between acquisitions, so an acquisition
costs a lock, an fstat (and a lookup of the name on a network filesystem),
the holder's record and an unlock, with no create or unlink (those cost
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
import os
import threading
import time
from typing import Dict, Optional

from . import gates
from .gates import (
    _KEEP_AT_MOST,
    _MUTEX_PREFIX,
    INTENT_SUFFIX,
    _acquire,
    _Gate,
    _gates,
    _hold_gate,
    _let_others_in,
    _linked_by_count,
    _remove_and_close,
    _still_linked,
    _unlock,
    _unlock_failed,
    kept_gate_files,
    reap_unheld_mutex_files,
    retire_gates,
)
from .holder import check_purpose, confirm, describe, lock_table, read_record, write_record
from .locks import LockTimeout, PathArg, check_name

__all__ = ["global_mutex", "reap_unheld_mutex_files", "retire_mutex_files"]


def retire_mutex_files() -> None:
    """Remove the lock files this process keeps open, of mutexes that no
    process holds, and close them. Runs at interpreter exit; a mutex used
    afterwards makes its file again."""
    with gates._gates_guard:
        for path, readers in list(_readers.items()):
            _retire_readers(path, readers)
        retire_gates()


def kept_lock_files() -> int:
    """How many lock files this process keeps open between acquisitions."""
    shared = [gate for readers in list(_readers.values()) for gate in (readers.gate, readers.intent)]
    return kept_gate_files() + sum(gate.fd >= 0 for gate in shared)


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


# Lock-file path -> this process's shared holders; changed under gates._gates_guard.
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
    with gates._gates_guard:
        readers = _readers.get(path)
        if readers is None:
            readers = _readers[path] = _Readers()
            for old_path, old in list(_readers.items())[: max(len(_readers) - _KEEP_AT_MOST, 0)]:
                _retire_readers(old_path, old)
    return readers


def _pass_intent(gate: _Gate, path: str, deadline: Optional[float]) -> None:
    """Wait while a writer waits (holds the intent file at *path*), then go on."""
    if gate.network is False:
        # A local file, the common case: a non-blocking lock, and one fstat
        # to know it is still the file at its name.
        try:
            fcntl.flock(gate.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            pass  # a writer waits, or the fd is gone: the careful way below
        else:
            linked = _linked_by_count(gate, os.fstat(gate.fd))
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
            _remove_and_close(gate_path, gate)
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
        return NotADirectoryRuntimeError(
            errno.ENOTDIR, "mutex base directory is not a directory", os.path.dirname(path)
        )
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

    def __init__(
        self,
        base_dir: PathArg,
        mutex: str,
        timeout: Optional[float] = None,
        *,
        purpose: Optional[str] = None,
        shared: bool = False,
    ) -> None:
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
        self._gate, self._epoch = gate, gates._epoch

    def _enter_shared(self) -> None:
        try:
            readers = _enter_shared(self.path, None if self.timeout is None else time.monotonic() + self.timeout)
        except BaseException as error:
            clearer = _clearer_error(error, self.path)
            if clearer is not None:
                raise clearer from None
            raise
        self._readers, self._epoch = readers, gates._epoch

    def __exit__(self, *exc_info: object) -> None:
        readers, self._readers = self._readers, None
        if readers is not None:
            if self._epoch == gates._epoch:
                _leave_shared(readers)
            return
        gate, self._gate = self._gate, None
        if gate is None or self._epoch != gates._epoch:
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


def _forget_parent_readers() -> None:
    _readers.clear()  # their fds were closed by locks' own fork handler


os.register_at_fork(after_in_child=_forget_parent_readers)
atexit.register(retire_mutex_files)
