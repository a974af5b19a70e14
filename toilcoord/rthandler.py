"""The worker's side of real-time logging: :class:`RealtimeLogHandler`, a
``logging.Handler`` that sends each record to the leader as one datagram
over the leader's abstract AF_UNIX socket when this process can reach it and
it provably belongs to this user, else over UDP. What a datagram holds is
:mod:`toilcoord.rtwire`'s; like the handlers of ``logging.handlers``,
``emit`` never raises.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any, Dict, Optional, Tuple, Union

from . import rtwire
from .locks import fork_epoch

__all__ = ["RealtimeLogHandler"]

# Real-time logging's warnings keep the logger they had before the modules
# were split, so a filter or level set on it still applies.
log = logging.getLogger(__name__.rpartition(".")[0] + ".rtlog")


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

    def __init__(
        self,
        address: str,
        local_address: Optional[str] = None,
        secret: Optional[str] = None,
        level: Union[int, str] = logging.NOTSET,
    ) -> None:
        super().__init__(level)
        import socket

        self._encoder = rtwire.Encoder(secret.encode("utf-8") if secret else None)
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
            log.warning("Real-time logging over UDP: %s is not this user's leader (owner uid %s)", local_address, owner)
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
            probe.connect(name + rtwire.OWNER_SUFFIX)
            return struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        except OSError:
            return None
        finally:
            probe.close()

    def make_udp_socket(self, address: str) -> Any:
        """A UDP socket connected to ``host:port`` (IPv6 as ``[addr]:port``)."""
        import socket

        host, port = rtwire.split_address(address)
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
        if rtwire.RECEIVED_MARK in record.__dict__:
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
        cut to fit, numbered and (with a secret) signed (:class:`rtwire.Encoder`)."""
        return self._encoder.encode(
            self.record_fields(record), self._next_seq(), self.sender_id, self.max_datagram_size
        )

    def record_fields(self, record: logging.LogRecord) -> Dict[str, Any]:
        """The record's attributes as sent: message formatted (args dropped),
        traceback as ``exc_text`` (exc_info dropped)."""
        return self._encoder.fields(record)

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
