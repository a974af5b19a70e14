"""What a batch system's epilog and a node health check run.

:func:`cleanup_findings` removes what dead processes left in a coordination
directory and says what it removed, what it left and why.
:func:`clean_directories` runs it for several directories at once, each in
a child process killed at a deadline (a hung NFS call cannot hold the
node), as the directory's owner when called by root (:func:`run_as_owner`:
root never reads a user's files, runs a user's deferred functions or
follows a user's symlinks with its own rights). :func:`check_directory` is
the health check: the directory is usable and a mutex can be taken there.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import stat
import sys
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence

from .folders import hold_folder, let_go
from .locks import held_exclusively
from .watchdog import Watched, describe_error, run_watched

__all__ = [
    "DirectoryReport",
    "Finding",
    "NotACoordinationDirectoryError",
    "check_directory",
    "clean_directories",
    "cleanup_directory",
    "cleanup_findings",
    "directory_owner",
    "run_as_owner",
    "summary_lines",
]

_PACKAGE = __name__.rpartition(".")[0]


class NotACoordinationDirectoryError(ValueError):
    """The path given can never be a coordination directory (empty, not a
    directory, on a pseudo filesystem such as /proc): a usage error."""


class Finding(NamedTuple):
    """One thing cleanup did or did not do.

    *action* is ``"removed"``, ``"left"`` or ``"failed"`` (could not be
    cleaned: the only action that makes cleanup exit 1); *kind* is
    ``"deferred"``, ``"process name"``, ``"arena"``, ``"mutex"`` or
    ``"file"``; *reason* is a category (``"dead"``, ``"live"``,
    ``"foreign"``, ``"error"``) and *detail* says it in words.
    """

    action: str
    kind: str
    name: str
    reason: str
    detail: str


# ------------------------------------------------------------ the cleanup


def cleanup_findings(directory: str) -> Iterator[Finding]:
    """Remove what dead processes left in *directory*, one finding at a time.

    Never touches a live process's files: every removal is of a file whose
    lock could be taken, and arenas are reaped under the arena's own mutex.
    Files of another user are never run or read: they are reported as left,
    ``"foreign"``. Safe while other processes use the directory, another
    cleanup included. A step that fails is reported as a ``"failed"``
    finding and the remaining steps still run; nothing is raised.

    *directory* is opened and checked once (see :mod:`.folders`); every
    step works relative to that open directory, kept open until the last.
    """
    try:
        folder = hold_folder(os.path.abspath(directory))
    except Exception as error:  # missing, refused: one failure, nothing done
        yield Finding("failed", "directory", "", "error", describe_error(error))
        return
    try:
        for step in (_deferred_step, _names_step, _arenas_step, _mutexes_step, _leftovers_step):
            try:
                yield from step(directory, folder.fd)
            except Exception as error:  # reported, and the next step still runs
                yield Finding("failed", step.__doc__ or "", "", "error", describe_error(error))
    finally:
        let_go(folder)


def cleanup_directory(directory: str) -> Iterator[str]:
    """The lines :func:`summary_lines` makes of :func:`cleanup_findings`."""
    return iter(summary_lines(list(cleanup_findings(directory))))


def _deferred_step(directory: str, dir_fd: int) -> Iterator[Finding]:
    """deferred"""
    from .deferred import DeferredFunctionManager

    stem = DeferredFunctionManager.STATE_DIR_STEM
    try:
        info = os.stat(stem, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    foreign = _foreign(info)
    if foreign:
        yield Finding("left", "deferred", stem, "foreign", foreign + ": its functions are never run here")
        return
    before = set(_probe_all(dir_fd, stem))
    errors: List[str] = []
    with _logged_errors(errors):
        DeferredFunctionManager.cleanupWorker(directory)
    left = _probe_all(dir_fd, stem)
    for name in sorted(before - set(left)):
        yield Finding("removed", "deferred", f"{stem}/{name}", "dead", "its owner was dead: its functions ran")
    for name, (reason, detail) in sorted(left.items()):
        where = f"{stem}/{name}"
        if reason == "dead" and name.startswith(DeferredFunctionManager.OWN_PREFIX):
            said = [message for message in errors if where in message]
            yield Finding("failed", "deferred", where, "error", said[-1] if said else detail)
        else:
            yield Finding("left", "deferred", where, reason, detail)


def _names_step(directory: str, dir_fd: int) -> Iterator[Finding]:
    """process name"""
    from .procnames import reap_dead_process_names

    for name in reap_dead_process_names(directory):
        yield Finding("removed", "process name", name, "dead", "its process was dead")


def _arenas_step(directory: str, dir_fd: int) -> Iterator[Finding]:
    """arena"""
    from .arena import reap_dead_arenas

    for arena, live in reap_dead_arenas(directory):
        if live:
            yield Finding("left", "arena", arena, "live", "live members remain")
        else:
            yield Finding("removed", "arena", arena, "dead", "no live members")


def _mutexes_step(directory: str, dir_fd: int) -> Iterator[Finding]:
    """mutex"""
    from .gates import reap_unheld_mutex_files

    for path in reap_unheld_mutex_files(directory):
        yield Finding("removed", "mutex", os.path.basename(path), "dead", "nobody held it")


def _leftovers_step(directory: str, dir_fd: int) -> Iterator[Finding]:
    """file"""
    from .deferred import DeferredFunctionManager

    for name, (reason, detail) in sorted(_probe_all(dir_fd, ".").items()):
        # Live arenas were said by their step (members hold them shared).
        if (
            reason in ("live", "foreign")
            and name != DeferredFunctionManager.STATE_DIR_STEM
            and not (reason == "live" and name.endswith("-arena-live"))
        ):
            yield Finding("left", _kind_of(name), name, reason, detail)


def _kind_of(name: str) -> str:
    if name.endswith("-arena-live"):
        return "arena"
    if name.startswith("toil-mutex-"):
        return "mutex"
    return "process name" if name.startswith("toil-proc-") else "file"


def _probe_all(dir_fd: int, directory: str) -> Dict[str, tuple]:
    """``{name: (reason, detail)}`` for each entry of *directory* (``"."``
    or a name, never a symlink, in *dir_fd*): "live" (a process holds an
    exclusive lock on it), "foreign" (another user's, or writable by
    others), else "dead". Read-only: each file is opened relative to the
    directory, never followed, never read. Empty if *directory* is gone
    (cleanupWorker removes the deferred directory when it empties it)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return {}
    try:
        return {name: _probe(fd, name) for name in os.listdir(fd)}
    finally:
        os.close(fd)


