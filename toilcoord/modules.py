"""Shipping user code from a leader to its workers, with Toil's names.

On the leader, :meth:`ModuleDescriptor.forModule` describes a loaded module
(``"__main__"`` included), :meth:`ModuleDescriptor.saveAsResourceTo` stores
its file's directory -- or its whole top-level package -- in a job store, and
:meth:`Resource.register` exports the resulting :class:`Resource` as a
``JTRES_<pathHash>`` environment variable for the workers. On a worker,
:meth:`Resource.prepareSystem` picks the local resource root (``JTRES_ROOT``)
and :meth:`ModuleDescriptor.load` downloads, verifies, unpacks and imports
the shipped copy, ahead of any installed module of the same name.

This module holds :class:`ModuleDescriptor`; the resources are in
:mod:`.resources`, :class:`LocalJobStore` (and what a job store is) in
:mod:`.jobstore`, the exceptions in :mod:`.resource_errors`. All of them are
importable from here too, as Toil's ``toil.resource`` offers them from one
place.

Everything heavy (json, importlib's machinery) is imported inside the
function that needs it: the package's ``__init__`` imports this module.
"""

from __future__ import annotations

import logging
import os
import sys
from types import ModuleType
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple, Type

from .jobstore import LocalJobStore
from .resource_errors import ResourceException, ResourceRootError
from .resources import DirectoryResource, FileResource, Resource, VirtualEnvResource, _init_file, _is_within

# ModuleDescriptor is defined here; the other names are re-exported (see above).
__all__ = [
    "DirectoryResource",
    "FileResource",
    "LocalJobStore",
    "ModuleDescriptor",
    "Resource",
    "ResourceException",
    "ResourceRootError",
    "VirtualEnvResource",
]

logger = logging.getLogger(__name__)

# The package this module belongs to, whatever it is called or vendored as
# ("toilcoord", "mypipeline._vendor.toilcoord", ...).
_OWN_PACKAGE = __name__.rpartition(".")[0]

# Written into a localized copy so globalize() can recover the leader's path.
# Not Toil's ".stash": a user's script directory could hold a file by that name.
_STASH_NAME = ".jtres-stash.json"


class _MalformedCommandError(ValueError, RuntimeError):
    """A command :meth:`ModuleDescriptor.fromCommand` cannot read. Toil
    raises RuntimeError for a wrong item count and ValueError for a bad
    ``fromVirtualEnv``: this is both, so either ``except`` clause catches
    either mistake."""


