"""What filesystem a path is on, and how far its locks reach.

Read from ``/proc/self/mountinfo`` (proc(5)); no subprocess is ever run.
Two questions are answered here:

* :func:`filesystem_info`: the filesystem's type, mount point, options and
  lock scope ("cluster", "node", "unsafe" or "unknown"), for people and for
  :func:`~.locks.ensure_filesystem_lockable`;
* :func:`names_may_be_stale`: whether the kernel may answer a name lookup
  on a device from a cache that another node (or another mount of the same
  export) has made stale. Lock code must then never trust a looked-up name
  after locking (NFS caches names and attributes for up to a minute by
  default).

And one question of the kernel's: :func:`hard_links_protected`, whether
another user can give one of our files a second name.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

__all__ = [
    "FilesystemInfo",
    "filesystem_info",
    "hard_links_protected",
    "lock_scope",
    "names_may_be_stale",
    "parse_mountinfo",
]

PathArg = Union[str, "os.PathLike[str]"]

_MOUNTINFO = "/proc/self/mountinfo"


class FilesystemInfo(NamedTuple):
    """What kind of filesystem a path is on and how far its locks reach."""

    fstype: str
    mount_point: str
    options: Tuple[str, ...]
    lock_scope: str  # "cluster", "node", "unsafe" or "unknown"
    reason: str


class _Mount(NamedTuple):
    mount_point: str
    fstype: str
    options: Tuple[str, ...]
    device: str = ""  # "major:minor", as st_dev shows it


# The kernel writes space, tab, newline and backslash in mountinfo as \ooo.
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    if "\\" not in field:
        return field
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def parse_mountinfo(text: str) -> List[_Mount]:
    """Parse ``/proc/self/mountinfo`` (see proc(5)); bad lines are skipped."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            separator = fields.index("-", 6)
            mount_point = _unescape(fields[4])
            options = fields[5].split(",") + fields[separator + 3].split(",")
            fstype = _unescape(fields[separator + 1])
        except (ValueError, IndexError):
            continue
        options = tuple(dict.fromkeys(_unescape(o) for o in options if o))
        mounts.append(_Mount(mount_point, fstype, options, fields[2]))
    return mounts


_NODE_LOCAL_TYPES = frozenset(
    (
        "ext2",
        "ext3",
        "ext4",
        "xfs",
        "btrfs",
        "zfs",
        "f2fs",
        "jfs",
        "reiserfs",
        "tmpfs",
        "ramfs",
        "overlay",
        "devtmpfs",
        "shm",
    )
)
_SMB_TYPES = frozenset(("cifs", "smb3", "smbfs"))


def lock_scope(fstype: str, options: Tuple[str, ...]) -> Tuple[str, str]:
    """Return ``(scope, reason)`` for a filesystem type and its options."""
    opts = set(options)
    if fstype in ("nfs", "nfs4"):
        return _nfs_scope(opts)
    if fstype == "lustre":
        return _lustre_scope(opts)
    if fstype == "beegfs":
        # tuneUseGlobalFileLocks is set in the client's configuration file,
        # not as a mount option, so the mount table cannot show it.
        return "node", (
            "BeeGFS: flock is node-local unless the client sets tuneUseGlobalFileLocks=true "
            "in its configuration, which the mount table does not show"
        )
    if fstype in ("ceph", "fuse.ceph-fuse", "fuse.ceph"):
        return "unsafe", "CephFS: flock is known to hang or be lost; use local storage for coordination"
    if fstype in _SMB_TYPES:
        return "unknown", (
            f"{fstype} (SMB): byte-range locks reach the server only in some configurations "
            "and names are cached; not proven here"
        )
    if fstype == "gpfs":
        return (
            "unknown",
            "GPFS (Spectrum Scale): flock holds between nodes only in some configurations; not proven here",
        )
    if fstype.startswith("fuse"):
        return "unknown", f"{fstype}: a FUSE filesystem decides for itself whether flock reaches other nodes"
    if fstype in _NODE_LOCAL_TYPES:
        return "node", f"{fstype} is local to this node: locks hold between its processes"
    return "unknown", f"{fstype} is not a filesystem whose locking toilcoord knows"


