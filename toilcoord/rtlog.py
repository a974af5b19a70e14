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
(``rt_hmac``). What the leader accepts, and how it cleans and bounds it, is
in :mod:`toilcoord.rtwire`.

Two transports, chosen by the worker: an abstract AF_UNIX datagram socket
(Linux) for workers that share the leader's network namespace -- a full queue
blocks the sender instead of dropping the record -- and UDP for everyone else.
The leader drains its UDP socket on a thread that does nothing else and
re-logs from memory on another, so a burst lands in memory rather than
overflowing the kernel buffer.
"""
from __future__ import annotations

import errno
import logging
import os
import sys
import threading
from collections import deque
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from . import rtwire
from .locks import fork_epoch
from .rtwire import MAC as _MAC, SENDER as _SENDER, SEQ as _SEQ

__all__ = ["RealtimeLogHandler", "RealtimeLogServer", "RealtimeLogger"]

log = logging.getLogger(__name__)

LevelArg = Union[str, int, None, bool]

# Set on every record this leader re-logs, so that no sending handler of
# ours ever forwards it again (no feedback loop, whatever handlers exist).
RECEIVED_MARK = "rt_received"
# The leader's owner check: a listening stream socket at the local socket's
# name plus this suffix (see RealtimeLogServer.make_owner_socket).
OWNER_SUFFIX = ".owner"

_TRUNCATED = "[rtlog: %d characters cut to fit one datagram]"
_TRUNCATION_ROOM = len(_TRUNCATED) + 20
# Text fields that may be long, in the order they are cut; msg keeps its head,
# tracebacks keep their tail (the exception itself is at the end).
_LONG_TEXT = ("msg", "exc_text", "stack_info")
_FIELD_TYPES = rtwire.FIELD_TYPES

_SO_RCVBUFFORCE = 33  # Linux; the socket module does not name it

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


# ------------------------------------------------------------------ sender


class RealtimeLogHandler(logging.Handler):
    """Sends each record to a real-time log leader as one JSON datagram.

    ``address`` is the leader's ``host:port`` (UDP). ``local_address`` is the
    leader's AF_UNIX datagram socket ("@name" for the abstract namespace); it is
    used when reachable, that is when this process shares the leader's network
    namespace and its owner check shows a process of this user, and UDP
    otherwise. ``secret`` signs every datagram.

    The record is formatted here: the message with its arguments, the
    traceback of ``exc_info``, the stack; extra attributes JSON cannot encode
    are sent as ``str()``. A record larger than :attr:`max_datagram_size` is
    cut to fit, with a visible marker. ``emit`` never raises: records the
    leader cannot take (gone, queue full past :attr:`local_send_timeout`) are
    counted in :attr:`dropped`; other failures go to ``handleError``.
    Records that a leader received (marked ``rt_received``) are never sent.
    """

    #: Largest datagram sent; UDP over IPv4 carries at most 65507 bytes.
    max_datagram_size = 65000
    #: How long a send on the local socket may block while the leader's queue
    #: is full. After one such timeout, sends stop blocking (and drop) until
    #: the leader takes a record again, so a stopped leader costs one timeout.
    local_send_timeout = 1.0

    def __init__(self, address: str, local_address: Optional[str] = None,
                 secret: Optional[str] = None, level: Union[int, str] = logging.NOTSET) -> None:
        super().__init__(level)
        import json
        import socket

        self._key = secret.encode("utf-8") if secret else None
        self._encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
        self._exception_formatter = logging.Formatter()
        self.dropped = 0
        self.sock, self.transport = self.make_socket(address, local_address)
        self._blocking_flags = getattr(socket, "MSG_NOSIGNAL", 0)
        self._flags = self._blocking_flags
        self._dontwait = socket.MSG_DONTWAIT if self.transport == "unix" else 0
        self._new_identity()

    def _new_identity(self) -> None:
        import itertools
        import socket

        self._generation = fork_epoch()
        self.sender_id = "%s:%d:%s" % (socket.gethostname(), os.getpid(), os.urandom(4).hex())
        self._next_seq = itertools.count().__next__

    def make_socket(self, address: str, local_address: Optional[str]) -> Tuple[Any, str]:
        """A connected datagram socket to the leader and its transport name
        ("unix" or "udp"). Override to change how the leader is reached."""
        if local_address:
            sock = self.make_local_socket(local_address)
            if sock is not None:
                return sock, "unix"
        return self.make_udp_socket(address), "udp"

    def make_local_socket(self, local_address: str) -> Optional[Any]:
        """The AF_UNIX socket connected to the leader, or None if it cannot be
        reached from here (another host or network namespace) or is not
        provably this user's leader (:meth:`local_leader_uid`): another user
        may have bound the name after the leader exited."""
        import socket
        import struct

        if not hasattr(socket, "AF_UNIX"):
            return None
        name = "\0" + local_address[1:] if local_address.startswith("@") else local_address
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect(name)
            # A kernel-side timeout keeps the socket in blocking mode: Python's
            # own timeouts would poll() before every send.
            seconds = int(self.local_send_timeout)
            micros = int((self.local_send_timeout - seconds) * 1e6)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, micros))
            owner = self.local_leader_uid(name)  # after connecting: see make_owner_socket
        except OSError:
            sock.close()
            return None
        if owner != os.geteuid():
            log.warning("Real-time logging over UDP: %s is not this user's leader (owner uid %s)",
                        local_address, owner)
            sock.close()
            return None
        return sock

    def local_leader_uid(self, name: str) -> Optional[int]:
        """The uid of the process listening at ``name`` + ".owner" (SO_PEERCRED
        of a stream connection; datagram sockets carry no peer credentials),
        or None if nobody listens there."""
        import socket
        import struct

        if not hasattr(socket, "SO_PEERCRED"):
            return None
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(self.local_send_timeout)
            probe.connect(name + OWNER_SUFFIX)
            return struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        except OSError:
            return None
        finally:
            probe.close()

    def make_udp_socket(self, address: str) -> Any:
        """A UDP socket connected to ``host:port`` (IPv6 as ``[addr]:port``)."""
        import socket

        host, port = split_address(address)
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.connect(sockaddr)
        except OSError:
            sock.close()
            raise
        return sock

    def emit(self, record: logging.LogRecord) -> None:
        """Format, encode and send one datagram; never raises."""
        if RECEIVED_MARK in record.__dict__:
            return
        try:
            if self._generation != fork_epoch():
                self._new_identity()  # a forked child must not reuse the parent's numbering
            self.send(self.encode(record))
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def encode(self, record: logging.LogRecord) -> bytes:
        """The datagram for ``record``: its fields as JSON, message formatted,
        cut to fit, numbered and (with a secret) signed."""
        fields = self.record_fields(record)
        fields[_SEQ] = self._next_seq()
        fields[_SENDER] = self.sender_id
        limit = self.max_datagram_size - (rtwire.SIGNED_OVERHEAD if self._key else 0)
        try:
            body = self._encode(fields)
        except (TypeError, ValueError):  # e.g. an extra dict with tuple keys
            fields = _stringify_extras(fields)
            body = self._encode(fields)
        if len(body) > limit:
            body = self._fit(fields, body, limit)
        data = body.encode("ascii")  # JSONEncoder escapes all non-ASCII
        return data if self._key is None else rtwire.sign(self._key, data)

    def record_fields(self, record: logging.LogRecord) -> Dict[str, Any]:
        """The record's attributes as sent: message formatted (args dropped),
        traceback as ``exc_text`` (exc_info dropped)."""
        fields = record.__dict__.copy()
        fields["msg"] = record.getMessage()
        fields["args"] = None
        if record.exc_info:
            if not record.exc_text:  # cached on the record, as logging.Formatter does
                record.exc_text = self._exception_formatter.formatException(record.exc_info)
            fields["exc_text"] = record.exc_text
        fields["exc_info"] = None
        fields.pop("message", None)  # a copy of msg left by an earlier formatter
        return fields

    def _fit(self, fields: Dict[str, Any], body: str, limit: int) -> str:
        """Cut the longest text fields, longest first, until ``body`` fits."""
        for name in sorted(_LONG_TEXT, key=lambda key: len(fields.get(key) or ""), reverse=True):
            excess = len(body) - limit
            text = fields.get(name)
            if excess <= 0 or not text:
                break
            # Every character encodes to at least one byte, so cutting this
            # many characters (marker included) always removes enough bytes.
            fields[name] = _cut(text, excess + _TRUNCATION_ROOM, keep_tail=name != "msg")
            body = self._encode(fields)
        if len(body) > limit:  # huge extra attributes: send the bare record
            fields = {key: fields[key] for key in _FIELD_TYPES if key in fields and key not in _LONG_TEXT}
            fields["msg"] = "[rtlog: record too large for one datagram even without its text]"
            body = self._encode(fields)
        return body

    def send(self, data: bytes) -> None:
        """Send one datagram; losses the leader can see are counted, not raised."""
        try:
            self.sock.send(data, self._flags)
        except OSError as error:
            if error.errno not in _DROPPED:
                raise
            self.dropped += 1
            if error.errno == errno.EAGAIN:  # the local queue stayed full: stop waiting
                self._flags = self._blocking_flags | self._dontwait
        else:
            self._flags = self._blocking_flags

    def close(self) -> None:
        """Close the socket and the handler."""
        self.acquire()
        try:
            self.sock.close()
        finally:
            self.release()
        super().close()


# Send failures that mean "the leader cannot take it": local queue full past
# the timeout (EAGAIN), nobody listening any more (ECONNREFUSED after an ICMP
# port unreachable or a closed local socket, then ENOTCONN; EPIPE after the
# leader shut down), or no buffer space on the way out (ENOBUFS).
_DROPPED = frozenset((errno.EAGAIN, errno.ECONNREFUSED, errno.ENOTCONN, errno.EPIPE, errno.ENOBUFS))


def _stringify_extras(fields: Dict[str, Any]) -> Dict[str, Any]:
    return {key: (value if key in _FIELD_TYPES or key in ("msg", "args", "exc_info") else str(value))
            for key, value in fields.items()}


def _cut(text: str, remove: int, keep_tail: bool) -> str:
    keep = max(0, len(text) - remove)
    marker = _TRUNCATED % (len(text) - keep)
    return marker + "\n" + text[len(text) - keep:] if keep_tail else text[:keep] + "\n" + marker


def split_address(address: str) -> Tuple[str, int]:
    """``"host:port"`` or ``"[v6addr]:port"`` as (host, port); ValueError if
    it is neither."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("real-time logging address must be host:port, not %r" % (address,))
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


