"""toilcoord.rtwire: the wire's pure functions directly, and its cleaning
and bounding rules end to end through a real leader."""

from __future__ import annotations

import json
import logging
import re
import time

import pytest

from toilcoord.rtlog import (
    RealtimeLogger,
)

import rtlog_support
from conftest import run_python
from rtlog_support import leader_server, plain_leader, raw_sender, toil_datagram

pytestmark = pytest.mark.timeout(60)

# The shared fixtures, in effect in this module (clean_state is autouse).
clean_state, received = rtlog_support.clean_state, rtlog_support.received


# ------------------------------------- a shared node: hostile senders (issue 10)

# What must never reach a log line: C0/C1 controls (ESC, CSI, OSC, BEL, CR,
# LF...), DEL, Unicode line separators, bidi overrides, lone surrogates.
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")

HOSTILE_TEXT = (
    "ok\n2030-01-01 00:00:00,000 CRITICAL root: fake line\r\x1b[2J\x1b]0;owned\x07\x9b31m\u2028\u202eevil\ud800\x00end"
)


def test_received_text_cannot_fake_lines_or_drive_a_terminal(received):
    fields = {
        key: HOSTILE_TEXT
        for key in (
            "threadName",
            "processName",
            "funcName",
            "filename",
            "module",
            "exc_text",
            "stack_info",
            "message",
            "asctime",
            "custom",
        )
    }
    with plain_leader():
        sender = raw_sender(leader_server(), "udp")
        sender.send(toil_datagram("msg " + HOSTILE_TEXT + " arg %s", HOSTILE_TEXT, name="w\n" + HOSTILE_TEXT, **fields))
        sender.send(toil_datagram("last"))
        sender.close()
        received.wait_for("last")
    record = received.records[0]
    for key, value in record.__dict__.items():
        assert not isinstance(value, str) or not UNSAFE.search(value), (key, value)
    message = record.getMessage()
    assert message.startswith("msg ok\\n2030-01-01") and "\\r\\x1b[2J\\x1b]0;owned\\x07\\x9b31m" in message
    assert message.count("\\u2028\\u202eevil\\ud800\\x00end") == 2  # the format and its argument
    shown = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(threadName)s %(message)s").format(record)
    # The formatter itself puts the traceback and the stack on lines of their own; nothing else does.
    assert len(shown.splitlines()) == 3 and "\x1b" not in shown


def test_own_workers_multi_line_messages_arrive_escaped(received):
    with RealtimeLogger(host="127.0.0.1"):
        worker = run_python(r"""
            from toilcoord.rtlog import RealtimeLogger
            RealtimeLogger.warning("two\nlines \x1b[31mred")
            try:
                raise ValueError("boom")
            except ValueError:
                RealtimeLogger.getLogger().exception("failed")
        """)
        assert worker.returncode == 0, worker.stderr
        received.wait_for("failed")
    assert received.messages() == ["two\\nlines \\x1b[31mred", "failed"]
    traceback_text = received.records[1].exc_text
    assert traceback_text.startswith("Traceback (most recent call last):\\n") and "\n" not in traceback_text
    assert traceback_text.endswith("ValueError: boom")


def test_a_levelname_contradicting_the_level_is_dropped(received):
    with plain_leader():
        server = leader_server()
        sender = raw_sender(server, "udp")
        sender.send(toil_datagram("lying", level=logging.DEBUG, levelname="CRITICAL"))
        sender.send(toil_datagram("lying too", level=logging.ERROR, levelname="error"))
        sender.send(json.dumps({"name": "w", "levelno": 40, "msg": "no levelname"}).encode())
        sender.send(toil_datagram("custom level", level=25))
        sender.send(toil_datagram("last"))
        sender.close()
        received.wait_for("last")
        stats = server.statistics()
    assert stats["malformed"] == 2
    assert received.messages() == ["no levelname", "custom level", "last"]
    assert [record.levelname for record in received.records] == ["ERROR", "Level 25", "INFO"]


