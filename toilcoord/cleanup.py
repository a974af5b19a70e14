"""What a batch system's epilog runs: clean up after a node's dead processes.

:func:`cleanup_directory` removes what dead processes left in a coordination
directory. :func:`run_as_owner` runs it, when called by root, in a child
process that has become the directory's owner first, so that root never
reads a user's files, runs a user's deferred functions or follows a user's
symlinks with its own rights.
"""
from __future__ import annotations

import errno
import os
import pwd
import sys
from typing import Callable, Iterator, Optional

__all__ = ["cleanup_directory", "directory_owner", "run_as_owner"]


def cleanup_directory(directory: str) -> Iterator[str]:
    """Remove what dead processes left in *directory*, saying what was done.

    Never touches a live process's files: every removal is of a file whose
    lock could be taken, and arenas are reaped under the arena's own mutex.
    Safe while other processes use the directory, another cleanup included:
    whatever vanishes meanwhile was removed by someone else.
    """
    from .arena import reap_dead_arenas
    from .deferred import DeferredFunctionManager
    from .mutex import reap_unheld_mutex_files
    from .procnames import reap_dead_process_names

    state = os.path.join(directory, DeferredFunctionManager.STATE_DIR_STEM)
    if os.path.isdir(state):
        DeferredFunctionManager.cleanupWorker(directory)
        yield f"deferred functions: ran those of dead processes; {_count_entries(state)} live state files left"
    yield f"process names: removed {len(reap_dead_process_names(directory))} of dead processes"
    for arena, live in reap_dead_arenas(directory):
        yield f"arena {arena}: " + ("live members remain" if live else "no live members; removed")
    yield f"mutexes: removed {len(reap_unheld_mutex_files(directory))} lock files left by dead holders"


def _count_entries(path: str) -> int:
    try:
        return len(os.listdir(path))
    except FileNotFoundError:
        return 0  # removed meanwhile by another cleanup


def directory_owner(directory: str) -> int:
    """The uid that owns *directory*, a real directory (a symlink there is
    refused with NotADirectoryError, never followed)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        # O_NOFOLLOW gives ELOOP for a symlink, or ENOTDIR with O_DIRECTORY.
        if error.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(directory):
            raise NotADirectoryError(errno.ENOTDIR, "refusing a coordination directory that is a symlink",
                                     directory) from None
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
            print(f"cleanup of {directory} as uid {owner} failed: {type(error).__name__}: {error}",
                  file=sys.stderr)
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
        raise PermissionError(errno.EPERM, f"the directory belongs to uid {owner}, not to {user} (uid {wanted})",
                              directory)


def _account(directory: str, owner: int) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(owner)
    except KeyError:
        raise PermissionError(errno.EPERM, f"the directory belongs to uid {owner}, which has no account to "
                              "run its cleanup as", directory) from None


def _become(account: pwd.struct_passwd) -> None:
    """Take *account*'s groups, gid and uid, in that order (after setuid
    nothing else could be changed), and its environment's names."""
    os.setgroups(os.getgrouplist(account.pw_name, account.pw_gid))
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)
    os.environ.update(HOME=account.pw_dir, USER=account.pw_name, LOGNAME=account.pw_name)
    os.chdir("/")
