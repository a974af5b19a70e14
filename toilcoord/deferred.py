"""Deferred functions: cleanup that still runs when its process is SIGKILLed.

A worker registers cleanup with :class:`DeferredFunctionManager`; each
function is written, framed and checksummed, to the worker's own state file
before ``defer`` returns. The file is held locked for as long as the worker
lives (:class:`~.locks.HeldFile`), so when the worker dies without running
its functions, whichever process next opens or closes a manager on the same
directory (or ``cleanupWorker``) sees the lock free, takes the file over and
runs them.

Guarantees, precisely:

* At most once for finished work: after a function returns (or raises), a
  one-byte "done" mark is written over its record before the next one
  starts, so neither a crash of the owner nor of an orphan-runner ever runs
  it again.
* At least once for everything else: a function that has not finished
  (not started, or interrupted mid-run by the death of the process running
  it) runs later, once its file is taken over; only an interrupted one can
  therefore run twice.

The records live in the kernel (written with ``os.write``) when ``defer``
returns, which is all that SIGKILL-safety needs; nothing is fsynced, so
after a power loss the newest records may be missing or torn (a torn record
is skipped with an error log, never a crash).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import sys
import types
import weakref
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Tuple

from .locks import HeldFile, PathArg, discard_taken, locked_file_is, release_taken, take_over

__all__ = ["DeferredFunction", "DeferredFunctionManager"]

logger = logging.getLogger(__name__)

# ------------------------------------------------------------ serialising

# pickle, struct and zlib are loaded on first use (importing the package must
# stay light); the hot path reads them from these globals.
_pickle_dumps: Any = None
_crc32: Any = None
_header: Any = None
_EMPTY_ARGS: Any = None  # pickles of () and {}, made once
_EMPTY_KWARGS: Any = None

# A fixed protocol, so every Python from 3.8 on reads what any other wrote.
_PROTOCOL = 5


def _load_codec() -> None:
    global _pickle_dumps, _crc32, _header, _EMPTY_ARGS, _EMPTY_KWARGS
    import pickle
    import struct
    import zlib

    _crc32 = zlib.crc32
    # magic, state, format version, payload length, CRC-32 of the payload
    _header = struct.Struct("<2sBBII")
    _EMPTY_ARGS = pickle.dumps((), _PROTOCOL)
    _EMPTY_KWARGS = pickle.dumps({}, _PROTOCOL)
    _pickle_dumps = pickle.dumps


def _dumps(obj: object) -> bytes:
    """Pickle *obj* so that another process on this node can load it."""
    try:
        data = _pickle_dumps(obj, _PROTOCOL)
    except Exception:
        # Lambdas, nested functions and the like: the full pickler below
        # either handles them or raises the error worth reporting.
        return _dumps_by_value(obj)
    if b"__main__" in data:
        # Plain pickle refers to __main__ by name, which is another program
        # in the process that runs it; rare, so pay for the full pickler.
        return _dumps_by_value(obj)
    return data


def _dumps_by_value(obj: object) -> bytes:
    import io

    buffer = io.BytesIO()
    _by_value_pickler()(buffer, _PROTOCOL).dump(obj)
    return buffer.getvalue()


@functools.lru_cache(maxsize=None)
def _by_value_pickler() -> type:
    import pickle

    class ByValuePickler(pickle.Pickler):
        """Carries functions that cannot be imported by name as code."""

        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, types.FunctionType):
                return _reduce_function(obj)
            if isinstance(obj, type):
                return _reduce_class(obj)
            if isinstance(obj, types.ModuleType):
                return _import_module, (_module_reference(obj.__name__),)
            # What a class carried by value holds besides functions.
            if isinstance(obj, (classmethod, staticmethod)):
                return type(obj), (obj.__func__,)
            if type(obj) is property:
                return property, (obj.fget, obj.fset, obj.fdel, obj.__doc__)
            return NotImplemented

    return ByValuePickler


def _main_module_name() -> Optional[str]:
    """The importable name of ``__main__`` (run with ``-m``), or None for a
    script, ``-c`` or an interactive session, which others cannot import."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    return name if name and name != "__main__" else None


def _module_reference(name: str) -> str:
    if name != "__main__":
        return name
    main = _main_module_name()
    if main is None:
        raise TypeError("the __main__ script cannot be imported by another process")
    return main


def _import_module(name: str) -> types.ModuleType:
    if name == _main_module_name():
        return sys.modules["__main__"]  # the creator itself: do not import it twice
    import importlib

    return importlib.import_module(name)


def _load_attribute(module: str, qualname: str) -> Any:
    obj: Any = _import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _is_reachable(obj: Any, module: Optional[str]) -> bool:
    """True if *obj* is what its qualified name finds in its loaded module."""
    found: Any = sys.modules.get(module or "")
    for part in getattr(obj, "__qualname__", "<>").split("."):
        found = getattr(found, part, None)
    return found is obj


