"""The torture's checks: the journal parsed, and one :class:`Invariant`
per guarantee, each proven from the records alone (plus what only the
supervisor sees: kills, progress, exits). Why each check is sound is said
in torture.py and beside each check.
"""

from __future__ import annotations

import bisect
import collections
import heapq
import sys
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple

__all__ = ["Invariant", "RunStats", "check_journal"]


class RunStats:
    """What only the supervisor sees: kills, progress, exits."""

    def __init__(self) -> None:
        self.incarnations = 0
        self.kills: Dict[int, int] = {}  # phase -> kills that landed in it
        self.iterations = 0
        self.longest_gap = 0.0
        self.stalled: List[str] = []
        self.crashed: List[str] = []


# ------------------------------------------------------------ checks


class Invariant(NamedTuple):
    """One checked guarantee: its name, whether it held, and the counts."""

    name: str
    held: bool
    detail: str

    def line(self) -> str:
        return "%-4s  %-29s %s" % ("ok" if self.held else "FAIL", self.name, self.detail)


class _Event(NamedTuple):
    pos: int
    writer: str
    kind: str
    args: Tuple[str, ...]


# Records only counted, not kept (they are most of a long run's journal).
_COUNTED_ONLY = frozenset(("mutex", "spawned", "start", "stopped"))


class _Journal:
    """The parsed journal, with the facts every check uses."""

    def __init__(self, data: bytes) -> None:
        self.by_kind: Dict[str, List[_Event]] = {}
        self.writers: Dict[str, Set[str]] = {}  # kind -> who wrote such records
        self.last: Dict[str, int] = {}  # writer -> position of its last record
        torn: List[str] = []
        pieces = data.split(b"@")
        if pieces[0]:
            torn.append("?")
        pos = 0
        for piece in pieces[1:]:
            if b"\n" not in piece:  # cut short: its writer field is whole or cut too
                torn.append(piece.decode("utf-8", "replace").split(" ")[0])
                continue
            fields = piece[:-1].decode("utf-8", "replace").split(" ")
            if not piece.endswith(b"\n") or b"\n" in piece[:-1] or len(fields) < 2:
                torn.append("?")  # not a cut: no SIGKILL explains it
                continue
            writer, kind = sys.intern(fields[0]), sys.intern(fields[1])
            self.last[writer] = pos
            self.writers.setdefault(kind, set()).add(writer)
            if kind in _COUNTED_ONLY:
                self.by_kind.setdefault(kind, []).append(None)  # type: ignore[arg-type]
            else:
                self.by_kind.setdefault(kind, []).append(_Event(pos, writer, kind, tuple(fields[2:])))
            pos += 1
        self.killed = {event.args[0]: event.pos for event in self.of("killed") if event.writer == "sup"}
        # A SIGKILL can cut a write short (between two pages of the file):
        # only a torn record of a process that was killed is expected.
        self.torn = sum(not self._cut_by_a_kill(writer) for writer in torn)
        self.torn_by_killed = len(torn) - self.torn

    def _cut_by_a_kill(self, writer: str) -> bool:
        """Whether a torn record's writer field can be a killed process's.
        The cut can fall inside the name itself ("@i1" of "@i17 ..."), so a
        prefix of a killed incarnation's name counts too."""
        return any(killed.startswith(writer) for killed in self.killed)

    def of(self, kind: str) -> List[_Event]:
        return self.by_kind.get(kind, [])

    def count(self, kind: str) -> int:
        return len(self.by_kind.get(kind, ()))

    def violations(self, prefix: str) -> List[_Event]:
        return [event for event in self.of("violation") if event.args[0].startswith(prefix)]

    def alive_after(self, writer: str, pos: int) -> bool:
        """True if *writer* wrote something after *pos* (so it lived then)."""
        return self.last.get(writer, -1) > pos


def _owner(ident: str) -> str:
    return ident.split(".", 1)[0]


