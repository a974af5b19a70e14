"""The real-time logging wire, as pure functions: the datagram's fields,
encoding a ``logging.LogRecord`` into one datagram within a size limit,
signing and checking datagrams, decoding and validating what a leader
receives into a record it may re-log (text escaped, message formatted within
a size limit), and per-sender numbering (losses, replay window). No sockets
and no threads here: :mod:`toilcoord.rthandler` (the worker's sending
handler) and :mod:`toilcoord.rtserver` (the leader's receiver) use these.

A datagram is one JSON object with a ``logging.LogRecord``'s fields. This
package adds ``rt_seq`` (0, 1, 2, ... per sender) and ``rt_sender``; with a
secret, ``rt_hmac`` comes first: ``{"rt_hmac":"<64 hex>",`` followed by the
unsigned object without its opening brace, the MAC being HMAC-SHA256 over
exactly those bytes -- sequence number and sender included, so a replay is
recognisable and cannot be renumbered. ``json`` and ``hmac`` are imported
when first used, keeping ``import toilcoord`` light.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

__all__ = [
    "Encoder",
    "SenderTable",
    "format_message",
    "load",
    "make_record",
    "record_template",
    "sanitize",
    "sanitize_fields",
    "sign",
    "split_address",
    "validate",
    "verify",
]

SEQ, SENDER, MAC = "rt_seq", "rt_sender", "rt_hmac"
# Set on every record a leader re-logs, so that no sending handler of ours
# ever forwards it again (no feedback loop, whatever handlers exist).
RECEIVED_MARK = "rt_received"
# The leader's owner check: a listening stream socket at the local socket's
# name plus this suffix (see rtserver.RealtimeLogServer.make_owner_socket).
OWNER_SUFFIX = ".owner"
MAC_HEAD = b'{"rt_hmac":"'
MAC_END = len(MAC_HEAD) + 64
MAC_BODY = MAC_END + 2
#: Bytes a signature adds to a datagram.
SIGNED_OVERHEAD = MAC_BODY - 1
#: Longest sender id accepted (ours are ``host:pid:8 hex digits``).
MAX_SENDER_LENGTH = 300


def sign(key: bytes, body: bytes) -> bytes:
    """The signed datagram for the JSON object ``body`` (see the module)."""
    import hmac

    tail = memoryview(body)[1:]
    return b"".join((MAC_HEAD, hmac.digest(key, tail, "sha256").hex().encode("ascii"), b'",', tail))


def verify(key: bytes, data: bytes) -> bool:
    """True if ``data`` was signed with ``key`` by :func:`sign`."""
    import hmac

    if not data.startswith(MAC_HEAD) or data[MAC_END:MAC_BODY] != b'",':
        return False
    expected = hmac.digest(key, memoryview(data)[MAC_BODY:], "sha256").hex().encode("ascii")
    return hmac.compare_digest(expected, data[len(MAC_HEAD) : MAC_END])


def split_address(address: str) -> Tuple[str, int]:
    """``"host:port"`` or ``"[v6addr]:port"`` (a leader's advertised UDP
    address) as (host, port); ValueError if it is neither."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("real-time logging address must be host:port, not %r" % (address,))
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


# ------------------------------------------------------------- encoding

_TRUNCATED = "[rtlog: %d characters cut to fit one datagram]"
_TRUNCATION_ROOM = len(_TRUNCATED) + 20
# Text fields that may be long, in the order they are cut; msg keeps its head,
# tracebacks keep their tail (the exception itself is at the end).
_LONG_TEXT = ("msg", "exc_text", "stack_info")


class Encoder:
    """A worker's half of the wire: :meth:`fields` are a record's attributes
    as sent, :meth:`encode` makes them one numbered JSON datagram, cut to
    fit with a visible marker and, with ``key``, signed."""

    def __init__(self, key: Optional[bytes]) -> None:
        import json

        self.key = key
        self._dumps = json.JSONEncoder(separators=(",", ":"), default=str).encode
        self._exception_formatter = logging.Formatter()

    def fields(self, record: logging.LogRecord) -> Dict[str, Any]:
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

    def encode(self, fields: Dict[str, Any], seq: int, sender: str, max_size: int) -> bytes:
        """The datagram for ``fields`` (from :meth:`fields`; changed in place),
        numbered ``seq`` of ``sender``, at most ``max_size`` bytes. Extra
        attributes JSON cannot encode are sent as ``str()``."""
        fields[SEQ] = seq
        fields[SENDER] = sender
        limit = max_size - (SIGNED_OVERHEAD if self.key else 0)
        try:
            body = self._dumps(fields)
        except (TypeError, ValueError):  # e.g. an extra dict with tuple keys
            fields = _stringify_extras(fields)
            body = self._dumps(fields)
        if len(body) > limit:
            body = self._fit(fields, body, limit)
        data = body.encode("ascii")  # JSONEncoder escapes all non-ASCII
        return data if self.key is None else sign(self.key, data)

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
            body = self._dumps(fields)
        if len(body) > limit:  # huge extra attributes: send the bare record
            fields = {key: fields[key] for key in FIELD_TYPES if key in fields and key not in _LONG_TEXT}
            fields["msg"] = "[rtlog: record too large for one datagram even without its text]"
            body = self._dumps(fields)
        return body


