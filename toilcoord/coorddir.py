"""Where a user's processes on one node can meet: a safe coordination directory.

Locks only coordinate processes that see the same directory. The wrong one
breaks coordination silently: a network filesystem shares it with other
nodes (or, mounted ``local_lock``, only pretends to), CephFS hangs, and a
job-private ``/tmp`` (Slurm's ``job_container/tmpfs``, systemd's
``PrivateTmp``) hides every job's locks from every other job.
:func:`coordination_dir` picks a directory that is node-local and private
to the user; :func:`job_private_reasons` says why a directory may be seen
by this job only.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import List, Optional, Set, Tuple

from .locks import UnsafeFilesystemError
from .mounts import filesystem_info, names_may_be_stale

__all__ = ["CoordinationDirError", "coordination_dir", "job_private_reasons"]

logger = logging.getLogger(__name__)

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PRIVATE = 0o700
# Mount points a batch system replaces per job.
_PER_JOB_MOUNTS = ("/tmp", "/dev/shm")

_warned: Set[str] = set()


class CoordinationDirError(PermissionError):
    """The coordination directory cannot be trusted: a symlink or something
    else planted where it should be, another user's directory, or one that
    others may write to. It is never used."""


def coordination_dir(purpose: str = "toilcoord", *, mountinfo: Optional[str] = None) -> str:
    """A node-local directory private to this user (mode 0700, owned by
    them) that every process of the user on this node sees; made if needed.

    Candidates, first usable wins:

    1. ``$XDG_RUNTIME_DIR/<purpose>``, then ``/run/user/<uid>/<purpose>``:
       the base must exist, be ours and 0700 (as the XDG spec says);
    2. ``$TMPDIR/<purpose>-<uid>``;
    3. ``/tmp/<purpose>-<uid>``.

    A candidate whose base is missing, not a directory, another user's,
    writable by others without the sticky bit, or on a filesystem that is
    not local to this node (NFS whatever its ``local_lock``, Lustre,
    CephFS, SMB, FUSE, anything unknown; see :mod:`.mounts`) is skipped
    with a log line. Raises :class:`CoordinationDirError` (a
    PermissionError) if the directory itself is a symlink, not a directory,
    another user's, or open to others: a planted entry is never used nor
    changed; :class:`~.locks.UnsafeFilesystemError` (a RuntimeError) if no
    candidate is node-local; ValueError for a *purpose* that is empty,
    contains ``/`` or NUL, starts with ``.``, or is over 200 bytes.

    When the directory may be private to this job (see
    :func:`job_private_reasons`) a warning says so once per directory:
    jobs on the node will not see each other's locks there. *mountinfo*
    replaces ``/proc/self/mountinfo`` (for tests).
    """
    _check_purpose(purpose)
    uid = os.geteuid()
    skipped = []
    for base, name, base_must_be_private in _candidates(purpose, uid):
        reason = _unusable_base(base, base_must_be_private, uid, mountinfo)
        if reason is None:
            path = _make_private_dir(base, name, uid)
            _warn_if_job_private(path, mountinfo)
            return path
        skipped.append(f"{base}: {reason}")
        logger.info("not using %s for coordination: %s", base, reason)
    raise UnsafeFilesystemError("no node-local directory for coordination: " + "; ".join(skipped))


def _check_purpose(purpose: str) -> None:
    if not isinstance(purpose, str):
        raise TypeError(f"purpose must be a str, not {type(purpose).__name__}")
    if not purpose or "/" in purpose or "\0" in purpose or purpose.startswith(".") or len(os.fsencode(purpose)) > 200:
        raise ValueError(
            f"purpose {purpose!r} cannot be a directory name: it must be 1-200 bytes "
            "with no '/' or NUL, not starting with '.'"
        )


def _candidates(purpose: str, uid: int) -> List[Tuple[str, str, bool]]:
    """[(base directory, name in it, whether the base must be ours and 0700)]."""
    found = []
    for base in (os.environ.get("XDG_RUNTIME_DIR"), f"/run/user/{uid}"):
        if base and os.path.isabs(base) and base not in [b for b, _, _ in found]:
            found.append((base, purpose, True))
    tmpdir = os.environ.get("TMPDIR")
    for base in ([tmpdir] if tmpdir and os.path.isabs(tmpdir) else []) + ["/tmp"]:
        if base not in [b for b, _, _ in found]:
            found.append((base, f"{purpose}-{uid}", False))
    return found


def _unusable_base(base: str, must_be_private: bool, uid: int, mountinfo: Optional[str]) -> Optional[str]:
    """Why *base* cannot hold the directory, or None if it can."""
    try:
        fd = os.open(base, _OPEN_DIR)
    except OSError as error:
        return "a symlink" if error.errno == errno.ELOOP else os.strerror(error.errno).lower()
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    mode = stat.S_IMODE(info.st_mode)
    if must_be_private and (info.st_uid != uid or mode != _PRIVATE):
        return f"owned by uid {info.st_uid} with mode {mode:o}, not ours with mode 700"
    if info.st_uid not in (uid, 0):
        return f"owned by uid {info.st_uid}"
    if mode & 0o022 and not mode & stat.S_ISVTX:
        return f"writable by others (mode {mode:o}) without the sticky bit: our directory could be replaced"
    return _not_node_local(base, info.st_dev, mountinfo)


def _not_node_local(path: str, device: int, mountinfo: Optional[str]) -> Optional[str]:
    fs = filesystem_info(path, mountinfo)
    if fs.lock_scope != "node" or names_may_be_stale(device, path, mountinfo):
        return f"on {fs.fstype} at {fs.mount_point}, not a filesystem local to this node ({fs.reason})"
    return None


def _make_private_dir(base: str, name: str, uid: int) -> str:
    """Make (or find) *base*/*name*, relative to *base* opened once, and
    check what was opened: a directory, ours, mode 0700."""
    path = os.path.join(base, name)
    base_fd = os.open(base, _OPEN_DIR)
    try:
        try:
            os.mkdir(name, _PRIVATE, dir_fd=base_fd)
            made = True
        except FileExistsError:
            made = False
        try:
            fd = os.open(name, _OPEN_DIR, dir_fd=base_fd)
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CoordinationDirError(
                    f"{path} is {'a symlink' if error.errno == errno.ELOOP else 'not a directory'}, "
                    "not the private directory toilcoord makes; remove it if it is yours, "
                    "or set TMPDIR elsewhere"
                ) from None
            raise
    finally:
        os.close(base_fd)
    try:
        if made:
            os.fchmod(fd, _PRIVATE)  # whatever the umask took away or left
        _check_private(fd, path, uid)
    finally:
        os.close(fd)
    return path


def _check_private(fd: int, path: str, uid: int) -> None:
    info = os.fstat(fd)
    mode = stat.S_IMODE(info.st_mode)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
        raise CoordinationDirError(
            f"{path} belongs to uid {info.st_uid}, not to this user ({uid}); "
            "it is not used (someone may have planted it)"
        )
    if mode != _PRIVATE:
        raise CoordinationDirError(
            f"{path} has mode {mode:o}: others may have put files in it; check it and `chmod 700` it, or remove it"
        )


# ------------------------------------------------------- job-private /tmp


def job_private_reasons(path: str, mountinfo: Optional[str] = None) -> List[str]:
    """Why *path* may be visible to this job only (empty: no sign of it).

    Two signs: this process is in a mount namespace other than PID 1's
    (only where ``/proc/1/ns/mnt`` is readable; batch systems make one per
    job), and *path* is under ``/tmp`` or ``/dev/shm`` mounted from a
    subdirectory of another filesystem (a bind mount, as Slurm's
    ``job_container/tmpfs``, pam_namespace and systemd's ``PrivateTmp`` make
    for each job). Jobs on the node do not see each other's locks there.
    """
    reasons = []
    namespace = _own_mount_namespace()
    if namespace:
        reasons.append(namespace)
    real = os.path.realpath(path)
    for point, root, fstype in _per_job_binds(mountinfo):
        if real == point or real.startswith(point + "/"):
            reasons.append(
                f"{point} is {root} of a {fstype} filesystem mounted there for this job alone "
                "(as Slurm's job_container/tmpfs or systemd's PrivateTmp do)"
            )
    return reasons


def _own_mount_namespace() -> Optional[str]:
    try:
        own, init = os.readlink("/proc/self/ns/mnt"), os.readlink("/proc/1/ns/mnt")
    except OSError:
        return None  # PID 1's is hidden from us (not root, or a container): cannot tell
    if own == init:
        return None
    return f"this process runs in a mount namespace of its own ({own}, PID 1's is {init}): its /tmp may be its job's"


def _per_job_binds(mountinfo: Optional[str]) -> List[Tuple[str, str, str]]:
    """[(mount point, root, fstype)] of the last mount on each of /tmp and
    /dev/shm when its root is not its filesystem's root."""
    try:
        with open(mountinfo or "/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
            lines = table.read().splitlines()
    except OSError:
        return []
    last = {}
    for line in lines:
        # proc(5): "id parent major:minor root mount-point options ... - fstype ..."
        fields = line.split(" ")
        if len(fields) > 6 and fields[4] in _PER_JOB_MOUNTS and "-" in fields[6:-1]:
            last[fields[4]] = (fields[3], fields[fields.index("-", 6) + 1])
    return [(point, root, fstype) for point, (root, fstype) in last.items() if root != "/"]


def _warn_if_job_private(path: str, mountinfo: Optional[str]) -> None:
    reasons = job_private_reasons(path, mountinfo)
    if reasons and path not in _warned:
        _warned.add(path)
        logger.warning(
            "coordination directory %s may be private to this job: jobs on this node will not "
            "see each other's locks there (%s); set XDG_RUNTIME_DIR or TMPDIR to a directory "
            "all jobs share",
            path,
            "; ".join(reasons),
        )