def _first(events: Sequence[_Event]) -> str:
    """The first of *events* (violations), after their count per kind."""
    if not events:
        return ""
    kinds = collections.Counter(event.args[0] if event.kind == "violation" else event.kind for event in events)
    return "; %s; first: %s %s %s" % (
        ", ".join("%s %d" % kind for kind in sorted(kinds.items())),
        events[0].writer,
        events[0].kind,
        " ".join(events[0].args),
    )


def _orphans_of_the_living(journal: _Journal, kind: str) -> List[_Event]:
    """The *kind* records (``<kind> <owner> <mark>``: a mark found left
    behind, and replaced) whose owner wrote again later or was never
    killed: it may have been inside while the finder was."""
    return [
        event
        for event in journal.of(kind)
        if journal.alive_after(event.args[0], event.pos) or event.args[0] not in journal.killed
    ]


def _check_mutex(journal: _Journal) -> Invariant:
    holds = journal.count("mutex")
    orphans = journal.of("potato-orphan")
    bad = journal.violations("mutex-") + _orphans_of_the_living(journal, "potato-orphan")
    return Invariant(
        "mutex exclusion",
        not bad and bool(holds),
        "%d holds by %d processes; %d overlaps; %d potatoes left by SIGKILLed holders, "
        "each found only once its holder was dead%s"
        % (holds, len(journal.writers.get("mutex", ())), len(bad), len(orphans), _first(bad)),
    )


class _Hold(NamedTuple):
    start: int
    end: int
    writer: str
    what: Tuple[str, ...]


def _holds(journal: _Journal, begin: str, end: str, what: Callable[[_Event], Tuple[str, ...]]) -> List[_Hold]:
    """Each hold from a *begin* record to its holder's next *end* record or,
    for a holder killed inside, its last record: every position between lies
    inside the real hold (both records are written inside it, holds of one
    process never nest), so holds overlapping here overlapped for real."""
    ends: Dict[str, List[int]] = {}
    for event in journal.of(end):
        ends.setdefault(event.writer, []).append(event.pos)
    holds = []
    for event in journal.of(begin):
        mine = ends.get(event.writer, [])
        index = bisect.bisect_right(mine, event.pos)
        last = mine[index] if index < len(mine) else journal.last[event.writer]
        holds.append(_Hold(event.pos, last, event.writer, what(event)))
    return holds


def _overlapping(holds: List[_Hold]) -> Iterator[Tuple[_Hold, List[_Hold]]]:
    """Each hold with the holds it began inside: of every pair that
    overlaps, one began inside the other, so each pair is seen once."""
    inside: List[Tuple[int, _Hold]] = []  # a heap by end
    for hold in sorted(holds):
        while inside and inside[0][0] < hold.start:
            heapq.heappop(inside)
        yield hold, [other for _, other in inside]
        heapq.heappush(inside, (hold.end, hold))


def _marks_left(marks_left: Sequence[str], where: str, kind: str) -> List[_Event]:
    left = [mark for mark in marks_left if mark.startswith(where + "/")]
    return [_Event(-1, "final", "violation", (kind, ",".join(left[:5])))] if left else []


def _check_slots(journal: _Journal, marks_left: Sequence[str]) -> Invariant:
    """Each slot id held by one process at a time; at most n at once."""
    holds = _holds(
        journal,
        "slots-held",
        "slots-free",
        lambda event: tuple(ident for ident in event.args[0].split(",") if ident != "-"),
    )
    count = max((int(event.args[1]) for event in journal.of("slots-held")), default=0)
    bad = journal.violations("slots-") + _orphans_of_the_living(journal, "slot-orphan")
    bad += _marks_left(marks_left, "slots", "slots-marks-left")
    most = 0
    for hold, inside in _overlapping(holds):
        taken = [(ident, other.writer) for other in inside for ident in other.what]
        most = max(most, len(taken) + len(hold.what))
        bad += [
            _Event(hold.start, hold.writer, "violation", ("slots-overlap", ident, "held by", holder))
            for ident, holder in taken
            if ident in hold.what
        ]
    if most > count:
        bad.append(_Event(-1, "final", "violation", ("slots-too-many", "%d of %d held at once" % (most, count))))
    return Invariant(
        "never more holders than slots",
        not bad and bool(holds),
        "%d holds of %d slots by %d processes, at most %d held at once; %d overlaps; %d slots "
        "left by SIGKILLed holders, each found only once its holder was dead%s"
        % (
            len(holds),
            count,
            len({hold.writer for hold in holds}),
            most,
            len(bad),
            journal.count("slot-orphan"),
            _first(bad),
        ),
    )