def _reduce_by_name(obj: Any) -> Any:
    """How pickle reduces a class or function it can find again by name:
    NotImplemented (pickle's own way), a lookup under the real name of the
    ``__main__`` module, or None: it must travel by value."""
    module = obj.__module__
    if _is_reachable(obj, module):
        if module != "__main__":
            return NotImplemented  # by name, as pickle always does
        main = _main_module_name()
        if main is not None:
            return _load_attribute, (main, obj.__qualname__)
    return None


def _reduce_class(cls: type) -> Any:
    reduced = _reduce_by_name(cls)
    return reduced if reduced is not None else _reduce_class_by_value(cls)


# Set by the interpreter on every class, or describing its instances' layout:
# never carried.
_CLASS_MACHINERY = frozenset(("__dict__", "__weakref__"))


def _reduce_class_by_value(cls: type) -> Any:
    """Carry a class that another process cannot import by name (defined in
    a function, or in the __main__ script) as its name, bases and namespace,
    as lambdas are carried. Plain classes only: a metaclass could do
    anything when the class is made again."""
    if type(cls) is not type:
        raise TypeError(f"class {cls.__qualname__} cannot be imported by another process and has the metaclass "
                        f"{type(cls).__qualname__}; only plain classes defined in functions can be deferred")
    namespace = {key: value for key, value in vars(cls).items() if key not in _CLASS_MACHINERY}
    slots = namespace.get("__slots__", ())
    for slot in ((slots,) if isinstance(slots, str) else slots):
        namespace.pop(slot, None)  # member descriptors: made again from __slots__
    # The class exists (and is memoised) before its namespace is set, so its
    # methods may refer to it (super(), a closure over __class__).
    skeleton = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    if "__slots__" in namespace:
        skeleton["__slots__"] = namespace.pop("__slots__")
    namespace.pop("__module__", None)
    namespace.pop("__qualname__", None)
    return _new_class, (cls.__name__, cls.__bases__, skeleton), namespace, None, None, _set_class_state


def _new_class(name: str, bases: tuple, skeleton: dict) -> type:
    return type(name, bases, dict(skeleton))


def _set_class_state(cls: type, namespace: dict) -> None:
    for key, value in namespace.items():
        setattr(cls, key, value)


class _EmptyCell:
    """Stands for a closure cell that had no value yet."""


def _reduce_function(fn: types.FunctionType) -> Any:
    reduced = _reduce_by_name(fn)
    if reduced is not None:
        return reduced
    import marshal

    globals_module = _globals_module(fn)
    captured = _referenced_globals(fn) if globals_module is None else None
    closure = fn.__closure__ or ()
    values = tuple(_cell_value(cell) for cell in closure)
    # The state is set after the function exists and is memoised, so a
    # function may refer to itself through its closure or globals.
    state = (fn.__qualname__, fn.__module__, fn.__defaults__, fn.__kwdefaults__,
             fn.__dict__ or None, values, captured)
    arguments = (_code_tag(), marshal.dumps(fn.__code__), globals_module, fn.__name__, len(closure))
    return _new_function, arguments, state, None, None, _set_function_state


def _globals_module(fn: types.FunctionType) -> Optional[str]:
    """The module another process imports to get *fn*'s globals, or None if
    they must travel by value (the __main__ script, an exec namespace)."""
    name = fn.__globals__.get("__name__")
    module = sys.modules.get(name) if isinstance(name, str) else None
    if module is None or vars(module) is not fn.__globals__:
        return None
    return name if name != "__main__" else _main_module_name()


def _referenced_globals(fn: types.FunctionType) -> dict:
    names = _global_names(fn.__code__)
    namespace = fn.__globals__
    return {name: namespace[name] for name in names if name in namespace and name != "__builtins__"}


def _global_names(code: types.CodeType) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:
        return _EmptyCell


class _ForeignCodeError(ImportError):
    """Marshalled code made by another Python version (like a .pyc with a
    bad magic number, which importlib reports as ImportError)."""


def _code_tag() -> Tuple[str, bytes]:
    from importlib.util import MAGIC_NUMBER

    return f"{sys.implementation.name} {sys.version_info[0]}.{sys.version_info[1]}", MAGIC_NUMBER


def _new_function(tag: Tuple[str, bytes], code: bytes, globals_module: Optional[str],
                  name: str, cells: int) -> types.FunctionType:
    ours = _code_tag()
    if tuple(tag) != ours:
        # Checked before marshal.loads: foreign bytecode could crash us.
        raise _ForeignCodeError(
            f"deferred function {name} was compiled by {tag[0]} (bytecode {tag[1].hex()}) "
            f"and cannot run on {ours[0]} (bytecode {ours[1].hex()})")
    import builtins
    import marshal

    if globals_module is None:
        namespace = {"__builtins__": builtins}
    else:
        namespace = vars(_import_module(globals_module))
    closure = tuple(types.CellType() for _ in range(cells)) or None
    return types.FunctionType(marshal.loads(code), namespace, name, None, closure)


