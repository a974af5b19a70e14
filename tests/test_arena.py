from __future__ import annotations

import multiprocessing
import os
import subprocess

import pytest

from toilcoord import LastProcessStandingArena, LockTimeout, global_mutex
from toilcoord.arena import reap_dead_arenas
from toilcoord.mutex import reap_unheld_mutex_files, retire_mutex_files

from conftest import join_or_kill, left_after_exit, open_fds, run_in_fork

pytestmark = pytest.mark.timeout(90)

# A member in a child process: enters the arena, says so, waits for a line on
# stdin, then leaves, printing "last" if it ran the cleanup.
MEMBER = """
import sys
from toilcoord import LastProcessStandingArena
arena = LastProcessStandingArena(sys.argv[1], "test")
arena.enter()
print("in", flush=True)
sys.stdin.readline()
print("last" if list(arena.leave()) else "not-last", flush=True)
"""


def start_member(children, directory):
    child = children.python(MEMBER, str(directory), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "in"
    return child


def tell_to_leave(child):
    child.stdin.write("go\n")
    child.stdin.flush()
    outcome = child.stdout.readline().strip()
    assert child.wait() == 0
    return outcome


def test_single_member_is_last_and_leaves_nothing(tmp_path):
    arena = LastProcessStandingArena(tmp_path, "solo")
    before = open_fds()
    arena.enter()
    assert list(arena.leave()) == [True]
    assert left_after_exit(tmp_path) == []
    assert open_fds() == before


def test_only_the_last_of_several_members_cleans_up(tmp_path, children):
    members = [start_member(children, tmp_path) for _ in range(4)]
    outcomes = [tell_to_leave(member) for member in members]
    assert outcomes == ["not-last"] * 3 + ["last"]
    assert os.listdir(tmp_path) == []


def test_leaving_while_a_live_member_remains_leaks_no_fd(tmp_path, children):
    other = start_member(children, tmp_path)
    arena = LastProcessStandingArena(tmp_path, "test")
    before = open_fds()
    arena.enter()
    assert list(arena.leave()) == []
    retire_mutex_files()  # the arena's two files are kept open for the next entry
    assert open_fds() == before
    assert tell_to_leave(other) == "last"


def test_killed_members_do_not_block_the_election(tmp_path, children):
    live = start_member(children, tmp_path)
    dead = [start_member(children, tmp_path) for _ in range(5)]
    for member in dead:
        member.kill()
        member.wait()
    arena = LastProcessStandingArena(tmp_path, "test")
    arena.enter()
    assert list(arena.leave()) == [], "the live member still counts"
    assert tell_to_leave(live) == "last", "the dead do not"
    assert left_after_exit(tmp_path) == []


def test_member_killed_inside_then_last_leaver_cleans_up(tmp_path, children):
    dead = start_member(children, tmp_path)
    dead.kill()
    dead.wait()
    arena = LastProcessStandingArena(tmp_path, "test")
    arena.enter()
    assert list(arena.leave()) == [True]
    assert left_after_exit(tmp_path) == []


def test_entering_twice_and_leaving_unentered_raise(tmp_path):
    arena = LastProcessStandingArena(tmp_path, "twice")
    with pytest.raises(RuntimeError):
        arena.leave()
    arena.enter()
    with pytest.raises(RuntimeError):
        arena.enter()
    assert list(arena.leave()) == [True]
    with pytest.raises(RuntimeError):
        arena.leave()


def test_a_leave_never_iterated_keeps_the_membership(tmp_path):
    arena = LastProcessStandingArena(tmp_path, "lazy")
    before = open_fds()
    arena.enter()
    forgotten, second = arena.leave(), arena.leave()
    del forgotten  # never iterated: still a member, nothing leaked
    assert list(arena.leave()) == [True]
    assert list(second) == [], "a second leave() of the same membership yields nothing"
    assert left_after_exit(tmp_path) == []
    assert open_fds() == before


def test_forked_child_is_not_a_member(tmp_path):
    arena = LastProcessStandingArena(tmp_path, "fork")
    arena.enter()

    def child_cannot_leave():
        with pytest.raises(RuntimeError):
            arena.leave()
        return True

    assert run_in_fork(child_cannot_leave) == 0
    assert list(arena.leave()) == [True]


# Enters, forks a child that outlives it and reports (once it runs, so its
# at-fork handlers are done), and waits to be killed.
MEMBER_WITH_CHILD = """
import os, sys
from toilcoord import LastProcessStandingArena
LastProcessStandingArena(sys.argv[1], "test").enter()
if os.fork() == 0:
    print(os.getpid(), flush=True)
    sys.stdin.read()
    os._exit(0)
sys.stdin.read()
"""


def test_dead_member_with_live_forked_child_counts_as_dead(tmp_path, children):
    member = children.python(MEMBER_WITH_CHILD, str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child_pid = int(member.stdout.readline())
    try:
        member.kill()
        member.wait()
        arena = LastProcessStandingArena(tmp_path, "test")
        arena.enter()
        assert list(arena.leave()) == [True]
    finally:
        os.kill(child_pid, 9)


def test_cleanup_runs_while_nobody_can_enter(tmp_path):
    arena = LastProcessStandingArena(tmp_path, "busy")
    arena.enter()
    for _ in arena.leave():
        newcomer = LastProcessStandingArena(tmp_path, "busy")
        with pytest.raises(LockTimeout):
            newcomer.enter(timeout=0.05)
    newcomer.enter(timeout=5)
    assert list(newcomer.leave()) == [True]


def test_cleanup_that_raises_still_releases_the_arena(tmp_path):
    arena = LastProcessStandingArena(tmp_path, "boom")
    arena.enter()
    with pytest.raises(ZeroDivisionError):
        for _ in arena.leave():
            1 / 0
    assert left_after_exit(tmp_path) == []
    arena.enter(timeout=5)
    assert list(arena.leave()) == [True]


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "x\0", None, b"bytes", "é" * 150])
def test_bad_arena_names_touch_nothing(tmp_path, bad):
    with pytest.raises(ValueError):
        LastProcessStandingArena(tmp_path, bad)
    assert os.listdir(tmp_path) == []