def _stringify_extras(fields: Dict[str, Any]) -> Dict[str, Any]:
    return {
        key: (value if key in FIELD_TYPES or key in ("msg", "args", "exc_info") else str(value))
        for key, value in fields.items()
    }


def _cut(text: str, remove: int, keep_tail: bool) -> str:
    keep = max(0, len(text) - remove)
    marker = _TRUNCATED % (len(text) - keep)
    return marker + "\n" + text[len(text) - keep :] if keep_tail else text[:keep] + "\n" + marker


# ------------------------------------------------------------- validation

_NONE = type(None)
_NUMBER = (int, float)
_OPTIONAL_STR = (str, _NONE)
# Types a received field must have, where handlers or formatters rely on them.
FIELD_TYPES: Dict[str, Any] = {
    "name": str,
    "levelno": int,
    "levelname": str,
    "pathname": str,
    "filename": str,
    "module": str,
    "lineno": int,
    "funcName": _OPTIONAL_STR,
    "created": _NUMBER,
    "msecs": _NUMBER,
    "relativeCreated": _NUMBER,
    "thread": (int, _NONE),
    "threadName": _OPTIONAL_STR,
    "process": (int, _NONE),
    "processName": _OPTIONAL_STR,
    "exc_text": _OPTIONAL_STR,
    "stack_info": _OPTIONAL_STR,
    "taskName": _OPTIONAL_STR,
    SEQ: int,
    SENDER: str,
}
# Times that formatters turn into dates or integers: NaN, Infinity and dates
# past the year 5000 make every logging.Formatter raise.
_TIME_LIMITS = {"created": 1e11, "msecs": 1e15, "relativeCreated": 1e15}
# Keys that would shadow LogRecord methods (getMessage...) if accepted.
_SHADOWING = frozenset(name for name in dir(logging.LogRecord) if not name.startswith("__")) | {
    "__class__",
    "__dict__",
    "__init__",
    "__repr__",
    "__getattr__",
    "__getattribute__",
}


def validate(fields: Any, numbered: bool = False) -> bool:
    """True if decoded JSON is a record a leader may re-log: a dict with a
    str ``name``, an int ``levelno``, a ``msg``; known fields of the right
    types; times a Formatter can show; a ``levelname``, if any, equal to
    ``logging.getLevelName(levelno)``; ``rt_seq`` from 0 to 2**63-1 and a
    short ``rt_sender``; no key shadowing a LogRecord method. ``numbered``
    (a signed datagram) also requires ``rt_seq`` and ``rt_sender``: without
    them a replay could not be recognised."""
    if type(fields) is not dict or "msg" not in fields or not _SHADOWING.isdisjoint(fields):
        return False
    for key, value in fields.items():
        expected = FIELD_TYPES.get(key)
        if expected is not None and not isinstance(value, expected):
            return False
    if "levelno" not in fields or "name" not in fields:
        return False
    level_name = logging.getLevelName(fields["levelno"])
    if fields.get("levelname", level_name) != level_name:
        return False
    for key, limit in _TIME_LIMITS.items():
        value = fields.get(key)
        if value is not None and not -limit < value < limit:  # False for NaN too
            return False
    if numbered and (SEQ not in fields or SENDER not in fields):
        return False
    return 0 <= fields.get(SEQ, 0) < 1 << 63 and len(fields.get(SENDER, "")) <= MAX_SENDER_LENGTH


# Characters that end or fake a log line or drive a terminal: C0 and C1
# controls (LF, CR, ESC, CSI, OSC, BEL...), DEL, line and paragraph
# separators, bidirectional and invisible format characters, lone surrogates.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ufff9-\ufffb\ud800-\udfff]"
)