def _set_function_state(fn: types.FunctionType, state: tuple) -> None:
    qualname, module, defaults, kwdefaults, attributes, values, captured = state
    if captured:
        fn.__globals__.update(captured)
    for cell, value in zip(fn.__closure__ or (), values):
        if value is not _EmptyCell:
            cell.cell_contents = value
    fn.__qualname__ = qualname
    fn.__module__ = module
    fn.__defaults__ = defaults
    fn.__kwdefaults__ = kwdefaults
    if attributes:
        fn.__dict__.update(attributes)


def _callable_name(function: Any) -> str:
    if isinstance(function, functools.partial):
        return f"partial({_callable_name(function.func)})"
    name = getattr(function, "__qualname__", None) or getattr(function, "__name__", None)
    return name if isinstance(name, str) else type(function).__qualname__


def _short_repr(obj: object) -> str:
    try:
        text = repr(obj)
    except Exception:  # a broken __repr__ must not hide the real error
        text = object.__repr__(obj)
    return text if len(text) <= 120 else text[:117] + "..."


def _unserialisable(function: Any, args: tuple, kwargs: dict, error: Exception) -> Tuple[TypeError, BaseException]:
    """Find the first part of a call that cannot be pickled; return the
    TypeError that names it, and the pickling error as its cause."""
    name = _callable_name(function)
    parts = [(f"the function {_short_repr(function)}", function)]
    parts += [(f"argument {index} ({_short_repr(arg)})", arg) for index, arg in enumerate(args)]
    parts += [(f"keyword argument {key}={_short_repr(arg)}", arg) for key, arg in kwargs.items()]
    for what, obj in parts:
        try:
            _dumps(obj)
        except Exception as culprit:
            return TypeError(f"cannot defer {name}: {what} cannot be serialised: {culprit}"), culprit
    # Each part alone pickles, together they do not (say, shared state).
    return TypeError(f"cannot defer {name}: its arguments cannot be serialised: {error}"), error


class DeferredFunction(NamedTuple):
    """A call captured for later: ``function``, ``args`` and ``kwargs`` are
    pickles (made eagerly), ``name`` is the callable's name and ``module``,
    as in Toil, the :class:`~.modules.ModuleDescriptor` of its module
    (globalized: on a worker, the leader's), or None where the module has no
    file to describe (builtins, ``python -c``). :meth:`invoke` uses it to
    make a hot-deployed module loadable when unpickling cannot import it.

    >>> from collections import defaultdict
    >>> df = DeferredFunction.create(defaultdict, None, {'x':1}, y=2)
    >>> df
    DeferredFunction(defaultdict, ...)
    >>> df.invoke() == defaultdict(None, x=1, y=2)
    True
    """

    function: bytes
    args: bytes
    kwargs: bytes
    name: str
    module: Any  # a ModuleDescriptor, or None

    @classmethod
    def create(*args: Any, **kwargs: Any) -> "DeferredFunction":
        """``create(function, *args, **kwargs)``: capture
        ``function(*args, **kwargs)``, serialised now. As in Toil the
        callable may also be given as ``function=``; when it is given
        positionally, a ``function=`` keyword goes to the callable.

        Accepts module-level functions, builtins (``os.remove``), bound
        methods, classmethods, staticmethods, ``functools.partial`` objects,
        lambdas and nested functions (their code travels by value; their
        globals by module name, or by value for the ``__main__`` script;
        their closures by value), and instances of classes defined in
        functions (plain classes, carried by value like lambdas). Raises
        TypeError, naming the culprit, for anything that cannot be
        serialised.
        """
        cls, *args = args  # a classmethod with no named parameters: any keyword is the callable's
        if args:
            function, *args = args
        elif "function" in kwargs:
            function = kwargs.pop("function")
        else:
            raise TypeError("DeferredFunction.create() needs the function to defer")
        return cls(*_fields(function, tuple(args), kwargs))

    def invoke(self) -> Any:
        """Run the captured call and return its result. If the function's
        module cannot be imported here, it is made loadable first through
        ``module`` (a hot-deployed user module is downloaded, as in Toil)."""
        import pickle

        # In this order: loading the function imports its module, which the
        # arguments may need.
        try:
            function = pickle.loads(self.function)
        except ModuleNotFoundError:
            make_loadable = getattr(self.module, "makeLoadable", None)
            if make_loadable is None:
                raise
            make_loadable()
            function = pickle.loads(self.function)
        args = pickle.loads(self.args)
        kwargs = pickle.loads(self.kwargs)
        return function(*args, **kwargs)

    def __str__(self) -> str:
        return f"{type(self).__name__}({self.name}, ...)"

    __repr__ = __str__


# Pickles of plain functions, builtins and classes that pickle by reference,
# so a worker deferring the same cleanup again and again pays only for its
# arguments. Bounded: cleared when full.
_by_reference: Dict[Any, Tuple[bytes, str, Any]] = {}
_BY_REFERENCE_TYPES = (types.FunctionType, types.BuiltinFunctionType, type)
_BY_REFERENCE_MAX = 1024


