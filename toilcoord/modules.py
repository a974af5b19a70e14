"""Shipping user code from a leader to its workers, with Toil's names.

On the leader, :meth:`ModuleDescriptor.forModule` describes a loaded module
(``"__main__"`` included), :meth:`ModuleDescriptor.saveAsResourceTo` stores
its file's directory -- or its whole top-level package -- in a job store, and
:meth:`Resource.register` exports the resulting :class:`Resource` as a
``JTRES_<pathHash>`` environment variable for the workers. On a worker,
:meth:`Resource.prepareSystem` picks the local resource root (``JTRES_ROOT``)
and :meth:`ModuleDescriptor.load` downloads, verifies, unpacks and imports
the shipped copy, ahead of any installed module of the same name.

A job store is any object with ``write_shared_file_stream(shared_file_name,
encrypted=False)`` (a context manager yielding a binary writer) and
``get_shared_public_url(shared_file_name)``; the file name is passed
positionally, since Toil's job stores call that parameter ``sharedFileName``
in some places and ``shared_file_name`` in others. Toil's job stores qualify
and :class:`LocalJobStore` is a directory-backed one with ``file:`` URLs.

Everything heavy (hashlib, json, zipfile, urllib, importlib.util, tempfile,
shutil) is imported inside the function that needs it: this module is
imported by the package's ``__init__``.
"""
from __future__ import annotations

import errno
import logging
import os
import sys
from contextlib import contextmanager
from types import ModuleType
from typing import IO, Any, BinaryIO, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Type

from .errors import NotADirectoryRuntimeError
from .locks import check_name

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

_CHUNK = 1 << 20

# Written into a localized copy so globalize() can recover the leader's path.
# Not Toil's ".stash": a user's script directory could hold a file by that name.
_STASH_NAME = ".jtres-stash.json"

# Directories whose wholesale shipping is surely a mistake (a script saved
# directly in one of them would ship everything beside it).
_UNSHIPPABLE_DIRS = ("/", "/bin", "/dev", "/etc", "/home", "/proc", "/run", "/sbin", "/sys", "/tmp", "/usr", "/var")


class ResourceException(RuntimeError):
    """A module or resource cannot be shipped, found or verified."""


class ResourceRootError(NotADirectoryRuntimeError):
    """``JTRES_ROOT`` names something that is not a directory. Both a
    NotADirectoryError and the RuntimeError Toil raises there, so either
    ``except`` clause catches it."""


class _MalformedCommandError(ValueError, RuntimeError):
    """A command :meth:`ModuleDescriptor.fromCommand` cannot read. Toil
    raises RuntimeError for a wrong item count and ValueError for a bad
    ``fromVirtualEnv``: this is both, so either ``except`` clause catches
    either mistake."""


# Copies downloaded privately because the copy at "$JTRES_ROOT/<hash>" (the
# key) was not trusted; localDirPath answers with these.
_private_copies: Dict[str, str] = {}


def _distrust(path: str) -> Optional[str]:
    """Why this process must not import code from the directory *path*, or
    None if it may: it must be a real directory (no symlink, even with a
    trailing slash), owned by the effective uid, writable by neither group
    nor others."""
    import stat

    try:
        info = os.lstat(os.path.normpath(path))
        if stat.S_ISLNK(info.st_mode) or not os.path.samestat(info, os.stat(path)):
            return "it is a symlink"
    except OSError as error:
        return f"it cannot be examined ({error.strerror})"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a directory"
    if info.st_uid != os.geteuid():
        return f"it belongs to uid {info.st_uid}, not {os.geteuid()}"
    if info.st_mode & 0o022:
        return f"group or others may write to it (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


# ------------------------------------------------------------------ hashing

