"""Deferred functions: cleanup that still runs when its process is SIGKILLed.

A worker registers cleanup with :class:`DeferredFunctionManager`; each
function is written, framed and checksummed, to the worker's own state file
before ``defer`` returns. The file is held locked for as long as the worker
lives (:class:`~.heldfiles.HeldFile`), so when the worker dies without running
its functions, whichever process next opens or closes a manager on the same
directory (or ``cleanupWorker``) sees the lock free, takes the file over and
runs them.

Guarantees, precisely:

* At most once for finished work: after a function returns (or raises), a
  one-byte "done" mark is written over its record before the next one
  starts, so neither a crash of the owner nor of an orphan-runner ever runs
  it again.
* At least once for everything else: a function that has not finished
  (not started, or interrupted mid-run by the death of the process running
  it) runs later, once its file is taken over; only an interrupted one can
  therefore run twice.

The records live in the kernel (written with ``os.write``) when ``defer``
returns, which is all that SIGKILL-safety needs; nothing is fsynced, so
after a power loss the newest records may be missing or torn (a torn record
is skipped with an error log, never a crash).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import weakref
from typing import Any, Callable, Iterator, Optional, Tuple

from .deferred_records import (
    HEADER_SIZE,
    MAGIC,
    DeferredFunction,
    call_fields,
    frame,
    load_codec,
    run_file,
    starts_with_a_record,
)
from .heldfiles import HeldFile, discard_taken, release_taken, take_over
from .locks import PathArg
from .pickler import short_repr

__all__ = ["DeferredFunction", "DeferredFunctionManager"]

logger = logging.getLogger(__name__)

# ------------------------------------------------------ state files

_STATE_DIR_MODE = 0o700
_STATE_FILE_MODE = 0o600
# A concurrent cleanupWorker removes the (empty) state directory at most
# once between our mkdir and our create, so a few attempts are plenty.
_CREATE_ATTEMPTS = 100
#: What a create or open in a directory another process just removed raises:
#: ENOENT, or on NFS, where the directory's handle is stale, ESTALE.
_REMOVED_MEANWHILE = (errno.ENOENT, errno.ESTALE)

_reported_untrusted: set = set()
_reported_foreign: set = set()

# Names of the state files this process holds: its managers' own, and the
# dead processes' files it is running. Scans skip them: where flock is
# emulated with per-process POSIX locks (NFS), this process could otherwise
# "take over" its own files.
_held_here: set = set()


def _make_state_dir(path: str) -> Optional[int]:
    """Create the state directory mode 0700, or check the existing one (see
    _open_state_dir), taking away read and search bits of others; return
    an fd of it (the caller closes it), to make files in relative to it.

    Returns None if it vanished meanwhile (the caller retries)."""
    try:
        os.mkdir(path, _STATE_DIR_MODE)
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT, "the base directory for deferred functions does not exist", os.path.dirname(path)
        ) from None
    try:
        fd = _open_state_dir(path)
    except FileNotFoundError:
        return None
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode != _STATE_DIR_MODE:  # on the opened directory: nobody can swap it meanwhile
            logger.info("making deferred-function directory %s mode 0700 (it was %o)", path, mode)
            os.fchmod(fd, _STATE_DIR_MODE)
    except OSError as error:
        os.close(fd)
        if error.errno != errno.ESTALE:
            raise
        return None  # removed meanwhile (NFS): the caller makes it again
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_state_dir(path: str) -> int:
    """An fd on the state directory: a real directory (never a symlink) of
    this user that nobody else can write, or PermissionError; everything
    in it is then opened relative to this fd. FileNotFoundError if missing
    (or removed meanwhile: on NFS, a stale handle)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise PermissionError(
                errno.EPERM, "refusing to use a deferred-function directory that is not a directory (a symlink?)", path
            ) from None
        if error.errno == errno.ESTALE:
            raise FileNotFoundError(errno.ENOENT, "removed meanwhile (a stale NFS file handle)", path) from None
        raise
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        os.close(fd)
        raise PermissionError(
            errno.EPERM,
            f"refusing to use a deferred-function directory owned by uid "
            f"{info.st_uid} with mode {stat.S_IMODE(info.st_mode):o}: it must belong to this "
            f"user (uid {os.geteuid()}) and be writable by nobody else",
            path,
        )
    return fd