def _escape(match: Any) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def sanitize(text: str) -> str:
    """``text`` with every character that could end, fake or colour a log
    line written as its visible Python escape (``\\n``, ``\\x1b``,
    ``\\u202e``), so it shows on one line and cannot drive a terminal."""
    return text if text.isprintable() else _UNSAFE.sub(_escape, text)


def sanitize_fields(fields: Dict[str, Any]) -> None:
    """:func:`sanitize` every str value of ``fields``, in place. Other values
    show through ``str()``/``repr()``, which escape such characters already."""
    for key, value in fields.items():
        if type(value) is str and not value.isprintable():
            fields[key] = _UNSAFE.sub(_escape, value)


# ------------------------------------------------------------- formatting

MESSAGE_CUT = " [rtlog: message cut to at most %d characters]"
# A conversion whose width or precision is "*" (taken from the arguments) or
# 10000 and more, or a mapping key with parentheses in it (parsed by Python
# in a way the bound below does not follow).
_HOSTILE_CONVERSION = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\*|\d{5}|\d{0,4}\.(?:\*|\d{5}))|%\([^)]*\(")
_CONVERSION = re.compile(r"%(?:\(([^()]*)\))?[-#0 +]*(\d*)(?:\.(\d*))?[hlL]?(.?)", re.S)
# What a conversion may add to its value's ascii() length: a float's digits
# ("%f" or "%d" of 1e308 has 309), or a sign and "0x" for an int.
_FLOAT_ROOM, _INT_ROOM = 320, 3
_FLOAT_KINDS = frozenset("eEfFgG")


def format_message(msg: Any, args: Any, limit: int) -> str:
    """A received record's message: ``msg % args`` as logging makes it, but
    never longer than ``limit`` characters plus :data:`MESSAGE_CUT`, in time
    proportional to ``limit`` and the datagram however the format string
    widens it (the format is cut before the first conversion that might pass
    the limit), then :func:`sanitize`\\ d. What cannot be applied (a bad
    format, wrong arguments, "%c" of a huge number, a "*" or 5-digit width)
    gives the message and its arguments side by side."""
    text, cut = msg if type(msg) is str else str(msg), False
    if args:
        text, cut = _apply_args(text, args, limit)
    text = sanitize(text)
    if len(text) > limit:
        text, cut = text[:limit], True
    return text + MESSAGE_CUT % limit if cut else text


def _apply_args(text: str, args: Any, limit: int) -> Tuple[str, bool]:
    if type(args) is list:  # a Toil worker's tuple, through JSON
        args = tuple(args)
    elif not isinstance(args, (tuple, dict)):
        args = (args,)  # what "%s" % value means
    if _HOSTILE_CONVERSION.search(text) is None:
        try:
            end, used = _affordable(text, args, limit)
            if end is None:
                return text % args, False
            return text[:end] % (args[:used] if type(args) is tuple else args), True
        except (TypeError, ValueError, KeyError, OverflowError):
            pass
    return "%s %r" % (text, args), False


def _affordable(text: str, args: Any, limit: int) -> Tuple[Optional[int], int]:
    """Where to stop formatting ``text`` so the result stays within
    ``limit`` -- (None, n) if it all fits -- and how many positional
    arguments precede that point. Each conversion is bounded by its width
    and precision plus the ``ascii()`` length of its value and room for
    what a numeric conversion adds; each value is measured once."""
    sizes: Dict[Any, int] = {}
    total = position = used = 0
    for match in _CONVERSION.finditer(text):
        key, width, precision, kind = match.groups()
        cost, before = int(width or 0) + int(precision or 0) + 1, used
        if kind != "%":
            if key is None and type(args) is tuple:
                key, used = used, used + 1
            cost += _size(args, key, sizes) + (_FLOAT_ROOM if kind in _FLOAT_KINDS else 0)
        total += match.start() - position
        if total + cost > limit:
            return match.start(), before
        total, position = total + cost, match.end()
    return None, used


def _size(args: Any, key: Any, sizes: Dict[Any, int]) -> int:
    """The most a conversion can make of the value ``key`` names (an index
    into a tuple, a mapping key, or None for the mapping itself) beyond its
    width and precision."""
    if key not in sizes:
        if type(args) is tuple:
            value = args[key] if isinstance(key, int) and key < len(args) else None
        else:
            value = args if key is None else args.get(key)
        sizes[key] = len(ascii(value)) + (_FLOAT_ROOM if isinstance(value, float) else _INT_ROOM)
    return sizes[key]


# ------------------------------------------------------------- decoding


def load(data: bytes) -> Any:
    """A datagram's decoded JSON, or None if it is not JSON (bad UTF-8 or
    nesting too deep included); :func:`make_record` checks the rest."""
    import json

    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # bad UTF-8 is a ValueError too
        return None


def record_template(name: str) -> Dict[str, Any]:
    """The attributes a re-logged record starts from, so that every
    attribute a formatter may name exists whatever the sender omitted
    (taskName on 3.12+, for instance)."""
    fields = logging.LogRecord(name, logging.NOTSET, "", 0, "", None, None).__dict__.copy()
    fields.update(process=0, processName="", thread=0, threadName="")
    return fields


def make_record(
    fields: Any, template: Dict[str, Any], numbered: bool, max_message_size: int
) -> Optional[logging.LogRecord]:
    """The LogRecord to re-log for decoded JSON (changed in place), or None
    if :func:`validate` refuses it. Text fields are :func:`sanitize_fields`\\ d;
    arguments are applied here (a Toil worker sends them as a list) by
    :func:`format_message` within ``max_message_size``; exc_info is dropped,
    its text having travelled as ``exc_text``; the record is marked
    :data:`RECEIVED_MARK`."""
    if not validate(fields, numbered=numbered):
        return None
    sanitize_fields(fields)
    fields.pop(MAC, None)
    record = logging.LogRecord.__new__(logging.LogRecord)
    attributes = record.__dict__
    attributes.update(template)
    attributes.update(fields)
    if "created" not in fields:
        import time

        record.created = time.time()
    if "levelname" not in fields:
        record.levelname = logging.getLevelName(record.levelno)
    record.exc_info = None
    record.msg = format_message(record.msg, record.args, max_message_size)
    record.args = None
    attributes[RECEIVED_MARK] = True
    return record


# ------------------------------------------------------------- numbering


class SenderTable:
    """Per-sender numbering on the leader. ``accept(sender, seq, signed)``
    counts each datagram, the gaps in a sender's numbering as losses and late
    arrivals (up to :attr:`window` behind) as found again, and refuses a
    signed datagram whose number was seen already or is older than the
    window: a replay. Unsigned ones are never refused (anyone can forge
    them anyway). A jump over :attr:`max_gap` is not counted as lost. At most
    :attr:`limit` senders are kept, the least recently heard forgotten first;
    a forgotten sender's losses still count in :meth:`lost`, but an old
    datagram of a forgotten sender is new again. Not thread-safe."""

    def __init__(self, limit: int = 4096, window: int = 128, max_gap: int = 1 << 16) -> None:
        self.limit, self.window, self.max_gap = limit, window, max_gap
        self.forgotten = self._forgotten_lost = 0
        # sender -> [received, highest seq, bit i: highest - i seen, lost]
        self._senders: "OrderedDict[str, List[int]]" = OrderedDict()

    def accept(self, sender: str, seq: int, signed: bool) -> bool:
        """Count one datagram; False if it is a replay to drop."""
        entry = self._entry(sender)
        ahead = seq - entry[1]
        if ahead > 0:
            entry[3] += ahead - 1 if ahead <= self.max_gap else 0
            entry[2] = (entry[2] << ahead | 1) & ((1 << self.window) - 1) if ahead < self.window else 1
            entry[1] = seq
        elif -ahead < self.window and not entry[2] >> -ahead & 1:
            entry[2] |= 1 << -ahead
            entry[3] = max(0, entry[3] - 1)  # counted lost when the gap opened
        elif signed:
            return False
        entry[0] += 1
        return True

    def _entry(self, sender: str) -> List[int]:
        entry = self._senders.get(sender)
        if entry is not None:
            self._senders.move_to_end(sender)
            return entry
        if len(self._senders) >= self.limit:
            _, oldest = self._senders.popitem(last=False)
            self.forgotten += 1
            self._forgotten_lost += oldest[3]
        entry = self._senders[sender] = [0, -1, 0, 0]
        return entry

    def lost(self) -> int:
        """Datagrams missing from the numbering of every sender seen."""
        return self._forgotten_lost + sum(entry[3] for entry in self._senders.values())

    def senders(self) -> Dict[str, Dict[str, int]]:
        """{sender: {"received", "lost"}} for the senders kept."""
        return {sender: {"received": entry[0], "lost": entry[3]} for sender, entry in list(self._senders.items())}
