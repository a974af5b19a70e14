"""Tests for toilcoord.mutex: real processes, threads, signals and files."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import tempfile
import threading
import time
import types

import pytest

from toilcoord import LastProcessStandingArena, folders, process_name_exists
from toilcoord import gates as gates_module
from toilcoord import mounts as mounts_module
from toilcoord import mutex as mutex_module
from toilcoord.files import robust_rmtree
from toilcoord.heldfiles import release_taken, take_over
from toilcoord.locks import ForeignFileError, LockTimeout, check_name
from toilcoord.mutex import global_mutex, retire_mutex_files
from toilcoord.smoke import left_in

from conftest import (
    alive,
    blocked_on_flock,
    fstat_failing_once,
    kill_orphan,
    left_after_exit,
    open_fds,
    release,
    run_in_fork,
    wait_until,
)
from fuzzing import rng_for, sizes

pytestmark = pytest.mark.timeout(60)

MUTEX_FILE = "toil-mutex-m"


# Holds mutex argv[2] in directory argv[1], says "held", and releases it when
# its stdin closes.
HOLD = """
import sys
from toilcoord.mutex import global_mutex
with global_mutex(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


def start_holder(children, directory, mutex="m"):
    holder = children.python(HOLD, str(directory), mutex, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def no_gate_in_use():
    """True when no thread of this process holds or waits for a mutex."""
    return not any(gate.lock.locked() for gate in gates_module._gates.values())


# ----------------------------------------------------------- the potato race

# Runs race(directory, rounds, threads): each thread enters the mutex
# `rounds` times; the holder creates a "potato" with O_EXCL, writes its
# identity, yields, checks the potato is still its own and removes it. Any
# overlap of two holders makes a create, a check or a removal fail. As a
# child: waits for stdin to close (the start gun), prints "violations done".
RACE = """
import os, sys, threading
from toilcoord.mutex import global_mutex

def race(directory, rounds, threads):
    potato = os.path.join(directory, "potato")
    tally_lock = threading.Lock()
    tally = [0, 0]

    def hold_the_potato(me):
        try:
            fd = os.open(potato, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return 1
        os.write(fd, me)
        os.close(fd)
        for _ in range(3):
            os.sched_yield()
        with open(potato, "rb") as stream:
            stolen = stream.read() != me
        try:
            os.unlink(potato)
        except FileNotFoundError:
            return 1
        return int(stolen)

    def contender():
        me = ("%d.%d" % (os.getpid(), threading.get_ident())).encode()
        for _ in range(rounds):
            with global_mutex(directory, "potato"):
                violation = hold_the_potato(me)
            with tally_lock:
                tally[0] += violation
                tally[1] += 1

    workers = [threading.Thread(target=contender) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return tally

if __name__ == "__main__":
    sys.stdin.read()
    print(*race(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


def race_in_processes(children, directory, processes, rounds, threads):
    racers = [
        children.python(
            RACE, str(directory), str(rounds), str(threads), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(processes)
    ]
    for racer in racers:
        racer.stdin.close()  # the start gun
    results = [racer.stdout.read().split() for racer in racers]
    assert [racer.wait() for racer in racers] == [0] * processes
    return [[int(count) for count in result] for result in results]


@pytest.mark.timeout(120)
def test_processes_racing_never_overlap(tmp_path, children):
    results = race_in_processes(children, tmp_path, processes=8, rounds=25, threads=1)
    assert results == [[0, 25]] * 8
    assert os.listdir(tmp_path) == []


def test_threads_of_one_process_racing_never_overlap(tmp_path):
    namespace = {"__name__": "race"}
    exec(RACE, namespace)
    assert namespace["race"](str(tmp_path), 40, 8) == [0, 8 * 40]
    assert left_after_exit(tmp_path) == []
    assert no_gate_in_use()


@pytest.mark.timeout(120)
def test_threads_in_several_processes_racing_never_overlap(tmp_path, children):
    results = race_in_processes(children, tmp_path, processes=3, rounds=15, threads=4)
    assert results == [[0, 4 * 15]] * 3
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------- holding and dying


def test_lock_file_stays_while_its_user_lives_and_goes_at_exit(tmp_path):
    path = str(tmp_path / MUTEX_FILE)
    with global_mutex(tmp_path, "m"):
        assert os.listdir(tmp_path) == [MUTEX_FILE]
        assert take_over(path) is None, "locked by us"
        inode = os.stat(path).st_ino
    assert os.listdir(tmp_path) == [MUTEX_FILE], "kept open for the next acquisition"
    with global_mutex(str(tmp_path), "m"):  # and again, as a str: the same file
        assert os.stat(path).st_ino == inode
    assert left_after_exit(tmp_path) == []


USE_AND_EXIT = """
import sys
from toilcoord.mutex import global_mutex
for _ in range(3):
    with global_mutex(sys.argv[1], "m"):
        pass
"""


def test_a_user_that_exits_normally_leaves_nothing(tmp_path, children):
    assert children.python(USE_AND_EXIT, str(tmp_path)).wait() == 0
    assert os.listdir(tmp_path) == []


def test_relative_base_dir_is_the_same_mutex(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with global_mutex(".", "m"):
        with pytest.raises(LockTimeout):
            with global_mutex(tmp_path, "m", timeout=0):
                pass
    assert left_after_exit(tmp_path) == []


def test_waiter_gets_the_mutex_of_a_holder_killed_while_holding(tmp_path, children):
    holder = start_holder(children, tmp_path)
    waiter = children.python(HOLD, str(tmp_path), "m", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    wait_until(lambda: blocked_on_flock(waiter.pid))
    holder.kill()
    holder.wait()
    assert waiter.stdout.readline() == "held\n"
    assert left_in(str(tmp_path)) == [MUTEX_FILE]  # on NFS, .nfsXXXX files go a moment later
    release(waiter)
    assert os.listdir(tmp_path) == []


def test_mutex_after_holder_killed_without_waiters(tmp_path, children):
    holder = start_holder(children, tmp_path)
    holder.kill()
    holder.wait()
    assert os.listdir(tmp_path) == [MUTEX_FILE], "a killed holder leaves its file"
    with global_mutex(tmp_path, "m", timeout=10):
        pass
    assert left_after_exit(tmp_path) == []


# ------------------------------------------------------------------ timeout


@pytest.mark.parametrize("timeout", [0, 0.05])
def test_timeout_when_another_process_holds_it(tmp_path, children, timeout):
    holder = start_holder(children, tmp_path)
    before = open_fds()
    with pytest.raises(LockTimeout) as raised:
        with global_mutex(tmp_path, "m", timeout=timeout):
            pytest.fail("entered a mutex another process holds")
    assert isinstance(raised.value, TimeoutError)
    assert str(tmp_path / MUTEX_FILE) in str(raised.value)
    retire_mutex_files()  # closes the one fd kept for the next try
    assert open_fds() == before
    assert no_gate_in_use()
    assert os.listdir(tmp_path) == [MUTEX_FILE]
    release(holder)
    with global_mutex(tmp_path, "m", timeout=timeout + 10):
        assert os.listdir(tmp_path) == [MUTEX_FILE]
    assert left_after_exit(tmp_path) == []


@pytest.mark.parametrize("timeout", [0, 0.05])
def test_timeout_when_another_thread_holds_it(tmp_path, timeout):
    entered, leave = threading.Event(), threading.Event()

    def hold():
        with global_mutex(tmp_path, "m"):
            entered.set()
            leave.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert entered.wait(30)
        before = open_fds()
        with pytest.raises(LockTimeout):
            with global_mutex(tmp_path, "m", timeout=timeout):
                pytest.fail("entered a mutex another thread holds")
        assert open_fds() == before
    finally:
        leave.set()
        holder.join(30)
    with global_mutex(tmp_path, "m", timeout=timeout + 10):
        pass
    assert left_after_exit(tmp_path) == []
    assert no_gate_in_use()


def test_infinite_timeout_waits_like_none(tmp_path):
    with global_mutex(tmp_path, "m", timeout=float("inf")):
        assert os.listdir(tmp_path) == [MUTEX_FILE]
    assert left_after_exit(tmp_path) == []


@pytest.mark.parametrize("timeout", [-1, float("nan")])
def test_bad_timeout(tmp_path, timeout):
    with pytest.raises(ValueError, match="timeout"):
        global_mutex(tmp_path, "m", timeout=timeout)


# --------------------------------------------------------------------- fork

# Holds the mutex, forks a child that lives until stdin closes, prints the
# child's pid once the child runs, then either releases the mutex
# ("release", printing "released") or waits to be killed ("die").
HOLD_AND_FORK = """
import os, sys
from toilcoord.mutex import global_mutex
running, started = os.pipe()
with global_mutex(sys.argv[1], "m"):
    pid = os.fork()
    if pid == 0:
        os.write(started, b"x")  # the at-fork handlers have run
        sys.stdin.read()
        os._exit(0)
    os.read(running, 1)
    print(pid, flush=True)
    if sys.argv[2] == "die":
        sys.stdin.read()
print("released", flush=True)
os.waitpid(pid, 0)
"""


@pytest.mark.parametrize("parent_fate", ["release", "die"])
def test_forked_child_does_not_keep_the_parents_mutex(tmp_path, children, parent_fate):
    parent = children.python(
        HOLD_AND_FORK, str(tmp_path), parent_fate, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    child_pid = int(parent.stdout.readline())
    try:
        if parent_fate == "die":
            parent.kill()
        else:
            assert parent.stdout.readline() == "released\n"
        with global_mutex(tmp_path, "m", timeout=20):
            assert alive(child_pid), "the child must still live while we hold the mutex"
    finally:
        parent.stdin.close()  # the child's stdin too: it exits
        if parent_fate == "die":
            kill_orphan(child_pid)
    assert parent.wait(20) in (0, -signal.SIGKILL)
    assert left_after_exit(tmp_path) == []


# A child forked inside the `with` also leaves the block: it must neither
# unlink the parent's lock file nor believe it holds the mutex.
FORK_INSIDE_WITH = """
import os, sys
from toilcoord.locks import LockTimeout
from toilcoord.mutex import global_mutex
path = os.path.join(sys.argv[1], "toil-mutex-m")
with global_mutex(sys.argv[1], "m"):
    pid = os.fork()
    if pid == 0:
        try:
            with global_mutex(sys.argv[1], "m", timeout=0):
                os._exit(3)  # the child got in while the parent holds it
        except LockTimeout:
            pass
    else:
        _, status = os.waitpid(pid, 0)
        print(os.WEXITSTATUS(status), os.path.exists(path), flush=True)
        sys.stdin.readline()
if pid == 0:
    os._exit(0)
with global_mutex(sys.argv[1], "m", timeout=0):
    print("free", flush=True)
"""


def test_child_leaving_an_inherited_with_block_leaves_the_parents_lock(tmp_path, children):
    parent = children.python(FORK_INSIDE_WITH, str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline() == "0 True\n"
    with pytest.raises(LockTimeout):
        with global_mutex(tmp_path, "m", timeout=0):
            pytest.fail("the parent's mutex was free after its child left the with block")
    parent.stdin.write("go\n")
    parent.stdin.close()
    assert parent.stdout.readline() == "free\n"
    assert parent.wait() == 0
    assert left_after_exit(tmp_path) == []  # our own try kept the file open: on NFS a .nfsXXXX till we let go


# Thread A waits for the mutex (its fd already open) while the main thread
# forks a long-lived child; A then gets the lock on that very fd, the file of
# a holder that died. Toil-like code would leave the lock shared with the
# child, so the parent's death would not free the mutex.
WAIT_THEN_FORK = """
import os, sys, threading
from toilcoord.mutex import global_mutex

def wait_for_mutex():
    with global_mutex(sys.argv[1], "m"):
        print("A holds", flush=True)
        threading.Event().wait()

threading.Thread(target=wait_for_mutex, daemon=True).start()
sys.stdin.readline()  # "fork", once A waits in flock
if os.fork() == 0:
    print(os.getpid(), flush=True)
    sys.stdin.read()
    os._exit(0)
sys.stdin.read()
"""


def test_child_forked_while_a_thread_waits_does_not_keep_the_lock(tmp_path, children):
    holder = start_holder(children, tmp_path)
    parent = children.python(WAIT_THEN_FORK, str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    wait_until(lambda: blocked_on_flock(parent.pid))
    parent.stdin.write("fork\n")
    parent.stdin.flush()
    child_pid = int(parent.stdout.readline())
    try:
        holder.kill()  # its file stays linked: thread A locks the fd it opened before the fork
        assert parent.stdout.readline() == "A holds\n"
        parent.kill()
        parent.wait()
        with global_mutex(tmp_path, "m", timeout=20):
            assert alive(child_pid)
    finally:
        kill_orphan(child_pid)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "name",
    [
        "",
        None,
        b"m",
        5,
        "a/b",
        "a\0b",
        ".",
        "..",
        "x" * 201,
        "\u00e9" * 101,  # 101 characters, 202 bytes
        "\U0001f512" * 51,  # 51 characters, 204 bytes
        "\ud800",  # cannot be encoded
    ],
)
def test_bad_mutex_names_raise_before_touching_anything(tmp_path, name):
    with pytest.raises(ValueError, match="mutex name"):
        global_mutex(tmp_path, name)
    with pytest.raises(ValueError):
        check_name(name)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["x" * 200, "\u00e9" * 100, "...", ".hidden", "sp ace", "\u00e9"])
def test_names_at_the_limits_work(tmp_path, name):
    assert check_name(name) == name
    with global_mutex(tmp_path, name):
        assert os.listdir(tmp_path) == ["toil-mutex-" + name]
    assert left_after_exit(tmp_path) == []


def test_missing_base_dir_is_named(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError) as raised:
        with global_mutex(missing, "m"):
            pass
    assert raised.value.filename == str(missing)
    assert "does not exist" in str(raised.value)
    assert no_gate_in_use()


def test_base_dir_that_is_a_file(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("data")
    with pytest.raises(NotADirectoryError) as raised:
        with global_mutex(afile, "m"):
            pass
    assert raised.value.filename == str(afile)
    assert "not a directory" in str(raised.value)
    assert afile.read_text() == "data"


def test_bad_base_dir_errors_are_also_the_runtime_errors_toil_raises(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("data")
    for base_dir, kind in (
        (tmp_path / "missing", FileNotFoundError),
        (afile, NotADirectoryError),
        (afile / "below", NotADirectoryError),
    ):
        for caught in (RuntimeError, kind):  # Toil's callers catch RuntimeError
            with pytest.raises(caught) as raised:
                with global_mutex(base_dir, "m"):
                    pass
            assert isinstance(raised.value, RuntimeError) and isinstance(raised.value, kind)
            assert raised.value.filename == os.path.dirname(str(base_dir / "toil-mutex-m"))
    assert afile.read_text() == "data"
    assert no_gate_in_use()


@pytest.fixture
def fresh_lockable_cache(monkeypatch):
    from toilcoord import locks

    monkeypatch.setattr(locks, "_lockable_devices", {})


@pytest.mark.usefixtures("fresh_lockable_cache")
def test_a_mutex_on_ceph_is_refused_like_toils(fake_mounts, monkeypatch):
    from toilcoord import mounts
    from toilcoord.locks import UnsafeFilesystemError

    root, mountinfo = fake_mounts
    monkeypatch.setattr(mounts, "_MOUNTINFO", mountinfo)
    ceph = os.path.join(root, "ceph")

    with pytest.raises(UnsafeFilesystemError) as raised:
        with global_mutex(ceph, "m"):
            pass
    assert isinstance(raised.value, RuntimeError)  # what Toil raises, and its callers catch
    assert ceph in str(raised.value) and "CephFS" in str(raised.value)
    assert os.listdir(ceph) == [], "refused before anything is created"
    assert no_gate_in_use()


@pytest.mark.usefixtures("fresh_lockable_cache")
def test_the_filesystem_is_checked_on_first_open_only(tmp_path, monkeypatch):
    from toilcoord import locks

    checked = []
    real = locks.ensure_filesystem_lockable
    monkeypatch.setattr(
        folders,
        "ensure_filesystem_lockable",
        lambda path, *args, **kwargs: checked.append(path) or real(path, *args, **kwargs),
    )
    for _ in range(5):
        with global_mutex(tmp_path, "m"):
            pass
    assert checked == [str(tmp_path)], "the kept lock file is not checked again"
    retire_mutex_files()
    with global_mutex(tmp_path, "m"):
        pass
    assert checked == [str(tmp_path)] * 2, "a reopened directory is checked (an answer cached per device)"


def test_bytes_base_dir_is_a_clear_type_error(tmp_path):
    with pytest.raises(TypeError, match="base_dir"):
        global_mutex(os.fsencode(str(tmp_path)), "m")


@pytest.mark.parametrize("dangling", [False, True])
def test_symlink_at_the_lock_path_is_never_followed(tmp_path, dangling):
    target = tmp_path / "target"
    if not dangling:
        target.write_text("precious")
    base = tmp_path / "base"
    base.mkdir()
    os.symlink(target, base / MUTEX_FILE)
    with pytest.raises(OSError) as raised:
        with global_mutex(base, "m"):
            pytest.fail("entered through a symlink")
    assert raised.value.errno == errno.ELOOP
    assert "symbolic link" in str(raised.value)
    if dangling:
        assert not os.path.lexists(target), "the symlink's target was created"
    else:
        assert target.read_text() == "precious"
        fd = take_over(target)  # nobody holds it
        assert fd is not None
        release_taken(fd)  # untracked too
    assert no_gate_in_use()


# ------------------------------------------- a kept file that others remove

# Like RACE, in one process per style: "ours" takes global_mutex; "toil"
# does what Toil's own mutex does (create, flock, check the name, and unlink
# before unlocking at release); "reaper" runs cleanup's reaping of unheld
# lock files in a loop; "stale" takes global_mutex as on a network
# filesystem (an exclusive create before trusting the name). Prints
# "violations rounds".
MIXED = """
import fcntl, os, sys
from toilcoord import mutex
from toilcoord.mutex import global_mutex, reap_unheld_mutex_files

directory, style, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
path = os.path.join(directory, "toil-mutex-potato")
potato = os.path.join(directory, "potato")

class toil_mutex:
    def __enter__(self):
        while True:
            self.fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                if os.stat(path).st_ino == os.fstat(self.fd).st_ino:
                    return
            except FileNotFoundError:
                pass
            os.close(self.fd)

    def __exit__(self, *exc):
        os.unlink(path)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)

def hold_the_potato():
    try:
        os.close(os.open(potato, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return 1
    for _ in range(3):
        os.sched_yield()
    try:
        os.unlink(potato)
    except FileNotFoundError:
        return 1
    return 0

sys.stdin.read()  # the start gun
if style == "stale":
    mutex.names_may_be_stale = lambda device, path: True
violations = 0
for _ in range(rounds):
    if style == "reaper":
        reap_unheld_mutex_files(directory)
        continue
    with (toil_mutex() if style == "toil" else global_mutex(directory, "potato")):
        violations += hold_the_potato()
print(violations, rounds)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "styles",
    [
        ("ours", "ours", "toil", "toil"),
        ("ours", "ours", "ours", "reaper"),
        ("stale", "stale", "ours", "toil", "reaper"),
    ],
    ids="+".join,
)
def test_a_lock_file_removed_by_others_is_never_held_twice(tmp_path, children, styles):
    racers = [
        children.python(
            MIXED,
            str(tmp_path),
            style,
            "300" if style != "reaper" else "600",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for style in styles
    ]
    for racer in racers:
        racer.stdin.close()
    results = [racer.stdout.read().split() for racer in racers]
    assert [racer.wait() for racer in racers] == [0] * len(racers)
    assert [int(violations) for violations, _ in results] == [0] * len(racers)
    assert os.listdir(tmp_path) == [], "exited normally: nothing left"


def test_a_file_removed_between_acquisitions_is_made_again_and_held(tmp_path, children):
    with global_mutex(tmp_path, "m"):
        pass
    from toilcoord.mutex import reap_unheld_mutex_files

    assert reap_unheld_mutex_files(tmp_path) == [str(tmp_path / MUTEX_FILE)]
    assert os.listdir(tmp_path) == []
    with global_mutex(tmp_path, "m"):
        probe = children.python(
            "import sys\nfrom toilcoord.heldfiles import take_over\nprint(take_over(sys.argv[1]))",
            str(tmp_path / MUTEX_FILE),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert probe.stdout.read().strip() == "None", "the new file is the one we hold"
        assert probe.wait() == 0
    assert left_after_exit(tmp_path) == []


def test_on_a_network_filesystem_a_free_name_is_created_and_adopted(tmp_path, monkeypatch):
    # The stale-name path: our kept file was unlinked by someone else; the
    # exclusive create that forces a server lookup finds the name free and
    # makes the new lock file, which we lock instead.
    monkeypatch.setattr(gates_module, "names_may_be_stale", lambda device, path: True)
    with global_mutex(tmp_path, "m"):
        pass
    # As a holder on another client would at its exit, while it still had
    # the file open: its client keeps the file as .nfsXXXX, one link left.
    os.link(tmp_path / MUTEX_FILE, tmp_path / ".nfs-renamed")
    os.unlink(tmp_path / MUTEX_FILE)
    real_open, opened = os.open, []

    def noting_opens(path, flags, *args, **keywords):
        fd = real_open(path, flags, *args, **keywords)
        opened.append(os.path.basename(path))  # an open that gave an fd
        return fd

    monkeypatch.setattr(os, "open", noting_opens)
    with global_mutex(tmp_path, "m"):
        monkeypatch.setattr(os, "open", real_open)
        assert opened == [MUTEX_FILE], "the file made to look the name up is the one locked, not opened again"
        assert sorted(os.listdir(tmp_path)) == [".nfs-renamed", MUTEX_FILE]
        assert take_over(str(tmp_path / MUTEX_FILE)) is None, "we hold the file now linked there"
    os.unlink(tmp_path / ".nfs-renamed")
    assert left_after_exit(tmp_path) == []


def test_a_stale_handle_makes_us_reopen(tmp_path, monkeypatch):
    # ESTALE (an NFS file removed on the server) cannot be caused locally.
    with global_mutex(tmp_path, "m"):
        pass
    failures = fstat_failing_once(monkeypatch, mutex_module, errno.ESTALE)
    with global_mutex(tmp_path, "m"):
        assert not failures
    monkeypatch.undo()
    assert left_after_exit(tmp_path) == []


def a_new_holder_excludes_us(children, base):
    """With the name's file gone (unlinked or renamed while kept open by
    us), a new holder makes and holds the new file: we must see it held."""
    holder = start_holder(children, base)
    try:
        with pytest.raises(LockTimeout):
            with global_mutex(base, "m", timeout=0):
                pass
    finally:
        release(holder)


def test_where_anyone_may_link_it_a_lock_file_linked_elsewhere_is_looked_up(tmp_path, children, monkeypatch):
    # Where fs.protected_hardlinks is 0, another user may link our kept
    # lock file into a directory of theirs. After an unlink at its name (a
    # holder leaving at exit, Toil's release) the file keeps that one link,
    # and its count alone would call it ours still. The setting is the
    # machine's: here its 0 is told, not set.
    monkeypatch.setattr(gates_module, "hard_links_protected", lambda: False)
    base = tmp_path / "base"
    base.mkdir()
    with global_mutex(base, "m"):
        pass
    os.link(base / MUTEX_FILE, tmp_path / "theirs")
    os.unlink(base / MUTEX_FILE)  # as a holder leaving would, under the lock
    a_new_holder_excludes_us(children, base)
    os.unlink(tmp_path / "theirs")
    with global_mutex(base, "m"):
        assert take_over(str(base / MUTEX_FILE)) is None, "we hold the file linked at the name"
    assert left_after_exit(base) == []


@pytest.fixture
def reachable(other_user):
    """(top, base): top like /tmp (anyone may make a link in it), base/ in
    it, root's but anyone may reach its files; the kernel protects links
    here (else skip). Removed after."""
    if not mounts_module.hard_links_protected():
        pytest.skip("fs.protected_hardlinks is 0 here: every lock file is looked up at its name")
    top = tempfile.mkdtemp(prefix="toilcoord-test-")
    try:
        os.chmod(top, 0o1777)
        base = os.path.join(top, "base")
        os.mkdir(base, 0o755)
        yield top, base
    finally:
        retire_mutex_files()
        robust_rmtree(top)


def linked_by(user, source, target):
    """Whether *user* could hard-link *source* to *target*."""

    def link_it():
        os.setgroups([])
        os.setgid(user[1])
        os.setuid(user[0])
        try:
            os.link(source, target)
        except PermissionError:
            return False
        return True

    return run_in_fork(link_it) == 0


def test_no_other_user_can_link_a_lock_file_where_the_kernel_protects_links(reachable, other_user):
    # What lets an acquirer trust a lock file's link count (see above).
    top, base = reachable
    with global_mutex(base, "m"):
        pass
    assert not linked_by(other_user, os.path.join(base, MUTEX_FILE), os.path.join(top, "theirs"))
    assert os.stat(os.path.join(base, MUTEX_FILE)).st_nlink == 1


def test_a_lock_file_others_may_write_and_so_link_is_looked_up(reachable, other_user, children):
    # Toil makes its lock files with the umask's mode: with umask 000 anyone
    # may read and write one, and so (even where the kernel protects links)
    # link it into a directory of theirs. After the unlink at its name (at
    # Toil's release) it keeps that link: its count alone would call it
    # ours still, while a new holder holds the new file at the name.
    top, base = reachable
    made = os.open(os.path.join(base, MUTEX_FILE), os.O_CREAT | os.O_WRONLY)
    os.fchmod(made, 0o666)  # as Toil makes it under umask 000
    os.close(made)
    with global_mutex(base, "m"):
        pass  # ours now, kept open
    assert linked_by(other_user, os.path.join(base, MUTEX_FILE), os.path.join(top, "theirs"))
    os.unlink(os.path.join(base, MUTEX_FILE))  # as Toil's release does, under the lock
    a_new_holder_excludes_us(children, base)


@pytest.mark.usefixtures("fresh_directory_checks")
def test_in_a_directory_others_may_write_a_renamed_lock_file_is_looked_up(tmp_path, children):
    # A group-writable directory without the sticky bit is accepted (with a
    # warning), and its group may rename our lock file away: it keeps its
    # one link, elsewhere, while a new holder holds a new file at the name.
    base = tmp_path / "base"
    base.mkdir()
    os.chmod(base, 0o775)
    with global_mutex(base, "m"):
        pass  # kept open
    os.rename(base / MUTEX_FILE, base / "aside")  # as a member of the group could
    a_new_holder_excludes_us(children, base)
    os.unlink(base / "aside")


# ------------------------------------------------- what the lock file is


def test_the_lock_file_is_open_for_writing_and_private(tmp_path):
    with global_mutex(tmp_path, "m"):
        fd = gates_module._gates[str(tmp_path / MUTEX_FILE)].fd
        with open(f"/proc/self/fdinfo/{fd}") as info:
            flags = int(next(line for line in info if line.startswith("flags:")).split()[1], 8)
    # NFSv4 grants an exclusive flock only on a file open for writing.
    assert flags & os.O_ACCMODE == os.O_RDWR
    assert flags & os.O_CLOEXEC and flags & os.O_NONBLOCK
    assert os.stat(tmp_path / MUTEX_FILE).st_mode & 0o777 == 0o600
    assert left_after_exit(tmp_path) == []


@pytest.mark.parametrize("timeout", [None, 2])
def test_a_fifo_at_the_lock_path_is_a_clear_error_not_a_hang(tmp_path, timeout):
    os.mkfifo(tmp_path / MUTEX_FILE)
    with pytest.raises(OSError, match="not a regular file"):
        with global_mutex(tmp_path, "m", timeout=timeout):
            pytest.fail("entered a mutex whose lock file is a FIFO")
    assert os.listdir(tmp_path) == [MUTEX_FILE], "left alone"
    assert no_gate_in_use()


def test_idle_lock_files_kept_open_are_bounded(tmp_path):
    from toilcoord.mutex import kept_lock_files

    for number in range(gates_module._KEEP_AT_MOST + 40):
        with global_mutex(tmp_path, f"m{number}"):
            pass
    assert kept_lock_files() == gates_module._KEEP_AT_MOST
    assert len(os.listdir(tmp_path)) == gates_module._KEEP_AT_MOST, "those let go of are removed"
    assert left_after_exit(tmp_path) == []


# ------------------------------------------------------------- fairness


def clock_noting_sleeps(pauses, really=False):
    """The time module as the mutex module sees it, noting its sleeps (and
    sleeping them if *really*); other modules' sleeps are not noted."""

    def sleep(seconds):
        pauses.append(seconds)
        if really:
            time.sleep(seconds)

    return types.SimpleNamespace(monotonic=time.monotonic, sleep=sleep)


def releaser_once_blocked(holder):
    """A started thread that releases *holder* once this process waits in
    flock for it, so the next acquisition is a contended one."""

    def release_when_we_wait():
        wait_until(lambda: blocked_on_flock(os.getpid()))
        release(holder)

    thread = threading.Thread(target=release_when_we_wait)
    thread.start()
    return thread


def test_on_a_network_filesystem_a_contended_holder_lets_others_in(tmp_path, monkeypatch, children):
    # Another node's waiter asks the NFS server later than this node's next
    # request would: after a contended release, a process pauses briefly.
    monkeypatch.setattr(gates_module, "names_may_be_stale", lambda device, path: True)
    pauses = []
    monkeypatch.setattr(gates_module, "time", clock_noting_sleeps(pauses, really=True))
    with global_mutex(tmp_path, "m"):
        pass
    with global_mutex(tmp_path, "m"):
        pass
    assert pauses == [], "uncontended: no pause"
    holder = start_holder(children, tmp_path)
    release_later = releaser_once_blocked(holder)
    with global_mutex(tmp_path, "m"):  # waits for the holder: contended
        pass
    with global_mutex(tmp_path, "m"):  # at once: first a pause
        pass
    release_later.join()
    assert len(pauses) == 1 and 0 < pauses[0] <= gates_module._HANDOFF
    assert left_after_exit(tmp_path) == []


def test_on_a_local_filesystem_nobody_pauses(tmp_path, monkeypatch, children):
    pauses = []
    monkeypatch.setattr(gates_module, "time", clock_noting_sleeps(pauses))
    holder = start_holder(children, tmp_path)
    release_later = releaser_once_blocked(holder)
    with global_mutex(tmp_path, "m"):  # a blocking wait, not a polling one
        pass
    release_later.join()
    with global_mutex(tmp_path, "m"):
        pass
    assert pauses == []


# ---------------------------------------------------- shared directories


@pytest.fixture
def fresh_directory_checks(monkeypatch):
    monkeypatch.setattr(folders, "_warned", set())


@pytest.mark.usefixtures("fresh_directory_checks")
def test_a_lock_file_of_another_user_is_refused_and_left_alone(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another uid")
    planted = tmp_path / MUTEX_FILE
    planted.write_text("theirs")
    os.chown(planted, 4242, 4242)
    with pytest.raises(ForeignFileError, match="owned by uid 4242") as raised:
        with global_mutex(tmp_path, "m", timeout=1):
            pytest.fail("entered through another user's file")
    assert isinstance(raised.value, PermissionError)
    assert planted.read_text() == "theirs" and os.stat(planted).st_uid == 4242
    assert no_gate_in_use()


@pytest.mark.usefixtures("fresh_directory_checks")
def test_a_hard_linked_lock_file_is_refused(tmp_path):
    # Someone links our future lock file to a file of their choosing.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("")
    base = tmp_path / "base"
    base.mkdir()
    os.link(elsewhere, base / MUTEX_FILE)
    with pytest.raises(ForeignFileError, match="2 links"):
        with global_mutex(base, "m"):
            pass
    assert sorted(os.listdir(base)) == [MUTEX_FILE]


@pytest.mark.usefixtures("fresh_directory_checks")
def test_a_directory_anyone_can_empty_is_refused(tmp_path):
    os.chmod(tmp_path, 0o777)
    with pytest.raises(ForeignFileError, match="writable by all, not sticky"):
        with global_mutex(tmp_path, "m"):
            pass
    assert os.listdir(tmp_path) == []


@pytest.mark.usefixtures("fresh_directory_checks")
def test_a_sticky_shared_directory_is_used_with_one_warning(tmp_path, caplog):
    os.chmod(tmp_path, 0o1777)
    for name in ("a", "b", "a"):
        with global_mutex(tmp_path, name):
            pass
    warnings = [record for record in caplog.records if "writable by other users" in record.getMessage()]
    assert len(warnings) == 1
    assert left_after_exit(tmp_path) == []


@pytest.mark.usefixtures("fresh_directory_checks")
def test_a_directory_of_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another uid")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 4242, 4242)
    with pytest.raises(ForeignFileError, match="belongs to uid 4242"):
        with global_mutex(theirs, "m"):
            pass
    assert os.listdir(theirs) == []


def test_reaping_through_a_stale_name_never_removes_a_held_file(
    tmp_path, children, monkeypatch, through_another_client
):
    # On NFS: just after the reaper listed the directory, another client
    # unlinks the old lock file while it still has it open (so the server
    # keeps it as .nfsXXXX, unheld, with one link), and a process there
    # makes and holds a new one. The reaper, its client still caching the
    # name for the old file, took that over and unlinked "it" by name,
    # which removed the held file.
    from toilcoord.mutex import reap_unheld_mutex_files

    path, twin = tmp_path / MUTEX_FILE, through_another_client(tmp_path / MUTEX_FILE)
    path.write_text("")
    real_scandir, held = os.scandir, []

    @contextlib.contextmanager
    def listed_then_replaced_elsewhere(directory):
        with real_scandir(directory) as entries:
            listed = list(entries)
        os.lstat(path)  # the reaper's client has the old file's name cached
        held.append(os.open(twin, os.O_RDWR))
        os.unlink(twin)  # renamed .nfsXXXX by the other client, which has it open
        held.append(start_holder(children, os.path.dirname(twin)))
        yield iter(listed)

    monkeypatch.setattr(os, "scandir", listed_then_replaced_elsewhere)
    try:
        removed = reap_unheld_mutex_files(tmp_path)
        monkeypatch.undo()
        with pytest.raises(FileExistsError):  # an exclusive create looks the name up at the server
            os.close(os.open(twin, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        assert removed == []
    finally:
        monkeypatch.undo()
        os.close(held[0])
        release(held[1])
    assert left_after_exit(tmp_path) == []


# ------------------------------------------------------ the holder record

# Holds mutex argv[2] in argv[1] with purpose argv[3], says "held", lets go
# at its first line of stdin, says "released", and exits when stdin closes.
HOLD_WITH_PURPOSE = """
import sys
from toilcoord.mutex import global_mutex
with global_mutex(sys.argv[1], sys.argv[2], purpose=sys.argv[3]):
    print("held", flush=True)
    sys.stdin.readline()
print("released", flush=True)
sys.stdin.read()
"""

# Holds argv[1] with a bare flock, as Toil's mutex does: no record.
HOLD_BARE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def start_recording_holder(children, directory, purpose):
    holder = children.python(
        HOLD_WITH_PURPOSE, str(directory), "m", purpose, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "held\n"
    return holder


def start_bare_holder(children, path):
    holder = children.python(HOLD_BARE, str(path), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def timeout_message(directory):
    with pytest.raises(LockTimeout) as raised:
        with global_mutex(directory, "m", timeout=0):
            pytest.fail("entered a held mutex")
    return str(raised.value)


def test_a_holder_records_itself_in_the_lock_file(tmp_path, children):
    from toilcoord.holder import RECORD_SIZE, read_record

    holder = start_recording_holder(children, tmp_path, "nightly index build")
    fd = os.open(tmp_path / MUTEX_FILE, os.O_RDONLY)
    try:
        record = read_record(fd)
        assert os.fstat(fd).st_size == RECORD_SIZE
    finally:
        os.close(fd)
    assert (record.pid, record.purpose, record.host) == (holder.pid, "nightly index build", os.uname().nodename)
    assert record.command and abs(record.since - time.time()) < 600
    release(holder)


def test_lock_timeout_names_the_holder(tmp_path, children):
    holder = start_recording_holder(children, tmp_path, "reindexing")
    message = timeout_message(tmp_path)
    assert f"pid {holder.pid}" in message and "'reindexing'" in message and os.uname().nodename in message
    release(holder)


@pytest.mark.parametrize("fate", ["released", "killed"])
def test_lock_timeout_never_names_a_previous_holder(tmp_path, children, fate):
    previous = start_recording_holder(children, tmp_path, "earlier work")
    if fate == "released":
        previous.stdin.write("\n")
        previous.stdin.flush()
        assert previous.stdout.readline() == "released\n"  # alive, its record still in the file
    else:
        previous.kill()
        previous.wait()
    bare = start_bare_holder(children, tmp_path / MUTEX_FILE)
    message = timeout_message(tmp_path)
    assert f"pid {previous.pid}" not in message and "earlier work" not in message
    assert "held by" not in message
    release(bare)


def test_lock_timeout_in_a_thread_says_another_thread_holds_it(tmp_path):
    entered, leave = threading.Event(), threading.Event()

    def hold():
        with global_mutex(tmp_path, "m", purpose="in a thread"):
            entered.set()
            leave.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert entered.wait(30)
        with pytest.raises(LockTimeout, match=f"another thread of this process \\(pid {os.getpid()}\\)"):
            with global_mutex(tmp_path, "m", timeout=0.01):
                pytest.fail("entered a mutex another thread holds")
    finally:
        leave.set()
        thread.join(30)


@pytest.mark.parametrize(
    "purpose, error",
    [
        (5, TypeError),
        (b"bytes", TypeError),
        ("", ValueError),
        ("two\nlines", ValueError),
        ("\x1b[31mred", ValueError),
        ("x" * 201, ValueError),
        ("é" * 101, ValueError),
        ("\udcff", ValueError),
    ],
)
def test_bad_purposes_raise_before_touching_anything(tmp_path, purpose, error):
    with pytest.raises(error, match="purpose"):
        global_mutex(tmp_path, "m", purpose=purpose)
    assert os.listdir(tmp_path) == []


def test_purpose_is_keyword_only_and_may_be_200_bytes(tmp_path):
    with pytest.raises(TypeError):
        global_mutex(tmp_path, "m", None, "positional")  # type: ignore[misc]
    with global_mutex(tmp_path, "m", purpose="é" * 100):
        pass
    assert left_after_exit(tmp_path) == []


def test_a_record_that_cannot_be_written_leaves_the_lock_held(tmp_path, monkeypatch):
    from toilcoord import holder

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(holder.os, "pwrite", full_disk)  # a full disk cannot be caused here
    monkeypatch.setattr(holder.os, "pwritev", full_disk)  # what a network filesystem's record uses
    with global_mutex(tmp_path, "m", purpose="no room"):
        assert os.stat(tmp_path / MUTEX_FILE).st_size == 0
    assert left_after_exit(tmp_path) == []


# ------------------------------------------------- fuzz: mutex and arena names

EDGE_NAMES = [
    None,
    b"bytes",
    7,
    1.5,
    ["a"],
    "",
    ".",
    "..",
    "/",
    "a/b",
    "\0",
    "a\0b",
    " ",
    "\n",
    "\t",
    "-",
    "--help",
    "...",
    ".hidden",
    "a b",
    "名前",
    "🦀",
    "\x7f",
    "%s",
    "*",
    "?",
    "\\",
    "toil-proc-x",
    "x-arena-members",
    "x-arena-lock",
    "\udcff",
    "\ud800",
    "a" * 189,
    "a" * 190,
    "a" * 200,
    "a" * 201,
    "é" * 100,
    "é" * 100 + "a",
    "€" * 66 + "ab",
    "\udcff" * 200,
    "\udcff" * 201,
]


def name_bytes(name):
    try:
        return len(os.fsencode(name))
    except UnicodeError:
        return None


def acceptable(name, limit):
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        return False
    size = name_bytes(name)
    return size is not None and size <= limit


def generated_names(rng, count):
    pieces = ["a", "é", "€", "🦀", "\udcff", ".", "-", " ", "\n", "/", "\0", "\\", "\ud800", "x" * 50]
    names = []
    for _ in range(count):
        name = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        if rng.random() < 0.3:  # near the byte limit
            name = name + "b" * max(0, rng.randint(185, 205) - (name_bytes(name) or 0))
        names.append(name)
    return names


def exercise_name(tmp_path, name):
    before = sorted(os.listdir(tmp_path))
    mutex_ok, arena_ok = acceptable(name, 200), acceptable(name, 200 - len("-arena-lock"))
    if mutex_ok:
        with global_mutex(tmp_path, name):
            assert os.listdir(tmp_path) == ["toil-mutex-" + name]
    else:
        with pytest.raises(ValueError):
            global_mutex(tmp_path, name)
    if arena_ok:
        arena = LastProcessStandingArena(tmp_path, name)
        arena.enter()
        assert list(arena.leave()) == [True]
    else:
        with pytest.raises(ValueError):
            LastProcessStandingArena(tmp_path, name)
    # Never alive here, whatever the name: ours, Toil's or impossible (nothing touched).
    assert process_name_exists(tmp_path, name) is False
    retire_mutex_files()  # as at exit
    assert left_in(str(tmp_path)) == before, "nothing left for %r" % (name,)  # NFS's .nfsXXXX waited out


def short_id(name):
    text = repr(name)
    return text if len(text) <= 24 else "%s...(%d chars)" % (text[:16], len(name))


@pytest.mark.parametrize("name", EDGE_NAMES, ids=short_id)
def test_edge_case_names_are_refused_up_front_or_work_and_leave_nothing(tmp_path, name):
    exercise_name(tmp_path, name)


@pytest.mark.parametrize("count", sizes(150, 5000))
def test_generated_names_are_refused_up_front_or_work_and_leave_nothing(tmp_path, count):
    for name in generated_names(rng_for("names"), count):
        exercise_name(tmp_path, name)
        exercise_name(tmp_path, "toil-proc-" + name if isinstance(name, str) else name)