# ---------------------------------------------------------------- receiver


class _Tally:
    """Counters kept by one receiving thread (so no locking is needed)."""

    __slots__ = ("received", "malformed", "forged", "replayed", "overflow")

    def __init__(self) -> None:
        self.received = self.malformed = self.forged = self.replayed = self.overflow = 0


class RealtimeLogServer:
    """The leader's receiver: a UDP socket bound to ``bind_host`` and, on
    Linux, an abstract AF_UNIX datagram socket for workers on this node, with
    the owner check they verify before using it (:meth:`make_owner_socket`).

    No thread per datagram: one thread only drains the UDP socket into memory
    (bounded by :attr:`backlog_limit` bytes), :meth:`serve_forever` decodes and
    re-logs from there, and one more thread reads and re-logs the local
    socket, whose senders wait when it is full. Bad datagrams (not JSON, wrong
    shape, too large, unsigned or wrongly signed when a secret is set,
    replayed) are counted and dropped; they never stop the server. Records are
    handed to the ``toil-rt`` logger and then to Toil's ``toil.realtimeLogger``
    (:meth:`handle_record`) with their own level and name, their text escaped
    (:func:`rtwire.sanitize`) and their message at most
    :attr:`max_message_size` characters.
    Settings are class attributes; the socket and record factories are
    methods to override, as in ``socketserver``.
    """

    #: Datagrams this long or longer are dropped (they may have been cut).
    max_packet_size = 65536
    #: Receive buffer asked of the kernel; more than rmem_max needs CAP_NET_ADMIN.
    receive_buffer_size = 8 << 20
    #: Bytes of undecoded datagrams held in memory before new ones are dropped.
    backlog_limit = 64 << 20
    #: After shutdown(), how long to keep draining datagrams already queued.
    shutdown_drain_seconds = 2.0
    #: Senders tracked for losses and replays; the least recently heard go first.
    max_senders = 4096
    #: Late datagrams of a sender still accepted (and replays recognised) behind its newest.
    replay_window = 128
    #: A larger jump in a sender's numbering is not counted as lost.
    max_sequence_gap = 1 << 16
    #: Longest received message after formatting; longer ones are cut, with a marker.
    max_message_size = 1 << 16
    #: toilcoord's receiving logger: its handlers see every received record first.
    logger_name = "toil-rt"
    #: Toil's: where a Toil leader handles received records, and where Toil
    #: users attach handlers. Records go on to it (and its ancestors) unless
    #: the ``toil-rt`` logger's ``propagate`` is False.
    toil_logger_name = "toil.realtimeLogger"

    def __init__(self, bind_host: str = "0.0.0.0", port: int = 0, secret: Optional[str] = None,
                 local_socket: bool = True) -> None:
        import json

        self._loads = json.loads
        self.logger = logging.getLogger(self.logger_name)
        self.toil_logger = logging.getLogger(self.toil_logger_name)
        self._key = secret.encode("utf-8") if secret else None
        self.socket = self.make_udp_socket(bind_host, port)
        self.server_address: Tuple[Any, ...] = self.socket.getsockname()
        self.local_socket = self.owner_socket = None
        self.local_address: Optional[str] = None
        if local_socket and sys.platform.startswith("linux"):
            try:
                self.local_socket, self.local_address = self.make_local_socket()
                self.owner_socket = self.make_owner_socket(self.local_address)
            except OSError as error:  # an optimisation only: UDP serves everyone
                log.warning("Real-time logging over UDP only: no local socket: %s", error)
                if self.local_socket is not None:
                    self.local_socket.close()
                self.local_socket = self.local_address = None
        self._template = self._record_template()
        self._backlog: deque = deque()
        self._queued = self._dequeued = 0  # bytes; each written by one thread only
        self._wake = threading.Event()
        self._udp_done = False
        self._stopping = False
        self._deadline = 0.0
        self._finished = threading.Event()
        self._started = False
        self._udp_tally, self._local_tally = _Tally(), _Tally()
        # Shared by both receiving threads: a replay may come in by either.
        self._senders = rtwire.SenderTable(self.max_senders, self.replay_window, self.max_sequence_gap)
        self._senders_lock = threading.Lock()

    # -- factories

    def make_udp_socket(self, bind_host: str, port: int) -> Any:
        """The UDP socket bound to ``bind_host`` (an address of this host, or
        a name resolving to one) with the largest receive buffer allowed;
        OSError naming the host if it cannot be bound."""
        import socket

        sock = None
        try:
            family, kind, proto, _, address = socket.getaddrinfo(bind_host, port, 0, socket.SOCK_DGRAM)[0]
            sock = socket.socket(family, kind, proto)
            self.enlarge_receive_buffer(sock)
            sock.bind(address)
        except BaseException as error:
            if sock is not None:
                sock.close()
            if isinstance(error, OSError):
                raise OSError(error.errno, "real-time logging cannot listen on %s port %d: %s"
                              % (bind_host, port, error.strerror or error)) from error
            raise
        return sock

    def enlarge_receive_buffer(self, sock: Any) -> None:
        """Ask for :attr:`receive_buffer_size`: beyond ``net.core.rmem_max``
        if privileged (SO_RCVBUFFORCE), else as much as rmem_max allows."""
        import socket

        if sys.platform.startswith("linux"):
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, self.receive_buffer_size)
                return
            except OSError:  # EPERM without CAP_NET_ADMIN: fall back below
                pass
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer_size)
        except OSError as error:  # some platforms refuse instead of clamping
            log.debug("Kept the default receive buffer: %s", error)

    def make_local_socket(self) -> Tuple[Any, str]:
        """An AF_UNIX datagram socket bound in the abstract namespace (no file
        to clean up; reachable only from this network namespace) and its
        advertised name, "@" standing for the leading NUL."""
        import socket

        name = "toil-rt-%d-%s" % (os.getpid(), os.urandom(8).hex())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind("\0" + name)
        except BaseException:
            sock.close()
            raise
        return sock, "@" + name

    def make_owner_socket(self, local_address: str) -> Any:
        """The owner check: a stream socket listening at ``local_address`` +
        ".owner", whose SO_PEERCRED tells a worker this leader's uid. A worker
        connects its datagram socket first, then checks; the leader holds both
        names for its whole life and shuts this one first, so a worker that
        sees its own uid here reached this leader, not another user who bound
        the name after the leader exited."""
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind("\0" + local_address[1:] + OWNER_SUFFIX)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return sock

    def _answer_owner_checks(self) -> None:
        while True:
            try:
                connection, _ = self.owner_socket.accept()
            except OSError:  # shut down; if anything else, workers use UDP
                return
            connection.close()

    def _record_template(self) -> Dict[str, Any]:
        # Every attribute a formatter may name exists on a re-logged record,
        # whatever the sender omitted (taskName on 3.12+, for instance).
        fields = logging.LogRecord(self.logger_name, logging.NOTSET, "", 0, "", None, None).__dict__.copy()
        fields.update(process=0, processName="", thread=0, threadName="")
        return fields

    # -- serving

    def serve_forever(self) -> None:
        """Receive until :meth:`shutdown`; runs the UDP decoder itself and
        starts the draining threads."""
        self._started = True
        threads = [threading.Thread(target=self._receive, name="toil-rt-udp", daemon=True,
                                    args=(self.socket, self._enqueue, self._udp_tally))]
        if self.local_socket is not None:
            threads.append(threading.Thread(target=self._receive, name="toil-rt-local", daemon=True,
                                            args=(self.local_socket, self.handle_datagram, self._local_tally)))
        if self.owner_socket is not None:
            threads.append(threading.Thread(target=self._answer_owner_checks, name="toil-rt-owner", daemon=True))
        try:
            for thread in threads:
                thread.start()
            self._decode_backlog(self._udp_tally)
        finally:
            self._udp_done = True
            for thread in threads:
                if thread.ident is not None:
                    thread.join()
            self._finished.set()

    def _receive(self, sock: Any, sink: Callable[[bytes, _Tally], None], tally: _Tally) -> None:
        import time

        recv, size = sock.recv, self.max_packet_size
        failures = 0
        try:
            while True:
                try:
                    data = recv(size)
                except OSError as error:
                    # A closed socket ends the loop; a passing error (ENOBUFS,
                    # ENOMEM under pressure) loses a datagram, not the rest.
                    failures += 1
                    if self._stopping or error.errno in (errno.EBADF, errno.ENOTSOCK) or failures > 100:
                        raise
                    log.warning("Real-time log receiver: %s; going on", error)
                    continue
                failures = 0
                if self._stopping and (not data or time.monotonic() > self._deadline):
                    return
                sink(data, tally)
        except OSError:
            if not self._stopping:
                log.exception("Real-time log receiver failed; no more records from %s", sock)
        finally:
            if sock is self.socket:
                self._udp_done = True
                self._wake.set()

    def _enqueue(self, data: bytes, tally: _Tally) -> None:
        if self._queued - self._dequeued > self.backlog_limit:
            tally.overflow += 1
            return
        self._queued += len(data)
        self._backlog.append(data)
        if not self._wake.is_set():  # the decoder clears it only before sleeping
            self._wake.set()

    def _decode_backlog(self, tally: _Tally) -> None:
        backlog, wake = self._backlog, self._wake
        while True:
            try:
                data = backlog.popleft()
            except IndexError:
                if self._udp_done and not backlog:
                    return
                wake.clear()
                if not backlog and not self._udp_done:
                    wake.wait()
                continue
            self._dequeued += len(data)
            self.handle_datagram(data, tally)

    def shutdown(self) -> None:
        """Stop receiving once what is already queued has been re-logged (for
        at most :attr:`shutdown_drain_seconds`), and wait for
        :meth:`serve_forever` to return. Call from another thread."""
        import socket
        import time

        self._deadline = time.monotonic() + self.shutdown_drain_seconds
        self._stopping = True
        for sock in (self.owner_socket, self.socket, self.local_socket):  # the owner check first
            if sock is not None:
                try:
                    # Wakes the blocked recv() (or accept()), which returns
                    # b"" once the queue is empty; unconnected sockets report
                    # ENOTCONN but are shut down all the same (Linux).
                    sock.shutdown(socket.SHUT_RDWR if sock is self.owner_socket else socket.SHUT_RD)
                except OSError:
                    pass
        if self._started:
            self._finished.wait()

    def server_close(self) -> None:
        """Close the sockets, the owner check first."""
        for sock in (self.owner_socket, self.socket, self.local_socket):
            if sock is not None:
                sock.close()

    # -- decoding

    def handle_datagram(self, data: bytes, tally: _Tally) -> None:
        """Check, decode and re-log one datagram, counting it either way."""
        if not 0 < len(data) < self.max_packet_size:
            tally.malformed += 1
            return
        if not self.verify(data):
            tally.forged += 1
            return
        try:
            fields = self._loads(data)
        except (ValueError, RecursionError):  # bad UTF-8 is a ValueError too
            tally.malformed += 1
            return
        record = self.make_record(fields)
        if record is None:
            tally.malformed += 1
            return
        if not self._note(fields):
            tally.replayed += 1
            return
        tally.received += 1
        try:
            self.handle_record(record)
        except Exception:
            self.handle_error(record)

    def verify(self, data: bytes) -> bool:
        """True if no secret is set, or ``data`` carries its valid HMAC."""
        return self._key is None or rtwire.verify(self._key, data)

    def make_record(self, fields: Any) -> Optional[logging.LogRecord]:
        """The LogRecord for decoded JSON, or None if :func:`rtwire.validate`
        refuses it (signed datagrams must be numbered). Text fields are
        escaped; arguments are applied here (a Toil worker sends them as a
        list) within :attr:`max_message_size`; exc_info is dropped, its text
        having travelled as ``exc_text``."""
        if not rtwire.validate(fields, numbered=self._key is not None):
            return None
        rtwire.sanitize_fields(fields)
        fields.pop(_MAC, None)
        record = logging.LogRecord.__new__(logging.LogRecord)
        attributes = record.__dict__
        attributes.update(self._template)
        attributes.update(fields)
        if "created" not in fields:
            import time

            record.created = time.time()
        if "levelname" not in fields:
            record.levelname = logging.getLevelName(record.levelno)
        record.exc_info = None
        record.msg = rtwire.format_message(record.msg, record.args, self.max_message_size)
        record.args = None
        attributes[RECEIVED_MARK] = True
        return record

    def _note(self, fields: Dict[str, Any]) -> bool:
        """Number the datagram in its sender's sequence; False for a replay."""
        sender, seq = fields.get(_SENDER), fields.get(_SEQ)
        if sender is None or seq is None:
            return True  # a Toil worker: no numbering to count losses with
        with self._senders_lock:
            return self._senders.accept(sender, seq, signed=self._key is not None)

    def handle_record(self, record: logging.LogRecord) -> None:
        """Re-log a received record, skipping level checks (the worker
        filtered already): through the ``toil-rt`` logger's filters and own
        handlers, then, unless ``toil-rt.propagate`` is False, through Toil's
        ``toil.realtimeLogger`` logger as a Toil leader does (its filters, its
        handlers, then ``toil``'s and the root's). So ``toil-rt`` acts as
        a child of ``toil.realtimeLogger`` here, and each handler gets the
        record once."""
        receiver = self.logger
        if receiver.disabled or not receiver.filter(record):
            return
        for handler in receiver.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)
        if receiver.propagate:
            self.toil_logger.handle(record)

    def handle_error(self, record: logging.LogRecord) -> None:
        """A handler or filter raised: report on stderr and keep serving."""
        import traceback

        sys.stderr.write("Error re-logging a real-time log record from %s:\n" % (record.name,))
        traceback.print_exc()

    # -- accounting

    def statistics(self) -> Dict[str, Any]:
        """Counts so far: ``received``, ``malformed``, ``forged`` (unsigned or
        wrongly signed), ``replayed`` (signed datagrams seen before),
        ``overflow`` (dropped, backlog full), ``lost`` (gaps in senders'
        numbering; losses after a sender's last received record cannot be
        seen), ``senders``: {id: {"received", "lost"}} for the senders kept,
        and ``forgotten``: senders dropped from that table (their losses
        still count)."""
        tallies = (self._udp_tally, self._local_tally)
        stats: Dict[str, Any] = {key: sum(getattr(tally, key) for tally in tallies)
                                 for key in ("received", "malformed", "forged", "replayed", "overflow")}
        with self._senders_lock:
            stats.update(lost=self._senders.lost(), senders=self._senders.senders(),
                         forgotten=self._senders.forgotten)
        return stats

    def summary(self) -> str:
        """One line: what was received, dropped and lost, losses per sender."""
        stats = self.statistics()
        line = ("Real-time logging received %(received)d records; dropped %(malformed)d malformed, "
                "%(forged)d unsigned or forged, %(replayed)d replayed, %(overflow)d over the backlog limit; "
                "lost %(lost)d in transit" % stats)
        losers = sorted(((entry["lost"], sender) for sender, entry in stats["senders"].items()
                         if entry["lost"]), reverse=True)
        if losers:
            shown = ", ".join("%s lost %d" % (sender, lost) for lost, sender in losers[:5])
            line += " (%s%s)" % (shown, ", and %d more senders" % (len(losers) - 5) if len(losers) > 5 else "")
        return line


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