def _new_hash() -> Any:
    """An MD5 hash object that FIPS-mode Pythons allow, or SHA-256 where
    MD5 cannot be had at all (a FIPS-mode Python 3.8 without the
    ``usedforsecurity`` keyword). The hash only detects corruption and names
    files; it protects nothing."""
    import hashlib

    try:
        return hashlib.md5(usedforsecurity=False)  # type: ignore[call-arg]
    except TypeError:  # Python 3.8 has no usedforsecurity keyword
        pass
    try:
        return hashlib.md5()
    except ValueError:  # FIPS mode forbids MD5 for any purpose here
        return hashlib.sha256()


def _hash_like(hexdigest: str) -> Any:
    """A fresh hash object of the algorithm that produced *hexdigest*, told
    apart by length: 32 hex digits are MD5, 64 are SHA-256."""
    if len(hexdigest) == 64:
        import hashlib

        return hashlib.sha256()
    digest = _new_hash()
    if digest.name != "md5":
        raise ResourceException(
            f"the resource was hashed with MD5 ({hexdigest}) but this Python cannot compute MD5 "
            "(FIPS mode without usedforsecurity, Python 3.8); run leader and workers on Python 3.9+"
        )
    return digest


def _path_hash(path: str) -> str:
    digest = _new_hash()
    digest.update(path.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _copy_hashing(src: IO[bytes], dst: IO[bytes], digest: Any) -> None:
    for chunk in iter(lambda: src.read(_CHUNK), b""):
        digest.update(chunk)
        dst.write(chunk)


# ------------------------------------------------------------------ job store

class LocalJobStore:
    """A job store in a local or shared directory, enough for
    :meth:`Resource.create`: shared files are written atomically (a reader
    sees the old file or the whole new one) and published as ``file:`` URLs.
    The directory is created if missing."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"LocalJobStore path must be a str or os.PathLike, not {type(path).__name__}")
        self.path = os.path.abspath(os.fspath(path))
        os.makedirs(self.path, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalJobStore({self.path!r})"

    def _shared_path(self, shared_file_name: str) -> str:
        return os.path.join(self.path, check_name(shared_file_name, "shared file name"))

    @contextmanager
    def write_shared_file_stream(self, shared_file_name: str, encrypted: bool = False) -> Iterator[BinaryIO]:
        """Yield a binary writer; on a clean exit its bytes replace the shared
        file *shared_file_name* at once, on an exception nothing changes.
        ``encrypted=True`` raises ValueError: this store cannot encrypt."""
        final = self._shared_path(shared_file_name)
        if encrypted:
            raise ValueError("LocalJobStore cannot encrypt shared files; pass encrypted=False")
        temp = f"{final}.{os.urandom(6).hex()}.tmp"
        # 0o666 under the umask, unlike mkstemp's 0o600: workers may read
        # the store as another user of a shared filesystem.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            with open(fd, "wb") as writer:
                yield writer
            os.replace(temp, final)
        except BaseException:
            os.unlink(temp)
            raise

    def get_shared_public_url(self, shared_file_name: str) -> str:
        """The ``file:`` URL of the shared file (which need not exist yet)."""
        from pathlib import Path

        return Path(self._shared_path(shared_file_name)).as_uri()


# ------------------------------------------------------------------ resources

class Resource(NamedTuple):
    """A file or directory saved by the leader for every worker to download.

    ``name`` is the basename of the leader's path; ``pathHash`` the MD5 hex
    digest of that path (the shared file's name in the job store and the key
    of its ``JTRES_`` environment variable); ``url`` where workers fetch it;
    ``contentHash`` the MD5 hex digest of the stored bytes, checked on every
    download and naming the local copy. Where MD5 is unavailable even with
    ``usedforsecurity=False`` (FIPS-mode Python 3.8) both are SHA-256.
    """

    name: str
    pathHash: str
    url: str
    contentHash: str

    resourceEnvNamePrefix = "JTRES_"
    rootDirPathEnvName = resourceEnvNamePrefix + "ROOT"

    @classmethod
    def create(cls, jobStore: Any, leaderPath: str) -> "Resource":
        """Save the file or directory at *leaderPath* to *jobStore* and return
        the resource naming it. Leader only."""
        pathHash = _path_hash(leaderPath)
        digest = _new_hash()
        with cls._load(leaderPath) as src:
            # The name positionally: Toil's FileJobStore calls it sharedFileName.
            with jobStore.write_shared_file_stream(pathHash, encrypted=False) as dst:
                _copy_hashing(src, dst, digest)
        return cls(
            name=os.path.basename(leaderPath),
            pathHash=pathHash,
            url=jobStore.get_shared_public_url(pathHash),
            contentHash=digest.hexdigest(),
        )

    def refresh(self, jobStore: Any) -> "Resource":
        """This resource with its URL asked afresh of *jobStore* (signed URLs expire)."""
        return self._replace(url=jobStore.get_shared_public_url(self.pathHash))

    @classmethod
    def prepareSystem(cls) -> None:
        """Make sure ``JTRES_ROOT`` names a directory for local copies that
        only this user can change, creating a private temporary one (and
        exporting it to child processes) if it is unset. A set one that is
        a symlink, belongs to another user or is writable by group or others
        is replaced the same way, with a warning saying why (see
        :meth:`download`). A set one that is not a directory raises
        :class:`ResourceRootError` (a NotADirectoryError and a RuntimeError,
        as Toil raises). Worker only; idempotent, not thread-safe."""
        root = os.environ.get(cls.rootDirPathEnvName)
        if root is not None and not os.path.isdir(root):
            raise ResourceRootError(errno.ENOTDIR, f"{cls.rootDirPathEnvName} is {root!r}, which is not a directory "
                                    "(Resource root path is not a directory)", root)
        cls._trusted_root(create=True)

    @classmethod
    def _trusted_root(cls, create: bool = False) -> str:
        """``JTRES_ROOT``, first replaced (in this process's environment) by
        a fresh private directory if it is untrusted, or unset and *create*."""
        root = os.environ.get(cls.rootDirPathEnvName)
        if root is None and not create:
            raise ResourceException(
                f"{cls.rootDirPathEnvName} is not set: call Resource.prepareSystem() on the worker first"
            )
        why = None if root is None else _distrust(root)
        if root is None or why is not None:
            import tempfile

            fresh = tempfile.mkdtemp(prefix="jtres-")
            if why is not None:
                logger.warning("Not trusting %s=%s: %s; using %s instead", cls.rootDirPathEnvName, root, why, fresh)
            root = os.environ[cls.rootDirPathEnvName] = fresh
        return root

    @classmethod
    def cleanSystem(cls) -> None:
        """Remove the resource root with every local copy and unset all
        ``JTRES_`` variables of this process. A root that is not trusted
        (as :meth:`prepareSystem` judges) is not ours to remove: it is left
        alone, with a warning."""
        import shutil

        root = os.environ.pop(cls.rootDirPathEnvName, None)
        why = None if root is None or not os.path.lexists(root) else _distrust(root)
        if why is not None:
            logger.warning("Not removing %s=%s: %s", cls.rootDirPathEnvName, root, why)
        elif root is not None:
            try:
                shutil.rmtree(root)
            except FileNotFoundError:
                pass
        _private_copies.clear()
        for key in [key for key in os.environ if key.startswith(cls.resourceEnvNamePrefix)]:
            del os.environ[key]

    def register(self) -> None:
        """Export this resource to this process's environment (and so to the
        workers it or its batch system starts) for :meth:`lookup`."""
        os.environ[self.resourceEnvNamePrefix + self.pathHash] = self.pickle()

    @classmethod
    def lookup(cls, leaderPath: str) -> Optional["Resource"]:
        """The registered resource created from *leaderPath* on the leader (a
        path that need not exist here), or None if there is none."""
        pathHash = _path_hash(leaderPath)
        encoded = os.environ.get(cls.resourceEnvNamePrefix + pathHash)
        if encoded is None:
            return None
        resource = cls.unpickle(encoded)
        if resource.pathHash != pathHash:
            raise ResourceException(
                f"{cls.resourceEnvNamePrefix}{pathHash} holds a resource for another path: {resource!r}"
            )
        return resource

    def download(self, callback: Optional[Callable[[str], None]] = None) -> None:
        """Make :attr:`localPath` exist: fetch, verify and unpack this resource
        unless a trusted copy is already there. Needs :meth:`prepareSystem`.

        The copy is assembled in a private (0700) temporary directory beside
        ``$JTRES_ROOT/<contentHash>``, handed to *callback* if given, then
        renamed into place, so nobody ever sees a partial copy. Concurrent
        downloads of one resource are safe: the first rename wins and the
        others discard their copies. A corrupt or refused download raises
        ResourceException and leaves nothing behind.

        Only this user's own directories are trusted: an untrusted
        ``JTRES_ROOT`` is replaced as by :meth:`prepareSystem`, and an
        existing copy that is a symlink, belongs to another user or is
        writable by group or others is never used (nor removed): this
        process downloads its own copy, keeps it in its temporary directory
        and logs one warning saying why."""
        dirPath = os.path.join(self._trusted_root(), self.contentHash)
        exists = os.path.lexists(dirPath)
        why = _distrust(dirPath) if exists else None
        if (exists and why is None) or dirPath in _private_copies:
            return
        import shutil
        import tempfile

        tempDirPath = tempfile.mkdtemp(dir=os.path.dirname(dirPath), prefix=f".{self.contentHash}-")
        try:
            self._save(tempDirPath)
            if callback is not None:
                callback(tempDirPath)
            won = why is None and _rename_unless_present(tempDirPath, dirPath)
        except BaseException:
            shutil.rmtree(tempDirPath, ignore_errors=True)  # a half-made copy; the error says why
            raise
        if won:
            return
        why = why or _distrust(dirPath)  # someone published first: is theirs ours?
        if why is None:
            logger.debug("Another process localized %s first; discarding this copy", self.name)
            shutil.rmtree(tempDirPath)
        else:
            logger.warning("Not trusting the copy of %s at %s: %s; using %s instead",
                           self.name, dirPath, why, tempDirPath)
            _private_copies[dirPath] = tempDirPath

    @property
    def localPath(self) -> str:
        """Where this resource is (after :meth:`download`) on this node."""
        raise NotImplementedError

    @property
    def localDirPath(self) -> str:
        """The directory holding this resource's local copy on this node
        (this process's private copy if :meth:`download` made one)."""
        root = os.environ.get(self.rootDirPathEnvName)
        if root is None:
            raise ResourceException(
                f"{self.rootDirPathEnvName} is not set: call Resource.prepareSystem() on the worker first"
            )
        dirPath = os.path.join(root, self.contentHash)
        return _private_copies.get(dirPath, dirPath)

    def pickle(self) -> str:
        """This resource as ``"<module>.<class>:<JSON list of fields>"``."""
        import json

        return f"{type(self).__module__}.{type(self).__qualname__}:{json.dumps(list(self))}"

    @classmethod
    def unpickle(cls, s: str) -> "Resource":
        """The resource :meth:`pickle` encoded as *s*. The class is looked up
        among the already defined subclasses of this class, never imported."""
        import json

        className, colon, payload = s.partition(":")
        try:
            fields = json.loads(payload) if colon else None
        except ValueError:
            fields = None
        if not (isinstance(fields, list) and len(fields) == len(cls._fields) and all(isinstance(f, str) for f in fields)):
            raise ValueError(f"not an encoded resource: {s[:200]!r}")
        resource = cls._subclass_named(className)(*fields)
        resource._check_local_names()
        return resource

    def _check_local_names(self) -> None:
        """Raise ValueError unless the fields that become local path
        components (name, and the hashes) are single, plain components."""
        check_name(self.name, "resource name")
        for what, value in (("pathHash", self.pathHash), ("contentHash", self.contentHash)):
            if len(value) not in (32, 64) or value.strip("0123456789abcdef"):
                raise ValueError(f"resource {what} must be 32 or 64 lowercase hex digits: {value!r}")

    @classmethod
    def _subclass_named(cls, className: str) -> Type["Resource"]:
        """*cls* or the subclass of it called *className*, matched by full
        name, else by bare class name when that is unambiguous (so Toil's
        ``toil.resource.FileResource`` means our FileResource)."""
        family: List[Type[Resource]] = [cls]
        for klass in family:  # grows while walked: a breadth-first search
            family.extend(klass.__subclasses__())
        exact = [k for k in family if f"{k.__module__}.{k.__qualname__}" == className]
        bare = [k for k in family if k.__qualname__ == className.rpartition(".")[2]]
        for candidates in (exact, bare):
            if len(set(candidates)) == 1:
                return candidates[0]
        raise ValueError(f"no single {cls.__name__} class is called {className!r}")

    @classmethod
    def _load(cls, path: str) -> IO[bytes]:
        """A readable binary file with the bytes to store for *path*."""
        raise NotImplementedError

    def _save(self, dirPath: str) -> None:
        """Fetch this resource, verify it and unpack it into *dirPath*."""
        raise NotImplementedError

    def _download(self, dstFile: IO[bytes]) -> None:
        """Copy the bytes at :attr:`url` to *dstFile*; raise ResourceException
        unless their hash is :attr:`contentHash`."""
        import urllib.request

        digest = _hash_like(self.contentHash)
        with urllib.request.urlopen(self.url) as content:
            _copy_hashing(content, dstFile, digest)
        if digest.hexdigest() != self.contentHash:
            raise ResourceException(
                f"{self.url} has hash {digest.hexdigest()}, not {self.contentHash}: "
                "it changed or was corrupted after the leader saved it"
            )


def _rename_unless_present(source: str, target: str) -> bool:
    """Rename directory *source* to *target*; False if *target* already
    exists with content (another process published first)."""
    try:
        os.rename(source, target)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):  # ENOTDIR: a symlink is there
            return False
        raise
    return True


class FileResource(Resource):
    """A resource read from a regular file on the leader."""

    @classmethod
    def _load(cls, path: str) -> IO[bytes]:
        return open(path, "rb")

    def _save(self, dirPath: str) -> None:
        with open(os.path.join(dirPath, self.name), "wb") as localFile:
            self._download(localFile)

    @property
    def localPath(self) -> str:
        return os.path.join(self.localDirPath, self.name)


class DirectoryResource(Resource):
    """A resource read from a directory on the leader, stored as a ZIP
    archive of every file below it (``__pycache__`` excepted). A package
    directory (one with ``__init__.py``) is archived with its own name as the
    top folder, any other directory with its contents at the top.

    Shipping skips, with a warning, symlinked directories and symlinks
    that dangle or lead out of the directory; a symlinked file inside it
    ships as its content. Unpacking goes through :mod:`.archives`: absolute
    member names, ``..`` components, symbolic links, control characters in
    names and archives past its size or member limits are refused with
    ResourceException, so nothing lands outside the copy or fills the disk."""

    @classmethod
    def _load(cls, path: str) -> IO[bytes]:
        real = os.path.realpath(path)
        if real in _unshippable_dirs():
            raise ResourceException(
                f"refusing to ship all of {path}: move the script or package into a directory of its own"
            )
        rootDir = os.path.dirname(path) if _init_file(path) else path
        return _zip_tree(path, rootDir)

    def _save(self, dirPath: str) -> None:
        import tempfile

        from .archives import unpack

        with tempfile.TemporaryFile(dir=os.path.dirname(dirPath)) as archive:
            self._download(archive)
            archive.seek(0)
            unpack(archive, dirPath)

    @property
    def localPath(self) -> str:
        return self.localDirPath


class VirtualEnvResource(DirectoryResource):
    """A resource read from a virtualenv's ``site-packages`` directory on the
    leader: every module and package in it, archived relative to it."""

    @classmethod
    def _load(cls, path: str) -> IO[bytes]:
        if os.path.basename(path) != "site-packages":
            raise ResourceException(f"a virtualenv resource must be a site-packages directory, not {path}")
        return _zip_tree(path, path)


def _unshippable_dirs() -> Tuple[str, ...]:
    import tempfile

    extra = (os.path.expanduser("~"), tempfile.gettempdir())
    return _UNSHIPPABLE_DIRS + tuple(os.path.realpath(d) for d in extra)


def _zip_tree(path: str, rootDir: str) -> IO[bytes]:
    """A temporary file holding a ZIP archive of the files under *path*,
    named relative to *rootDir*, in a stable order (so unchanged content
    keeps its hash)."""
    import tempfile
    import zipfile

    archive = tempfile.TemporaryFile()
    try:
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, strict_timestamps=False) as zipFile:
            for filePath in _files_to_ship(path):
                try:
                    zipFile.write(filePath, os.path.relpath(filePath, rootDir))
                except OSError as error:
                    raise ResourceException(f"cannot read {filePath} to ship it: {error}") from error
        archive.seek(0)
    except BaseException:
        archive.close()
        raise
    return archive