def _nfs_scope(opts: set) -> Tuple[str, str]:
    for local in ("local_lock=flock", "local_lock=all"):
        if local in opts:
            return "node", f"NFS mounted {local}: locks hold only between processes of this node"
    if "nolock" in opts:
        return "node", "NFS mounted nolock: locks hold only between processes of this node"
    # Proven on real NFSv3 and NFSv4.2 (Linux client and nfsd, default
    # mount options) by the project's NFS rig.
    return "cluster", (
        "NFS with server-side locking: flock is emulated with byte-range locks that hold "
        "between nodes; a dead node's locks are freed only after the NFSv4 lease "
        "(about 90 s) or NLM recovery"
    )


def _lustre_scope(opts: set) -> Tuple[str, str]:
    if "flock" in opts:
        return "cluster", "Lustre mounted flock: locks are coherent between nodes"
    if "localflock" in opts:
        return "node", "Lustre mounted localflock: locks hold only between processes of this node"
    return "unsafe", "Lustre mounted noflock (the default): flock fails; remount with -o flock or use local storage"


def _read_mounts(mountinfo: Optional[str]) -> List[_Mount]:
    try:
        with open(mountinfo or _MOUNTINFO, encoding="utf-8", errors="surrogateescape") as stream:
            return parse_mountinfo(stream.read())
    except OSError:
        return []


def _mount_of_path(mounts: List[_Mount], real: str) -> Optional[_Mount]:
    """The mount whose mount point is the longest prefix of *real*; of
    mounts stacked on one mount point, the last."""
    best: Optional[_Mount] = None
    for mount in mounts:
        point = mount.mount_point
        if (real == point or real.startswith(point.rstrip("/") + "/")) and (
            best is None or len(point) >= len(best.mount_point)
        ):
            best = mount
    return best


def filesystem_info(path: PathArg, mountinfo: Optional[str] = None) -> FilesystemInfo:
    """Describe the filesystem *path* is on, from the mount table
    (*mountinfo*, by default ``/proc/self/mountinfo``).

    The mount whose mount point is the longest prefix of the real path
    wins; of mounts stacked on one mount point, the last. No subprocess is
    run. Raises FileNotFoundError if *path* is missing; where the mount
    table cannot be read the answer is "unknown".
    """
    real = os.path.realpath(path)
    os.stat(real)
    best = _mount_of_path(_read_mounts(mountinfo), real)
    if best is None:
        return FilesystemInfo("unknown", "/", (), "unknown", "the mount table could not be read")
    scope, reason = lock_scope(best.fstype, best.options)
    return FilesystemInfo(best.fstype, best.mount_point, best.options, scope, reason)


# st_dev -> True where names may be stale. A device's filesystem never
# changes while it is mounted, so the answer is kept for the process.
_stale_names: Dict[int, bool] = {}


def names_may_be_stale(device: int, path: str, mountinfo: Optional[str] = None) -> bool:
    """True unless *device* (an ``st_dev``; *path* is a file on it) is known
    to be a local filesystem, whose name lookups are always current.

    NFS, SMB, FUSE, every cluster filesystem and anything not recognised
    count as possibly stale. Cached per device.
    """
    stale = _stale_names.get(device)
    if stale is None:
        mounts = _read_mounts(mountinfo)
        wanted = f"{os.major(device)}:{os.minor(device)}"
        # By device number first: it tells apart two mounts of one export.
        matches = [mount for mount in mounts if mount.device == wanted]
        mount = matches[-1] if matches else _mount_of_path(mounts, os.path.realpath(path))
        stale = _stale_names[device] = mount is None or mount.fstype not in _NODE_LOCAL_TYPES
    return stale


_PROTECTED_HARDLINKS = "/proc/sys/fs/protected_hardlinks"
_links_protected: Optional[bool] = None  # the kernel's setting, read once


def hard_links_protected() -> bool:
    """True if the kernel refuses a hard link to a file whose caller neither
    owns it nor may both read and write it (``fs.protected_hardlinks = 1``,
    the default of every systemd distribution): then only its owner and
    root can give a private (0600) file a second name. False where the
    setting is 0 or cannot be read. Read once per process."""
    global _links_protected
    if _links_protected is None:
        try:
            with open(_PROTECTED_HARDLINKS, "rb") as setting:
                _links_protected = setting.read(8).strip() == b"1"
        except OSError:
            _links_protected = False
    return _links_protected
