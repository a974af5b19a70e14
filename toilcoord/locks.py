"""flock-based locks that dead holders release, on local and network filesystems.

Everything in toilcoord that proves liveness or excludes other processes
stands on three ideas kept in this module:

* a lock is an exclusive ``flock`` on a file open for writing (NFSv4 grants
  exclusive locks only on such files), so the kernel drops it when the
  holder dies, however it dies;
* after locking, the holder checks that the file it locked is still the one
  linked at the path (:func:`locked_file_is`), so a file may be unlinked
  while locked and nobody ever holds a stale copy. On network filesystems
  the check never trusts a cached name (see :mod:`.mounts`);
* a forked child never keeps a lock of its parent's: the fds are closed in
  the child (``os.register_at_fork``), so a parent that dies is seen dead even
  while its children live.

The file held locked for as long as its process lives, built on these, is
in :mod:`.heldfiles`; the lock files a mutex keeps open are in :mod:`.gates`.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import threading
import time
from typing import Dict, List, Optional, Union

from .files import unlink_if_present
from .mounts import FilesystemInfo, filesystem_info

__all__ = [
    "FilesystemInfo",
    "ForeignFileError",
    "LockTimeout",
    "UnsafeFilesystemError",
    "check_name",
    "ensure_filesystem_lockable",
    "filesystem_info",
    "fork_epoch",
    "held_exclusively",
    "locked_file_is",
    "safe_lock",
    "safe_unlock_and_close",
]

logger = logging.getLogger(__name__)

PathArg = Union[str, "os.PathLike[str]"]


class LockTimeout(TimeoutError):
    """A lock was not acquired within its timeout."""


class UnsafeFilesystemError(RuntimeError):
    """The filesystem's locks are known to hang or to be unreliable."""


class ForeignFileError(PermissionError):
    """A file where toilcoord keeps one of its own is not this user's (or
    is not a plain file of one link): it is never used, nor removed."""


# ---------------------------------------------------------------- flock

# EIO and ENOLCK come from network filesystems whose lock service is
# briefly (EIO) or permanently (ENOLCK: no lockd) unavailable.
_RETRYABLE = frozenset((errno.EIO, errno.ENOLCK))
_RETRIES = 10
_FIRST_BACKOFF = 1.0
_MAX_BACKOFF = 60.0
_ADVICE = {
    errno.ENOLCK: "the filesystem has no working lock daemon; point the "
    "coordination directory at local storage (for example $TMPDIR on the node)",
    errno.EIO: "the filesystem's lock service keeps failing; check the mount, "
    "or point the coordination directory at local storage",
}


def safe_lock(fd: int, block: bool = True, shared: bool = False) -> None:
    """``flock`` *fd*, retrying EIO and ENOLCK with exponential backoff.

    Retries start after 1 s, double, are capped at 60 s and stop after 10;
    each is logged, and the last error is re-raised with advice logged. A
    non-blocking lock that is not available raises OSError with EAGAIN or
    EACCES at once.
    """
    operation = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if block else fcntl.LOCK_NB)
    try:
        fcntl.flock(fd, operation)
    except OSError as error:
        if error.errno not in _RETRYABLE:
            raise
        _retry_flock(fd, operation, error)


def _retry_flock(fd: int, operation: int, error: OSError) -> None:
    delay = _FIRST_BACKOFF
    for attempt in range(1, _RETRIES + 1):
        logger.warning(
            "flock(%d) failed with %s; retry %d of %d in %g s",
            fd,
            errno.errorcode.get(error.errno, error.errno),
            attempt,
            _RETRIES,
            delay,
        )
        time.sleep(delay)
        delay = min(delay * 2, _MAX_BACKOFF)
        try:
            fcntl.flock(fd, operation)
            return
        except OSError as again:
            if again.errno not in _RETRYABLE:
                raise
            error = again
    logger.error(
        "flock(%d) still fails with %s after %d retries: %s",
        fd,
        errno.errorcode.get(error.errno, error.errno),
        _RETRIES,
        _ADVICE[error.errno],
    )
    raise error


