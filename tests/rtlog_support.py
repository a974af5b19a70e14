"""Helpers shared by the real-time logging tests (test_rtlog, test_rtwire,
test_rthandler, test_rtserver): a collector of what the leader re-logs, a
clean slate around every test, raw senders and Toil-made datagrams."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest

from toilcoord.rtlog import RealtimeLogger

PREFIX = RealtimeLogger.envPrefix
VARIABLES = [PREFIX + name for name in ("ADDRESS", "LEVEL", "LOCAL_ADDRESS", "SECRET")]


class Collector(logging.Handler):
    """Keeps every record it sees; wait_for() blocks until one matches."""

    def __init__(self) -> None:
        super().__init__()
        self.records = []
        self.changed = threading.Condition()

    def emit(self, record):
        with self.changed:
            self.records.append(record)
            self.changed.notify_all()

    def messages(self):
        return [record.getMessage() for record in self.records]

    def wait_for(self, message, timeout=30):
        deadline = time.monotonic() + timeout
        with self.changed:
            while not any(record.getMessage() == message for record in self.records):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("%r never arrived; got %r" % (message, [m[:80] for m in self.messages()]))
                self.changed.wait(left)
        return next(record for record in self.records if record.getMessage() == message)


@pytest.fixture
def received():
    """What the leader re-logs on ``toil-rt`` (kept off the root logger)."""
    rt_logger = logging.getLogger("toil-rt")
    collector, propagate = Collector(), rt_logger.propagate
    rt_logger.addHandler(collector)
    rt_logger.propagate = False
    try:
        yield collector
    finally:
        rt_logger.removeHandler(collector)
        rt_logger.propagate = propagate


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    RealtimeLogger._resetLogger()
    yield
    leaked = RealtimeLogger.initialized
    while RealtimeLogger.initialized:
        RealtimeLogger._stopLeader()
    RealtimeLogger._resetLogger()
    assert not leaked, "a test left the leader running"


def leader_server():
    server = RealtimeLogger.loggingServer
    assert server is not None
    return server


def raw_sender(server, transport):
    """A bare datagram socket connected to the leader's UDP or local socket."""
    if transport == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(("127.0.0.1", server.server_address[1]))
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.connect("\0" + server.local_address[1:])
    return sock


def toil_datagram(text, *args, name="toil.worker", level=logging.INFO, **extra):
    """Exactly what Toil's JSONDatagramHandler sends for such a record."""
    record = logging.LogRecord(name, level, "/w/job.py", 7, text, args, None, "run")
    record.__dict__.update(extra)
    return json.dumps(record.__dict__).encode("utf-8")


def wait_until(condition, timeout=30):
    deadline, pause = time.monotonic() + timeout, threading.Event()
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        pause.wait(0.01)


def plain_leader(**options):
    """A leader that opted out of the secret, as it must for Toil workers."""
    return RealtimeLogger(host="127.0.0.1", secret=False, **options)
