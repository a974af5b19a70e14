"""Put toilcoord's names into Toil, as a user switching imports would.

Imported from ``sitecustomize`` (beside this file) when ``TOILCOORD_SWAP``
is set, in the leader and in every worker, since workers inherit the
environment: an import hook replaces the names below in Toil's modules right
after each module runs, before any other module can copy them with
``from ... import``. So Toil's own code (its worker, file stores, batch
systems, job store) and its tests use ours throughout.

``TOILCOORD_SWAP=workers`` swaps only in Toil's worker processes (a Toil
leader with toilcoord workers), ``TOILCOORD_SWAP=leader`` only outside them.
"""

import importlib.abc
import importlib.util
import os
import sys

# Toil module -> names replaced by toilcoord's of the same name.
SWAPS = {
    "toil.lib.threading": (
        "global_mutex",
        "LastProcessStandingArena",
        "process_name_exists",
        "get_process_name",
        "collect_process_name_garbage",
        "destroy_all_process_names",
        "current_process_name_lock",
        "current_process_name_for",
        "safe_lock",
        "safe_unlock_and_close",
        "locked_file_is",
        "ensure_filesystem_lockable",
        "ExceptionalThread",
        "cpu_count",
    ),
    "toil.deferred": ("DeferredFunction", "DeferredFunctionManager"),
    "toil.realtimeLogger": ("RealtimeLogger",),
    "toil.resource": (
        "ModuleDescriptor",
        "Resource",
        "FileResource",
        "DirectoryResource",
        "VirtualEnvResource",
        "ResourceException",
    ),
    "toil.lib.io": ("robust_rmtree",),
}

#: Set in every process where the swap happened, for the harness to check.
MARK = "__toilcoord_swapped__"


def _is_worker() -> bool:
    main = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return main in ("_toil_worker", "worker.py") or main.startswith("_toil_")


def wanted() -> bool:
    mode = os.environ.get("TOILCOORD_SWAP", "")
    if mode in ("", "0"):
        return False
    if mode == "workers":
        return _is_worker()
    if mode == "leader":
        return not _is_worker()
    return True


def swap(module) -> None:
    import toilcoord

    for name in SWAPS[module.__name__]:
        setattr(module, name, getattr(toilcoord, name))
    setattr(module, MARK, True)


class _SwappingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        swap(module)

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self.loader, name)


class _SwappingFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in SWAPS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _SwappingLoader(spec.loader)
                return spec
        return None


def install() -> None:
    if any(isinstance(finder, _SwappingFinder) for finder in sys.meta_path):
        return
    for name in SWAPS:
        if name in sys.modules:  # imported before us: too late for a clean swap
            raise RuntimeError(f"{name} was imported before toilcoord_swap.install()")
    sys.meta_path.insert(0, _SwappingFinder())
