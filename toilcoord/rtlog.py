"""Real-time logging from workers to the leader, with Toil's names and wire.

On the leader::

    with RealtimeLogger(batchSystem):          # or RealtimeLogger() with no batch system
        ...                                    # run the workers

starts a receiver on a background thread and exports
``TOIL_RT_LOGGING_ADDRESS`` / ``TOIL_RT_LOGGING_LEVEL`` (plus
``TOIL_RT_LOGGING_LOCAL_ADDRESS`` and, unless the leader opted out with
``secret=False`` or ``TOILCOORD_RTLOG_UNSIGNED=1``, a random
``TOIL_RT_LOGGING_SECRET``) for the workers. In
a worker::

    RealtimeLogger.info("step %d of %d", i, n)

sends the record to the leader, which hands it to its ``toil-rt`` logger's
handlers and then, as a Toil leader does, to the ``toil.realtimeLogger``
logger (and so to ``toil``'s and the root's handlers), with the record's own
level and name.

The wire is Toil's: one JSON object per datagram holding a
``logging.LogRecord``'s fields, so a Toil leader reads these records and this
leader reads a Toil worker's. The sender formats the message itself (any
argument works, tracebacks travel as ``exc_text``), truncates what does not fit
in one datagram, numbers its datagrams (``rt_seq``, ``rt_sender``) so the
leader can count losses and drop replays, and with a secret signs them
(``rt_hmac``).

Two transports, chosen by the worker: an abstract AF_UNIX datagram socket
(Linux) for workers that share the leader's network namespace -- a full queue
blocks the sender instead of dropping the record -- and UDP for everyone else.

This module is Toil's API (:class:`RealtimeLogger`) and the leader's
environment; it imports the rest: :mod:`toilcoord.rtwire`, the wire format
(fields, encoding, signing, decoding, validation, replay window; no sockets),
:mod:`toilcoord.rthandler`, the worker's sending handler, and
:mod:`toilcoord.rtserver`, the leader's receiver (sockets and threads).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from .locks import fork_epoch
from .rthandler import RealtimeLogHandler
from .rtserver import RealtimeLogServer
from .rtwire import RECEIVED_MARK, split_address  # noqa: F401 - importable from here as before the split

__all__ = ["RealtimeLogHandler", "RealtimeLogServer", "RealtimeLogger"]

log = logging.getLogger(__name__)

LevelArg = Union[str, int, None, bool]

#: The leader's own opt-out of signing, for a leader it does not construct
#: itself (Toil's leader makes the RealtimeLogger and cannot pass
#: ``secret=False``): "1" there accepts unsigned records.
UNSIGNED_VARIABLE = "TOILCOORD_RTLOG_UNSIGNED"


def parse_level(level: Union[str, int]) -> int:
    """The numeric logging level for a name ("info", "OFF" = CRITICAL), a
    number, or a string of digits; ValueError for anything else."""
    if isinstance(level, bool) or not isinstance(level, (int, str)):
        raise ValueError("logging level must be a level name or number, not %r" % (level,))
    if isinstance(level, int):
        return level
    name = level.strip().upper()
    if name.isdigit():
        return int(name)
    if name == "OFF":  # as in Toil: OFF means only CRITICAL gets through
        return logging.CRITICAL
    number = logging.getLevelName(name)
    if not isinstance(number, int):
        raise ValueError("unknown logging level %r" % (level,))
    return number


def _level_name(level: int) -> str:
    name = logging.getLevelName(level)
    return name if isinstance(name, str) and not name.startswith("Level ") else str(level)


# ------------------------------------------------------- address to advertise


def advertised_host() -> str:
    """An IPv4 address of this host that other nodes can reach, found
    without sending anything: that of the interface holding the default route
    (/proc/net/route), else of the first non-loopback interface that is up,
    else 127.0.0.1."""
    try:
        candidates = _default_route_interfaces() + [name for _, name in _interfaces()]
    except OSError:
        return "127.0.0.1"
    for interface in candidates:
        address = _interface_ipv4(interface)
        if address is not None:
            return address
    return "127.0.0.1"


def _interfaces() -> List[Tuple[int, str]]:
    import socket

    return socket.if_nameindex() if hasattr(socket, "if_nameindex") else []


def _default_route_interfaces() -> List[str]:
    """Interfaces of IPv4 default routes, lowest metric first."""
    try:
        with open("/proc/net/route") as table:
            rows = [line.split() for line in table.readlines()[1:]]
    except OSError:
        return []
    routes = []
    for row in rows:  # Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        if len(row) >= 8 and row[1] == "00000000" and row[7] == "00000000" and int(row[3], 16) & 1:
            routes.append((int(row[6]), row[0]))
    return [name for _, name in sorted(routes)]


def _interface_ipv4(name: str) -> Optional[str]:
    """The IPv4 address of an interface that is up and not loopback."""
    if not sys.platform.startswith("linux"):
        return None
    import fcntl
    import socket
    import struct

    request = struct.pack("256s", name.encode("utf-8", "surrogateescape")[:15])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            flags = struct.unpack("H", fcntl.ioctl(probe.fileno(), 0x8913, request)[16:18])[0]  # SIOCGIFFLAGS
            if not flags & 0x1 or flags & 0x8:  # IFF_UP, IFF_LOOPBACK
                return None
            return socket.inet_ntoa(fcntl.ioctl(probe.fileno(), 0x8915, request)[20:24])  # SIOCGIFADDR
        except OSError:  # no IPv4 address, or the interface vanished
            return None


# ------------------------------------------------------------ Toil's facade


def _unsigned_by_environment() -> bool:
    """Whether this process (a leader) was told by its own environment not
    to sign. A value other than "1", "0" or "" is a mistake that must not
    weaken the leader: it keeps signing."""
    value = os.environ.get(UNSIGNED_VARIABLE, "")
    if value == "1":
        return True
    if value not in ("", "0"):
        log.warning("Real-time logging: %s=%r ignored (1 or 0 only); signing", UNSIGNED_VARIABLE, value[:40])
    return False


def _variables(prefix: str) -> Dict[str, str]:
    return {key: value for key, value in os.environ.items() if key.startswith(prefix)}


def _export(prefix: str, variables: Dict[str, str], batchSystem: Any, prefixed: bool = False) -> None:
    """Replace every ``prefix`` variable of ``os.environ`` with ``variables``
    (named without the prefix unless ``prefixed``), an outer leader's
    included: none may reach this one's workers; tell ``batchSystem``."""
    for key in _variables(prefix):
        del os.environ[key]
    for name, value in variables.items():
        key = name if prefixed else prefix + name
        os.environ[key] = value
        if batchSystem is not None:
            batchSystem.setEnv(key)