class ModuleDescriptor(NamedTuple):
    """A loaded Python module as ``(dirPath, name, fromVirtualEnv)``:
    ``dirPath`` is the directory to put on ``sys.path`` to import it,
    ``name`` its fully qualified name, ``fromVirtualEnv`` whether it lives
    in the leader's virtualenv (then ``dirPath`` is its site-packages and
    all of that is shipped)."""

    dirPath: str
    name: str
    fromVirtualEnv: bool

    @classmethod
    def forModule(cls, name: str) -> "ModuleDescriptor":
        """Describe the already imported module *name*.

        ``"__main__"`` is translated to the name the module would be
        imported by: for ``python -m pkg.mod`` that is ``pkg.mod``; for
        ``python dir/script.py`` it is ``script``, and if another module of
        that name is importable (the standard library's, an installed one, a
        package beside the script) ResourceException is raised, since a
        worker would import that one instead. The other module is located
        without being imported."""
        module = sys.modules.get(name)
        if module is None:
            raise ResourceException(f"module {name!r} has not been imported; forModule() describes loaded modules")
        file_name = getattr(module, "__file__", None)
        if not file_name:
            raise ResourceException(
                f"module {name!r} has no file (interactive session, python -c, built-in or namespace package)"
            )
        stem, extension = os.path.splitext(os.path.abspath(file_name))
        if extension not in (".py", ".pyc"):
            raise ResourceException(
                f"module {name!r} is {file_name}; only .py and .pyc modules can be shipped "
                "(The name of a user script/module must end in .py or .pyc.)"
            )
        if name == "__main__":
            name, dir_path = _main_module_location(module, stem)
        else:
            dir_path = _import_root(stem, name)
        if not os.path.isdir(dir_path):
            raise ResourceException(
                f"module {name!r} would be imported from {dir_path!r}, which is not a directory "
                "(scripts in / and .egg-link installs cannot be shipped)"
            )
        return cls(dirPath=dir_path, name=name, fromVirtualEnv=_in_virtualenv() and _is_within(dir_path, sys.prefix))

    @property
    def belongsToToil(self) -> bool:
        """True for the modules of this coordination package itself (under
        whatever name it is installed or vendored) and, as in Toil, for
        Toil's own (``toil.*``): neither is ever shipped."""
        name = self.name
        return name == _OWN_PACKAGE or name.startswith(_OWN_PACKAGE + ".") or name.startswith("toil.")

    def saveAsResourceTo(self, jobStore: Any) -> Resource:
        """Store this module's directory -- for a module in a package, its
        whole top-level package -- in *jobStore* and return the resource.
        Leader only; call :meth:`Resource.register` on the result to make it
        visible to workers started from this environment."""
        self._check_shippable()
        return self._resource_class().create(jobStore, self._resource_path)

    def localize(self) -> "ModuleDescriptor":
        """If this module was registered as a resource, download it (once
        per node) and return a descriptor of the local copy; otherwise, as on
        the leader, return self. Needs :meth:`Resource.prepareSystem`."""
        resource = Resource.lookup(self._resource_path)
        if resource is None:
            return self

        def stash(temp_dir: str) -> None:
            import json

            with open(os.path.join(temp_dir, _STASH_NAME), "w") as f:
                json.dump({"dirPath": self.dirPath, "fromVirtualEnv": self.fromVirtualEnv}, f)

        resource.download(callback=stash)
        return self._replace(dirPath=resource.localDirPath)

    def globalize(self) -> "ModuleDescriptor":
        """Reverse :meth:`localize`: the leader's descriptor of a local copy
        (self if this is not a local copy)."""
        import json

        try:
            with open(os.path.join(self.dirPath, _STASH_NAME)) as f:
                stashed = json.load(f)
        except (FileNotFoundError, NotADirectoryError):
            return self
        return self._replace(dirPath=stashed["dirPath"], fromVirtualEnv=stashed["fromVirtualEnv"])

    def toCommand(self) -> Sequence[str]:
        """Three strings that :meth:`fromCommand` turns back into this descriptor."""
        return (self.dirPath, self.name, str(self.fromVirtualEnv))

    @classmethod
    def fromCommand(cls, command: Sequence[str]) -> "ModuleDescriptor":
        """The descriptor :meth:`toCommand` gave *command* for. A malformed
        command raises an exception that is both a ValueError and the
        RuntimeError Toil raises for a wrong item count."""
        if len(command) != 3:
            raise _MalformedCommandError(f"a module descriptor command has 3 items, not {len(command)}: {command!r}")
        dir_path, name, from_virtual_env = command
        if from_virtual_env not in ("True", "False"):
            raise _MalformedCommandError(f"fromVirtualEnv must be 'True' or 'False', not {from_virtual_env!r}")
        return cls(dirPath=dir_path, name=name, fromVirtualEnv=from_virtual_env == "True")

    def makeLoadable(self) -> "ModuleDescriptor":
        """Localize this module (unless it is one of this package's own) and
        put its directory first on ``sys.path`` if it is not on it yet, so
        the shipped copy wins over an installed module of the same name.
        Returns the descriptor to import from."""
        if self.belongsToToil:
            return self
        module = self.localize()
        if module.dirPath not in sys.path:
            import importlib

            sys.path.insert(0, module.dirPath)
            importlib.invalidate_caches()  # the copy may be younger than the finders' caches
        return module

    def load(self) -> Optional[ModuleType]:
        """:meth:`makeLoadable`, then import and return the module. An
        ImportError says what was tried: the name, the directory, the
        original error; and it is raised too if a module of this name had
        already been imported from somewhere else."""
        import importlib

        module = self.makeLoadable()
        try:
            loaded = importlib.import_module(module.name)
        except ImportError as error:
            raise ImportError(module._import_failure(str(error)), name=module.name) from error
        if not self.belongsToToil:
            module._check_origin(loaded)
        return loaded

    # -- helpers

    @property
    def _resource_path(self) -> str:
        """The path shipped for this module: ``dirPath`` itself for a
        top-level module or a virtualenv, the top-level package for a module
        in a package. Depends on the name and ``dirPath`` only (a worker
        computes it for a path it does not have)."""
        if self.fromVirtualEnv or "." not in self.name:
            return self.dirPath
        return os.path.join(self.dirPath, self.name.split(".", 1)[0])

    def _check_shippable(self) -> None:
        if self.fromVirtualEnv:
            return
        if "." in self.name:
            if not _init_file(self._resource_path):
                raise ResourceException(
                    f"{self._resource_path} has no __init__.py: namespace packages cannot be shipped"
                )
            return
        if _init_file(self.dirPath):
            parent, package = os.path.split(self.dirPath)
            raise ResourceException(
                f"{self.name} is a top-level script inside the package directory {self.dirPath}, which "
                f"cannot be shipped; run it as a module instead: "
                f"PYTHONPATH={parent} {sys.executable} -m {package}.{self.name}"
            )

    def _resource_class(self) -> Type[Resource]:
        path = self._resource_path
        if self.fromVirtualEnv:
            return VirtualEnvResource
        if os.path.isdir(path):
            return DirectoryResource
        if os.path.isfile(path):
            return FileResource
        raise ResourceException(
            f"{path} is neither a file nor a directory" if os.path.exists(path) else f"{path} does not exist"
        )

    def _expected_files(self) -> List[str]:
        base = os.path.join(self.dirPath, *self.name.split("."))
        return [base + ".py", os.path.join(base, "__init__.py")]

    def _import_failure(self, error: str) -> str:
        present = [path for path in self._expected_files() if os.path.exists(path)]
        return (
            f"could not import {self.name!r} from {self.dirPath} "
            f"({'found ' + ', '.join(present) if present else 'neither ' + ' nor '.join(self._expected_files()) + ' exists'}; "
            f"sys.path starts {sys.path[:3]!r}): {error}"
        )

    def _check_origin(self, loaded: ModuleType) -> None:
        file_name = getattr(loaded, "__file__", None)
        if file_name and not _is_within(file_name, self.dirPath):
            raise ImportError(
                f"{self.name!r} was imported from {file_name}, not from the copy in {self.dirPath}: "
                f"a module of that name (or its package) was imported before load() was called",
                name=self.name,
            )