def _probe(dir_fd: int, name: str) -> tuple:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY, dir_fd=dir_fd)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "foreign", "a symlink: never followed"
        return "dead", f"cannot be opened: {error.strerror}"
    try:
        info = os.fstat(fd)
        foreign = _foreign(info)
        if not stat.S_ISREG(info.st_mode):
            return ("foreign", foreign) if foreign else ("dead", "not a regular file")
        state = "its owner is running" if held_exclusively(fd) else "its owner is dead"
        if foreign:
            return "foreign", f"{foreign}; {state}: skipped, never run or removed"
        return ("live", state) if state.endswith("running") else ("dead", state)
    finally:
        os.close(fd)  # drops the probe's own lock, if it got one


def _foreign(info: os.stat_result) -> Optional[str]:
    """Why a file of this stat is not this user's to act on, or None."""
    euid = os.geteuid()
    if info.st_uid != euid:
        return f"belongs to uid {info.st_uid}, not to this user (uid {euid})"
    if stat.S_ISREG(info.st_mode) and info.st_mode & 0o022:
        return f"writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
    return None


class _logged_errors:  # noqa: N801 - used as a context manager
    """Collect the package's ERROR log messages meanwhile (why a dead
    owner's file could not be run) into *sink*."""

    def __init__(self, sink: List[str]) -> None:
        self.handler = logging.Handler(logging.ERROR)
        self.handler.emit = lambda record: sink.append(record.getMessage())  # type: ignore[method-assign]

    def __enter__(self) -> None:
        logging.getLogger(_PACKAGE).addHandler(self.handler)

    def __exit__(self, *_: object) -> None:
        logging.getLogger(_PACKAGE).removeHandler(self.handler)