def _configure_worker(
    logger: logging.Logger, prefix: str, default_level: str, handler_class: Callable[..., RealtimeLogHandler]
) -> Optional[RealtimeLogHandler]:
    """Give a worker's ``logger`` the handler sending to the leader its
    environment names, at the leader's level, and return that handler; with
    no leader (or one it cannot reach) set it to CRITICAL and return None."""
    environ = os.environ
    address = environ.get(prefix + "ADDRESS")
    if not address:
        logger.setLevel(logging.CRITICAL)
        return None
    try:
        level = parse_level(environ.get(prefix + "LEVEL") or default_level)
    except ValueError as error:
        log.warning("Real-time logging at %s: %s", default_level, error)
        level = parse_level(default_level)
    try:
        handler = handler_class(
            address, local_address=environ.get(prefix + "LOCAL_ADDRESS"), secret=environ.get(prefix + "SECRET") or None
        )
    except (OSError, ValueError) as error:
        log.warning("Real-time logging disabled: cannot send to %s: %s", address, error)
        logger.setLevel(logging.CRITICAL)
        return None
    logger.setLevel(level)
    logger.addHandler(handler)
    return handler


def _leader_secret(prefix: str, secret: Union[str, bool, None]) -> Optional[str]:
    if secret is None:
        import secrets

        return os.environ.get(prefix + "SECRET") or secrets.token_hex(32)
    return secret or None  # False or "": opted out


