"""toilcoord.rthandler: the worker's sending handler, in real processes:
what it sends, emit never raising, a stuck or absent leader, forks, and
another user's socket under the leader's name."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import threading
import time

import pytest

from toilcoord.rtlog import (
    RealtimeLogger,
    RealtimeLogHandler,
)

import rtlog_support
from conftest import child_env, run_python
from rtlog_support import PREFIX, leader_server

pytestmark = pytest.mark.timeout(60)

# The shared fixtures, in effect in this module (clean_state is autouse).
clean_state, received = rtlog_support.clean_state, rtlog_support.received


def test_received_records_are_never_sent_on(received):
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(30)
    forward = RealtimeLogHandler("127.0.0.1:%d" % sink.getsockname()[1])
    root, rt_logger = logging.getLogger(), logging.getLogger("toil-rt")
    root.addHandler(forward)
    rt_logger.propagate = True  # received records reach the root's handlers
    try:
        with RealtimeLogger(host="127.0.0.1"):
            result = run_python("from toilcoord.rtlog import RealtimeLogger; RealtimeLogger.warning('worker record')")
            assert result.returncode == 0, result.stderr
            received.wait_for("worker record")
            logging.getLogger("leader.side").warning("sentinel")
        first = json.loads(sink.recv(65536))
        assert first["msg"] == "sentinel"
    finally:
        root.removeHandler(forward)
        forward.close()
        sink.close()


# ------------------------------------------------------------ what a record holds


def test_any_argument_exceptions_stacks_and_huge_messages_arrive(received):
    with RealtimeLogger(host="127.0.0.1"):
        result = run_python("""
            import pathlib
            from toilcoord.rtlog import RealtimeLogger
            class Thing:
                def __str__(self):
                    return "a thing"
            RealtimeLogger.info("path %s thing %s", pathlib.Path("/data/x.txt"), Thing())
            RealtimeLogger.info("mapping %(where)s", {"where": pathlib.Path("/p")})
            try:
                1 / 0
            except ZeroDivisionError:
                RealtimeLogger.getLogger().exception("it failed at %s", pathlib.Path("/q"))
            RealtimeLogger.info("with a stack", stack_info=True)
            RealtimeLogger.warning("huge %s", "x" * 200000 + "END")
            RealtimeLogger.info("extras", extra={"weird": {(1, 2): "tuple key"}, "thing": Thing()})
            RealtimeLogger.info("last")
        """)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        received.wait_for("last")
    records = {record.getMessage()[:12]: record for record in received.records}
    assert received.messages()[:3] == ["path /data/x.txt thing a thing", "mapping /p", "it failed at /q"]
    failed = records["it failed at"]
    assert failed.levelno == logging.ERROR and failed.exc_info is None
    assert "Traceback (most recent call last)" in failed.exc_text and "ZeroDivisionError" in failed.exc_text
    assert "ZeroDivisionError" in logging.Formatter().format(failed)
    assert "Stack (most recent call last)" in records["with a stack"].stack_info
    huge = records["huge xxxxxxx"]
    assert huge.levelno == logging.WARNING
    assert 60000 < len(huge.getMessage()) < 65000
    assert "[rtlog:" in huge.getMessage() and "cut to fit one datagram]" in huge.getMessage()
    assert "END" not in huge.getMessage()
    extras = records["extras"]
    assert extras.thing == "a thing" and extras.weird == "{(1, 2): 'tuple key'}"


def test_huge_traceback_keeps_its_end():
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    handler = RealtimeLogHandler("127.0.0.1:%d" % sink.getsockname()[1], secret="k")
    logger = logging.getLogger("test.huge.traceback")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        try:
            raise ValueError("y" * 150000 + " final words")
        except ValueError:
            logger.exception("short message")
        data = sink.recv(70000)
    finally:
        logger.removeHandler(handler)
        handler.close()
        sink.close()
    assert len(data) <= RealtimeLogHandler.max_datagram_size
    fields = json.loads(data)
    assert fields["msg"] == "short message"
    assert fields["exc_text"].startswith("[rtlog:") and fields["exc_text"].endswith("final words")


# ------------------------------------------------------------ sender failures


def test_emit_never_raises_when_the_leader_is_gone(children):
    with RealtimeLogger(host="127.0.0.1"):
        worker = children.python(
            """
            import sys
            from toilcoord.rtlog import RealtimeLogger
            RealtimeLogger.info("while the leader runs")
            print(RealtimeLogger._handler.transport, flush=True)
            sys.stdin.readline()
            for number in range(100):
                RealtimeLogger.info("after the leader left %d", number)
            print(RealtimeLogger._handler.dropped, flush=True)
        """,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert worker.stdout.readline().strip() == "unix"
    worker.stdin.write("go\n")
    worker.stdin.flush()
    assert worker.stdout.readline().strip() == "100"
    assert worker.wait() == 0
    assert worker.stderr.read() == ""


def test_emit_never_raises_without_a_listener_or_with_a_bad_argument():
    unused = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unused.bind(("127.0.0.1", 0))
    port = unused.getsockname()[1]
    unused.close()
    result = run_python(
        """
        from toilcoord.rtlog import RealtimeLogger
        class Unprintable:
            def __str__(self):
                raise RuntimeError("no text for you")
        for number in range(50):
            RealtimeLogger.info("nobody listens %d", number)
        RealtimeLogger.info("bad %s", Unprintable())
        print(RealtimeLogger._handler.transport, RealtimeLogger._handler.dropped > 0)
    """,
        env=child_env(
            **{PREFIX + "ADDRESS": "127.0.0.1:%d" % port, PREFIX + "LOCAL_ADDRESS": "@no-such-leader-%d" % os.getpid()}
        ),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["udp", "True"]  # ICMP port unreachable -> counted drops
    assert "no text for you" in result.stderr  # handleError reported it, the caller went on


def test_stuck_leader_costs_one_send_timeout_then_drops_fast():
    name = "rtlog-test-stuck-%d" % os.getpid()
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stuck.bind("\0" + name)  # bound, never read: the queue fills
    owner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    owner.bind("\0" + name + ".owner")  # the leader's owner check: this user
    owner.listen(1)
    handler = RealtimeLogHandler("127.0.0.1:9", local_address="@" + name)
    logger = logging.getLogger("test.stuck")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        assert handler.transport == "unix"
        started = time.monotonic()
        for number in range(60):
            logger.warning("record %d", number)
        elapsed = time.monotonic() - started
        queued = 0
        stuck.setblocking(False)
        while True:
            try:
                stuck.recv(65536)
            except BlockingIOError:
                break
            queued += 1
        logger.warning("after the leader caught up")
        stuck.setblocking(True)
        last = json.loads(stuck.recv(65536))
    finally:
        logger.removeHandler(handler)
        handler.close()
        stuck.close()
        owner.close()
    assert queued > 0 and handler.dropped == 60 - queued
    # Blocking on each of the dropped records would take dropped x 1 s.
    assert elapsed < handler.local_send_timeout * handler.dropped / 2
    assert last["msg"] == "after the leader caught up"


@pytest.mark.parametrize("secret", [None, "k"])
def test_datagrams_are_readable_by_a_toil_leader(secret):
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    handler = RealtimeLogHandler("127.0.0.1:%d" % sink.getsockname()[1], secret=secret)
    logger = logging.getLogger("compat.worker")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        try:
            1 / 0
        except ZeroDivisionError:
            logger.exception("failed on %s", pathlib.Path("/x"))
        data = sink.recv(65536)
    finally:
        logger.removeHandler(handler)
        handler.close()
        sink.close()
    record = logging.makeLogRecord(json.loads(data.decode("utf-8")))  # what Toil's leader does
    text = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s").format(record)
    assert " ERROR compat.worker failed on /x\nTraceback" in text and "ZeroDivisionError" in text
    assert isinstance(record.rt_seq, int) and record.rt_sender == handler.sender_id


def test_a_worker_forked_by_a_worker_is_another_sender(received):
    with RealtimeLogger(host="127.0.0.1"):
        server = leader_server()
        result = run_python("""
            import os
            from toilcoord.rtlog import RealtimeLogger
            RealtimeLogger.info("parent before fork")
            pid = os.fork()
            RealtimeLogger.info("after fork in %s" % ("child" if pid == 0 else "parent"))
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        """)
        assert result.returncode == 0, result.stderr
        received.wait_for("after fork in child")
        received.wait_for("after fork in parent")
        stats = server.statistics()
    assert len(stats["senders"]) == 2 and stats["lost"] == 0
    assert sorted(entry["received"] for entry in stats["senders"].values()) == [1, 2]


# ------------------------------------------------------- another user on this node


@pytest.fixture
def other_user():
    """A new unprivileged user (uid, gid), deleted after the test."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("a second user needs root and useradd")
    import pwd

    name = "rtsq%s" % os.urandom(4).hex()
    pause = threading.Event()
    for _ in range(50):  # /etc/passwd may be locked by a concurrent useradd
        done = subprocess.run(
            ["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", name],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 10:  # 10: cannot lock the password file
            break
        pause.wait(0.1)
    if done.returncode:
        pytest.skip("useradd failed: " + done.stderr.strip())
    try:
        entry = pwd.getpwnam(name)
        yield entry.pw_uid, entry.pw_gid
    finally:
        subprocess.run(["userdel", name], stdin=subprocess.DEVNULL, capture_output=True, timeout=60)


def squat(name, uid, gid):
    """Fork a process of another user that binds the abstract name ``name``
    (and its owner check, in case) and counts what arrives. Returns (pid,
    read end reporting, write end to say "count now")."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.close(ready_r)
            os.close(go_w)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            dgram.bind("\0" + name)
            listeners = []
            for stream_name in (name, name + ".owner"):
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind("\0" + stream_name)
                listener.listen(64)
                listeners.append(listener)
            os.write(ready_w, b"ready\n")
            os.read(go_r, 1)  # "count now", or EOF if the test died
            dgram.setblocking(False)
            count = 0
            while True:
                try:
                    dgram.recv(65536)
                except BlockingIOError:
                    break
                count += 1
            os.write(ready_w, b"%d\n" % count)
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    return pid, ready_r, go_w


def test_workers_never_send_to_another_users_socket_under_the_leaders_name(received, other_user, children):
    with RealtimeLogger(host="127.0.0.1"):
        worker_env = child_env()
        name = os.environ[PREFIX + "LOCAL_ADDRESS"][1:]
        early = children.python(
            """
            import sys
            from toilcoord.rtlog import RealtimeLogger
            RealtimeLogger.info("early worker")
            print(RealtimeLogger._handler.transport, flush=True)
            sys.stdin.readline()
            for number in range(5):
                RealtimeLogger.info("early worker, leader gone %d", number)
            print("done", flush=True)
        """,
            env=worker_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert early.stdout.readline().strip() == "unix"
        received.wait_for("early worker")
    pid, report, go = squat(name, *other_user)
    try:
        with os.fdopen(report, "rb") as reports:
            assert reports.readline() == b"ready\n"
            late = run_python(
                """
                from toilcoord.rtlog import RealtimeLogger
                for number in range(5):
                    RealtimeLogger.info("late worker %d", number)
                print(RealtimeLogger._handler.transport)
            """,
                env=worker_env,
            )
            early.stdin.write("go\n")
            early.stdin.flush()
            assert early.stdout.readline().strip() == "done"
            os.write(go, b"g")
            count = int(reports.readline())
    finally:
        os.close(go)  # EOF lets the squatter finish whatever happened
        os.waitpid(pid, 0)
    assert late.returncode == 0, late.stderr
    assert late.stdout.strip() == "udp", late.stderr  # the squatter's socket was refused
    assert count == 0  # neither worker gave the other user a record