def test_arena_names_are_refused_at_construction_when_their_mutex_name_would_be_too_long(tmp_path):
    # Regression (found by the torture's name fuzzer): a 190-200 byte name
    # was accepted, then enter() failed on the name of the arena's mutex.
    longest = "a" * (200 - len("-arena-lock"))
    arena = LastProcessStandingArena(tmp_path, longest)
    arena.enter()
    assert list(arena.leave()) == [True]
    for name in (longest + "b", "é" * 95):
        with pytest.raises(ValueError, match="arena name plus the suffix '-arena-lock'"):
            LastProcessStandingArena(tmp_path, name)
    assert left_after_exit(tmp_path) == []


def test_missing_base_dir(tmp_path):
    arena = LastProcessStandingArena(tmp_path / "missing", "a")
    with pytest.raises(FileNotFoundError, match="missing"):
        arena.enter()


# ---------------------------------------------------------------- races


def cleaned_up(directory):
    """What is left in *directory* after cleanup's arena and mutex reaping."""
    assert not any(live for _, live in reap_dead_arenas(directory))
    reap_unheld_mutex_files(directory)
    retire_mutex_files()
    return sorted(os.listdir(directory))


def _generation_member(directory, generation, ready, go):
    arena = LastProcessStandingArena(directory, "gen")
    arena.enter()
    inside = os.path.join(directory, "inside", f"{generation}-{os.getpid()}")
    open(inside, "w").close()
    ready.release()
    go.acquire()
    os.unlink(inside)
    for _ in arena.leave():
        _record_cleanup(directory, generation)


def _record_cleanup(directory, generation):
    # Only the last one out gets here, and nobody is inside.
    with open(os.path.join(directory, "cleanups"), "a") as log:
        log.write(f"{generation} {len(os.listdir(os.path.join(directory, 'inside')))}\n")


def test_exactly_one_cleanup_per_generation(tmp_path):
    context = multiprocessing.get_context("fork")
    (tmp_path / "inside").mkdir()
    generations, size = 5, 6
    for generation in range(generations):
        ready, go = context.Semaphore(0), context.Semaphore(0)
        members = [
            context.Process(target=_generation_member, args=(str(tmp_path), generation, ready, go)) for _ in range(size)
        ]
        try:
            for member in members:
                member.start()
            for _ in members:
                assert ready.acquire(timeout=30)  # all are inside at once
            for _ in members:
                go.release()
        finally:
            exit_codes = join_or_kill(members, 30)
        assert exit_codes == [0] * size
    lines = (tmp_path / "cleanups").read_text().split("\n")[:-1]
    assert lines == [f"{generation} 0" for generation in range(generations)]
    assert sorted(os.listdir(tmp_path)) == [
        "cleanups",
        "gen-arena-live",
        "inside",
        "toil-mutex-gen-arena-lock",
    ], "multiprocessing's children end with os._exit: files stay, for cleanup"
    assert cleaned_up(tmp_path) == ["cleanups", "inside"]


def _pool_task(directory):
    arena = LastProcessStandingArena(directory, "pool")
    arena.enter()
    marker = os.path.join(directory, "inside", str(os.getpid()))
    open(marker, "w").close()
    os.unlink(marker)
    cleaned = 0
    for _ in arena.leave():
        # Nobody may be inside while the last one cleans up.
        with global_mutex(directory, "log"):
            with open(os.path.join(directory, "cleanups"), "a") as log:
                log.write(f"{len(os.listdir(os.path.join(directory, 'inside')))}\n")
        cleaned += 1
    return cleaned


def test_pool_of_short_lived_tasks(tmp_path):
    (tmp_path / "inside").mkdir()
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_pool_task, [str(tmp_path)] * 100, chunksize=1)
    lines = (tmp_path / "cleanups").read_text().split()
    assert len(lines) == sum(results) >= 1
    assert set(lines) == {"0"}, "a cleanup ran while a member was inside"
    assert cleaned_up(tmp_path) == ["cleanups", "inside"], "the pool's workers end with os._exit: cleanup's work"


