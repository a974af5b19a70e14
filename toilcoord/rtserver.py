"""The leader's side of real-time logging: :class:`RealtimeLogServer`
receives workers' datagrams and re-logs them. Its job is sockets, threads,
dispatch to the logging handlers and counting; what a datagram holds and how
it is checked, cleaned and numbered is :mod:`toilcoord.rtwire`'s.

No thread per datagram: one thread only drains the UDP socket into memory
(bounded by ``backlog_limit`` bytes), ``serve_forever`` decodes and re-logs
from there, and one more thread reads and re-logs the local socket, whose
senders wait when it is full. So a burst lands in memory rather than
overflowing the kernel's buffer, however slow the leader's handlers.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading
from collections import deque
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import rtwire

__all__ = ["RealtimeLogServer"]

# Real-time logging's warnings keep the logger they had before the modules
# were split, so a filter or level set on it still applies.
log = logging.getLogger(__name__.rpartition(".")[0] + ".rtlog")

_SO_RCVBUFFORCE = 33  # Linux; the socket module does not name it
_COUNTS = ("received", "malformed", "forged", "replayed", "overflow")


class _Tally:
    """Counters kept by one receiving thread (so no locking is needed)."""

    __slots__ = _COUNTS

    def __init__(self) -> None:
        self.received = self.malformed = self.forged = self.replayed = self.overflow = 0


class _Counts:
    """What the receiving threads counted: a :class:`_Tally` each, and the
    senders' numbering (:class:`rtwire.SenderTable`) shared under a lock, as
    a replay may come in by either socket."""

    def __init__(self, senders: rtwire.SenderTable) -> None:
        self.udp, self.local = _Tally(), _Tally()
        self._senders = senders
        self._lock = threading.Lock()

    def note(self, fields: Dict[str, Any], signed: bool) -> bool:
        """Number the datagram in its sender's sequence; False for a replay."""
        sender, seq = fields.get(rtwire.SENDER), fields.get(rtwire.SEQ)
        if sender is None or seq is None:
            return True  # a Toil worker: no numbering to count losses with
        with self._lock:
            return self._senders.accept(sender, seq, signed=signed)

    def statistics(self) -> Dict[str, Any]:
        """See :meth:`RealtimeLogServer.statistics`."""
        stats: Dict[str, Any] = {key: getattr(self.udp, key) + getattr(self.local, key) for key in _COUNTS}
        with self._lock:
            stats.update(lost=self._senders.lost(), senders=self._senders.senders(), forgotten=self._senders.forgotten)
        return stats


def _summary(stats: Dict[str, Any]) -> str:
    line = (
        "Real-time logging received %(received)d records; dropped %(malformed)d malformed, "
        "%(forged)d unsigned or forged, %(replayed)d replayed, %(overflow)d over the backlog limit; "
        "lost %(lost)d in transit" % stats
    )
    losers = sorted(
        ((entry["lost"], sender) for sender, entry in stats["senders"].items() if entry["lost"]), reverse=True
    )
    if losers:
        shown = ", ".join("%s lost %d" % (sender, lost) for lost, sender in losers[:5])
        line += " (%s%s)" % (shown, ", and %d more senders" % (len(losers) - 5) if len(losers) > 5 else "")
    return line