def _open_for_writing(path: str, locked_fd: int, dir_fd: Optional[int] = None) -> int:
    """Open the file we hold locked through *locked_fd* for writing too."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        written, locked = os.fstat(fd), os.fstat(locked_fd)
    except BaseException:  # ESTALE on NFS: removed meanwhile
        os.close(fd)
        raise
    if (written.st_dev, written.st_ino) != (locked.st_dev, locked.st_ino):
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "state file was replaced while being opened", path)
    return fd


def _trusted(fd: int, path: str) -> bool:
    """True if the file may be unpickled: a regular file of this user that
    nobody else can write, with no other link (a hard link to someone's
    file is not theirs to run). Refusals are logged once per file."""
    info = os.fstat(fd)
    if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o022 and info.st_nlink == 1:
        return True
    if (info.st_dev, info.st_ino) not in _reported_untrusted:
        _reported_untrusted.add((info.st_dev, info.st_ino))
        logger.error(
            "refusing to read deferred functions from %s: it is owned by uid %d with mode %o and "
            "%d links, but only files of this user (uid %d) that nobody else can write, with one "
            "link, are read; leaving it alone",
            path,
            info.st_uid,
            stat.S_IMODE(info.st_mode),
            info.st_nlink,
            os.geteuid(),
        )
    return False


def _begins_like_ours(dir_fd: int, name: str) -> bool:
    """Whether the file *name* could be one of our state files: empty, or
    beginning with (part of) a record's magic. Toil's (dill pickles) do not;
    they are never locked, read further, run or removed here."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        head = os.pread(fd, len(MAGIC), 0)
    except OSError:
        return False
    finally:
        os.close(fd)
    return MAGIC.startswith(head)


def _run_orphan(dir_fd: int, name: str, where: str) -> None:
    """Run the pending functions in the state file *name* (in the directory
    *dir_fd*, at *where*) if its owner is dead, then remove it."""
    try:
        fd = take_over(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return  # another process got there first
    except OSError as error:
        logger.error("cannot take over deferred-function file %s: %s; leaving it", where, error)
        return
    if fd is None:
        return  # its owner lives
    _held_here.add(name)
    try:
        _run_and_release(fd, name, dir_fd, where)
    finally:
        _held_here.discard(name)


def _run_and_release(fd: int, name: str, dir_fd: int, where: str) -> None:
    try:
        finished = _run_taken(fd, name, dir_fd, where)
    except OSError as error:
        logger.error("cannot run the deferred functions in %s: %s; leaving it for another process", where, error)
        finished = False
    except BaseException:
        release_taken(fd)  # the rest stays for the next process
        raise
    if finished:
        discard_taken(fd, name, dir_fd)
    else:
        release_taken(fd)


def _run_taken(fd: int, name: str, dir_fd: int, where: str) -> bool:
    """Run a taken-over file; True if it is done with and ours to remove.
    A file that does not begin with a record is not ours: it is left alone,
    unread past its first bytes, and reported once."""
    if not _trusted(fd, where):
        return False
    load_codec()
    if not starts_with_a_record(os.pread(fd, HEADER_SIZE, 0)):
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) not in _reported_foreign:
            _reported_foreign.add((info.st_dev, info.st_ino))
            logger.error(
                "deferred-function file %s does not begin with a record (not toilcoord's: Toil's, "
                "or damaged); leaving it",
                where,
            )
        return False
    write_fd = _open_for_writing(name, fd, dir_fd)
    try:
        ours = run_file(fd, write_fd, where)
    finally:
        os.close(write_fd)
    if not ours:
        logger.error("deferred-function file %s does not begin with a record; leaving it", where)
    return ours


def _remove_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError as error:
        if error.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
            raise
        if error.errno != errno.ENOENT:
            logger.debug("deferred-function directory %s is still in use; leaving it", path)


def _state_dir_of(stateDirBase: PathArg, stem: str) -> str:
    base = os.fspath(stateDirBase) if isinstance(stateDirBase, (str, os.PathLike)) else None
    if not isinstance(base, str):
        raise TypeError(f"stateDirBase must be a str or an os.PathLike of str, not {short_repr(stateDirBase)}")
    return os.path.join(base, stem)


def _new_state_file(state_dir: str, prefix: str) -> Tuple[HeldFile, int]:
    """A new state file in *state_dir*, locked, and an fd writing to it.
    The directory is made again if a cleanupWorker removed it meanwhile."""
    for _ in range(_CREATE_ATTEMPTS):
        dir_fd = _make_state_dir(state_dir)
        if dir_fd is None:
            continue
        try:
            held = HeldFile.create(state_dir, prefix=prefix, mode=_STATE_FILE_MODE, dir_fd=dir_fd)
        except OSError as error:
            if error.errno not in _REMOVED_MEANWHILE:
                raise
            continue  # removed by a cleanupWorker while empty (on NFS, a stale handle): make it again
        finally:
            os.close(dir_fd)  # the held file keeps a copy
        try:
            os.fchmod(held.fd, _STATE_FILE_MODE)  # whatever the umask: orphan-runners must write the marks
            write_fd = _open_for_writing(held.name, held.fd, held.dir_fd)
        except OSError as error:
            held.release()
            if error.errno not in _REMOVED_MEANWHILE:
                raise
            continue  # removed meanwhile (on NFS, a stale handle): make another
        except BaseException:
            held.release()
            raise
        _held_here.add(held.name)
        return held, write_fd
    raise RuntimeError(f"could not create a state file in {state_dir}: the directory keeps disappearing")