def _files_to_ship(path: str) -> Iterator[str]:
    """Every file below *path*, sorted; skips ``__pycache__`` (workers
    compile their own), and with a warning symlinked directories (never
    followed, to stay out of cycles) and symlinks that dangle or lead out
    of *path* (another user's key must not reach the job store)."""
    for dirName, dirNames, fileNames in os.walk(path):
        dirNames.sort()
        for name in list(dirNames):
            if name == "__pycache__" or os.path.islink(os.path.join(dirName, name)):
                dirNames.remove(name)
                if name != "__pycache__":
                    logger.warning("Not shipping symlinked directory %s", os.path.join(dirName, name))
        for name in sorted(fileNames):
            filePath = os.path.join(dirName, name)
            if os.path.islink(filePath) and not os.path.exists(filePath):
                logger.warning("Not shipping dangling symlink %s", filePath)
                continue
            if os.path.islink(filePath) and not _is_within(filePath, path):
                logger.warning("Not shipping symlink %s: it leads out of %s", filePath, path)
                continue
            yield filePath


def _init_file(dirPath: str) -> Optional[str]:
    """The name of *dirPath*'s ``__init__`` module file, if it is a package."""
    for name in ("__init__.py", "__init__.pyc"):
        if os.path.isfile(os.path.join(dirPath, name)):
            return name
    return None