def _fields(function: Any, args: tuple, kwargs: dict) -> tuple:
    """The fields of ``DeferredFunction.create(function, *args, **kwargs)``."""
    if not callable(function):
        raise TypeError(f"cannot defer {_short_repr(function)}: it is not callable")
    if _pickle_dumps is None:
        _load_codec()
    try:
        if type(function) in _BY_REFERENCE_TYPES:
            pickled, name, module = _by_reference.get(function) or _describe_by_reference(function)
        else:
            pickled = _dumps(function)
            name, module = _callable_name(function), _module_descriptor(function)
        return (pickled, _dumps(args) if args else _EMPTY_ARGS, _dumps(kwargs) if kwargs else _EMPTY_KWARGS,
                name, module)
    except Exception as error:
        report, cause = _unserialisable(function, args, kwargs, error)
        raise report from cause


def _describe_by_reference(function: Any) -> Tuple[bytes, str, Any]:
    module = function.__module__
    described = (_dumps(function), _callable_name(function), _module_descriptor(function))
    if module != "__main__" and _is_reachable(function, module):
        if len(_by_reference) >= _BY_REFERENCE_MAX:
            _by_reference.clear()
        _by_reference[function] = described
    return described


# Module name -> its globalized ModuleDescriptor, or None if it has none.
_descriptors: Dict[str, Any] = {}


def _module_of(function: Any) -> Optional[str]:
    """The name of the module defining *function* (through partials and
    bound methods)."""
    while isinstance(function, functools.partial):
        function = function.func
    function = getattr(function, "__func__", function)
    name = getattr(function, "__module__", None)
    return name if isinstance(name, str) else None


def _module_descriptor(function: Any) -> Any:
    """``ModuleDescriptor.forModule(<function's module>).globalize()``, as
    Toil records it, or None where there is none; computed once per module."""
    name = _module_of(function)
    if name is None:
        return None
    try:
        return _descriptors[name]
    except KeyError:
        pass
    from .modules import ModuleDescriptor

    try:
        descriptor = ModuleDescriptor.forModule(name).globalize()
    except Exception:  # no file (builtins, python -c), a colliding script name, ...
        descriptor = None
    _descriptors[name] = descriptor
    return descriptor


def _decode(payload: bytes) -> DeferredFunction:
    import pickle

    from .modules import ModuleDescriptor

    fields = pickle.loads(payload)
    if not (isinstance(fields, tuple) and len(fields) == 5
            and all(isinstance(blob, bytes) for blob in fields[:3])
            and isinstance(fields[3], str) and isinstance(fields[4], (bytes, str, type(None)))):
        raise ValueError("the record does not hold a deferred function")
    module = fields[4]
    if isinstance(module, bytes):  # a pickled ModuleDescriptor (a str: written by an older toilcoord)
        module = pickle.loads(module)
        if not isinstance(module, ModuleDescriptor):
            raise ValueError("the record's module is not a module descriptor")
    return DeferredFunction(*fields[:4], module)


# ------------------------------------------------------------- records

# A record is a 12-byte header (see _load_codec) and the pickled tuple of a
# DeferredFunction's fields.
# The state byte is the only byte ever rewritten: PENDING -> DONE, in place,
# by one pwrite, after the function returned. The CRC covers the payload;
# after a bad header or payload the reader resynchronises on the next magic.
_MAGIC = b"\xdfF"
_PENDING = 0x50
_DONE = 0x44
_DONE_BYTE = bytes((_DONE,))
_STATE_OFFSET = 2
_FORMAT = 1
_HEADER_SIZE = 12


# id(module descriptor) -> (the descriptor, its pickle): a record carries the
# descriptor pickled once per module, not pickled again on every defer.
_module_pickles: Dict[int, Tuple[Any, bytes]] = {}


def _frame(fields: tuple) -> bytes:
    """A record of a DeferredFunction's fields (a plain tuple: the class
    name must not be in the file), the module descriptor as its pickle."""
    module = fields[4]
    if module is not None and type(module) is not str:
        cached = _module_pickles.get(id(module))
        if cached is None or cached[0] is not module:
            if len(_module_pickles) >= _BY_REFERENCE_MAX:
                _module_pickles.clear()
            cached = _module_pickles[id(module)] = (module, _pickle_dumps(module, _PROTOCOL))
        fields = fields[:4] + (cached[1],)
    payload = _pickle_dumps(fields, _PROTOCOL)
    return _header.pack(_MAGIC, _PENDING, _FORMAT, len(payload), _crc32(payload)) + payload


def _record_end(data: bytes, pos: int) -> Tuple[int, bool]:
    """``(end, intact)`` of the record at *pos*: *end* is -1 where no
    header can be trusted there (nothing after it can be framed either);
    *intact* is False for a record whose payload fails its checksum."""
    if len(data) - pos < _HEADER_SIZE:
        return -1, False
    magic, state, version, length, crc = _header.unpack_from(data, pos)
    end = pos + _HEADER_SIZE + length
    if magic != _MAGIC or version != _FORMAT or state not in (_PENDING, _DONE) or end > len(data):
        return -1, False
    return end, _crc32(memoryview(data)[pos + _HEADER_SIZE:end]) == crc


def _pending_records(data: bytes, where: str) -> Iterator[Tuple[int, bytes]]:
    """Yield ``(offset, payload)`` of each intact record not yet done, in
    file order. Records are read only at frame boundaries from offset 0: a
    record whose payload is corrupt is skipped (its header says where the
    next one starts); after a header that cannot be trusted (a torn tail)
    nothing more is read. Each skip is logged."""
    pos, size = 0, len(data)
    while pos < size:  # every pass moves pos forward
        end, intact = _record_end(data, pos)
        if end < 0:
            _log_skipped(where, pos, size, size)
            return
        if not intact:
            _log_skipped(where, pos, end, size)
        elif data[pos + _STATE_OFFSET] == _PENDING:
            yield pos, data[pos + _HEADER_SIZE:end]
        pos = end


def _starts_with_a_record(data: bytes) -> bool:
    """True for a state file of ours: empty (no function deferred yet), or
    beginning with a record header, whole or torn by a crash."""
    if len(data) < _HEADER_SIZE:
        return _MAGIC.startswith(data[:len(_MAGIC)])
    magic, state, version, _, _ = _header.unpack_from(data, 0)
    return magic == _MAGIC and version == _FORMAT and state in (_PENDING, _DONE)


def _log_skipped(where: str, start: int, stop: int, size: int) -> None:
    if stop == size:
        logger.error("deferred-function file %s ends in %d unreadable bytes at offset %d "
                     "(a record torn by a crash, or corrupt); skipped them", where, stop - start, start)
    else:
        logger.error("deferred-function file %s has a corrupt record of %d bytes at offset %d; skipped "
                     "it, the records after it still run", where, stop - start, start)


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break  # truncated meanwhile
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _run_file(read_fd: int, write_fd: int, where: str) -> bool:
    """Run the pending records of a state file in order, marking each done
    as soon as it has returned or raised; return whether the file is one of
    ours (see _starts_with_a_record). A BaseException (KeyboardInterrupt,
    SystemExit) from a function propagates and leaves it pending."""
    if _header is None:
        _load_codec()
    data = _read_all(read_fd)
    for offset, payload in _pending_records(data, where):
        _run_record(payload, offset, where)
        os.pwrite(write_fd, _DONE_BYTE, offset + _STATE_OFFSET)
    return _starts_with_a_record(data)


def _run_record(payload: bytes, offset: int, where: str) -> None:
    try:
        function = _decode(payload)
    except Exception:
        logger.exception("cannot read the deferred function at offset %d of %s; skipped it", offset, where)
        return
    try:
        function.invoke()
    except _ForeignCodeError as error:
        _failure_logger().error("%s; refused it (from %s)", error, where)
    except Exception:
        _failure_logger().exception("deferred function %s (from %s) failed", function, where)


def _failure_logger() -> logging.Logger:
    """The real-time logger when the leader listens (it also logs here,
    once), else this module's logger."""
    from .rtlog import RealtimeLogger

    realtime = RealtimeLogger.getLogger()
    return realtime if realtime.isEnabledFor(logging.ERROR) else logger


# ------------------------------------------------------ state files

_STATE_DIR_MODE = 0o700
_STATE_FILE_MODE = 0o600
# A concurrent cleanupWorker removes the (empty) state directory at most
# once between our mkdir and our create, so a few attempts are plenty.
_CREATE_ATTEMPTS = 100

_reported_untrusted: set = set()
_reported_foreign: set = set()

# Names of the state files this process holds: its managers' own, and the
# dead processes' files it is running. Scans skip them: where flock is
# emulated with per-process POSIX locks (NFS), this process could otherwise
# "take over" its own files.
_held_here: set = set()


def _make_state_dir(path: str) -> None:
    """Create the state directory mode 0700, or check the existing one (see
    _open_state_dir), taking away read and search bits of others.

    Returns quietly if it vanished meanwhile (the caller retries)."""
    try:
        os.mkdir(path, _STATE_DIR_MODE)
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "the base directory for deferred functions does not exist",
                                os.path.dirname(path)) from None
    try:
        fd = _open_state_dir(path)
    except FileNotFoundError:
        return
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode != _STATE_DIR_MODE:  # on the opened directory: nobody can swap it meanwhile
            logger.info("making deferred-function directory %s mode 0700 (it was %o)", path, mode)
            os.fchmod(fd, _STATE_DIR_MODE)
    except OSError as error:
        if error.errno != errno.ESTALE:
            raise  # else removed meanwhile (NFS): the caller makes it again
    finally:
        os.close(fd)