class _RealtimeLoggerMeta(type):
    """Lets ``RealtimeLogger.info(...)`` etc. reach the worker's logger."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("_"):  # keep introspection from configuring logging
            raise AttributeError(name)
        return getattr(cls.getLogger(), name)


def _check_leader_arguments(level: LevelArg, host: Optional[str], port: int, secret: Union[str, bool, None]) -> None:
    """Raise ValueError or TypeError for a bad argument of a leader."""
    if level not in (None, False, ""):
        parse_level(level)  # type: ignore[arg-type]
    if host is not None and (not isinstance(host, str) or not host or "%" in host):
        raise ValueError("host must be a non-empty host name or address, not %r" % (host,))
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise ValueError("port must be an int from 0 to 65535, not %r" % (port,))
    if secret is not None and secret is not False and not isinstance(secret, str):
        raise TypeError("secret must be a str, None or False, not %s" % type(secret).__name__)


def _leader_variables(server: RealtimeLogServer, advertised: str, level: int, secret: Optional[str]) -> Dict[str, str]:
    """The TOIL_RT_LOGGING_* variables (without the prefix) a leader exports."""
    shown = "[%s]" % advertised if ":" in advertised else advertised
    variables = {"ADDRESS": "%s:%d" % (shown, server.server_address[1]), "LEVEL": _level_name(level)}
    if server.local_address:
        variables["LOCAL_ADDRESS"] = server.local_address
    if secret:
        variables["SECRET"] = secret
    return variables


def _warn_unsigned(address: str) -> None:
    log.warning(
        "Real-time logging unsigned (%s=1): records from any process on this node, and from "
        "anyone who can reach %s, are accepted",
        UNSIGNED_VARIABLE,
        address,
    )


def _drain(server: RealtimeLogServer, thread: Optional[threading.Thread], lock: Any) -> None:
    """Stop *server*, join its *thread*, close it and log its summary. *lock*
    (held) is released meanwhile: a handler that calls getLogger() on the
    server thread must not deadlock against us."""
    lock.release()
    try:
        server.shutdown()
        if thread is not None and thread.ident is not None:
            thread.join()
        server.server_close()
    finally:
        lock.acquire()
    log.info(server.summary())


class RealtimeLogger(metaclass=_RealtimeLoggerMeta):
    """Toil's real-time logger: a context manager on the leader, a logger on
    the workers.

    On the leader, ``with RealtimeLogger(batchSystem=None, level="INFO",
    host=None, port=0, secret=None):`` starts the receiver
    (:class:`RealtimeLogServer`) and exports ``TOIL_RT_LOGGING_ADDRESS``,
    ``TOIL_RT_LOGGING_LEVEL``, ``TOIL_RT_LOGGING_LOCAL_ADDRESS`` (Linux) and,
    with a secret, ``TOIL_RT_LOGGING_SECRET`` -- in ``os.environ``, and through
    ``batchSystem.setEnv(name)`` when a batch system is given; variables an
    outer leader had set are replaced meanwhile. ``host`` is the address
    advertised to workers and the only one the UDP socket binds (default:
    this host's address on its default-route interface, found without
    network traffic); a name is bound as it resolves here, and an address
    that is not this host's raises OSError. ``level`` None, False or ""
    disables real-time logging. Entries nest; the last exit stops the
    receiver, closes its sockets, restores the variables as they were before
    the first entry, and logs a one-line summary.

    ``secret`` None (the default) signs with ``TOIL_RT_LOGGING_SECRET`` if
    set, else with a new random secret (``secrets.token_hex(32)``) for this
    leader; the leader drops unsigned, wrongly signed and replayed datagrams.
    A str is the secret itself. ``False`` (or "") opts out: no secret, so
    Toil's own workers, which cannot sign, are heard -- and so is anyone
    who can reach the socket. ``TOILCOORD_RTLOG_UNSIGNED=1`` in the
    leader's own environment opts out the same way where ``secret`` is None
    (a leader Toil makes), even over an inherited ``TOIL_RT_LOGGING_SECRET``,
    and logs one WARNING per leader saying so; "0" or unset keeps signing,
    any other value is ignored with a WARNING. Workers never read it.

    Everywhere, ``RealtimeLogger.getLogger()`` (and ``RealtimeLogger.logger``,
    always that Logger, as in Toil once used) is the ``toil-rt`` logger,
    configured from the environment when first used: with an address it
    sends at the leader's level (and still propagates locally); without one
    it is set to CRITICAL and sends nothing. In the process running the leader
    (not its forked children) it just logs locally at the leader's level.
    """

    envPrefix = "TOIL_RT_LOGGING_"
    defaultLevel = "INFO"
    lock = threading.RLock()
    loggingServer: Optional[RealtimeLogServer] = None
    serverThread: Optional[threading.Thread] = None
    initialized = 0
    #: Always the ``toil-rt`` Logger; :meth:`getLogger` configures it first.
    logger: Optional[logging.Logger] = logging.getLogger("toil-rt")

    #: Factories, overridable as in logging.handlers / socketserver.
    serverClass = RealtimeLogServer
    handlerClass = RealtimeLogHandler

    _handler: Optional[RealtimeLogHandler] = None
    _configured = False
    _leaderLevel = logging.INFO
    _savedEnvironment: Dict[str, str] = {}

    def __init__(
        self,
        batchSystem: Any = None,
        level: LevelArg = defaultLevel,
        host: Optional[str] = None,
        port: int = 0,
        secret: Union[str, bool, None] = None,
        localSocket: bool = True,
    ) -> None:
        _check_leader_arguments(level, host, port, secret)
        self._batchSystem = batchSystem
        self._level = level
        self._host = host
        self._port = port
        self._secret = secret
        self._localSocket = localSocket

    def __enter__(self) -> "RealtimeLogger":
        RealtimeLogger._startLeader(
            self._batchSystem, self._level, self._host, self._port, self._secret, self._localSocket
        )
        self._entered_in = fork_epoch()
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if self._entered_in != fork_epoch():
            return  # entered by the parent of this forked child: its leader, not ours
        RealtimeLogger._stopLeader()

    # -- leader

    @classmethod
    def _startLeader(
        cls,
        batchSystem: Any = None,
        level: LevelArg = defaultLevel,
        host: Optional[str] = None,
        port: int = 0,
        secret: Union[str, bool, None] = None,
        localSocket: bool = True,
    ) -> None:
        with cls.lock:
            if cls.initialized == 0:
                # Restored at the last exit: a leader that is itself a worker
                # gets its own leader's variables back.
                cls._savedEnvironment = _variables(cls.envPrefix)
                if level:
                    cls._startServer(batchSystem, parse_level(level), host, port, secret, localSocket)
                else:
                    log.debug("Real-time logging disabled")
            elif level:
                log.debug("Real-time logging already running; nested entry counted")
            cls.initialized += 1

    @classmethod
    def _startServer(
        cls,
        batchSystem: Any,
        level: int,
        host: Optional[str],
        port: int,
        secret: Union[str, bool, None],
        localSocket: bool,
    ) -> None:
        unsigned_by_environment = secret is None and _unsigned_by_environment()
        secret = None if unsigned_by_environment else _leader_secret(cls.envPrefix, secret)
        if host == "localhost":
            host = "127.0.0.1"  # "localhost" may resolve to ::1 on the workers
        advertised = host or advertised_host()
        server = cls.serverClass(advertised, port, secret=secret, local_socket=localSocket)
        thread = threading.Thread(target=server.serve_forever, name="toil-rt-server", daemon=True)
        cls.loggingServer, cls.serverThread, cls._leaderLevel = server, thread, level
        try:
            thread.start()
            variables = _leader_variables(server, advertised, level, secret)
            _export(cls.envPrefix, variables, batchSystem)
        except BaseException:
            cls._stopServer()
            raise
        cls._resetLogger()  # from now on this process logs locally
        log.info("Real-time logging listening on %s", variables["ADDRESS"])
        if unsigned_by_environment:
            _warn_unsigned(variables["ADDRESS"])

    @classmethod
    def _stopLeader(cls) -> None:
        with cls.lock:
            if cls.initialized == 0:
                raise RuntimeError("RealtimeLogger exited more often than entered")
            cls.initialized -= 1
            if cls.initialized == 0:
                cls._stopServer()

    @classmethod
    def _stopServer(cls) -> None:
        server, thread = cls.loggingServer, cls.serverThread
        cls.loggingServer = cls.serverThread = None
        _export(cls.envPrefix, cls._savedEnvironment, None, prefixed=True)
        cls._savedEnvironment = {}
        cls._resetLogger()
        if server is not None:
            _drain(server, thread, cls.lock)

    # -- worker

    @classmethod
    def getLogger(cls) -> logging.Logger:
        """The ``toil-rt`` logger, configured on first use (see the class)."""
        logger = cls.logger
        if logger is None or not cls._configured:  # None: reset the way Toil's code does
            with cls.lock:
                if cls.logger is None or not cls._configured:
                    if cls._configured:
                        cls._resetLogger()  # drop the handler the old configuration added
                    cls.logger = cls._configureLogger(logging.getLogger("toil-rt"))
                    cls._configured = True
                logger = cls.logger
        return logger

    @classmethod
    def _configureLogger(cls, logger: logging.Logger) -> logging.Logger:
        if cls.loggingServer is not None:
            logger.setLevel(cls._leaderLevel)  # the leader's own records stay local
        else:
            cls._handler = _configure_worker(logger, cls.envPrefix, cls.defaultLevel, cls.handlerClass)
        return logger

    @classmethod
    def _resetLogger(cls) -> None:
        """Forget the configuration; the next getLogger() reads it anew."""
        handler, cls._handler, cls._configured = cls._handler, None, False
        cls.logger = logging.getLogger("toil-rt")
        if handler is not None:
            logging.getLogger("toil-rt").removeHandler(handler)
            handler.close()


def _forget_the_leader_after_fork() -> None:
    cls = RealtimeLogger
    cls.lock = threading.RLock()  # another thread may have held it at fork time
    if cls.loggingServer is not None:
        # The child is a worker of its parent's leader: the environment
        # still points there. The server threads did not survive the fork.
        cls.loggingServer.server_close()
        cls.loggingServer = cls.serverThread = None
        cls.initialized = 0
        cls._savedEnvironment = {}
        cls._configured = False


os.register_at_fork(after_in_child=_forget_the_leader_after_fork)


# ------------------------------------------------- this package's own logs

#: Toil's module that sets every other top-level package's logger to
#: CRITICAL (``suppress_exotic_logging``), meaning noisy third-party libraries.
_TOIL_SILENCER = "toil.statsAndLogging"


def keep_package_logs_audible(package: str = __name__.rpartition(".")[0]) -> logging.Logger:
    """Make the logger of this package (``toilcoord``, or the top of a
    vendored copy) ignore the level Toil's logging set-up gives every
    package that is not Toil's, so that our warnings (lock retries, corrupt
    deferred records, real-time logging losses) reach a Toil user's log,
    as Toil's own coordination layer's do. Any other ``setLevel`` call,
    a user's included, works as usual. Idempotent; returns the logger."""
    logger = logging.getLogger(package)
    if getattr(logger.setLevel, "_keeps_package_audible", False):
        return logger
    set_level = logger.setLevel

    def setLevel(level: Union[int, str]) -> None:  # noqa: N802 - logging's name
        getframe = getattr(sys, "_getframe", None)
        caller = getframe(1).f_globals.get("__name__") if getframe is not None else None
        if caller == _TOIL_SILENCER:
            return
        set_level(level)

    setLevel._keeps_package_audible = True  # type: ignore[attr-defined]
    logger.setLevel = setLevel  # type: ignore[method-assign]
    return logger


keep_package_logs_audible()