def safe_unlock_and_close(fd: int) -> None:
    """Unlock and close *fd*; EIO/ENOLCK on unlock are logged and swallowed,
    and so is ESTALE (the file is gone from the NFS server, and its lock with it).

    The fd is always closed. (Closing alone would release the lock too,
    unless a forked child shares the open file description.)
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError as error:
        if error.errno == errno.ESTALE:
            logger.debug("fd %d is stale (removed on the NFS server); closing it", fd)
        elif error.errno in _RETRYABLE:
            logger.warning(
                "unlocking fd %d failed with %s; closing it anyway", fd, errno.errorcode.get(error.errno, error.errno)
            )
        else:
            raise
    finally:
        os.close(fd)


def locked_file_is(fd: int, path: PathArg, dir_fd: Optional[int] = None) -> bool:
    """True iff the open *fd* is the file now linked at *path* (relative to
    *dir_fd*, a directory fd, if given).

    A missing path, a path through a missing directory, a file whose last
    link is gone and a stale NFS handle (ESTALE) all give False. On NFS,
    call it after locking *fd*: taking a lock makes the client drop the
    file's cached attributes, so a file another node unlinked is seen with
    no links even where the name at *path* is still cached.
    """
    try:
        opened = os.fstat(fd)
        linked = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
            return False
        raise
    return opened.st_nlink > 0 and linked.st_ino == opened.st_ino and linked.st_dev == opened.st_dev


def held_exclusively(fd: int) -> bool:
    """Whether some process holds an exclusive lock on *fd*'s file, found
    with a shared probe that never waits and is dropped at once: owners
    lock exclusively, so another prober's brief shared lock never counts.
    OSError if the probe fails otherwise."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES):
            return True
        raise
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


# ------------------------------------------------- fork-aware held files

# Fds of locks this process holds or is waiting for. A forked child shares
# their open file descriptions, so it would keep the locks (and a dead parent
# "alive") for as long as it lives: the child closes them at once. An fd is
# tracked from the moment it is opened, because a lock that another thread
# of the parent gets *after* the fork still lands on the description the
# child shares. Closing in the child does not release the parent's lock;
# only the parent's own unlock or death does. Objects remember the fork
# epoch they were made in and become inert in a child, so they never act on
# an fd number the child has reused.
_held_fds: set = set()
_fork_epoch = 0


def fork_epoch() -> int:
    """A number that changes in every forked child: state stamped with it
    in a parent is recognisably inherited in the child."""
    return _fork_epoch


def _forget_parent_locks() -> None:
    global _fork_epoch
    for fd in _held_fds:
        try:
            os.close(fd)
        except OSError:
            pass  # already closed by the application after fork
    _held_fds.clear()
    _fork_epoch += 1


# Read-write: NFSv4 refuses an exclusive lock on a file not open for
# writing. Non-blocking: a FIFO planted at the path must not hang the open.
_OPEN_EXISTING = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_OPEN_OR_CREATE = _OPEN_EXISTING | os.O_CREAT
_CREATE_NEW = _OPEN_OR_CREATE | os.O_EXCL
_FILE_MODE = 0o600


def _open_tracked(path: str, flags: int, dir_fd: Optional[int] = None, owned: bool = False) -> int:
    """Open *path* (relative to *dir_fd* if given) and track the fd for
    forks; raise unless it is a regular file, and (if *owned*) one of this
    user's with a single link.

    On NFS a file removed by another client between the lookup and its use
    gives ESTALE: an open that may create the file tries again, one of an
    existing file raises FileNotFoundError (it is gone)."""
    for attempt in range(_STALE_RETRIES):
        try:
            fd = (
                _open_looking_again(path, flags, dir_fd) if attempt else os.open(path, flags, _FILE_MODE, dir_fd=dir_fd)
            )
        except OSError as error:
            _raise_unless_stale(error, path, flags)
            continue
        _held_fds.add(fd)
        try:
            info = os.fstat(fd)
        except OSError as error:
            _close_tracked(fd)
            _raise_unless_stale(error, path, flags)
            continue
        except BaseException:
            _close_tracked(fd)
            raise
        _check_opened(fd, info, path, owned)
        return fd
    raise OSError(errno.ESTALE, f"still a stale file handle after {_STALE_RETRIES} tries", path)