def _check_shared(journal: _Journal, marks_left: Sequence[str]) -> Invariant:
    """No writer's hold overlaps any other hold, a reader's or a writer's."""
    reads = _holds(journal, "rw-read", "rw-read-end", lambda event: ("read",))
    writes = _holds(journal, "rw-write", "rw-write-end", lambda event: ("write",))
    bad = journal.violations("rw-") + _orphans_of_the_living(journal, "rw-orphan")
    bad += _marks_left(marks_left, "rw", "rw-marks-left")
    readers = 0
    for hold, inside in _overlapping(reads + writes):
        if hold.what == ("write",) and inside or any(other.what == ("write",) for other in inside):
            bad.append(
                _Event(
                    hold.start,
                    hold.writer,
                    "violation",
                    ("rw-overlap", hold.what[0], "beside", ",".join(other.writer for other in inside)),
                )
            )
        elif hold.what == ("read",):
            readers = max(readers, 1 + len(inside))
    return Invariant(
        "never a writer beside anyone",
        not bad and bool(reads) and bool(writes),
        "%d shared holds (up to %d at once) and %d exclusive by %d processes; %d overlaps; %d marks "
        "left by SIGKILLed holders, each found only once its holder was dead%s"
        % (
            len(reads),
            readers,
            len(writes),
            len({hold.writer for hold in reads + writes}),
            len(bad),
            journal.count("rw-orphan"),
            _first(bad),
        ),
    )


def _arena_memberships(journal: _Journal) -> List[Tuple[int, int, str, bool]]:
    """(entered, gone, marker, left) per arena membership: *gone* is the
    position of its "leaving" record (*left* True), or, for a member that
    died inside, of its owner's last record."""
    leaving = {event.args[0]: event.pos for event in journal.of("arena-leaving")}
    return [
        (event.pos, leaving.get(event.args[0], journal.last[event.writer]), event.args[0], event.args[0] in leaving)
        for event in journal.of("arena-entered")
    ]


def _members_inside(memberships: List[Tuple[int, int, str, bool]]) -> Callable[[int], List[str]]:
    """A function giving the markers of the members inside at a position:
    entered before it and gone after it."""
    starts = sorted(entered for entered, _, _, _ in memberships)
    ends = sorted(gone for _, gone, _, _ in memberships)

    def inside(pos: int) -> List[str]:
        # gone >= entered, so every membership gone by *pos* entered before it.
        if bisect.bisect_left(starts, pos) - bisect.bisect_right(ends, pos) <= 0:
            return []
        return [marker for entered, gone, marker, _ in memberships if entered < pos < gone]

    return inside