def summary_lines(findings: Sequence[Finding]) -> List[str]:
    """What an admin reads: one line per step, per arena, per kind of
    leftover and per failure (failures begin with ``could not clean``)."""

    def count(action: str, kind: str, reason: Optional[str] = None) -> int:
        return sum(f.action == action and f.kind == kind and reason in (None, f.reason) for f in findings)

    lines = []
    if any(f.kind == "deferred" for f in findings):
        line = (
            f"deferred functions: ran those of {count('removed', 'deferred')} dead processes; "
            f"{count('left', 'deferred', 'live')} live state files left"
        )
        foreign = count("left", "deferred", "foreign")
        lines.append(line + (f"; {foreign} skipped because foreign" if foreign else ""))
    lines.append(f"process names: removed {count('removed', 'process name')} of dead processes")
    for finding in findings:
        if finding.kind == "arena" and finding.action != "failed" and finding.reason != "foreign":
            lines.append(
                f"arena {finding.name}: "
                + ("live members remain" if finding.action == "left" else "no live members; removed")
            )
    lines.append(f"mutexes: removed {count('removed', 'mutex')} lock files left by dead holders")
    live = sum(
        f.action == "left" and f.reason == "live" and f.kind in ("process name", "mutex", "file") for f in findings
    )
    if live:
        lines.append(f"left {live} files held by live processes")
    for finding in findings:
        if finding.action == "left" and finding.reason == "foreign":
            lines.append(f"skipped {finding.name}: {finding.detail}")
    lines.extend(
        f"could not clean {f.kind} {f.name}: {f.detail}".replace("  ", " ") for f in findings if f.action == "failed"
    )
    return lines


# ------------------------------------------------- many directories, watched


class DirectoryReport(NamedTuple):
    """What :func:`clean_directories` did in one directory. *status* is 0
    (cleaned, or nothing to do), 1 (something could not be cleaned, or the
    deadline passed) or 2 (not a coordination directory); *note* is the
    one line said instead of findings (missing, refused, timed out)."""

    directory: str
    status: int
    findings: List[Finding]
    note: str


# Pseudo filesystems: never anyone's coordination directory.
_PSEUDO = frozenset(
    (
        "proc",
        "sysfs",
        "devtmpfs",
        "devpts",
        "cgroup",
        "cgroup2",
        "debugfs",
        "tracefs",
        "securityfs",
        "pstore",
        "bpf",
        "configfs",
        "fusectl",
        "mqueue",
        "binfmt_misc",
        "autofs",
    )
)


def clean_directories(directories: Sequence[str], timeout: float, user: Optional[str] = None) -> List[DirectoryReport]:
    """Clean each directory in a child process of its own, all at once;
    children still running after *timeout* seconds are killed with their
    process group (and abandoned if stuck in the kernel: a hung NFS call
    cannot hold the caller). As root, each directory is cleaned as its
    owner; *user*, if given, must own every directory. Raises
    NotACoordinationDirectoryError for an empty path, before any fork."""
    for directory in directories:
        if not directory:
            raise NotACoordinationDirectoryError("--dir is empty (an unset variable?)")
    jobs = [_cleanup_job(directory, user) for directory in directories]
    return [_report(directory, watched, timeout) for directory, watched in zip(directories, run_watched(jobs, timeout))]


def _report(directory: str, watched: Watched, timeout: float) -> DirectoryReport:
    findings = [Finding(**event["finding"]) for event in watched.events if "finding" in event]
    notes = [event["note"] for event in watched.events if "note" in event]
    if watched.status is None:
        return DirectoryReport(
            directory,
            1,
            findings,
            f"timed out after {timeout:g} s (a hung filesystem?): the cleanup was killed and abandoned",
        )
    return DirectoryReport(directory, watched.status, findings, notes[-1] if notes else "")


def _cleanup_job(directory: str, user: Optional[str]) -> Callable[[Callable[[dict], None]], int]:
    def job(send: Callable[[dict], None]) -> int:
        refusal = _refusal(directory)
        if refusal is not None:
            send({"note": _REFUSAL_PREFIX[refusal[0]] + refusal[1]})
            return refusal[0]

        def work() -> int:
            failed = 0
            for finding in cleanup_findings(directory):
                send({"finding": finding._asdict()})
                failed |= finding.action == "failed"
            return failed

        try:
            return run_as_owner(directory, work, user)
        except OSError as error:  # refused: a symlink, not the owner, no account
            send({"note": f"cleanup refused: {describe_error(error)}"})
            return 1

    return job


_REFUSAL_PREFIX = {0: "nothing to clean: ", 1: "cleanup refused: ", 2: ""}


def _refusal(directory: str) -> Optional[tuple]:
    """(status, line) if *directory* is not one to clean, else None."""
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        return 0, f"{directory} does not exist"
    except NotADirectoryError:
        return 2, f"{directory} is not a directory"
    if stat.S_ISLNK(info.st_mode):
        return 1, f"{directory} is a symlink (a coordination directory is never followed)"
    if not stat.S_ISDIR(info.st_mode):
        return 2, f"{directory} is not a directory"
    from .mounts import filesystem_info

    fstype = filesystem_info(directory).fstype
    if fstype in _PSEUDO:
        return 2, f"{directory} is on {fstype}, a pseudo filesystem: not a coordination directory"
    if os.geteuid() != 0 and info.st_uid != os.geteuid():
        return 1, (
            f"{directory} belongs to uid {info.st_uid}, not to this user "
            f"(uid {os.geteuid()}): run it as that user, or as root"
        )
    return None


