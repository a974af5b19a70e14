"""Files and directories a leader saves for its workers, with Toil's names.

On the leader, :meth:`Resource.create` (through a subclass: a
:class:`FileResource`, :class:`DirectoryResource` or
:class:`VirtualEnvResource`) saves a path to a job store (see
:mod:`.jobstore`) and :meth:`Resource.register` exports the resulting
:class:`Resource` as a ``JTRES_<pathHash>`` environment variable. On a
worker, :meth:`Resource.prepareSystem` picks the local resource root
(``JTRES_ROOT``), :meth:`Resource.lookup` finds a registered resource and
:meth:`Resource.download` fetches, verifies and unpacks it there -- trusting
only this user's own directories.

Everything heavy (hashlib, json, zipfile, urllib, tempfile, shutil) is
imported inside the function that needs it: the package's ``__init__``
imports this module.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import IO, Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple, Type

from .locks import check_name
from .resource_errors import ResourceException, ResourceRootError

__all__ = ["DirectoryResource", "FileResource", "Resource", "VirtualEnvResource"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20

_ENV_PREFIX = "JTRES_"
_ROOT_ENV = _ENV_PREFIX + "ROOT"

# Directories whose wholesale shipping is surely a mistake (a script saved
# directly in one of them would ship everything beside it).
_UNSHIPPABLE_DIRS = ("/", "/bin", "/dev", "/etc", "/home", "/proc", "/run", "/sbin", "/sys", "/tmp", "/usr", "/var")


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


# ------------------------------------------------------------------ the resource root

# Copies downloaded privately because the copy at "$JTRES_ROOT/<hash>" (the
# key) was not trusted; Resource.localDirPath answers with these.
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


def _root() -> str:
    """``JTRES_ROOT``; ResourceException if it is unset."""
    root = os.environ.get(_ROOT_ENV)
    if root is None:
        raise ResourceException(f"{_ROOT_ENV} is not set: call Resource.prepareSystem() on the worker first")
    return root


def _trusted_root(create: bool = False) -> str:
    """``JTRES_ROOT``, first replaced (in this process's environment) by a
    fresh private directory if it is untrusted, or unset and *create*."""
    root = os.environ.get(_ROOT_ENV) if create else _root()
    why = None if root is None else _distrust(root)
    if root is None or why is not None:
        import tempfile

        fresh = tempfile.mkdtemp(prefix="jtres-")
        if why is not None:
            logger.warning("Not trusting %s=%s: %s; using %s instead", _ROOT_ENV, root, why, fresh)
        root = os.environ[_ROOT_ENV] = fresh
    return root


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


def _settle_lost_race(temp_dir: str, dir_path: str, why: Optional[str], name: str) -> None:
    """*temp_dir*, a whole copy of the resource *name*, was not renamed to
    *dir_path* (distrusted for *why*, or published first by someone else):
    discard it if the copy there is ours, else keep it as this process's."""
    import shutil

    why = why or _distrust(dir_path)  # someone published first: is theirs ours?
    if why is None:
        logger.debug("Another process localized %s first; discarding this copy", name)
        shutil.rmtree(temp_dir)
    else:
        logger.warning("Not trusting the copy of %s at %s: %s; using %s instead", name, dir_path, why, temp_dir)
        _private_copies[dir_path] = temp_dir


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

    resourceEnvNamePrefix = _ENV_PREFIX
    rootDirPathEnvName = _ROOT_ENV

    @classmethod
    def create(cls, jobStore: Any, leaderPath: str) -> "Resource":
        """Save the file or directory at *leaderPath* to *jobStore* and return
        the resource naming it. Leader only."""
        path_hash = _path_hash(leaderPath)
        digest = _new_hash()
        with cls._load(leaderPath) as src:
            # The name positionally: Toil's FileJobStore calls it sharedFileName.
            with jobStore.write_shared_file_stream(path_hash, encrypted=False) as dst:
                _copy_hashing(src, dst, digest)
        return cls(
            name=os.path.basename(leaderPath),
            pathHash=path_hash,
            url=jobStore.get_shared_public_url(path_hash),
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
        root = os.environ.get(_ROOT_ENV)
        if root is not None and not os.path.isdir(root):
            raise ResourceRootError(
                errno.ENOTDIR,
                f"{_ROOT_ENV} is {root!r}, which is not a directory (Resource root path is not a directory)",
                root,
            )
        _trusted_root(create=True)

    @classmethod
    def cleanSystem(cls) -> None:
        """Remove the resource root with every local copy and unset all
        ``JTRES_`` variables of this process. A root that is not trusted
        (as :meth:`prepareSystem` judges) is not ours to remove: it is left
        alone, with a warning."""
        import shutil

        root = os.environ.pop(_ROOT_ENV, None)
        why = None if root is None or not os.path.lexists(root) else _distrust(root)
        if why is not None:
            logger.warning("Not removing %s=%s: %s", _ROOT_ENV, root, why)
        elif root is not None:
            try:
                shutil.rmtree(root)
            except FileNotFoundError:
                pass
        _private_copies.clear()
        for key in [key for key in os.environ if key.startswith(_ENV_PREFIX)]:
            del os.environ[key]

    def register(self) -> None:
        """Export this resource to this process's environment (and so to the
        workers it or its batch system starts) for :meth:`lookup`."""
        os.environ[_ENV_PREFIX + self.pathHash] = self.pickle()

    @classmethod
    def lookup(cls, leaderPath: str) -> Optional["Resource"]:
        """The registered resource created from *leaderPath* on the leader (a
        path that need not exist here), or None if there is none."""
        path_hash = _path_hash(leaderPath)
        encoded = os.environ.get(_ENV_PREFIX + path_hash)
        if encoded is None:
            return None
        resource = cls.unpickle(encoded)
        if resource.pathHash != path_hash:
            raise ResourceException(f"{_ENV_PREFIX}{path_hash} holds a resource for another path: {resource!r}")
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
        dir_path = os.path.join(_trusted_root(), self.contentHash)
        exists = os.path.lexists(dir_path)
        why = _distrust(dir_path) if exists else None
        if (exists and why is None) or dir_path in _private_copies:
            return
        import shutil
        import tempfile

        temp_dir = tempfile.mkdtemp(dir=os.path.dirname(dir_path), prefix=f".{self.contentHash}-")
        try:
            self._save(temp_dir)
            if callback is not None:
                callback(temp_dir)
            won = why is None and _rename_unless_present(temp_dir, dir_path)
        except BaseException:
            shutil.rmtree(temp_dir, ignore_errors=True)  # a half-made copy; the error says why
            raise
        if not won:
            _settle_lost_race(temp_dir, dir_path, why, self.name)

    @property
    def localPath(self) -> str:
        """Where this resource is (after :meth:`download`) on this node."""
        raise NotImplementedError

    @property
    def localDirPath(self) -> str:
        """The directory holding this resource's local copy on this node
        (this process's private copy if :meth:`download` made one)."""
        dir_path = os.path.join(_root(), self.contentHash)
        return _private_copies.get(dir_path, dir_path)

    def pickle(self) -> str:
        """This resource as ``"<module>.<class>:<JSON list of fields>"``."""
        import json

        return f"{type(self).__module__}.{type(self).__qualname__}:{json.dumps(list(self))}"

    @classmethod
    def unpickle(cls, s: str) -> "Resource":
        """The resource :meth:`pickle` encoded as *s*. The class is looked up
        among the already defined subclasses of this class, never imported."""
        import json

        class_name, colon, payload = s.partition(":")
        try:
            fields = json.loads(payload) if colon else None
        except ValueError:
            fields = None
        if not (
            isinstance(fields, list) and len(fields) == len(cls._fields) and all(isinstance(f, str) for f in fields)
        ):
            raise ValueError(f"not an encoded resource: {s[:200]!r}")
        resource = _subclass_named(cls, class_name)(*fields)
        _check_local_names(resource)
        return resource

    @classmethod
    def _load(cls, path: str) -> IO[bytes]:
        """A readable binary file with the bytes to store for *path*."""
        raise NotImplementedError

    def _save(self, dir_path: str) -> None:
        """Fetch this resource, verify it and unpack it into *dir_path*."""
        raise NotImplementedError

    def _download(self, dst: IO[bytes]) -> None:
        """Copy the bytes at :attr:`url` to *dst*; raise ResourceException
        unless their hash is :attr:`contentHash`."""
        import urllib.request

        digest = _hash_like(self.contentHash)
        with urllib.request.urlopen(self.url) as content:
            _copy_hashing(content, dst, digest)
        if digest.hexdigest() != self.contentHash:
            raise ResourceException(
                f"{self.url} has hash {digest.hexdigest()}, not {self.contentHash}: "
                "it changed or was corrupted after the leader saved it"
            )


def _check_local_names(resource: Resource) -> None:
    """Raise ValueError unless the fields of *resource* that become local
    path components (name, and the hashes) are single, plain components."""
    check_name(resource.name, "resource name")
    for what, value in (("pathHash", resource.pathHash), ("contentHash", resource.contentHash)):
        if len(value) not in (32, 64) or value.strip("0123456789abcdef"):
            raise ValueError(f"resource {what} must be 32 or 64 lowercase hex digits: {value!r}")


def _subclass_named(cls: Type[Resource], class_name: str) -> Type[Resource]:
    """*cls* or the subclass of it called *class_name*, matched by full
    name, else by bare class name when that is unambiguous (so Toil's
    ``toil.resource.FileResource`` means our FileResource)."""
    family: List[Type[Resource]] = [cls]
    for klass in family:  # grows while walked: a breadth-first search
        family.extend(klass.__subclasses__())
    exact = [k for k in family if f"{k.__module__}.{k.__qualname__}" == class_name]
    bare = [k for k in family if k.__qualname__ == class_name.rpartition(".")[2]]
    for candidates in (exact, bare):
        if len(set(candidates)) == 1:
            return candidates[0]
    raise ValueError(f"no single {cls.__name__} class is called {class_name!r}")


class FileResource(Resource):
    """A resource read from a regular file on the leader."""

    @classmethod
    def _load(cls, path: str) -> IO[bytes]:
        return open(path, "rb")

    def _save(self, dir_path: str) -> None:
        with open(os.path.join(dir_path, self.name), "wb") as local_file:
            self._download(local_file)

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
        root_dir = os.path.dirname(path) if _init_file(path) else path
        return _zip_tree(path, root_dir)

    def _save(self, dir_path: str) -> None:
        import tempfile

        from .archives import unpack

        with tempfile.TemporaryFile(dir=os.path.dirname(dir_path)) as archive:
            self._download(archive)
            archive.seek(0)
            unpack(archive, dir_path)

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


# ------------------------------------------------------------------ archiving a directory


def _unshippable_dirs() -> Tuple[str, ...]:
    import tempfile

    extra = (os.path.expanduser("~"), tempfile.gettempdir())
    return _UNSHIPPABLE_DIRS + tuple(os.path.realpath(d) for d in extra)


def _zip_tree(path: str, root_dir: str) -> IO[bytes]:
    """A temporary file holding a ZIP archive of the files under *path*,
    named relative to *root_dir*, in a stable order (so unchanged content
    keeps its hash)."""
    import tempfile
    import zipfile

    archive = tempfile.TemporaryFile()
    try:
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, strict_timestamps=False) as zip_file:
            for file_path in _files_to_ship(path):
                try:
                    zip_file.write(file_path, os.path.relpath(file_path, root_dir))
                except OSError as error:
                    raise ResourceException(f"cannot read {file_path} to ship it: {error}") from error
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
    for dir_name, dir_names, file_names in os.walk(path):
        dir_names.sort()
        for name in list(dir_names):
            if name == "__pycache__" or os.path.islink(os.path.join(dir_name, name)):
                dir_names.remove(name)
                if name != "__pycache__":
                    logger.warning("Not shipping symlinked directory %s", os.path.join(dir_name, name))
        for name in sorted(file_names):
            file_path = os.path.join(dir_name, name)
            if os.path.islink(file_path) and not os.path.exists(file_path):
                logger.warning("Not shipping dangling symlink %s", file_path)
                continue
            if os.path.islink(file_path) and not _is_within(file_path, path):
                logger.warning("Not shipping symlink %s: it leads out of %s", file_path, path)
                continue
            yield file_path


# ------------------------------------------------------------------ paths (also used by .modules)


def _init_file(dir_path: str) -> Optional[str]:
    """The name of *dir_path*'s ``__init__`` module file, if it is a package."""
    for name in ("__init__.py", "__init__.pyc"):
        if os.path.isfile(os.path.join(dir_path, name)):
            return name
    return None


def _is_within(path: str, directory: str) -> bool:
    """Whether *path* is *directory* or below it, symlinks resolved."""
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory
