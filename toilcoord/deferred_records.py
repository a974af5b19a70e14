"""Deferred calls and the records that hold them in a state file.

A :class:`DeferredFunction` is a call captured for later, its parts
pickled at once (:mod:`.pickler`). A state file is a sequence of records:
a 12-byte header (magic, state, format, payload length, CRC-32) and the
pickled fields of one DeferredFunction. The state byte is the only byte
ever rewritten: PENDING to DONE, in place, by one ``pwrite`` after the
function returned, so a finished function never runs again. How state
files are owned, found and taken over is ``deferred.py``'s business.
"""

from __future__ import annotations

import functools
import logging
import os
import types
from typing import Any, Dict, Iterator, NamedTuple, Optional, Tuple

from .pickler import PROTOCOL, ForeignCodeError, callable_name, dumps, is_reachable, short_repr, unserialisable

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "DeferredFunction",
    "call_fields",
    "frame",
    "load_codec",
    "pending_records",
    "run_file",
    "starts_with_a_record",
]

# One logger for everything about deferred functions, whichever module reports.
logger = logging.getLogger(__name__.rpartition(".")[0] + ".deferred")

# pickle, struct and zlib are loaded on first use (importing the package must
# stay light); the hot path reads them from these globals.
_pickle_dumps: Any = None
_crc32: Any = None
_header: Any = None
_EMPTY_ARGS: Any = None  # pickles of () and {}, made once
_EMPTY_KWARGS: Any = None


def load_codec() -> None:
    """Import what records need (once; the hot path then reads globals)."""
    global _pickle_dumps, _crc32, _header, _EMPTY_ARGS, _EMPTY_KWARGS
    if _pickle_dumps is not None:
        return
    import pickle
    import struct
    import zlib

    _crc32 = zlib.crc32
    # magic, state, format version, payload length, CRC-32 of the payload
    _header = struct.Struct("<2sBBII")
    _EMPTY_ARGS = pickle.dumps((), PROTOCOL)
    _EMPTY_KWARGS = pickle.dumps({}, PROTOCOL)
    _pickle_dumps = pickle.dumps


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
        return cls(*call_fields(function, tuple(args), kwargs))

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


def call_fields(function: Any, args: tuple, kwargs: dict) -> tuple:
    """The fields of ``DeferredFunction.create(function, *args, **kwargs)``."""
    if not callable(function):
        raise TypeError(f"cannot defer {short_repr(function)}: it is not callable")
    if _pickle_dumps is None:
        load_codec()
    try:
        if type(function) in _BY_REFERENCE_TYPES:
            pickled, name, module = _by_reference.get(function) or _describe_by_reference(function)
        else:
            pickled = dumps(function)
            name, module = callable_name(function), _module_descriptor(function)
        return (pickled, dumps(args) if args else _EMPTY_ARGS, dumps(kwargs) if kwargs else _EMPTY_KWARGS, name, module)
    except Exception as error:
        report, cause = unserialisable(function, args, kwargs, error)
        raise report from cause


def _describe_by_reference(function: Any) -> Tuple[bytes, str, Any]:
    module = function.__module__
    described = (dumps(function), callable_name(function), _module_descriptor(function))
    if module != "__main__" and is_reachable(function, module):
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
    if not (
        isinstance(fields, tuple)
        and len(fields) == 5
        and all(isinstance(blob, bytes) for blob in fields[:3])
        and isinstance(fields[3], str)
        and isinstance(fields[4], (bytes, str, type(None)))
    ):
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
MAGIC = b"\xdfF"
_PENDING = 0x50
_DONE = 0x44
_DONE_BYTE = bytes((_DONE,))
_STATE_OFFSET = 2
_FORMAT = 1
HEADER_SIZE = 12


# id(module descriptor) -> (the descriptor, its pickle): a record carries the
# descriptor pickled once per module, not pickled again on every defer.
_module_pickles: Dict[int, Tuple[Any, bytes]] = {}