def test_entering_and_leaving_never_scan_the_directory(tmp_path, monkeypatch, children):
    # O(1) whatever base_dir holds: thousands of other files, dead members.
    for number in range(2000):
        (tmp_path / f"unrelated-{number}").touch()
    dead = start_member(children, tmp_path)
    dead.kill()
    dead.wait()

    def no_scanning(*args, **kwargs):
        raise AssertionError("the arena scanned its directory")

    monkeypatch.setattr(os, "scandir", no_scanning)
    monkeypatch.setattr(os, "listdir", no_scanning)
    arena = LastProcessStandingArena(tmp_path, "test")
    for _ in range(3):
        arena.enter()
        assert list(arena.leave()) == [True]
    monkeypatch.undo()
    retire_mutex_files()
    assert len(os.listdir(tmp_path)) == 2000


def test_a_member_holds_a_shared_lock_on_one_file(tmp_path, children):
    first, second = start_member(children, tmp_path), start_member(children, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["test-arena-live"], "entering takes no mutex"
    with open("/proc/locks") as table:
        shared = [
            line
            for line in table
            if " FLOCK " in line and " READ " in line and line.split()[4] in (str(first.pid), str(second.pid))
        ]
    assert len(shared) == 2
    assert tell_to_leave(first) == "not-last"
    assert tell_to_leave(second) == "last"
    assert os.listdir(tmp_path) == []


# A member of Toil's own arena (toil.lib.threading.LastProcessStandingArena,
# as in Toil 9.6): enters under the arena's mutex by making and locking a
# file in <name>-arena-members/; waits for a line on stdin, then leaves the
# way Toil does (unlink, unlock, and rmdir if it was the last).
TOIL_STYLE_MEMBER = """
import fcntl, os, sys, tempfile
from toilcoord import global_mutex
base = sys.argv[1]
folder = os.path.join(base, "test-arena-members")
with global_mutex(base, "test-arena-lock"):
    os.makedirs(folder, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=folder)
    fcntl.flock(fd, fcntl.LOCK_EX)
print("in", flush=True)
sys.stdin.readline()
with global_mutex(base, "test-arena-lock"):
    os.unlink(path)
    os.close(fd)
    os.rmdir(folder)
print("left", flush=True)
"""


def test_no_last_member_is_elected_while_a_toil_member_is_inside(tmp_path, children):
    toil_member = children.python(
        TOIL_STYLE_MEMBER, str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert toil_member.stdout.readline().strip() == "in"
    arena = LastProcessStandingArena(tmp_path, "test")
    arena.enter()
    assert list(arena.leave()) == [], "a Toil member is inside"
    arena.enter()  # not stuck: the refused election let go of the live file
    assert tell_to_leave(toil_member) == "left"
    assert list(arena.leave()) == [True]
    assert open_fds() == open_fds()
    assert left_after_exit(tmp_path) == []


def test_a_dead_toil_members_file_does_not_keep_the_arena_alive(tmp_path, children):
    folder = tmp_path / "test-arena-members"
    folder.mkdir()
    (folder / "tmpdeadmember").touch()  # unlocked: its process is gone
    arena = LastProcessStandingArena(tmp_path, "test")
    arena.enter()
    assert list(arena.leave()) == [True]
    assert (folder / "tmpdeadmember").exists(), "Toil's file: Toil's to remove"


# Holds the arena "test"'s mutex (as a last member cleaning up would) until
# a line arrives on stdin.
MUTEX_HOLDER = """
import sys
from toilcoord import global_mutex
with global_mutex(sys.argv[1], "test-arena-lock"):
    print("holding", flush=True)
    sys.stdin.readline()
"""


def test_leave_with_a_timeout_gives_up_and_stays_a_member(tmp_path, children):
    arena = LastProcessStandingArena(tmp_path, "test")
    arena.enter()
    holder = children.python(MUTEX_HOLDER, str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    with pytest.raises(LockTimeout):
        list(arena.leave(timeout=0.05))
    with pytest.raises(RuntimeError, match="already in arena"):
        arena.enter()  # still a member
    other = start_member(children, tmp_path)  # and counted as one: never the last while inside
    with pytest.raises(LockTimeout):
        list(arena.leave(timeout=0))
    holder.stdin.close()
    assert holder.wait() == 0
    assert list(arena.leave(timeout=30)) == []
    assert tell_to_leave(other) == "last"
    assert left_after_exit(tmp_path) == []


@pytest.mark.parametrize("bad", [-1, float("nan")])
def test_a_bad_leave_timeout_is_refused_at_once(tmp_path, bad):
    arena = LastProcessStandingArena(tmp_path, "test")
    arena.enter()
    with pytest.raises(ValueError, match="timeout"):
        arena.leave(timeout=bad)
    assert list(arena.leave()) == [True]