# ------------------------------------------------------------------ modules

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
        fileName = getattr(module, "__file__", None)
        if not fileName:
            raise ResourceException(
                f"module {name!r} has no file (interactive session, python -c, built-in or namespace package)"
            )
        stem, extension = os.path.splitext(os.path.abspath(fileName))
        if extension not in (".py", ".pyc"):
            raise ResourceException(f"module {name!r} is {fileName}; only .py and .pyc modules can be shipped "
                                    "(The name of a user script/module must end in .py or .pyc.)")
        if name == "__main__":
            name, dirPath = _main_module_location(module, stem)
        else:
            dirPath = _import_root(stem, name)
        if not os.path.isdir(dirPath):
            raise ResourceException(
                f"module {name!r} would be imported from {dirPath!r}, which is not a directory "
                "(scripts in / and .egg-link installs cannot be shipped)"
            )
        return cls(dirPath=dirPath, name=name, fromVirtualEnv=_in_virtualenv() and _is_within(dirPath, sys.prefix))

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
        return self._resourceClass().create(jobStore, self._resourcePath)

    def localize(self) -> "ModuleDescriptor":
        """If this module was registered as a resource, download it (once
        per node) and return a descriptor of the local copy; otherwise, as on
        the leader, return self. Needs :meth:`Resource.prepareSystem`."""
        resource = Resource.lookup(self._resourcePath)
        if resource is None:
            return self

        def stash(tempDirPath: str) -> None:
            import json

            with open(os.path.join(tempDirPath, _STASH_NAME), "w") as f:
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
        dirPath, name, fromVirtualEnv = command
        if fromVirtualEnv not in ("True", "False"):
            raise _MalformedCommandError(f"fromVirtualEnv must be 'True' or 'False', not {fromVirtualEnv!r}")
        return cls(dirPath=dirPath, name=name, fromVirtualEnv=fromVirtualEnv == "True")

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
    def _resourcePath(self) -> str:
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
            if not _init_file(self._resourcePath):
                raise ResourceException(
                    f"{self._resourcePath} has no __init__.py: namespace packages cannot be shipped"
                )
            return
        if _init_file(self.dirPath):
            parent, package = os.path.split(self.dirPath)
            raise ResourceException(
                f"{self.name} is a top-level script inside the package directory {self.dirPath}, which "
                f"cannot be shipped; run it as a module instead: "
                f"PYTHONPATH={parent} {sys.executable} -m {package}.{self.name}"
            )

    def _resourceClass(self) -> Type[Resource]:
        path = self._resourcePath
        if self.fromVirtualEnv:
            return VirtualEnvResource
        if os.path.isdir(path):
            return DirectoryResource
        if os.path.isfile(path):
            return FileResource
        raise ResourceException(f"{path} is neither a file nor a directory" if os.path.exists(path)
                                else f"{path} does not exist")

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
        fileName = getattr(loaded, "__file__", None)
        if fileName and not _is_within(fileName, self.dirPath):
            raise ImportError(
                f"{self.name!r} was imported from {fileName}, not from the copy in {self.dirPath}: "
                f"a module of that name (or its package) was imported before load() was called",
                name=self.name,
            )