def frame(fields: tuple) -> bytes:
    """A record of a DeferredFunction's fields (a plain tuple: the class
    name must not be in the file), the module descriptor as its pickle."""
    module = fields[4]
    if module is not None and type(module) is not str:
        cached = _module_pickles.get(id(module))
        if cached is None or cached[0] is not module:
            if len(_module_pickles) >= _BY_REFERENCE_MAX:
                _module_pickles.clear()
            cached = _module_pickles[id(module)] = (module, _pickle_dumps(module, PROTOCOL))
        fields = fields[:4] + (cached[1],)
    payload = _pickle_dumps(fields, PROTOCOL)
    return _header.pack(MAGIC, _PENDING, _FORMAT, len(payload), _crc32(payload)) + payload


def _record_end(data: bytes, pos: int) -> Tuple[int, bool]:
    """``(end, intact)`` of the record at *pos*: *end* is -1 where no
    header can be trusted there (nothing after it can be framed either);
    *intact* is False for a record whose payload fails its checksum."""
    if len(data) - pos < HEADER_SIZE:
        return -1, False
    magic, state, version, length, crc = _header.unpack_from(data, pos)
    end = pos + HEADER_SIZE + length
    if magic != MAGIC or version != _FORMAT or state not in (_PENDING, _DONE) or end > len(data):
        return -1, False
    return end, _crc32(memoryview(data)[pos + HEADER_SIZE : end]) == crc


def pending_records(data: bytes, where: str) -> Iterator[Tuple[int, bytes]]:
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
            yield pos, data[pos + HEADER_SIZE : end]
        pos = end


def starts_with_a_record(data: bytes) -> bool:
    """True for a state file of ours: empty (no function deferred yet), or
    beginning with a record header, whole or torn by a crash."""
    if len(data) < HEADER_SIZE:
        return MAGIC.startswith(data[: len(MAGIC)])
    magic, state, version, _, _ = _header.unpack_from(data, 0)
    return magic == MAGIC and version == _FORMAT and state in (_PENDING, _DONE)


def _log_skipped(where: str, start: int, stop: int, size: int) -> None:
    if stop == size:
        logger.error(
            "deferred-function file %s ends in %d unreadable bytes at offset %d "
            "(a record torn by a crash, or corrupt); skipped them",
            where,
            stop - start,
            start,
        )
    else:
        logger.error(
            "deferred-function file %s has a corrupt record of %d bytes at offset %d; skipped "
            "it, the records after it still run",
            where,
            stop - start,
            start,
        )


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


def run_file(read_fd: int, write_fd: int, where: str) -> bool:
    """Run the pending records of a state file in order, marking each done
    as soon as it has returned or raised; return whether the file is one of
    ours (see starts_with_a_record). A BaseException (KeyboardInterrupt,
    SystemExit) from a function propagates and leaves it pending."""
    if _header is None:
        load_codec()
    data = _read_all(read_fd)
    for offset, payload in pending_records(data, where):
        _run_record(payload, offset, where)
        os.pwrite(write_fd, _DONE_BYTE, offset + _STATE_OFFSET)
    return starts_with_a_record(data)


def _run_record(payload: bytes, offset: int, where: str) -> None:
    try:
        function = _decode(payload)
    except Exception:
        logger.exception("cannot read the deferred function at offset %d of %s; skipped it", offset, where)
        return
    try:
        function.invoke()
    except ForeignCodeError as error:
        _failure_logger().error("%s; refused it (from %s)", error, where)
    except Exception:
        _failure_logger().exception("deferred function %s (from %s) failed", function, where)


def _failure_logger() -> logging.Logger:
    """The real-time logger when the leader listens (it also logs here,
    once), else this module's logger."""
    from .rtlog import RealtimeLogger

    realtime = RealtimeLogger.getLogger()
    return realtime if realtime.isEnabledFor(logging.ERROR) else logger