def _check_arena(journal: _Journal, final_elected: bool, markers_left: List[str]) -> Invariant:
    memberships = _arena_memberships(journal)
    inside = _members_inside(memberships)
    bad = list(journal.violations("arena-"))
    cleanups = _arena_cleanups(journal)
    entered_by: Dict[str, List[int]] = {}
    for entered, _, marker, _ in memberships:
        entered_by.setdefault(_owner(marker), []).append(entered)
    previous = -1
    interrupted = 0
    for begin, finished in cleanups:
        bad += [
            _Event(begin.pos, begin.writer, "violation", ("arena-member-inside", marker))
            for marker in inside(begin.pos)
        ]
        own = [entered for entered in entered_by.get(begin.writer, []) if entered < begin.pos]
        if not own or own[-1] < previous:  # the cleaner was inside at the previous cleanup
            bad.append(_Event(begin.pos, begin.writer, "violation", ("arena-generation-cleaned-twice",)))
        if not finished:
            interrupted += 1
            if journal.alive_after(begin.writer, begin.pos):
                bad.append(_Event(begin.pos, begin.writer, "violation", ("arena-cleanup-unfinished",)))
        previous = begin.pos
    if not final_elected:
        bad.append(_Event(-1, "final", "violation", ("arena-final-member-not-elected",)))
    if markers_left:
        bad.append(_Event(-1, "final", "violation", ("arena-markers-left", ",".join(markers_left[:5]))))
    died_inside = sum(not left for _, _, _, left in memberships)
    return Invariant(
        "arena last one out",
        not bad and bool(cleanups),
        "%d entries, %d cleanups (%d killed midway and redone by the next last member); "
        "%d while a member was inside or twice per generation; %d members died inside%s"
        % (len(memberships), len(cleanups), interrupted, len(bad), died_inside, _first(bad)),
    )


def _arena_cleanups(journal: _Journal) -> List[Tuple[_Event, bool]]:
    """Every cleanup's "begin" record, in order, and whether it finished
    (its cleaner wrote "end" before it wrote anything else about the arena)."""
    marks = sorted(journal.of("arena-clean-begin") + journal.of("arena-clean-end"))
    cleanups: List[Tuple[_Event, bool]] = []
    open_by: Dict[str, int] = {}  # cleaner -> index of its unfinished cleanup
    for mark in marks:
        if mark.kind == "arena-clean-begin":
            open_by[mark.writer] = len(cleanups)
            cleanups.append((mark, False))
        elif mark.writer in open_by:
            index = open_by.pop(mark.writer)
            cleanups[index] = (cleanups[index][0], True)
    return cleanups


def _check_deferred(journal: _Journal) -> Invariant:
    registered = {event.args[0] for event in journal.of("registered")}
    confirmed = {event.args[0] for event in journal.of("deferred")}
    runs: Dict[str, List[_Event]] = {}
    for event in journal.of("ran"):
        runs.setdefault(event.args[0], []).append(event)
    bad = list(journal.violations("deferred-"))
    bad += [_Event(-1, "final", "violation", ("deferred-never-ran", ident)) for ident in sorted(confirmed - set(runs))]
    bad += [_Event(-1, "final", "violation", ("deferred-unknown", ident)) for ident in sorted(set(runs) - registered)]
    twice = by_others = 0
    for ident, ran in runs.items():
        twice += len(ran) > 1
        for index, run in enumerate(ran):
            if index + 1 < len(ran) and journal.alive_after(run.writer, run.pos):
                bad.append(_Event(run.pos, run.writer, "violation", ("deferred-returned-ran-again", ident)))
            if run.writer != _owner(ident):
                by_others += 1
                if journal.alive_after(_owner(ident), run.pos):
                    bad.append(_Event(run.pos, run.writer, "violation", ("deferred-ran-while-owner-lived", ident)))
    return Invariant(
        "deferred functions",
        not bad and bool(confirmed),
        "%d registered, %d confirmed by defer(); every confirmed one ran (%d runs by another "
        "process after the owner was SIGKILLed); %d ran twice, each after a run cut by a kill, "
        "%d after returning%s"
        % (
            len(registered),
            len(confirmed),
            by_others,
            twice,
            sum(e.args[0] == "deferred-returned-ran-again" for e in bad),
            _first(bad),
        ),
    )


