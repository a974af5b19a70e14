"""ResourceSlots: n slots at a time, freed by death, none starved."""

from __future__ import annotations

import os
import subprocess
import threading

import pytest

from toilcoord.locks import LockTimeout
from toilcoord.slots import ResourceSlots, ids_environment

from conftest import left_after_exit, release, wait_until

pytestmark = pytest.mark.timeout(60)

# Holds argv[3] of the slots "gpu" (ids argv[2], comma-separated) in
# directory argv[1], prints their ids, lets go when its stdin closes.
HOLD = """
import sys
from toilcoord.slots import ResourceSlots
slots = ResourceSlots(sys.argv[1], "gpu", sys.argv[2].split(","))
with slots.acquire(int(sys.argv[3])) as ids:
    print(",".join(ids), flush=True)
    sys.stdin.read()
"""

# Cycles one slot of "gpu" (ids argv[2]) in argv[1] until its stdin closes,
# appending a byte to the file argv[3] per acquisition.
CYCLE = """
import os, select, sys
from toilcoord.slots import ResourceSlots
slots = ResourceSlots(sys.argv[1], "gpu", sys.argv[2].split(","))
count = os.open(sys.argv[3], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
while not select.select([sys.stdin], [], [], 0)[0]:
    with slots.acquire():
        os.write(count, b".")
"""


def holding(children, directory, ids, n):
    holder = children.python(
        HOLD, str(directory), ids, str(n), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    return holder, holder.stdout.readline().strip().split(",")


def test_n_slots_are_held_and_given_by_id(tmp_path):
    slots = ResourceSlots(tmp_path, "gpu", ["0", "2", "5"])
    with slots.acquire(2) as first:
        with slots.acquire() as second:
            assert sorted(first + second) == ["0", "2", "5"]
            with pytest.raises(LockTimeout):
                with slots.acquire(timeout=0.05):
                    pass
    with slots.acquire(3) as every:
        assert every == ("0", "2", "5")
    assert left_after_exit(tmp_path) == []


def test_processes_hold_different_slots(tmp_path, children):
    holder, theirs = holding(children, tmp_path, "a,b,c", 2)
    slots = ResourceSlots(tmp_path, "gpu", ["a", "b", "c"])
    with slots.acquire(timeout=0) as ours:
        assert set(ours).isdisjoint(theirs) and len(theirs) == 2
    with pytest.raises(LockTimeout):
        with slots.acquire(2, timeout=0.05):
            pass
    release(holder)
    with slots.acquire(3, timeout=0):
        pass


def test_a_killed_holder_frees_its_slots_at_once(tmp_path, children):
    holder, _ = holding(children, tmp_path, "0,1", 2)
    holder.kill()
    holder.wait()
    with ResourceSlots(tmp_path, "gpu", ["0", "1"]).acquire(2, timeout=0) as ids:
        assert ids == ("0", "1")


def test_a_killed_head_waiter_leaves_nothing_that_blocks(tmp_path, children):
    holder, _ = holding(children, tmp_path, "0,1", 1)
    waiter = children.python(HOLD, str(tmp_path), "0,1", "2", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    wait_until(lambda: os.path.exists(tmp_path / "toil-mutex-gpu.slots-head"))
    waiter.kill()
    waiter.wait()
    release(holder)
    with ResourceSlots(tmp_path, "gpu", ["0", "1"]).acquire(2, timeout=20):
        pass
    assert left_after_exit(tmp_path) == []


def test_threads_hold_slots_apart(tmp_path):
    slots = ResourceSlots(tmp_path, "gpu", 2)
    seen = []
    with slots.acquire() as ours:

        def other() -> None:
            with slots.acquire(timeout=20) as theirs:
                seen.extend(theirs)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(30)
    assert seen and seen != list(ours)


def test_a_waiter_for_two_gets_in_while_three_others_cycle(tmp_path, children):
    """Three processes cycle single slots of three as fast as they can, so
    two are seldom free at once. The waiter for two queues on the turn
    (behind cyclers that found no free slot), then announces itself and
    takes slots as they come free: it got in within 0-160 of their
    acquisitions here, a waiter that only polls for two free slots after
    about 3,000 (or never, on a busier machine)."""
    coord = tmp_path / "coord"
    coord.mkdir()
    counts = [tmp_path / f"count{index}" for index in range(3)]
    cyclers = [children.python(CYCLE, str(coord), "0,1,2", str(count), stdin=subprocess.PIPE) for count in counts]
    try:
        wait_until(lambda: all(count.exists() and count.stat().st_size for count in counts))
        waiter = children.python(
            HOLD.replace("with slots", "print('trying', flush=True)\nwith slots"),
            str(coord),
            "0,1,2",
            "2",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert waiter.stdout.readline() == "trying\n"
        before = sum(count.stat().st_size for count in counts)
        ids = waiter.stdout.readline().strip().split(",")
        after = sum(count.stat().st_size for count in counts)
        release(waiter)
    finally:
        for cycler in cyclers:
            cycler.stdin.close()
        for cycler in cyclers:
            cycler.wait()
    assert len(ids) == 2
    assert after - before <= 1000, f"the cyclers took {after - before} slots while the waiter for two was announced"


@pytest.mark.parametrize("slots", [0, -2, True, [], ["a", "a"], ["a/b"], ["x\0"], [""], [1, 2], "01", 2.0])
def test_bad_slots_are_refused_before_anything_is_touched(tmp_path, slots):
    with pytest.raises(ValueError):
        ResourceSlots(tmp_path / "missing", "gpu", slots)


@pytest.mark.parametrize("n", [0, -1, 3, 1.0, None])
def test_bad_n_is_refused_before_anything_is_touched(tmp_path, n):
    with pytest.raises(ValueError):
        with ResourceSlots(tmp_path / "missing", "gpu", 2).acquire(n):
            pass


def test_bad_names_and_timeouts_are_refused(tmp_path):
    with pytest.raises(ValueError):
        ResourceSlots(tmp_path, "a/b", 2)
    with pytest.raises(ValueError):
        with ResourceSlots(tmp_path, "gpu", 2).acquire(timeout=-1):
            pass
    assert os.listdir(tmp_path) == []


def test_ids_environment_for_a_child(tmp_path, children):
    slots = ResourceSlots(tmp_path, "gpu", ["1", "3"])
    with slots.acquire(2) as ids:
        env = {**os.environ, **ids_environment(ids)}
        child = children.python(
            "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])", env=env, stdout=subprocess.PIPE, text=True
        )
        assert child.communicate()[0] == "1,3\n"
    assert ids_environment(["a"], "LICENCES") == {"LICENCES": "a"}
    with pytest.raises(ValueError):
        ids_environment(["a"], "A=B")