def _main_module_location(module: ModuleType, stem: str) -> Tuple[str, str]:
    """The importable name and import root of the ``__main__`` module whose
    file is *stem* plus an extension."""
    spec = getattr(module, "__spec__", None)
    if spec is not None and spec.name != "__main__":  # python -m pkg.mod
        return spec.name, _import_root(stem, spec.name)
    dirPath, name = os.path.split(stem)  # python dir/script.py
    if name == "__main__":
        raise ResourceException(f"{stem}.py is run as a directory or zip file, which cannot be shipped")
    _check_conflict(dirPath, name, module)
    return name, dirPath


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


def _check_conflict(dirPath: str, name: str, main: ModuleType) -> None:
    """Raise ResourceException if *name* could be imported from anywhere
    but the script itself: another module of that name in sys.modules,
    found by a meta path finder on ``sys.path`` without *dirPath*, or a
    package of that name beside the script. Nothing is imported."""
    origin = _colliding_origin(dirPath, name, main)
    if origin is not None:
        raise ResourceException(
            f"the script {main.__file__} collides with the importable module {name!r} from {origin}; "
            "a worker would import that instead: rename the script"
        )


def _colliding_origin(dirPath: str, name: str, main: ModuleType) -> Optional[str]:
    """Where a module *name* other than the script *main* would come from."""
    existing = sys.modules.get(name)
    if existing is not None and existing is not main:
        return getattr(existing, "__file__", None) or repr(existing)
    if _init_file(os.path.join(dirPath, name)):  # a package beside the script wins over it
        return os.path.join(dirPath, name)
    spec = _find_spec_without(name, os.path.realpath(dirPath))
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


def _is_within(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory
