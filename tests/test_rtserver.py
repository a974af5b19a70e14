"""toilcoord.rtserver: the leader's receiver, through a real leader: draining
into memory, hostile and forged datagrams, counting, replays, dispatch to
the logging handlers."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading

import pytest

from toilcoord.rtlog import (
    RECEIVED_MARK,
    RealtimeLogger,
    RealtimeLogHandler,
)

import rtlog_support
from conftest import run_python
from rtlog_support import PREFIX, Collector, leader_server, plain_leader, raw_sender, toil_datagram, wait_until

pytestmark = pytest.mark.timeout(60)

# The shared fixtures, in effect in this module (clean_state is autouse).
clean_state, received = rtlog_support.clean_state, rtlog_support.received


@pytest.mark.parametrize("limit", [None, 20000])
def test_udp_is_drained_into_memory_while_handlers_are_slow(received, monkeypatch, limit):
    if limit is not None:

        class SmallBacklog(RealtimeLogger.serverClass):
            backlog_limit = limit

        monkeypatch.setattr(RealtimeLogger, "serverClass", SmallBacklog)
    release = threading.Event()

    def hold_the_first(record):
        if record.getMessage() == "record 0":
            release.wait(30)
        return True

    rt_logger = logging.getLogger("toil-rt")
    rt_logger.addFilter(hold_the_first)
    try:
        with RealtimeLogger(host="127.0.0.1", secret=False):  # unsigned datagrams
            server = leader_server()
            sender = raw_sender(server, "udp")
            datagrams = [toil_datagram("record %d", number) for number in range(300)]
            # In chunks, each drained before the next, so a loaded machine's
            # loopback cannot drop any: the decoder is stuck in a handler,
            # yet the socket keeps being read.
            for chunk in range(0, len(datagrams), 30):
                for datagram in datagrams[chunk : chunk + 30]:
                    sender.send(datagram)
                sent = min(chunk + 30, len(datagrams))
                wait_until(lambda: len(server._backlog) + server.statistics()["overflow"] == sent - 1)
            sender.close()
            overflow = server.statistics()["overflow"]
            release.set()
            received.wait_for("record %d" % (len(datagrams) - 1 - overflow))
    finally:
        release.set()
        rt_logger.removeFilter(hold_the_first)
    if limit is None:
        assert overflow == 0 and len(received.records) == len(datagrams)
    else:
        kept = len(datagrams) - 1 - overflow
        assert 0 < overflow and kept * len(datagrams[0]) <= limit + 2 * len(datagrams[0])
        assert len(received.records) == 1 + kept


def test_receive_buffer_is_as_large_as_allowed(received):
    with open("/proc/sys/net/core/rmem_max") as limit:
        rmem_max = int(limit.read())
    with RealtimeLogger(host="127.0.0.1"):
        server = leader_server()
        size = server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    # Linux reports twice what was granted; root may exceed rmem_max.
    assert size >= 2 * min(server.receive_buffer_size, rmem_max)


# ------------------------------------------------------------- hostile input


def junk_datagrams(transport):
    rng = random.Random(20240917)
    junk = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 1500))) for _ in range(150)]
    junk += [
        b"",
        b"{",
        b'{"msg": ',
        b"[]",
        b"null",
        b'"text"',
        b"42",
        b"\xff\xfe\x00{}",
        b"[" * 50000,
        b'{"msg": "no name or level"}',
        b'{"name": "n", "levelno": 20}',
        b'{"name": "n", "levelno": "20", "msg": "x"}',
        b'{"name": 5, "levelno": 20, "msg": "x"}',
        b'{"name": "n", "levelno": 20, "msg": "x", "getMessage": "shadow"}',
        b'{"name": "n", "levelno": 20, "msg": "x", "created": "yesterday"}',
        b'{"name": "n", "levelno": 20, "msg": "x", "rt_seq": "one"}',
        b'{"name": "n", "levelno": 20, "msg": "x", "exc_text": ["not", "text"]}',
        b"j" * 65000,
    ]
    if transport == "unix":
        junk.append(toil_datagram("too big for the leader %s", "z" * 70000))
    return junk


@pytest.mark.parametrize("transport", ["udp", "unix"])
def test_malformed_datagrams_are_counted_and_the_server_keeps_serving(received, transport):
    junk = junk_datagrams(transport)
    with RealtimeLogger(host="127.0.0.1", secret=False):  # unsigned datagrams
        server = leader_server()
        sender = raw_sender(server, transport)
        try:
            for datagram in junk:
                sender.send(datagram)
            sender.send(toil_datagram("still serving"))
        finally:
            sender.close()
        received.wait_for("still serving")
        stats = server.statistics()
    assert stats["malformed"] == len(junk)
    assert stats["received"] == 1 and received.messages() == ["still serving"]


def test_hostile_arguments_and_times_neither_stop_the_server_nor_break_formatters(received):
    # Regression (found by the torture's fuzzer): "%c" of a huge number or
    # "%d" of Infinity raised OverflowError out of the receiver, which then
    # stopped serving; "%0999999999d" made the leader build a gigabyte; and a
    # "created" of Infinity or 1e300 reached the handlers, where every
    # Formatter raised.
    hostile_args = [
        ("%c", [10**10]),
        ("%d", [float("inf")]),
        ("%.*f", [10**10, 1.0]),
        ("%0999999999d", [1]),
        ("%-99999999s|", ["x"]),
    ]
    bad_times = [
        {"created": float("inf")},
        {"created": 1e300},
        {"created": float("nan")},
        {"msecs": float("-inf")},
        {"relativeCreated": float("nan")},
    ]
    formatter = logging.Formatter("%(asctime)s %(msecs)03d %(relativeCreated)d %(levelname)s %(message)s")
    with RealtimeLogger(host="127.0.0.1", secret=False):  # unsigned datagrams
        server = leader_server()
        sender = raw_sender(server, "udp")
        try:
            for message, args in hostile_args:
                sender.send(json.dumps({"name": "w", "levelno": 20, "msg": message, "args": args}).encode())
            for times in bad_times:
                sender.send(json.dumps(dict({"name": "w", "levelno": 20, "msg": "bad time"}, **times)).encode())
            sender.send(toil_datagram("still serving"))
        finally:
            sender.close()
        received.wait_for("still serving")
        stats = server.statistics()
    assert stats["malformed"] == len(bad_times)
    assert received.messages()[:-1] == ["%s %r" % (message, tuple(args)) for message, args in hostile_args]
    for record in received.records:
        formatter.format(record)


def test_a_failing_handler_does_not_stop_the_server(received, capfd):
    calls = []

    def explode(record):
        calls.append(record)
        if len(calls) == 1:
            raise RuntimeError("filter blew up")
        return True

    rt_logger = logging.getLogger("toil-rt")
    rt_logger.addFilter(explode)
    try:
        with RealtimeLogger(host="127.0.0.1", secret=False):  # unsigned datagrams
            sender = raw_sender(leader_server(), "udp")
            sender.send(toil_datagram("first"))
            sender.send(toil_datagram("second"))
            sender.close()
            received.wait_for("second")
    finally:
        rt_logger.removeFilter(explode)
    assert received.messages() == ["second"]
    assert "filter blew up" in capfd.readouterr().err


def test_secret_drops_unsigned_and_forged_and_accepts_signed(received):
    with RealtimeLogger(host="127.0.0.1", secret="right key"):
        server = leader_server()
        address = os.environ[PREFIX + "ADDRESS"]
        sender = raw_sender(server, "udp")
        sender.send(toil_datagram("unsigned"))
        wrong = RealtimeLogHandler(address, secret="wrong key")
        right = RealtimeLogHandler(address, secret="right key")
        logger = logging.getLogger("test.secret")
        logger.propagate = False
        try:
            wrong.handle(logger.makeRecord("test.secret", logging.INFO, "f.py", 1, "forged", (), None))
            signed = right.encode(logger.makeRecord("test.secret", logging.INFO, "f.py", 1, "tampered", (), None))
            sender.send(signed.replace(b"tampered", b"tempered"))
            right.handle(logger.makeRecord("test.secret", logging.INFO, "f.py", 1, "signed", (), None))
            received.wait_for("signed")
            worker = run_python("from toilcoord.rtlog import RealtimeLogger; RealtimeLogger.info('worker signed')")
            assert worker.returncode == 0, worker.stderr
            received.wait_for("worker signed")
        finally:
            wrong.close()
            right.close()
            sender.close()
        stats = server.statistics()
    assert stats["forged"] == 3 and stats["malformed"] == 0
    assert received.messages() == ["signed", "worker signed"]


def test_summary_counts_losses_per_sender(received, caplog):
    def numbered(sender, seq):
        return json.dumps(
            {"name": "w", "levelno": 20, "msg": "%s %d" % (sender, seq), "rt_sender": sender, "rt_seq": seq}
        ).encode()

    caplog.set_level(logging.INFO, logger="toilcoord.rtlog")
    with RealtimeLogger(host="127.0.0.1", secret=False):  # unsigned datagrams
        server = leader_server()
        sender = raw_sender(server, "unix")
        for name, seq in [("s1", 0), ("s1", 1), ("s1", 5), ("s2", 0)]:
            sender.send(numbered(name, seq))
        sender.close()
        received.wait_for("s2 0")
    stats = server.statistics()
    assert stats["senders"] == {"s1": {"received": 3, "lost": 3}, "s2": {"received": 1, "lost": 0}}
    assert stats["lost"] == 3
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Real-time logging received")]
    assert summary == [
        "Real-time logging received 4 records; dropped 0 malformed, 0 unsigned or forged, "
        "0 replayed, 0 over the backlog limit; lost 3 in transit (s1 lost 3)"
    ]


# ------------------------------------------------------------- wire and config


def test_toil_worker_datagrams_are_understood(received):
    with RealtimeLogger(host="127.0.0.1", secret=False):  # unsigned datagrams
        sender = raw_sender(leader_server(), "udp")
        sender.send(toil_datagram("x=%s n=%d", "a", 3, level=logging.WARNING))
        sender.send(toil_datagram("mapping %(key)s", {"key": "v"}))
        sender.send(toil_datagram("mismatch %s %s", "only one"))
        sender.send(toil_datagram("last"))
        sender.close()
        received.wait_for("last")
    first = received.records[0]
    assert first.getMessage() == "x=a n=3"
    assert (first.name, first.levelno, first.lineno, first.funcName) == ("toil.worker", logging.WARNING, 7, "run")
    assert received.messages()[1:3] == ["mapping v", "mismatch %s %s ('only one',)"]
    assert "x=a n=3" in logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s").format(first)


def numbered(sender, seq, message=None):
    return json.dumps(
        {"name": "w", "levelno": 20, "msg": message or "%s %d" % (sender, seq), "rt_sender": sender, "rt_seq": seq}
    ).encode()


def worker_record(message):
    return logging.LogRecord("test.worker", logging.INFO, "/w/job.py", 3, message, None, None)


def test_replayed_signed_datagrams_are_dropped(received):
    with RealtimeLogger(host="127.0.0.1", secret="shared"):
        server = leader_server()
        signer = RealtimeLogHandler(os.environ[PREFIX + "ADDRESS"], secret="shared")
        udp, local = raw_sender(server, "udp"), raw_sender(server, "unix")
        try:
            first, second, third = (signer.encode(worker_record("signed %d" % n)) for n in range(3))
            for datagram in (first, third, second, first):  # reordered: kept; then a replay
                udp.send(datagram)
            udp.send(signer.encode(worker_record("last over udp")))
            received.wait_for("last over udp")
            local.send(third)  # a replay through the other transport
            local.send(signer.encode(worker_record("last over the local socket")))
            received.wait_for("last over the local socket")
            stats = server.statistics()
        finally:
            for closable in (signer, udp, local):
                closable.close()
    assert received.messages() == ["signed 0", "signed 2", "signed 1", "last over udp", "last over the local socket"]
    assert stats["replayed"] == 2 and stats["lost"] == 0 and stats["forged"] == 0


def test_forged_senders_cannot_inflate_the_loss_count(received, monkeypatch):
    class FewSenders(RealtimeLogger.serverClass):
        max_senders = 4

    monkeypatch.setattr(RealtimeLogger, "serverClass", FewSenders)
    with plain_leader():
        server = leader_server()
        sender = raw_sender(server, "unix")
        for datagram in (numbered("liar", 0), numbered("liar", 10**9), numbered("honest", 0), numbered("honest", 2)):
            sender.send(datagram)
        sender.send(numbered("liar", 10**9 + 1, "last"))
        received.wait_for("last")
        lied = server.statistics()
        for number in range(10):
            sender.send(numbered("crowd%d" % number, 0))
        sender.send(numbered("newest", 0, "newest"))
        sender.close()
        received.wait_for("newest")
        crowded = server.statistics()
    assert lied["lost"] == 1 and lied["senders"]["liar"] == {"received": 3, "lost": 0}
    assert len(crowded["senders"]) == 4 and "newest" in crowded["senders"] and "liar" not in crowded["senders"]
    assert crowded["lost"] == 1  # the honest sender's loss is remembered after it is forgotten
    with RealtimeLogger(host="127.0.0.1"):  # with a secret, unsigned senders count for nothing
        server = leader_server()
        sender = raw_sender(server, "unix")
        sender.send(numbered("forger", 10**9))
        sender.close()
        worker = run_python("from toilcoord.rtlog import RealtimeLogger; RealtimeLogger.info('signed')")
        assert worker.returncode == 0, worker.stderr
        received.wait_for("signed")
        stats = server.statistics()
    assert stats["lost"] == 0 and stats["forged"] == 1 and "forger" not in stats["senders"]


# ------------------------------------------------------- Toil's logger names


def test_received_records_reach_toils_realtime_logger_once(received):
    toil_rt, root = Collector(), Collector()
    toil_logger = logging.getLogger("toil.realtimeLogger")
    toil_logger.addHandler(toil_rt)
    logging.getLogger().addHandler(root)
    rt_logger = logging.getLogger("toil-rt")
    rt_logger.propagate = True  # the default: toil-rt is, for received records, a child of toil.realtimeLogger
    try:
        with RealtimeLogger(host="127.0.0.1", secret=False):
            sender = raw_sender(leader_server(), "udp")
            sender.send(toil_datagram("from a Toil worker %s", "job-1", name="toil-rt"))
            toil_rt.wait_for("from a Toil worker job-1")
            rt_logger.propagate = False  # toilcoord's way to keep records off the root: off Toil's logger too
            sender.send(toil_datagram("toil-rt only"))
            received.wait_for("toil-rt only")
            sender.close()
        root.wait_for("from a Toil worker job-1")
    finally:
        toil_logger.removeHandler(toil_rt)
        logging.getLogger().removeHandler(root)
    assert received.messages() == ["from a Toil worker job-1", "toil-rt only"]
    assert toil_rt.messages() == ["from a Toil worker job-1"]
    assert [m for m in root.messages() if "Toil worker" in m or "only" in m] == ["from a Toil worker job-1"]
    assert toil_rt.records[0].name == "toil-rt" and toil_rt.records[0].__dict__[RECEIVED_MARK] is True


def test_a_filter_on_toils_logger_applies_to_its_chain_only(received):
    toil_rt = Collector()
    toil_logger = logging.getLogger("toil.realtimeLogger")
    toil_logger.addHandler(toil_rt)
    toil_logger.addFilter(lambda record: "secret" not in record.getMessage())
    rt_logger = logging.getLogger("toil-rt")
    rt_logger.propagate = True
    try:
        with RealtimeLogger(host="127.0.0.1", secret=False):
            sender = raw_sender(leader_server(), "udp")
            sender.send(toil_datagram("a secret"))
            sender.send(toil_datagram("public"))
            sender.close()
            toil_rt.wait_for("public")
    finally:
        toil_logger.removeHandler(toil_rt)
        toil_logger.filters.clear()
    assert received.messages() == ["a secret", "public"]
    assert toil_rt.messages() == ["public"]