def _open_looking_again(path: str, flags: int, dir_fd: Optional[int]) -> int:
    """Open after a stale handle: the client still has the removed file's
    name cached. An exclusive create makes it look the name up at the
    server (and creates the file if the name is free); then the plain open
    finds what is there now."""
    try:
        return os.open(path, flags | os.O_EXCL, _FILE_MODE, dir_fd=dir_fd)
    except FileExistsError:
        return os.open(path, flags, _FILE_MODE, dir_fd=dir_fd)


_STALE_RETRIES = 10


def _raise_unless_stale(error: OSError, path: str, flags: int) -> None:
    if error.errno != errno.ESTALE:
        raise error
    if not flags & os.O_CREAT:
        raise FileNotFoundError(errno.ENOENT, "removed meanwhile (a stale NFS file handle)", path) from error


def _check_opened(fd: int, info: os.stat_result, path: str, owned: bool) -> None:
    """Close *fd* and raise unless it is a regular file (of this user with
    one link, if *owned*)."""
    if not stat.S_ISREG(info.st_mode):
        _close_tracked(fd)
        raise OSError(
            errno.EINVAL, "not a regular file, so never used as a lock file (something else was put at this path)", path
        )
    if owned and (info.st_uid != os.geteuid() or info.st_nlink > 1):
        _close_tracked(fd)
        raise ForeignFileError(
            errno.EPERM,
            f"a lock file owned by uid {info.st_uid} with {info.st_nlink} links, "
            f"not by this user (uid {os.geteuid()}) with one: never used; a coordination "
            "directory must belong to one user",
            path,
        )


def _own_directory_fd(directory: str, dir_fd: Optional[int]) -> int:
    """A tracked fd of *directory*: a copy of *dir_fd*, or opened now."""
    if dir_fd is None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        fd = os.dup(dir_fd)  # inheritable=False: close-on-exec, as ours all are
    _held_fds.add(fd)
    return fd


def _close_tracked(fd: int) -> None:
    _held_fds.discard(fd)  # before closing: the number may be reused at once
    os.close(fd)


def _create_if_free(name: str, dir_fd: int) -> Optional[int]:
    """Create *name* in *dir_fd* exclusively and return its tracked fd, or
    None if the name is taken. On NFS an exclusive create cannot trust a
    cached name, so the client looks the name up at the server: this is
    the one way to learn whether a file we hold is still linked there."""
    try:
        return _open_tracked(name, _CREATE_NEW, dir_fd)
    except FileExistsError:
        return None


_POLL_FIRST = 0.001
_POLL_MAX = 0.05


def _lock_until(fd: int, path: str, deadline: float, shared: bool = False) -> None:
    # flock has no timeout: poll with LOCK_NB and a growing sleep.
    delay = _POLL_FIRST
    while True:
        try:
            safe_lock(fd, block=False, shared=shared)
            return
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LockTimeout(f"timed out waiting for the lock on {path}")
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, _POLL_MAX)


# ------------------------------------------------------------------ names

_MAX_NAME_BYTES = 200


def check_name(name: object, what: str = "mutex name") -> str:
    """Return *name* if it is usable as one path component, else raise
    ValueError saying what is wrong with it."""
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a str, not {type(name).__name__}: {name!r}")
    if not name or name in (".", ".."):
        raise ValueError(f"{what} must be a non-empty file name other than . and ..: {name!r}")
    if "/" in name or "\0" in name:
        raise ValueError(f"{what} must not contain '/' or NUL: {name!r}")
    if len(name) > _MAX_NAME_BYTES or not name.isascii():  # only these pay for encoding
        try:
            size = len(os.fsencode(name))
        except UnicodeError:
            raise ValueError(f"{what} cannot be encoded for the filesystem: {name!r}") from None
        if size > _MAX_NAME_BYTES:
            raise ValueError(f"{what} is {size} bytes long; at most {_MAX_NAME_BYTES} are allowed: {name[:40]!r}...")
    return name