def _check_names(journal: _Journal) -> Invariant:
    """A probe happens between its poller's "polling" record and its own
    "poll" record: "dead" is wrong if the owner wrote after the latter and
    had not begun to give its names up before it ("unnaming", as a worker
    stops), "alive" is wrong if the owner was reaped before the former."""
    owners = {event.args[0]: event.writer for event in journal.of("name")}
    unnaming = {event.writer: event.pos for event in journal.of("unnaming")}
    polls = journal.of("poll")
    bad = list(journal.violations("names-"))
    started: Dict[str, int] = {}  # poller -> position of its latest "polling" record
    for poll in sorted(journal.of("polling") + polls):
        if poll.kind == "polling":
            started[poll.writer] = poll.pos
            continue
        name, alive = poll.args[0], poll.args[1] == "1"
        owner = owners.get(name)
        if owner is None:
            continue  # its owner was killed before it could say its name
        if not alive and journal.alive_after(owner, poll.pos) and unnaming.get(owner, poll.pos) >= poll.pos:
            bad.append(_Event(poll.pos, poll.writer, "violation", ("names-live-read-dead", name)))
        elif alive and owner in journal.killed and journal.killed[owner] < started.get(poll.writer, -1):
            bad.append(_Event(poll.pos, poll.writer, "violation", ("names-dead-read-alive", name)))
    dead = sum(poll.args[1] == "0" for poll in polls)
    return Invariant(
        "process names",
        not bad and bool(owners),
        "%d names, stable; %d polls (%d dead), %d wrong%s" % (len(owners), len(polls), dead, len(bad), _first(bad)),
    )


def _check_fds(journal: _Journal) -> Invariant:
    counts: Dict[str, Dict[str, int]] = {}
    for event in journal.of("fds"):
        counts.setdefault(event.writer, {})[event.args[0]] = int(event.args[1])
    pairs = ["%s %s->%s" % (w, c.get("start"), c.get("end")) for w, c in sorted(counts.items())]
    held = bool(counts) and all("end" in c and c.get("start") == c["end"] for c in counts.values())
    return Invariant(
        "no fd leaks", held, "long-lived workers' open fds after their first round -> at the end: " + ", ".join(pairs)
    )


def check_journal(
    data: bytes,
    stats: Optional[RunStats] = None,
    final_elected: bool = True,
    markers_left: Sequence[str] = (),
    left_in_coord: Sequence[str] = (),
    progress_bound: float = 60.0,
    marks_left: Sequence[str] = (),
) -> List[Invariant]:
    """Check the invariants against a journal (and the supervisor's
    observations, and what the final checks found); one :class:`Invariant`
    per guarantee. *marks_left* are slot and reader-writer marks left after
    the final holds, as ``slots/<id>`` or ``rw/<name>``."""
    journal = _Journal(data)
    stats = stats or RunStats()
    errors = journal.of("error")
    invariants = [
        _check_mutex(journal),
        _check_arena(journal, final_elected, list(markers_left)),
        _check_deferred(journal),
        _check_names(journal),
        _check_slots(journal, marks_left),
        _check_shared(journal, marks_left),
        Invariant(
            "no deadlock",
            not stats.stalled,
            "every worker progressed within %g s: longest gap %.2f s over %d incarnations%s"
            % (
                progress_bound,
                stats.longest_gap,
                stats.incarnations,
                "; stalled: " + ", ".join(stats.stalled[:5]) if stats.stalled else "",
            ),
        ),
        Invariant(
            "nothing left after cleanup",
            not left_in_coord,
            "coordination directory empty" if not left_in_coord else "left: " + ", ".join(left_in_coord[:10]),
        ),
        _check_fds(journal),
        Invariant(
            "no worker errors",
            not errors and not stats.crashed and not journal.torn,
            "%d exceptions, %d unexpected exits, %d torn journal records (and %d cut short by "
            "SIGKILL)%s%s"
            % (
                len(errors),
                len(stats.crashed),
                journal.torn,
                journal.torn_by_killed,
                _first(errors),
                "; " + stats.crashed[0] if stats.crashed else "",
            ),
        ),
    ]
    return invariants