def _open_state_dir(path: str) -> int:
    """An fd on the state directory: a real directory (never a symlink) of
    this user that nobody else can write, or PermissionError; everything
    in it is then opened relative to this fd. FileNotFoundError if missing
    (or removed meanwhile: on NFS, a stale handle)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise PermissionError(errno.EPERM, "refusing to use a deferred-function directory that is not "
                                  "a directory (a symlink?)", path) from None
        if error.errno == errno.ESTALE:
            raise FileNotFoundError(errno.ENOENT, "removed meanwhile (a stale NFS file handle)", path) from None
        raise
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        os.close(fd)
        raise PermissionError(errno.EPERM, f"refusing to use a deferred-function directory owned by uid "
                              f"{info.st_uid} with mode {stat.S_IMODE(info.st_mode):o}: it must belong to this "
                              f"user (uid {os.geteuid()}) and be writable by nobody else", path)
    return fd


def _open_for_writing(path: str, locked_fd: int, dir_fd: Optional[int] = None) -> int:
    """Open the file we hold locked through *locked_fd* for writing too."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        written, locked = os.fstat(fd), os.fstat(locked_fd)
    except BaseException:  # ESTALE on NFS: removed meanwhile
        os.close(fd)
        raise
    if (written.st_dev, written.st_ino) != (locked.st_dev, locked.st_ino):
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "state file was replaced while being opened", path)
    return fd


def _trusted(fd: int, path: str) -> bool:
    """True if the file may be unpickled: a regular file of this user that
    nobody else can write, with no other link (a hard link to someone's
    file is not theirs to run). Refusals are logged once per file."""
    info = os.fstat(fd)
    if (stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o022
            and info.st_nlink == 1):
        return True
    if (info.st_dev, info.st_ino) not in _reported_untrusted:
        _reported_untrusted.add((info.st_dev, info.st_ino))
        logger.error("refusing to read deferred functions from %s: it is owned by uid %d with mode %o and "
                     "%d links, but only files of this user (uid %d) that nobody else can write, with one "
                     "link, are read; leaving it alone", path, info.st_uid, stat.S_IMODE(info.st_mode),
                     info.st_nlink, os.geteuid())
    return False