def _write_rest(fd: int, record: bytes, written: int, path: str) -> None:
    """Finish a short write of *record* to *fd* (a signal, a full disk), or
    cut the torn record off so the file ends on a whole record."""
    try:
        while written < len(record):
            count = os.write(fd, record[written:])
            if count == 0:
                raise OSError(errno.EIO, "write made no progress", path)
            written += count
    except BaseException:
        start = os.lseek(fd, 0, os.SEEK_CUR) - written
        os.ftruncate(fd, start)
        os.lseek(fd, start, os.SEEK_SET)
        raise


def _run_orphans_in(state_dir: str, manager: "type[DeferredFunctionManager]") -> None:
    """Run dead owners' files (named as *manager*'s class says), everything
    relative to the state directory opened once and checked (a swapped-in
    symlink cannot redirect us)."""
    try:
        dir_fd = _open_state_dir(state_dir)
    except FileNotFoundError:
        return
    own, older = manager.OWN_PREFIX + manager.PREFIX, manager.PREFIX
    try:
        with os.scandir(dir_fd) as entries:
            names = [
                entry.name
                for entry in entries
                if entry.name.startswith((own, older))
                and not entry.name.endswith(manager.WIP_SUFFIX)
                and entry.name not in _held_here
                and entry.is_file(follow_symlinks=False)
            ]
        for name in names:
            # A func* name is Toil's, unless an older toilcoord wrote it.
            if name.startswith(own) or _begins_like_ours(dir_fd, name):
                _run_orphan(dir_fd, name, os.path.join(state_dir, name))
    finally:
        os.close(dir_fd)


# -------------------------------------------------------------- manager

# Managers of this process: a forked child disowns them (see _disown).
_managers: "weakref.WeakSet[DeferredFunctionManager]" = weakref.WeakSet()


