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
        "toilcoord needs a POSIX system: it is built on fcntl.flock, which this platform does not have"
    ) from None

from .arena import LastProcessStandingArena
from .deferred import DeferredFunction, DeferredFunctionManager
from .files import robust_rmtree
from .locks import (
    LockTimeout,
    UnsafeFilesystemError,
    ensure_filesystem_lockable,
    locked_file_is,
    safe_lock,
    safe_unlock_and_close,
)
from .modules import (
    DirectoryResource,
    FileResource,
    LocalJobStore,
    ModuleDescriptor,
    Resource,
    ResourceException,
    VirtualEnvResource,
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
from .rtlog import RealtimeLogger
from .threads import ExceptionalThread, cgroup_cpu_limit, cpu_count, cpu_count_sources, memory_limit

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
    "cpu_count_sources",
    "memory_limit",
    "robust_rmtree",
    # beyond Toil: slots, a safe coordination directory, termination, status
    "CoordinationDirError",
    "ResourceSlots",
    "coordination_dir",
    "directory_status",
    "ids_environment",
    "install_termination_cleanup",
    "job_private_reasons",
]

# Beyond Toil's names: imported on first use, so that `import toilcoord`
# stays as light as the Toil-compatible core (a few milliseconds less).
_LAZY = {
    "ResourceSlots": "slots",
    "ids_environment": "slots",
    "CoordinationDirError": "coorddir",
    "coordination_dir": "coorddir",
    "job_private_reasons": "coorddir",
    "install_termination_cleanup": "termination",
    "directory_status": "status",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