def _begins_like_ours(dir_fd: int, name: str) -> bool:
    """Whether the file *name* could be one of our state files: empty, or
    beginning with (part of) a record's magic. Toil's (dill pickles) do not;
    they are never locked, read further, run or removed here."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        head = os.pread(fd, len(_MAGIC), 0)
    except OSError:
        return False
    finally:
        os.close(fd)
    return _MAGIC.startswith(head)


def _run_orphan(dir_fd: int, name: str, where: str) -> None:
    """Run the pending functions in the state file *name* (in the directory
    *dir_fd*, at *where*) if its owner is dead, then remove it."""
    try:
        fd = take_over(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return  # another process got there first
    except OSError as error:
        logger.error("cannot take over deferred-function file %s: %s; leaving it", where, error)
        return
    if fd is None:
        return  # its owner lives
    _held_here.add(name)
    try:
        _run_and_release(fd, name, dir_fd, where)
    finally:
        _held_here.discard(name)


def _run_and_release(fd: int, name: str, dir_fd: int, where: str) -> None:
    try:
        finished = _run_taken(fd, name, dir_fd, where)
    except OSError as error:
        logger.error("cannot run the deferred functions in %s: %s; leaving it for another process", where, error)
        finished = False
    except BaseException:
        release_taken(fd)  # the rest stays for the next process
        raise
    if finished:
        discard_taken(fd, name, dir_fd)
    else:
        release_taken(fd)


def _run_taken(fd: int, name: str, dir_fd: int, where: str) -> bool:
    """Run a taken-over file; True if it is done with and ours to remove.
    A file that does not begin with a record is not ours: it is left alone,
    unread past its first bytes, and reported once."""
    if not _trusted(fd, where):
        return False
    if _header is None:
        _load_codec()
    if not _starts_with_a_record(os.pread(fd, _HEADER_SIZE, 0)):
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) not in _reported_foreign:
            _reported_foreign.add((info.st_dev, info.st_ino))
            logger.error("deferred-function file %s does not begin with a record (not toilcoord's: Toil's, "
                         "or damaged); leaving it", where)
        return False
    write_fd = _open_for_writing(name, fd, dir_fd)
    try:
        ours = _run_file(fd, write_fd, where)
    finally:
        os.close(write_fd)
    if not ours:
        logger.error("deferred-function file %s does not begin with a record; leaving it", where)
    return ours


def _remove_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError as error:
        if error.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
            raise
        if error.errno != errno.ENOENT:
            logger.debug("deferred-function directory %s is still in use; leaving it", path)


def _state_dir_of(stateDirBase: PathArg, stem: str) -> str:
    base = os.fspath(stateDirBase) if isinstance(stateDirBase, (str, os.PathLike)) else None
    if not isinstance(base, str):
        raise TypeError(f"stateDirBase must be a str or an os.PathLike of str, not {_short_repr(stateDirBase)}")
    return os.path.join(base, stem)


# -------------------------------------------------------------- manager

# Managers of this process: a forked child disowns them (see _disown).
_managers: "weakref.WeakSet[DeferredFunctionManager]" = weakref.WeakSet()


class DeferredFunctionManager:
    """Runs a worker's deferred functions, and those of dead workers.

    Each manager holds its own state file,
    ``<stateDirBase>/deferred/toilcoord-func<16 hex digits>``, locked for as
    long as this process lives. Toil's workers keep theirs (dill pickles) in
    the same directory as ``func<8 characters>``: each implementation reads
    only its own, so Toil's scanner never meets ours (its names start with
    ``func``), and ours opens a ``func*`` file only to see whether it is an
    older toilcoord's (it begins with a record, or is empty), leaving
    anything else alone, unlocked and unread. Use it as a context manager
    (or call :meth:`close`) and register cleanup inside :meth:`open`::

        with DeferredFunctionManager(work_dir) as manager:
            with manager.open() as defer:
                defer(shutil.rmtree, scratch)
                run_job()
            # scratch is removed here, or by another worker if we are killed

    A forked child never owns or runs its parent's functions: there the
    manager is inert and using it raises RuntimeError.
    """

    STATE_DIR_STEM = "deferred"
    PREFIX = "func"
    #: Put before PREFIX in the names of our state files, so that Toil's
    #: scanner (which reads every ``func*`` file) never sees them.
    OWN_PREFIX = "toilcoord-"
    #: Names ending with this are never read as state files (reserved for
    #: files being set up; toilcoord itself needs none, since a new state
    #: file is locked and then verified, see HeldFile.create).
    WIP_SUFFIX = ".tmp"

    def __init__(self, stateDirBase: PathArg) -> None:
        self._closed = True  # until constructed, for __del__
        self._inert = False
        self._open = False
        if _pickle_dumps is None:
            _load_codec()
        self.stateDir = _state_dir_of(stateDirBase, self.STATE_DIR_STEM)
        self._file, self._write_fd = self._new_state_file()
        self._closed = False
        _managers.add(self)

    @property
    def stateFileName(self) -> str:
        """Path of this manager's state file."""
        return self._file.path

    def _new_state_file(self) -> Tuple[HeldFile, int]:
        for _ in range(_CREATE_ATTEMPTS):
            _make_state_dir(self.stateDir)
            try:
                held = HeldFile.create(self.stateDir, prefix=self.OWN_PREFIX + self.PREFIX, mode=_STATE_FILE_MODE)
            except FileNotFoundError:
                continue  # removed by a cleanupWorker while empty: make it again
            try:
                os.fchmod(held.fd, _STATE_FILE_MODE)  # whatever the umask: orphan-runners must write the marks
                write_fd = _open_for_writing(held.path, held.fd)
            except OSError as error:
                held.release()
                if error.errno not in (errno.ENOENT, errno.ESTALE):
                    raise
                continue  # removed meanwhile (on NFS, a stale handle): make another
            except BaseException:
                held.release()
                raise
            _held_here.add(held.name)
            return held, write_fd
        raise RuntimeError(f"could not create a state file in {self.stateDir}: the directory keeps disappearing")

    @contextlib.contextmanager
    def open(self) -> Iterator[Callable[..., None]]:
        """Context manager for one job: runs dead processes' functions, then
        yields ``defer``; on exit runs this job's functions in the order
        they were registered, then dead processes' functions again.

        ``defer(function, *args, **kwargs)`` or ``defer(DeferredFunction)``
        records a call in the state file before returning; it raises
        TypeError at once for what cannot be serialised and RuntimeError
        when called outside this block. A function that fails is logged
        and the rest still run. Not reentrant; ``open()`` and ``close()``
        belong to one thread.
        """
        self._check_usable("open()")
        if self._open:
            raise RuntimeError("open() is already active on this DeferredFunctionManager; it cannot be nested")
        self._keep_state_file()
        self._run_orphans()
        self._open = True
        try:
            yield self._defer
        finally:
            self._open = False
            if not self._inert:  # a forked child leaving the block runs nothing of its parent's
                self._run_own()
                self._run_orphans()

    def _defer(self, function: Any, /, *args: Any, **kwargs: Any) -> None:
        """``defer(function, *args, **kwargs)`` or ``defer(DeferredFunction)``:
        the call is in the state file when this returns. May be called from
        several threads of this process."""
        if not self._open:
            raise self._unusable_error("defer()")
        if isinstance(function, DeferredFunction):
            if args or kwargs:
                raise TypeError("defer(DeferredFunction) takes no further arguments: they were captured by create()")
            fields = tuple(function)
        else:
            fields = _fields(function, args, kwargs)
        frame = _frame(fields)
        written = os.write(self._write_fd, frame)
        if written != len(frame):
            self._write_rest(frame, written)

    def _write_rest(self, frame: bytes, written: int) -> None:
        # A short write (a signal, a full disk): finish it, or cut the torn
        # frame off so the file ends on a whole record.
        fd = self._write_fd
        try:
            while written < len(frame):
                count = os.write(fd, frame[written:])
                if count == 0:
                    raise OSError(errno.EIO, "write made no progress", self._file.path)
                written += count
        except BaseException:
            start = os.lseek(fd, 0, os.SEEK_CUR) - written
            os.ftruncate(fd, start)
            os.lseek(fd, start, os.SEEK_SET)
            raise

    def _check_usable(self, what: str) -> None:
        if self._inert or self._closed:
            raise self._unusable_error(what)

    def _unusable_error(self, what: str) -> RuntimeError:
        if self._inert:
            return RuntimeError(f"{what}: this DeferredFunctionManager belongs to the parent of this forked "
                                "process; create a new one here")
        if self._closed:
            return RuntimeError(f"{what}: this DeferredFunctionManager is closed")
        return RuntimeError(f"{what} was called outside DeferredFunctionManager.open(); "
                            "register deferred functions inside the with block")

    def _keep_state_file(self) -> None:
        """Make a new state file if ours was removed from under us (say, by
        deleting the directory): functions in an unlinked file would be
        lost with us."""
        if locked_file_is(self._file.fd, self._file.path):
            return
        logger.warning("deferred-function state file %s was removed by someone else; making a new one",
                       self._file.path)
        self._run_own()
        old_file, old_fd = self._file, self._write_fd
        self._file, self._write_fd = self._new_state_file()
        os.close(old_fd)
        _held_here.discard(old_file.name)
        old_file.release(unlink=False)

    def _run_own(self) -> None:
        _run_file(self._file.fd, self._write_fd, self._file.path)
        os.ftruncate(self._write_fd, 0)
        os.lseek(self._write_fd, 0, os.SEEK_SET)

    def _run_orphans(self) -> None:
        self._run_orphans_in(self.stateDir)

    @classmethod
    def _run_orphans_in(cls, state_dir: str) -> None:
        """Run dead owners' files, everything relative to the state
        directory opened once and checked (a swapped-in symlink cannot
        redirect us)."""
        try:
            dir_fd = _open_state_dir(state_dir)
        except FileNotFoundError:
            return
        own, older = cls.OWN_PREFIX + cls.PREFIX, cls.PREFIX
        try:
            with os.scandir(dir_fd) as entries:
                names = [entry.name for entry in entries
                         if entry.name.startswith((own, older)) and not entry.name.endswith(cls.WIP_SUFFIX)
                         and entry.name not in _held_here and entry.is_file(follow_symlinks=False)]
            for name in names:
                # A func* name is Toil's, unless an older toilcoord wrote it.
                if name.startswith(own) or _begins_like_ours(dir_fd, name):
                    _run_orphan(dir_fd, name, os.path.join(state_dir, name))
        finally:
            os.close(dir_fd)

    def close(self) -> None:
        """Run what is left of this manager's functions and dead processes',
        then remove the state file and release it. Idempotent; raises
        RuntimeError inside :meth:`open`."""
        if self._closed:
            return
        if self._open:
            raise RuntimeError("close() was called inside open(); leave the with block first")
        self._closed = True
        _managers.discard(self)
        if self._inert:
            return
        try:
            self._run_own()
            self._run_orphans()
        finally:
            self._release()

    def _release(self) -> None:
        # Records still pending (their run was interrupted) stay on disk for
        # the next process, exactly as if this one had died.
        pending = os.fstat(self._file.fd).st_size > 0
        os.close(self._write_fd)
        self._write_fd = -1
        if pending:
            logger.warning("leaving unfinished deferred functions in %s for the next process", self._file.path)
        _held_here.discard(self._file.name)
        self._file.release(unlink=not pending)

    def _disown(self) -> None:
        """In a forked child: forget the parent's state (HeldFile already
        closed its locked fd)."""
        self._inert = True
        self._open = False
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1

    def __enter__(self) -> "DeferredFunctionManager":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Fallback only: never runs user code; a pending file is left as an
        # orphan for the next process.
        if self._closed or self._inert:
            return
        self._closed = True
        self._release()

    @classmethod
    def cleanupWorker(cls, stateDirBase: PathArg) -> None:
        """Run the functions of every dead process in *stateDirBase* and
        remove the state directory if nothing else is left in it.

        For a batch system's epilog. Safe while other workers still use the
        directory: live processes' files are never touched, and a worker
        creating its file while the directory goes away makes it again.
        """
        state_dir = _state_dir_of(stateDirBase, cls.STATE_DIR_STEM)
        cls._run_orphans_in(state_dir)
        _remove_if_empty(state_dir)


def _disown_after_fork() -> None:
    for manager in list(_managers):
        manager._disown()
    _managers.clear()
    _held_here.clear()


os.register_at_fork(after_in_child=_disown_after_fork)