class DeferredFunctionManager:
    """Runs a worker's deferred functions, and those of dead workers.

    Each manager holds its own state file,
    ``<stateDirBase>/deferred/toilcoord-func<16 hex digits>``, locked for as
    long as this process lives. Toil's workers keep theirs (dill pickles) in
    the same directory as ``func<8 characters>``: each implementation reads
    only its own, so Toil's scanner never meets ours (its names start with
    ``func``), and ours opens a ``func*`` file only to see whether it is an
    older toilcoord's (it begins with a record, or is empty), leaving
    anything else alone, unlocked and unread. Use it as a context manager
    (or call :meth:`close`) and register cleanup inside :meth:`open`::

        with DeferredFunctionManager(work_dir) as manager:
            with manager.open() as defer:
                defer(shutil.rmtree, scratch)
                run_job()
            # scratch is removed here, or by another worker if we are killed

    A forked child never owns or runs its parent's functions: there the
    manager is inert and using it raises RuntimeError.
    """

    STATE_DIR_STEM = "deferred"
    PREFIX = "func"
    #: Put before PREFIX in the names of our state files, so that Toil's
    #: scanner (which reads every ``func*`` file) never sees them.
    OWN_PREFIX = "toilcoord-"
    #: Names ending with this are never read as state files (reserved for
    #: files being set up; toilcoord itself needs none, since a new state
    #: file is locked and then verified, see HeldFile.create).
    WIP_SUFFIX = ".tmp"

    def __init__(self, stateDirBase: PathArg) -> None:
        self._closed = True  # until constructed, for __del__
        self._inert = False
        self._open = False
        load_codec()
        self.stateDir = _state_dir_of(stateDirBase, self.STATE_DIR_STEM)
        self._file, self._write_fd = _new_state_file(self.stateDir, self.OWN_PREFIX + self.PREFIX)
        self._closed = False
        _managers.add(self)

    @property
    def stateFileName(self) -> str:
        """Path of this manager's state file."""
        return self._file.path

    @contextlib.contextmanager
    def open(self) -> Iterator[Callable[..., None]]:
        """Context manager for one job: runs dead processes' functions, then
        yields ``defer``; on exit runs this job's functions in the order
        they were registered, then dead processes' functions again.

        ``defer(function, *args, **kwargs)`` or ``defer(DeferredFunction)``
        records a call in the state file before returning; it raises
        TypeError at once for what cannot be serialised and RuntimeError
        when called outside this block. A function that fails is logged
        and the rest still run. Not reentrant; ``open()`` and ``close()``
        belong to one thread.
        """
        self._check_usable("open()")
        if self._open:
            raise RuntimeError("open() is already active on this DeferredFunctionManager; it cannot be nested")
        self._keep_state_file()
        self._run_orphans()
        self._open = True
        try:
            yield self._defer
        finally:
            self._open = False
            if not self._inert:  # a forked child leaving the block runs nothing of its parent's
                self._run_own()
                self._run_orphans()

    def _defer(self, function: Any, /, *args: Any, **kwargs: Any) -> None:
        """``defer(function, *args, **kwargs)`` or ``defer(DeferredFunction)``:
        the call is in the state file when this returns. May be called from
        several threads of this process."""
        if not self._open:
            raise self._unusable_error("defer()")
        if isinstance(function, DeferredFunction):
            if args or kwargs:
                raise TypeError("defer(DeferredFunction) takes no further arguments: they were captured by create()")
            fields = tuple(function)
        else:
            fields = call_fields(function, args, kwargs)
        record = frame(fields)
        written = os.write(self._write_fd, record)
        if written != len(record):
            _write_rest(self._write_fd, record, written, self._file.path)

    def _check_usable(self, what: str) -> None:
        if self._inert or self._closed:
            raise self._unusable_error(what)

    def _unusable_error(self, what: str) -> RuntimeError:
        if self._inert:
            return RuntimeError(
                f"{what}: this DeferredFunctionManager belongs to the parent of this forked "
                "process; create a new one here"
            )
        if self._closed:
            return RuntimeError(f"{what}: this DeferredFunctionManager is closed")
        return RuntimeError(
            f"{what} was called outside DeferredFunctionManager.open(); "
            "register deferred functions inside the with block"
        )

    def _keep_state_file(self) -> None:
        """Make a new state file if ours was removed from under us (say, by
        deleting the directory): functions in an unlinked file would be
        lost with us."""
        if self._file.is_linked():
            return
        logger.warning("deferred-function state file %s was removed by someone else; making a new one", self._file.path)
        self._run_own()
        old_file, old_fd = self._file, self._write_fd
        self._file, self._write_fd = _new_state_file(self.stateDir, self.OWN_PREFIX + self.PREFIX)
        os.close(old_fd)
        _held_here.discard(old_file.name)
        old_file.release(unlink=False)

    def _run_own(self) -> None:
        run_file(self._file.fd, self._write_fd, self._file.path)
        os.ftruncate(self._write_fd, 0)
        os.lseek(self._write_fd, 0, os.SEEK_SET)

    def _run_orphans(self) -> None:
        _run_orphans_in(self.stateDir, type(self))

    def close(self) -> None:
        """Run what is left of this manager's functions and dead processes',
        then remove the state file and release it. Idempotent; raises
        RuntimeError inside :meth:`open`."""
        if self._closed:
            return
        if self._open:
            raise RuntimeError("close() was called inside open(); leave the with block first")
        self._closed = True
        _managers.discard(self)
        if self._inert:
            return
        try:
            self._run_own()
            self._run_orphans()
        finally:
            self._release()

    def _release(self) -> None:
        # Records still pending (their run was interrupted) stay on disk for
        # the next process, exactly as if this one had died.
        pending = os.fstat(self._file.fd).st_size > 0
        os.close(self._write_fd)
        self._write_fd = -1
        if pending:
            logger.warning("leaving unfinished deferred functions in %s for the next process", self._file.path)
        _held_here.discard(self._file.name)
        self._file.release(unlink=not pending)

    def _disown(self) -> None:
        """In a forked child: forget the parent's state (HeldFile already
        closed its locked fd)."""
        self._inert = True
        self._open = False
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1

    def __enter__(self) -> "DeferredFunctionManager":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Fallback only: never runs user code; a pending file is left as an
        # orphan for the next process.
        if self._closed or self._inert:
            return
        self._closed = True
        self._release()

    @classmethod
    def cleanupWorker(cls, stateDirBase: PathArg) -> None:
        """Run the functions of every dead process in *stateDirBase* and
        remove the state directory if nothing else is left in it.

        For a batch system's epilog. Safe while other workers still use the
        directory: live processes' files are never touched, and a worker
        creating its file while the directory goes away makes it again.
        """
        state_dir = _state_dir_of(stateDirBase, cls.STATE_DIR_STEM)
        _run_orphans_in(state_dir, cls)
        _remove_if_empty(state_dir)


def _disown_after_fork() -> None:
    for manager in list(_managers):
        manager._disown()
    _managers.clear()
    _held_here.clear()


os.register_at_fork(after_in_child=_disown_after_fork)
