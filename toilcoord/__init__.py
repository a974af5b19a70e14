"""Node-local process coordination for pipeline runners, standard library only.

File-lock mutexes, a last-process-standing election, process names visible
across containers, crash-safe deferred cleanup functions, real-time log
shipping over UDP and module shipping, with the names of Toil's
coordination layer. Vendorable: copy this folder anywhere.
"""
from __future__ import annotations

try:
    import fcntl  # noqa: F401 - everything here stands on flock
except ImportError:  # pragma: no cover - exercised only off POSIX
    raise ImportError(
        "toilcoord needs a POSIX system: it is built on fcntl.flock, "
        "which this platform does not have"
    ) from None

from .locks import (
    LockTimeout,
    UnsafeFilesystemError,
    ensure_filesystem_lockable,
    locked_file_is,
    safe_lock,
    safe_unlock_and_close,
)
from .mounts import FilesystemInfo, filesystem_info
from .mutex import global_mutex
from .procnames import (
    collect_process_name_garbage,
    current_process_name_for,
    current_process_name_lock,
    destroy_all_process_names,
    get_process_name,
    process_name_exists,
)
from .arena import LastProcessStandingArena
from .deferred import DeferredFunction, DeferredFunctionManager
from .rtlog import RealtimeLogger
from .modules import (
    DirectoryResource,
    FileResource,
    LocalJobStore,
    ModuleDescriptor,
    Resource,
    ResourceException,
    VirtualEnvResource,
)
from .threads import ExceptionalThread, cgroup_cpu_limit, cpu_count
from .files import robust_rmtree

__version__ = "0.1.0"

__all__ = [
    # locks
    "FilesystemInfo",
    "LockTimeout",
    "UnsafeFilesystemError",
    "ensure_filesystem_lockable",
    "filesystem_info",
    "global_mutex",
    "locked_file_is",
    "safe_lock",
    "safe_unlock_and_close",
    # procnames
    "collect_process_name_garbage",
    "current_process_name_for",
    "current_process_name_lock",
    "destroy_all_process_names",
    "get_process_name",
    "process_name_exists",
    # arena
    "LastProcessStandingArena",
    # deferred
    "DeferredFunction",
    "DeferredFunctionManager",
    # rtlog
    "RealtimeLogger",
    # modules
    "DirectoryResource",
    "FileResource",
    "LocalJobStore",
    "ModuleDescriptor",
    "Resource",
    "ResourceException",
    "VirtualEnvResource",
    # threads and files
    "ExceptionalThread",
    "cgroup_cpu_limit",
    "cpu_count",
    "robust_rmtree",
]