# ------------------------------------------------------- filesystem facts

_lockable_devices: Dict[int, FilesystemInfo] = {}


def ensure_filesystem_lockable(
    path: PathArg, timeout: float = 30, hint: Optional[str] = None, dir_fd: Optional[int] = None
) -> None:
    """Raise unless *path* is on a filesystem whose locks can be trusted.

    FileNotFoundError if *path* is missing; :class:`UnsafeFilesystemError`
    for filesystems whose locks are known to hang or be lost (CephFS, Lustre
    without flock), and for an unknown filesystem where a trial lock in
    *path* fails or takes longer than *timeout* seconds. *hint* is added to
    the error message. The answer is cached per device. *dir_fd*, an fd of
    the directory *path* the caller opened, is where the device is learnt
    and the trial lock made, if given.
    """
    device = os.stat(path).st_dev if dir_fd is None else os.fstat(dir_fd).st_dev
    info = _lockable_devices.get(device)
    if info is None:
        info = filesystem_info(path)
        if info.lock_scope == "unknown":
            failure = _trial_lock_failure(path, timeout, info.fstype, dir_fd)
            if failure is not None:  # cached too: a hung lock is not retried
                info = info._replace(lock_scope="unsafe", reason=failure)
        _lockable_devices[device] = info
    if info.lock_scope == "unsafe":
        raise UnsafeFilesystemError(_unsafe_message(path, info.reason, hint))


def _unsafe_message(path: PathArg, reason: str, hint: Optional[str]) -> str:
    message = f"{os.fspath(path)} cannot be used for locks: {reason}."
    return f"{message} {hint}" if hint else message


def _trial_lock_failure(path: PathArg, timeout: float, fstype: str, dir_fd: Optional[int]) -> Optional[str]:
    """Why a trial lock in *path* failed or hung, or None if it worked."""
    # A blocking flock cannot be interrupted, so it runs in a daemon thread
    # that we stop waiting for after *timeout*.
    outcome: List[BaseException] = []

    def trial() -> None:
        try:
            _lock_a_probe(path, dir_fd)
        except BaseException as error:  # reported to the waiting thread
            outcome.append(error)

    thread = threading.Thread(target=trial, name="toilcoord-lock-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return f"a trial lock on {fstype} did not finish within {timeout} s"
    if not outcome:
        return None
    error = outcome[0]
    if isinstance(error, OSError) and error.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
        return f"a trial lock on {fstype} failed: {error.strerror}"
    raise error


def _lock_a_probe(path: PathArg, dir_fd: Optional[int]) -> None:
    """Create a new, randomly named probe file in the directory *path* (or
    *dir_fd*, a directory fd, if given), lock it without waiting, then
    remove it and close it (closing drops the lock).

    Not a :class:`~.heldfiles.HeldFile`: that module is built on this one,
    which must not import it back; and nobody ever takes a probe over, so a
    fresh file of a random name that nobody else locks needs none of its
    checks. The probe works in its own copy of *dir_fd*: the caller closes
    its fd when a hung trial times out, and this thread may wake later.
    """
    name = ".toilcoord-lock-probe-" + os.urandom(8).hex()
    folder = _own_directory_fd(os.fspath(path), dir_fd)
    try:
        fd = _open_tracked(name, _CREATE_NEW, folder)
        try:
            safe_lock(fd, block=False)
        finally:
            try:
                unlink_if_present(name, folder)
            finally:
                _close_tracked(fd)
    finally:
        _close_tracked(folder)


os.register_at_fork(after_in_child=_forget_parent_locks)