def test_a_widening_format_string_cannot_make_a_huge_message(received):
    cap = getattr(RealtimeLogger.serverClass, "max_message_size", 65536)
    hostile = [
        ("%(a)9999s" * 7000, {"a": "x"}, " " * 9998 + "x"),  # 70 MB if formatted
        ("%(a)s" * 6000, {"a": "y" * 20000}, "y" * 20000),  # 120 MB
        ("%9999s" * 3000, ["z"] * 3000, " " * 9998 + "z"),  # 30 MB
        ("%-9999.9999f|" * 3000, [1e300] * 3000, "%f" % 1e300),
    ]  # 60 MB of digits
    started = time.monotonic()
    with plain_leader():
        sender = raw_sender(leader_server(), "udp")
        for message, args, _ in hostile:
            datagram = json.dumps({"name": "w", "levelno": 20, "msg": message, "args": args}).encode()
            assert len(datagram) < 65000
            sender.send(datagram)
        sender.send(toil_datagram("last"))
        sender.close()
        received.wait_for("last")
    assert time.monotonic() - started < 20
    assert len(received.records) == len(hostile) + 1
    for record, (_, _, head) in zip(received.records, hostile):
        message = record.getMessage()
        assert len(message) <= cap + 100 and message.startswith(head), (len(message), message[:50])
        assert message.endswith("]") and "[rtlog: message cut" in message[-100:]


def test_wire_functions_sanitize_format_and_number():
    from toilcoord.rtwire import MESSAGE_CUT, SenderTable, format_message, sanitize, sign, validate, verify

    assert sanitize("plain é 名") == "plain é 名"
    assert sanitize("a\tb\r\n\x1b\x9b\x7f\u2028\u202e\ud800") == "a\\tb\\r\\n\\x1b\\x9b\\x7f\\u2028\\u202e\\ud800"
    assert format_message("x=%s n=%d", ["a", 3], 100) == "x=a n=3"
    assert format_message("%(k)s is 100%%", {"k": "v"}, 100) == "v is 100%"
    assert format_message("%s", {"k": "v"}, 100) == "{'k': 'v'}"
    assert format_message("line\n%s", ["\x1b"], 100) == "line\\n\\x1b"
    assert format_message("mismatch %s %s", ["one"], 100) == "mismatch %s %s ('one',)"
    assert format_message("%c", [10**10], 1000) == "%c (10000000000,)"
    cut = format_message("%s|" * 10 + "%s", ["x" * 30] * 11, 100)  # stops before the conversion that might pass
    assert cut == "|".join(["x" * 30] * 2) + "|" + MESSAGE_CUT % 100
    assert format_message("y" * 150, None, 100) == "y" * 100 + MESSAGE_CUT % 100
    signed = sign(b"k", b'{"msg":"m","rt_seq":0}')
    assert json.loads(signed)["msg"] == "m" and verify(b"k", signed) and not verify(b"other", signed)
    record = {"name": "w", "levelno": 20, "msg": "m"}
    assert validate(record) and not validate(record, numbered=True)
    assert not validate(dict(record, rt_seq=-1)) and not validate(dict(record, rt_sender="s" * 1000))
    table = SenderTable(limit=2, window=4, max_gap=10)
    verdicts = [table.accept("a", seq, True) for seq in (0, 2, 1, 1, 7, 3, 4, 20)]
    assert verdicts == [True, True, True, False, True, False, True, True]  # 3 is older than the window
    assert table.senders() == {"a": {"received": 6, "lost": 3}}  # 5, 6 and 3; the jump to 20 not counted
    assert table.accept("a", 1, False)  # unsigned: counted, never refused
    table.accept("b", 0, True)
    table.accept("c", 0, True)  # "a" was heard least recently: forgotten, its losses kept
    assert set(table.senders()) == {"b", "c"} and table.forgotten == 1 and table.lost() == 3