class _Backlog:
    """UDP datagrams received but not yet decoded, at most ``limit`` bytes
    of them: one thread puts, one drains, so no lock (each byte counter is
    written by one thread only)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._data: deque = deque()
        self._queued = self._dequeued = 0
        self._wake = threading.Event()
        self._done = False

    def __len__(self) -> int:
        return len(self._data)

    def put(self, data: bytes, tally: _Tally) -> None:
        """Keep ``data``, or count it in ``tally.overflow`` if full."""
        if self._queued - self._dequeued > self.limit:
            tally.overflow += 1
            return
        self._queued += len(data)
        self._data.append(data)
        if not self._wake.is_set():  # the decoder clears it only before sleeping
            self._wake.set()

    def close(self) -> None:
        """No more puts: :meth:`drain` returns once the backlog is empty."""
        self._done = True
        self._wake.set()

    def drain(self, handle: Callable[[bytes, _Tally], None], tally: _Tally) -> None:
        """Hand each datagram to ``handle`` until closed and empty."""
        backlog, wake = self._data, self._wake
        while True:
            try:
                data = backlog.popleft()
            except IndexError:
                if self._done and not backlog:
                    return
                wake.clear()
                if not backlog and not self._done:
                    wake.wait()
                continue
            self._dequeued += len(data)
            handle(data, tally)


class _Readers:
    """The threads that read the sockets: each hands what it reads to its
    sink until :meth:`stop`, then keeps reading what is already queued for
    at most the seconds given there."""

    def __init__(self) -> None:
        self.stopping, self._deadline = False, 0.0
        self._threads: List[threading.Thread] = []

    def start(self, name: str, target: Callable[..., None], *args: Any) -> None:
        """Run ``target(*args)`` on a daemon thread joined by :meth:`join`."""
        thread = threading.Thread(target=target, name=name, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def read(
        self, sock: Any, size: int, sink: Callable[[bytes, _Tally], None], tally: _Tally, at_end: Callable[[], None]
    ) -> None:
        """Receive datagrams of up to ``size`` bytes into ``sink`` until the
        socket is shut down or closed; then call ``at_end``."""
        import time

        recv, failures = sock.recv, 0
        try:
            while True:
                try:
                    data = recv(size)
                except OSError as error:
                    # A closed socket ends the loop; a passing error (ENOBUFS,
                    # ENOMEM under pressure) loses a datagram, not the rest.
                    failures += 1
                    if self.stopping or error.errno in (errno.EBADF, errno.ENOTSOCK) or failures > 100:
                        raise
                    log.warning("Real-time log receiver: %s; going on", error)
                    continue
                failures = 0
                if self.stopping and (not data or time.monotonic() > self._deadline):
                    return
                sink(data, tally)
        except OSError:
            if not self.stopping:
                log.exception("Real-time log receiver failed; no more records from %s", sock)
        finally:
            at_end()

    def stop(self, drain_seconds: float) -> None:
        """Stop reading once the queues are empty or after ``drain_seconds``."""
        import time

        self._deadline = time.monotonic() + drain_seconds
        self.stopping = True

    def join(self) -> None:
        """Wait for every thread started."""
        for thread in self._threads:
            if thread.ident is not None:
                thread.join()


def _answer_owner_checks(owner_socket: Any) -> None:
    while True:
        try:
            connection, _ = owner_socket.accept()
        except OSError:  # shut down; if anything else, workers use UDP
            return
        connection.close()


def _enlarge_receive_buffer(sock: Any, size: int) -> None:
    """Ask for ``size`` bytes: beyond ``net.core.rmem_max`` if privileged
    (SO_RCVBUFFORCE), else as much as rmem_max allows."""
    import socket

    if sys.platform.startswith("linux"):
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, size)
            return
        except OSError:  # EPERM without CAP_NET_ADMIN: fall back below
            pass
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    except OSError as error:  # some platforms refuse instead of clamping
        log.debug("Kept the default receive buffer: %s", error)


def _local_sockets(server: "RealtimeLogServer") -> Tuple[Any, Any, Optional[str]]:
    """The server's local socket, its owner check and its name; Nones if they
    cannot be made (an optimisation only: UDP serves everyone)."""
    local = None
    try:
        local, name = server.make_local_socket()
        return local, server.make_owner_socket(name), name
    except OSError as error:
        log.warning("Real-time logging over UDP only: no local socket: %s", error)
        if local is not None:
            local.close()
        return None, None, None


def _shut_down(owner_socket: Any, *sockets: Any) -> None:
    """Shut the sockets down, the owner check first. This wakes a blocked
    recv() (or accept()), which returns b"" once the queue is empty;
    unconnected sockets report ENOTCONN but are shut down all the same
    (Linux)."""
    import socket

    for sock in (owner_socket, *sockets):
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR if sock is owner_socket else socket.SHUT_RD)
            except OSError:
                pass


def _closed_on_error(make: Callable[[Any], None], sock: Any) -> Any:
    """``sock`` after ``make(sock)`` (bind, listen...); closed if that raised."""
    try:
        make(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def _dispatch(server: "RealtimeLogServer", data: bytes, tally: _Tally, counts: "_Counts", signed: bool) -> None:
    """The body of :meth:`RealtimeLogServer.handle_datagram`, through the
    server's override points (verify, make_record, handle_record,
    handle_error)."""
    if not 0 < len(data) < server.max_packet_size:
        tally.malformed += 1
    elif not server.verify(data):
        tally.forged += 1
    else:
        fields = rtwire.load(data)
        record = None if fields is None else server.make_record(fields)
        if record is None:
            tally.malformed += 1
        elif not counts.note(fields, signed=signed):
            tally.replayed += 1
        else:
            tally.received += 1
            try:
                server.handle_record(record)
            except Exception:
                server.handle_error(record)


class RealtimeLogServer:
    """The leader's receiver: a UDP socket bound to ``bind_host`` and, on
    Linux, an abstract AF_UNIX datagram socket for workers on this node, with
    the owner check they verify before using it; threads as the module says.
    Bad datagrams (not JSON, wrong shape, too large, unsigned or wrongly
    signed when a secret is set, replayed) are counted and dropped; they
    never stop the server. Records go to the ``toil-rt`` logger and then to
    Toil's ``toil.realtimeLogger`` with their own level and name, their text
    escaped and their message at most :attr:`max_message_size` characters.

    Run :meth:`serve_forever` on a thread of its own; from another,
    :meth:`shutdown`, then :meth:`server_close`. Settings are class
    attributes. Methods to override, as in ``socketserver``:

    - :meth:`make_udp_socket`: the UDP socket;
    - :meth:`make_local_socket`, :meth:`make_owner_socket`: the local socket
      and its owner check;
    - :meth:`verify`: whether a datagram is signed with the secret;
    - :meth:`make_record`: decoded JSON to a LogRecord, or None to drop it;
    - :meth:`handle_record`: re-log one record;
    - :meth:`handle_error`: what to do when that raised.
    """

    #: Datagrams this long or longer are dropped (they may have been cut).
    max_packet_size = 65536
    #: Receive buffer asked of the kernel; more than rmem_max needs CAP_NET_ADMIN
    #: (SO_RCVBUFFORCE), else it is clamped to rmem_max.
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

    def __init__(
        self, bind_host: str = "0.0.0.0", port: int = 0, secret: Optional[str] = None, local_socket: bool = True
    ) -> None:
        self.logger = logging.getLogger(self.logger_name)
        self.toil_logger = logging.getLogger(self.toil_logger_name)
        self._key = secret.encode("utf-8") if secret else None
        self.socket = self.make_udp_socket(bind_host, port)
        self.server_address: Tuple[Any, ...] = self.socket.getsockname()
        self.local_address: Optional[str] = None
        self.local_socket = self.owner_socket = None
        if local_socket and sys.platform.startswith("linux"):
            self.local_socket, self.owner_socket, self.local_address = _local_sockets(self)
        self._template = rtwire.record_template(self.logger_name)
        self._backlog = _Backlog(self.backlog_limit)
        self._readers, self._started = _Readers(), False
        self._finished = threading.Event()
        self._counts = _Counts(rtwire.SenderTable(self.max_senders, self.replay_window, self.max_sequence_gap))

    # -- factories

    def make_udp_socket(self, bind_host: str, port: int) -> Any:
        """The UDP socket bound to ``bind_host`` (an address of this host, or
        a name resolving to one) with the largest receive buffer allowed;
        OSError naming the host if it cannot be bound."""
        import socket

        try:
            family, kind, proto, _, address = socket.getaddrinfo(bind_host, port, 0, socket.SOCK_DGRAM)[0]
            return _closed_on_error(
                lambda sock: (_enlarge_receive_buffer(sock, self.receive_buffer_size), sock.bind(address)),
                socket.socket(family, kind, proto),
            )
        except OSError as error:
            raise OSError(
                error.errno,
                "real-time logging cannot listen on %s port %d: %s" % (bind_host, port, error.strerror or error),
            ) from error

    def make_local_socket(self) -> Tuple[Any, str]:
        """An AF_UNIX datagram socket bound in the abstract namespace (no file
        to clean up; reachable only from this network namespace) and its
        advertised name, "@" standing for the leading NUL."""
        import socket

        name = "toil-rt-%d-%s" % (os.getpid(), os.urandom(8).hex())
        return _closed_on_error(
            lambda sock: sock.bind("\0" + name), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        ), "@" + name

    def make_owner_socket(self, local_address: str) -> Any:
        """The owner check: a stream socket listening at ``local_address`` +
        ".owner", whose SO_PEERCRED tells a worker this leader's uid. A worker
        connects its datagram socket first, then checks; the leader holds both
        names for its whole life and shuts this one first, so a worker that
        sees its own uid here reached this leader, not another user who bound
        the name after the leader exited."""
        import socket

        name = "\0" + local_address[1:] + rtwire.OWNER_SUFFIX
        return _closed_on_error(
            lambda sock: (sock.bind(name), sock.listen(128)), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        )

    # -- serving

    def serve_forever(self) -> None:
        """Receive until :meth:`shutdown`; runs the UDP decoder itself and
        starts the draining threads."""
        self._started = True
        readers, backlog, counts, size = self._readers, self._backlog, self._counts, self.max_packet_size
        try:
            readers.start("toil-rt-udp", readers.read, self.socket, size, backlog.put, counts.udp, backlog.close)
            if self.local_socket is not None:
                local = (self.local_socket, size, self.handle_datagram, counts.local, lambda: None)
                readers.start("toil-rt-local", readers.read, *local)
            if self.owner_socket is not None:
                readers.start("toil-rt-owner", _answer_owner_checks, self.owner_socket)
            backlog.drain(self.handle_datagram, counts.udp)
        finally:
            backlog.close()
            readers.join()
            self._finished.set()

    def shutdown(self) -> None:
        """Stop receiving once what is already queued has been re-logged (for
        at most :attr:`shutdown_drain_seconds`), and wait for
        :meth:`serve_forever` to return. Call from another thread."""
        self._readers.stop(self.shutdown_drain_seconds)
        _shut_down(self.owner_socket, self.socket, self.local_socket)
        if self._started:
            self._finished.wait()

    def server_close(self) -> None:
        """Close the sockets, the owner check first."""
        for sock in (self.owner_socket, self.socket, self.local_socket):
            if sock is not None:
                sock.close()

    # -- dispatching

    def handle_datagram(self, data: bytes, tally: _Tally) -> None:
        """Check, decode and re-log one datagram, counting it either way."""
        _dispatch(self, data, tally, self._counts, signed=self._key is not None)

    def verify(self, data: bytes) -> bool:
        """True if no secret is set, or ``data`` carries its valid HMAC."""
        return self._key is None or rtwire.verify(self._key, data)

    def make_record(self, fields: Any) -> Optional[logging.LogRecord]:
        """The LogRecord for decoded JSON, or None to drop it:
        :func:`rtwire.make_record` (signed datagrams must be numbered)."""
        return rtwire.make_record(fields, self._template, self._key is not None, self.max_message_size)

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
        return self._counts.statistics()

    def summary(self) -> str:
        """One line: what was received, dropped and lost, losses per sender."""
        return _summary(self.statistics())
