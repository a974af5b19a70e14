"""What the torture does inside the locks it proves exclusive: the mutex,
the resource slots, the shared mutex (readers and writer).

Inside each hold the holder links its identity file at a *mark* (``link(2)``:
an atomic create-with-content naming the holder) and, on the way out,
checks the mark is still its own and removes it. A mark already there is
legitimate only if its owner is dead: it is recorded as an orphan (the
checks then prove from the journal that its owner never wrote again and was
killed) and replaced. A live owner's mark is a violation, recorded at once.

Each hold is also journaled as a begin record written after the marks are
made and an end record written before they are removed, so every journal
position between the two lies inside the real hold (for a holder killed
inside, up to its last record): torture_check.py proves overlaps from these
records alone.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

from .torture_journal import Layout, Phase, owner_alive, record, set_phase

__all__ = ["MUTEX", "RW_MUTEX", "SLOT_IDS", "SLOTS", "hold_slots", "hold_the_potato", "read_shared", "write_shared"]

MUTEX = "torture"
SLOTS = "torture"
SLOT_IDS = ("0", "1", "2")  # as GPU numbers would be
RW_MUTEX = "torture-rw"


def _claim(mark: str, identity: str, violation: str, orphan: str) -> bool:
    """Make *mark* ours; False (a *violation* recorded) if a live process's
    is there. A dead one's is recorded as ``<orphan> <owner> <mark name>``
    and replaced."""
    try:
        os.link(identity, mark)
        return True
    except FileExistsError:
        pass
    name = os.path.basename(mark)
    try:
        holder, alive = owner_alive(mark)
    except FileNotFoundError:
        record("violation %s mark %s vanished while we held its lock" % (violation, name))
        return False
    if alive:
        record("violation %s mark %s of live %s was there when we got its lock" % (violation, name, holder))
        return False
    record("%s %s %s" % (orphan, holder, name))
    os.unlink(mark)
    try:
        os.link(identity, mark)
    except FileExistsError:
        record("violation %s mark %s appeared while we held its lock" % (violation, name))
        return False
    return True


def _release(mark: str, identity: str, violation: str) -> None:
    """Check *mark* is still ours, and remove it."""
    name = os.path.basename(mark)
    try:
        ours = os.path.samestat(os.stat(mark), os.stat(identity))
    except FileNotFoundError:
        record("violation %s our mark %s vanished while we held its lock" % (violation, name))
        return
    if not ours:
        record("violation %s our mark %s was replaced while we held its lock" % (violation, name))
        return
    os.unlink(mark)


def hold_the_potato(layout: Layout, identity: str, hold: float) -> None:
    """Inside the mutex: make the potato ours, hold it, check it is still
    ours and remove it."""
    if not _claim(layout.potato, identity, "mutex-overlap", "potato-orphan"):
        return
    record("mutex")
    if hold:
        time.sleep(hold)
    _release(layout.potato, identity, "mutex-overlap")


def hold_slots(layout: Layout, identity: str, ids: Sequence[str], wanted: int, inside: Callable[[], None]) -> None:
    """Inside ``ResourceSlots.acquire(wanted)``, which gave *ids*: mark each
    slot ours, record the hold, run *inside*, record its end, unmark."""
    set_phase(Phase.SLOTS_HELD)
    if len(ids) != wanted or len(set(ids)) != len(ids) or not set(ids) <= set(SLOT_IDS):
        record("violation slots-bad-ids asked for %d of %s, got %s" % (wanted, ",".join(SLOT_IDS), ",".join(ids)))
    marks = [os.path.join(layout.slot_marks, ident) for ident in ids]
    claimed = [mark for mark in marks if _claim(mark, identity, "slots-overlap", "slot-orphan")]
    held = ",".join(os.path.basename(mark) for mark in claimed)
    record("slots-held %s %d" % (held or "-", len(SLOT_IDS)))
    inside()
    set_phase(Phase.SLOTS_HELD)
    record("slots-free " + (held or "-"))
    for mark in claimed:
        _release(mark, identity, "slots-overlap")


def read_shared(layout: Layout, identity: str, incarnation: str, inside: Callable[[], None]) -> None:
    """Inside the shared mutex, as a reader: mark ourselves reading, find
    no live writer's mark, record the hold, run *inside*, record its end,
    unmark. (A writer marks itself, then looks for readers: of a reader and
    a writer inside at once, the later to mark itself sees the other.)"""
    set_phase(Phase.READING)
    mark = os.path.join(layout.rw_marks, "r-" + incarnation)
    os.link(identity, mark)  # ours alone: one reader per process, never nested
    try:
        writer, alive = owner_alive(os.path.join(layout.rw_marks, "writer"))
    except FileNotFoundError:
        alive = False
    if alive:
        record("violation rw-overlap writer %s inside while we read" % writer)
    record("rw-read")
    inside()
    set_phase(Phase.READING)
    record("rw-read-end")
    _release(mark, identity, "rw-overlap")


def write_shared(layout: Layout, identity: str, hold: float) -> None:
    """Inside the shared mutex, as its writer: mark ourselves writing, find
    only dead readers' marks (removed, recorded as orphans), record the
    hold, hold, record its end, unmark."""
    set_phase(Phase.WRITING)
    mark = os.path.join(layout.rw_marks, "writer")
    if not _claim(mark, identity, "rw-overlap", "rw-orphan"):
        return
    for name in sorted(os.listdir(layout.rw_marks)):
        if not name.startswith("r-"):
            continue
        try:
            reader, alive = owner_alive(os.path.join(layout.rw_marks, name))
            if alive:
                record("violation rw-overlap reader %s inside while we wrote" % reader)
                continue
            record("rw-orphan %s %s" % (reader, name))
            os.unlink(os.path.join(layout.rw_marks, name))
        except FileNotFoundError:  # only a live reader removes its own mark
            record("violation rw-overlap reader mark %s vanished while we wrote" % name)
    record("rw-write")
    if hold:
        time.sleep(hold)
    record("rw-write-end")
    _release(mark, identity, "rw-overlap")