# ------------------------------------------------------------ health check


def check_directory(directory: str) -> str:
    """Check that *directory* can coordinate processes: it exists, is a
    real directory of its owner that nobody else may write (or a sticky
    one), on a filesystem whose locks hold, and a mutex can be taken and
    released there (as its owner, when called by root). Returns the OK
    line; raises OSError (or UnsafeFilesystemError) saying what is wrong."""
    refusal = _refusal(directory)
    if refusal is not None:
        raise OSError(
            errno.ENOTDIR if refusal[0] == 2 else errno.ENOENT if refusal[0] == 0 else errno.EPERM, refusal[1]
        )
    info = os.lstat(directory)
    if info.st_mode & 0o002 and not info.st_mode & stat.S_ISVTX:
        raise PermissionError(
            errno.EPERM, "writable by everyone and not sticky: anyone could remove a held lock file", directory
        )
    from .locks import ensure_filesystem_lockable
    from .mounts import filesystem_info

    ensure_filesystem_lockable(directory, timeout=2)
    scope = filesystem_info(directory)
    if run_as_owner(directory, lambda: _take_mutex(directory)) != 0:
        raise OSError(errno.EIO, "the mutex could not be taken and released (as the directory's owner)", directory)
    return f"OK: {directory}: {scope.fstype}, lock scope {scope.lock_scope}; a mutex was taken and released"


def _take_mutex(directory: str) -> int:
    from .mutex import global_mutex, retire_mutex_files

    with global_mutex(directory, f"toilcoord-check-{os.uname().nodename}", timeout=2):
        pass
    retire_mutex_files()  # its lock file goes: a health check leaves nothing
    return 0


# ------------------------------------------------------- as the owner


def directory_owner(directory: str) -> int:
    """The uid that owns *directory*, a real directory (a symlink there is
    refused with NotADirectoryError, never followed)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        # O_NOFOLLOW gives ELOOP for a symlink, or ENOTDIR with O_DIRECTORY.
        if error.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(directory):
            raise NotADirectoryError(
                errno.ENOTDIR, "refusing a coordination directory that is a symlink", directory
            ) from None
        raise
    try:
        return os.fstat(fd).st_uid
    finally:
        os.close(fd)


def run_as_owner(directory: str, work: Callable[[], int], user: Optional[str] = None) -> int:
    """Run *work* as the owner of *directory* and return its exit status.

    Called by root on someone else's directory, *work* runs in a forked
    child that has taken the owner's groups, gid and uid (in that order)
    before anything in the directory is read. Raises PermissionError if
    *user* is given and does not own the directory, or if the owner has no
    account to become. Anyone else (or root on root's own directory) runs
    *work* in this process.
    """
    owner = directory_owner(directory)
    if user is not None:
        _check_user(directory, owner, user)
    if os.geteuid() != 0 or owner == 0:
        return work()
    account = _account(directory, owner)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its status is the result
        code = 1
        try:
            _become(account)
            code = work()
        except BaseException as error:
            print(f"cleanup of {directory} as uid {owner} failed: {type(error).__name__}: {error}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1


def _check_user(directory: str, owner: int, user: str) -> None:
    try:
        wanted = pwd.getpwnam(user).pw_uid
    except KeyError:
        raise PermissionError(errno.EPERM, f"there is no user {user!r}", directory) from None
    if wanted != owner:
        raise PermissionError(
            errno.EPERM, f"the directory belongs to uid {owner}, not to {user} (uid {wanted})", directory
        )


def _account(directory: str, owner: int) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(owner)
    except KeyError:
        raise PermissionError(
            errno.EPERM, f"the directory belongs to uid {owner}, which has no account to run its cleanup as", directory
        ) from None


def _become(account: pwd.struct_passwd) -> None:
    """Take *account*'s groups, gid and uid, in that order (after setuid
    nothing else could be changed), and its environment's names."""
    os.setgroups(os.getgrouplist(account.pw_name, account.pw_gid))
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)
    os.environ.update(HOME=account.pw_dir, USER=account.pw_name, LOGNAME=account.pw_name)
    os.chdir("/")