def _main_module_location(module: ModuleType, stem: str) -> Tuple[str, str]:
    """The importable name and import root of the ``__main__`` module whose
    file is *stem* plus an extension."""
    spec = getattr(module, "__spec__", None)
    if spec is not None and spec.name != "__main__":  # python -m pkg.mod
        return spec.name, _import_root(stem, spec.name)
    dir_path, name = os.path.split(stem)  # python dir/script.py
    if name == "__main__":
        raise ResourceException(f"{stem}.py is run as a directory or zip file, which cannot be shipped")
    _check_conflict(dir_path, name, module)
    return name, dir_path


def _import_root(stem: str, name: str) -> str:
    """The directory to put on ``sys.path`` to import *name* from the file
    *stem* (path without extension)."""
    parts = stem.split(os.sep)
    if parts[-1] == "__init__":  # a package
        parts.pop()
    for component in reversed(name.split(".")):
        if len(parts) < 2 or parts.pop() != component:
            raise ResourceException(f"module {name!r} was loaded from {stem}, a path that does not match its name")
    return os.sep.join(parts) or os.sep


def _check_conflict(dir_path: str, name: str, main: ModuleType) -> None:
    """Raise ResourceException if *name* could be imported from anywhere
    but the script itself: another module of that name in sys.modules,
    found by a meta path finder on ``sys.path`` without *dir_path*, or a
    package of that name beside the script. Nothing is imported."""
    origin = _colliding_origin(dir_path, name, main)
    if origin is not None:
        raise ResourceException(
            f"the script {main.__file__} collides with the importable module {name!r} from {origin}; "
            "a worker would import that instead: rename the script"
        )


def _colliding_origin(dir_path: str, name: str, main: ModuleType) -> Optional[str]:
    """Where a module *name* other than the script *main* would come from."""
    existing = sys.modules.get(name)
    if existing is not None and existing is not main:
        return getattr(existing, "__file__", None) or repr(existing)
    if _init_file(os.path.join(dir_path, name)):  # a package beside the script wins over it
        return os.path.join(dir_path, name)
    spec = _find_spec_without(name, os.path.realpath(dir_path))
    return None if spec is None else spec.origin or repr(spec)


def _find_spec_without(name: str, excluded: str) -> Any:
    """The spec the import system would find for the top-level module *name*
    if the directory *excluded* were not on ``sys.path`` -- without
    importing anything or changing ``sys.path``."""
    import importlib.machinery

    path = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != excluded]
    for finder in sys.meta_path:
        if finder is importlib.machinery.PathFinder:
            spec = finder.find_spec(name, path)
        elif hasattr(finder, "find_spec"):
            spec = finder.find_spec(name, None)
        else:
            continue
        if spec is not None and not (spec.has_location and os.path.dirname(os.path.realpath(spec.origin)) == excluded):
            return spec
    return None


def _in_virtualenv() -> bool:
    return hasattr(sys, "real_prefix") or sys.prefix != getattr(sys, "base_prefix", sys.prefix)