class _RealtimeLoggerMeta(type):
    """Lets ``RealtimeLogger.info(...)`` etc. reach the worker's logger."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("_"):  # keep introspection from configuring logging
            raise AttributeError(name)
        return getattr(cls.getLogger(), name)


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

    def __init__(self, batchSystem: Any = None, level: LevelArg = defaultLevel,
                 host: Optional[str] = None, port: int = 0, secret: Union[str, bool, None] = None,
                 localSocket: bool = True) -> None:
        if level not in (None, False, ""):
            parse_level(level)  # type: ignore[arg-type]
        if host is not None and (not isinstance(host, str) or not host or "%" in host):
            raise ValueError("host must be a non-empty host name or address, not %r" % (host,))
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
            raise ValueError("port must be an int from 0 to 65535, not %r" % (port,))
        if secret is not None and secret is not False and not isinstance(secret, str):
            raise TypeError("secret must be a str, None or False, not %s" % type(secret).__name__)
        self._batchSystem = batchSystem
        self._level = level
        self._host = host
        self._port = port
        self._secret = secret
        self._localSocket = localSocket

    def __enter__(self) -> "RealtimeLogger":
        RealtimeLogger._startLeader(self._batchSystem, self._level, self._host, self._port,
                                    self._secret, self._localSocket)
        self._entered_in = fork_epoch()
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if self._entered_in != fork_epoch():
            return  # entered by the parent of this forked child: its leader, not ours
        RealtimeLogger._stopLeader()

    # -- leader

    @classmethod
    def _startLeader(cls, batchSystem: Any = None, level: LevelArg = defaultLevel,
                     host: Optional[str] = None, port: int = 0, secret: Union[str, bool, None] = None,
                     localSocket: bool = True) -> None:
        with cls.lock:
            if cls.initialized == 0:
                # Restored at the last exit: a leader that is itself a worker
                # gets its own leader's variables back.
                cls._savedEnvironment = {key: value for key, value in os.environ.items()
                                         if key.startswith(cls.envPrefix)}
                if level:
                    cls._startServer(batchSystem, parse_level(level), host, port, secret, localSocket)
                else:
                    log.debug("Real-time logging disabled")
            elif level:
                log.debug("Real-time logging already running; nested entry counted")
            cls.initialized += 1

    @classmethod
    def _startServer(cls, batchSystem: Any, level: int, host: Optional[str], port: int,
                     secret: Union[str, bool, None], localSocket: bool) -> None:
        unsigned_by_environment = secret is None and _unsigned_by_environment()
        secret = None if unsigned_by_environment else cls._leaderSecret(secret)
        if host == "localhost":
            host = "127.0.0.1"  # "localhost" may resolve to ::1 on the workers
        advertised = host or advertised_host()
        server = cls.serverClass(advertised, port, secret=secret, local_socket=localSocket)
        thread = threading.Thread(target=server.serve_forever, name="toil-rt-server", daemon=True)
        cls.loggingServer, cls.serverThread, cls._leaderLevel = server, thread, level
        try:
            thread.start()
            shown = "[%s]" % advertised if ":" in advertised else advertised
            variables = {"ADDRESS": "%s:%d" % (shown, server.server_address[1]), "LEVEL": _level_name(level)}
            if server.local_address:
                variables["LOCAL_ADDRESS"] = server.local_address
            if secret:
                variables["SECRET"] = secret
            for key in [key for key in os.environ if key.startswith(cls.envPrefix)]:
                del os.environ[key]  # an outer leader's: none may reach this one's workers
            for name, value in variables.items():
                os.environ[cls.envPrefix + name] = value
                if batchSystem is not None:
                    batchSystem.setEnv(cls.envPrefix + name)
        except BaseException:
            cls._stopServer()
            raise
        cls._resetLogger()  # from now on this process logs locally
        log.info("Real-time logging listening on %s", variables["ADDRESS"])
        if unsigned_by_environment:
            log.warning("Real-time logging unsigned (%s=1): records from any process on this node, and from "
                        "anyone who can reach %s, are accepted", UNSIGNED_VARIABLE, variables["ADDRESS"])

    @classmethod
    def _leaderSecret(cls, secret: Union[str, bool, None]) -> Optional[str]:
        if secret is None:
            import secrets

            return os.environ.get(cls.envPrefix + "SECRET") or secrets.token_hex(32)
        return secret or None  # False or "": opted out

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
        for key in [key for key in os.environ if key.startswith(cls.envPrefix)]:
            del os.environ[key]
        os.environ.update(cls._savedEnvironment)
        cls._savedEnvironment = {}
        cls._resetLogger()
        if server is None:
            return
        # Release the lock while draining: a handler that calls getLogger()
        # on the server thread must not deadlock against us.
        cls.lock.release()
        try:
            server.shutdown()
            if thread is not None and thread.ident is not None:
                thread.join()
            server.server_close()
        finally:
            cls.lock.acquire()
        log.info(server.summary())

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
            return logger
        environ = os.environ
        address = environ.get(cls.envPrefix + "ADDRESS")
        if not address:
            logger.setLevel(logging.CRITICAL)
            return logger
        try:
            level = parse_level(environ.get(cls.envPrefix + "LEVEL") or cls.defaultLevel)
        except ValueError as error:
            log.warning("Real-time logging at %s: %s", cls.defaultLevel, error)
            level = parse_level(cls.defaultLevel)
        try:
            handler = cls.handlerClass(address, local_address=environ.get(cls.envPrefix + "LOCAL_ADDRESS"),
                                       secret=environ.get(cls.envPrefix + "SECRET") or None)
        except (OSError, ValueError) as error:
            log.warning("Real-time logging disabled: cannot send to %s: %s", address, error)
            logger.setLevel(logging.CRITICAL)
            return logger
        logger.setLevel(level)
        logger.addHandler(handler)
        cls._handler = handler
        return logger

    @classmethod
    def _resetLogger(cls) -> None:
        """Forget the configuration; the next getLogger() reads it anew."""
        handler, cls._handler, cls._configured = cls._handler, None, False
        cls.logger = logging.getLogger("toil-rt")
        if handler is not None:
            logging.getLogger("toil-rt").removeHandler(handler)
            handler.close()

    @classmethod
    def _afterForkInChild(cls) -> None:
        cls.lock = threading.RLock()  # another thread may have held it at fork time
        if cls.loggingServer is not None:
            # The child is a worker of its parent's leader: the environment
            # still points there. The server threads did not survive the fork.
            cls.loggingServer.server_close()
            cls.loggingServer = cls.serverThread = None
            cls.initialized = 0
            cls._savedEnvironment = {}
            cls._configured = False


os.register_at_fork(after_in_child=RealtimeLogger._afterForkInChild)


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
