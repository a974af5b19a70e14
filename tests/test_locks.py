"""Tests for toilcoord.locks: real processes, threads, signals and files;
mocks only for faults that cannot be caused (EIO, ENOLCK, ESTALE)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import subprocess
import threading
import time

import pytest

from toilcoord import locks
from toilcoord.locks import (
    HeldFile,
    LockTimeout,
    UnsafeFilesystemError,
    check_name,
    discard_taken,
    ensure_filesystem_lockable,
    filesystem_info,
    global_mutex,
    lock_scope,
    locked_file_is,
    parse_mountinfo,
    safe_lock,
    safe_unlock_and_close,
    take_over,
)

from conftest import run_in_fork

pytestmark = pytest.mark.timeout(60)

MUTEX_FILE = "toil-mutex-m"


# ------------------------------------------------------------------ helpers

# Holds mutex argv[2] in directory argv[1], says "held", and releases it when
# its stdin closes.
HOLD = """
import sys
from toilcoord.locks import global_mutex
with global_mutex(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


def start_holder(children, directory, mutex="m"):
    holder = children.python(HOLD, str(directory), mutex, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def release(holder):
    holder.stdin.close()
    assert holder.wait() == 0


def open_fds():
    return sorted(os.listdir("/proc/self/fd"))


def blocked_on_flock(pid):
    """True once process *pid* waits for an flock (a "->" line in /proc/locks)."""
    with open("/proc/locks") as table:
        return any(line.split()[1:3] == ["->", "FLOCK"] and line.split()[5] == str(pid) for line in table)


def wait_until(predicate, timeout=30.0):
    """Poll *predicate* (an observation of another process, such as
    /proc/locks) until it holds; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{predicate} never held"
        time.sleep(0.005)


def alive(pid):
    """True while *pid* runs (not a zombie), whoever its parent is."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def kill_orphan(pid):
    """SIGKILL a grandchild whose parent died (init reaps it, not us)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------- the potato race

# Runs race(directory, rounds, threads): each thread enters the mutex
# `rounds` times; the holder creates a "potato" with O_EXCL, writes its
# identity, yields, checks the potato is still its own and removes it. Any
# overlap of two holders makes a create, a check or a removal fail. As a
# child: waits for stdin to close (the start gun), prints "violations done".
RACE = """
import os, sys, threading
from toilcoord.locks import global_mutex

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
        children.python(RACE, str(directory), str(rounds), str(threads),
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
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
    assert os.listdir(tmp_path) == []
    assert locks._thread_locks == {}, "idle gates are dropped"


@pytest.mark.timeout(120)
def test_threads_in_several_processes_racing_never_overlap(tmp_path, children):
    results = race_in_processes(children, tmp_path, processes=3, rounds=15, threads=4)
    assert results == [[0, 4 * 15]] * 3
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------- holding and dying

def test_lock_file_exists_only_while_held(tmp_path):
    path = str(tmp_path / MUTEX_FILE)
    with global_mutex(tmp_path, "m"):
        assert os.listdir(tmp_path) == [MUTEX_FILE]
        assert take_over(path) is None, "locked by us"
    assert os.listdir(tmp_path) == []
    with global_mutex(str(tmp_path), "m"):  # and again, as a str
        assert os.listdir(tmp_path) == [MUTEX_FILE]
    assert os.listdir(tmp_path) == []


def test_relative_base_dir_is_the_same_mutex(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with global_mutex(".", "m"):
        with pytest.raises(LockTimeout):
            with global_mutex(tmp_path, "m", timeout=0):
                pass
    assert os.listdir(tmp_path) == []


def test_waiter_gets_the_mutex_of_a_holder_killed_while_holding(tmp_path, children):
    holder = start_holder(children, tmp_path)
    waiter = children.python(HOLD, str(tmp_path), "m", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    wait_until(lambda: blocked_on_flock(waiter.pid))
    holder.kill()
    holder.wait()
    assert waiter.stdout.readline() == "held\n"
    assert os.listdir(tmp_path) == [MUTEX_FILE]
    release(waiter)
    assert os.listdir(tmp_path) == []


def test_mutex_after_holder_killed_without_waiters(tmp_path, children):
    holder = start_holder(children, tmp_path)
    holder.kill()
    holder.wait()
    assert os.listdir(tmp_path) == [MUTEX_FILE], "a killed holder leaves its file"
    with global_mutex(tmp_path, "m", timeout=10):
        pass
    assert os.listdir(tmp_path) == []


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
    assert open_fds() == before
    assert locks._thread_locks == {}
    assert os.listdir(tmp_path) == [MUTEX_FILE]
    release(holder)
    with global_mutex(tmp_path, "m", timeout=timeout + 10):
        assert os.listdir(tmp_path) == [MUTEX_FILE]
    assert os.listdir(tmp_path) == []


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
    assert os.listdir(tmp_path) == []
    assert locks._thread_locks == {}


def test_infinite_timeout_waits_like_none(tmp_path):
    with global_mutex(tmp_path, "m", timeout=float("inf")):
        assert os.listdir(tmp_path) == [MUTEX_FILE]
    assert os.listdir(tmp_path) == []


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
from toilcoord.locks import global_mutex
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
    parent = children.python(HOLD_AND_FORK, str(tmp_path), parent_fate,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
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
    assert os.listdir(tmp_path) == []


# A child forked inside the `with` also leaves the block: it must neither
# unlink the parent's lock file nor believe it holds the mutex.
FORK_INSIDE_WITH = """
import os, sys
from toilcoord.locks import LockTimeout, global_mutex
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
print(os.path.exists(path), flush=True)
"""


def test_child_leaving_an_inherited_with_block_leaves_the_parents_lock(tmp_path, children):
    parent = children.python(FORK_INSIDE_WITH, str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline() == "0 True\n"
    with pytest.raises(LockTimeout):
        with global_mutex(tmp_path, "m", timeout=0):
            pytest.fail("the parent's mutex was free after its child left the with block")
    parent.stdin.write("go\n")
    parent.stdin.close()
    assert parent.stdout.readline() == "False\n"
    assert parent.wait() == 0
    assert os.listdir(tmp_path) == []


# Thread A waits for the mutex (its fd already open) while the main thread
# forks a long-lived child; A then gets the lock on that very fd, the file of
# a holder that died. Toil-like code would leave the lock shared with the
# child, so the parent's death would not free the mutex.
WAIT_THEN_FORK = """
import os, sys, threading
from toilcoord.locks import global_mutex

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

@pytest.mark.parametrize("name", [
    "", None, b"m", 5, "a/b", "a\0b", ".", "..", "x" * 201,
    "\u00e9" * 101,   # 101 characters, 202 bytes
    "\U0001f512" * 51,  # 51 characters, 204 bytes
    "\ud800",  # cannot be encoded
])
def test_bad_mutex_names_raise_before_touching_anything(tmp_path, name):
    with pytest.raises(ValueError, match="mutex name"):
        global_mutex(tmp_path, name)
    with pytest.raises(ValueError):
        check_name(name)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["x" * 200, "\u00e9" * 100, "..." , ".hidden", "sp ace", "\u00e9"])
def test_names_at_the_limits_work(tmp_path, name):
    assert check_name(name) == name
    with global_mutex(tmp_path, name):
        assert os.listdir(tmp_path) == ["toil-mutex-" + name]
    assert os.listdir(tmp_path) == []


def test_missing_base_dir_is_named(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError) as raised:
        with global_mutex(missing, "m"):
            pass
    assert raised.value.filename == str(missing)
    assert "does not exist" in str(raised.value)
    assert locks._thread_locks == {}


def test_base_dir_that_is_a_file(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("data")
    with pytest.raises(NotADirectoryError) as raised:
        with global_mutex(afile, "m"):
            pass
    assert raised.value.filename == str(afile)
    assert "not a directory" in str(raised.value)
    assert afile.read_text() == "data"


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
        safe_unlock_and_close(fd)
    assert locks._thread_locks == {}


# ---------------------------------------------------------------- safe_lock

class FakeFlock:
    """Stands in for fcntl.flock: raises the queued errnos, then succeeds."""

    def __init__(self, *errnos):
        self.errnos = list(errnos)
        self.calls = []

    def __call__(self, fd, operation):
        self.calls.append(operation)
        if self.errnos:
            code = self.errnos.pop(0)
            raise OSError(code, os.strerror(code))


@pytest.fixture
def sleeps(monkeypatch):
    """Records the delays locks asks time.sleep for, without sleeping."""
    delays = []
    monkeypatch.setattr(locks.time, "sleep", delays.append)
    return delays


@pytest.fixture
def lock_fd(tmp_path):
    """An fd on tmp_path/lockfile, closed at teardown unless the test did."""
    fd = os.open(str(tmp_path / "lockfile"), os.O_RDWR | os.O_CREAT)
    inode = os.fstat(fd).st_ino
    yield fd
    with contextlib.suppress(OSError):
        if os.fstat(fd).st_ino == inode:  # not a reused number
            os.close(fd)


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOLCK])
def test_safe_lock_retries_with_backoff_then_succeeds(monkeypatch, sleeps, caplog, lock_fd, code):
    flock = FakeFlock(code, code, code)
    monkeypatch.setattr(locks.fcntl, "flock", flock)
    with caplog.at_level(logging.WARNING, logger=locks.logger.name):
        safe_lock(lock_fd)
    assert sleeps == [1, 2, 4]
    assert flock.calls == [fcntl.LOCK_EX] * 4
    retries = [record for record in caplog.records if "retry" in record.getMessage()]
    assert len(retries) == 3
    assert errno.errorcode[code] in retries[0].getMessage()


@pytest.mark.parametrize("code, advice", [
    (errno.ENOLCK, "no working lock daemon"),
    (errno.EIO, "lock service keeps failing"),
])
def test_safe_lock_gives_up_after_ten_retries_with_advice(monkeypatch, sleeps, caplog, lock_fd, code, advice):
    flock = FakeFlock(*[code] * 11)
    monkeypatch.setattr(locks.fcntl, "flock", flock)
    with caplog.at_level(logging.WARNING, logger=locks.logger.name):
        with pytest.raises(OSError) as raised:
            safe_lock(lock_fd, shared=True)
    assert raised.value.errno == code
    assert sleeps == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]
    assert flock.calls == [fcntl.LOCK_SH] * 11
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert advice in errors[0] and "local storage" in errors[0]


@pytest.mark.parametrize("code", [errno.EBADF, errno.EINVAL, errno.EINTR])
def test_safe_lock_raises_other_errors_at_once(monkeypatch, sleeps, lock_fd, code):
    monkeypatch.setattr(locks.fcntl, "flock", FakeFlock(code))
    with pytest.raises(OSError) as raised:
        safe_lock(lock_fd)
    assert raised.value.errno == code
    assert sleeps == []


def test_safe_lock_error_during_retries_is_raised_at_once(monkeypatch, sleeps, lock_fd):
    monkeypatch.setattr(locks.fcntl, "flock", FakeFlock(errno.EIO, errno.EWOULDBLOCK))
    with pytest.raises(BlockingIOError):
        safe_lock(lock_fd, block=False)
    assert sleeps == [1]


def test_safe_lock_unavailable_non_blocking_fails_at_once(tmp_path, sleeps, lock_fd):
    other = os.open(str(tmp_path / "lockfile"), os.O_RDONLY)
    try:
        safe_lock(other)
        with pytest.raises(OSError) as raised:
            safe_lock(lock_fd, block=False)
        assert raised.value.errno in (errno.EAGAIN, errno.EACCES)
        with pytest.raises(OSError):
            safe_lock(lock_fd, block=False, shared=True)
        assert sleeps == []
    finally:
        os.close(other)
    safe_lock(lock_fd, block=False)  # free now


def test_safe_lock_shared_locks_coexist(tmp_path, lock_fd):
    other = os.open(str(tmp_path / "lockfile"), os.O_RDONLY)
    try:
        safe_lock(other, shared=True)
        safe_lock(lock_fd, block=False, shared=True)
    finally:
        os.close(other)


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOLCK])
def test_safe_unlock_and_close_swallows_eio_enolck(monkeypatch, caplog, lock_fd, code):
    monkeypatch.setattr(locks.fcntl, "flock", FakeFlock(code))
    with caplog.at_level(logging.WARNING, logger=locks.logger.name):
        safe_unlock_and_close(lock_fd)
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(lock_fd)
    assert any(errno.errorcode[code] in record.getMessage() for record in caplog.records)


def test_safe_unlock_and_close_closes_even_on_other_errors(monkeypatch, lock_fd):
    monkeypatch.setattr(locks.fcntl, "flock", FakeFlock(errno.EINVAL))
    with pytest.raises(OSError) as raised:
        safe_unlock_and_close(lock_fd)
    assert raised.value.errno == errno.EINVAL
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(lock_fd)


def test_safe_unlock_and_close_releases_the_lock(tmp_path, lock_fd):
    safe_lock(lock_fd)
    safe_unlock_and_close(lock_fd)
    fd = take_over(str(tmp_path / "lockfile"))
    assert fd is not None
    safe_unlock_and_close(fd)


# ----------------------------------------------------------- locked_file_is

def test_locked_file_is(tmp_path):
    path = str(tmp_path / "f")
    fd = os.open(path, os.O_RDONLY | os.O_CREAT)
    try:
        assert locked_file_is(fd, path)
        assert locked_file_is(fd, tmp_path / "f")
        os.unlink(path)
        assert not locked_file_is(fd, path)
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT))  # a replacement (fd keeps the old inode alive)
        assert not locked_file_is(fd, path)
        os.unlink(path)
        os.symlink(f"/proc/self/fd/{fd}", path)
        assert not locked_file_is(fd, path), "a symlink is not the file"
        assert not locked_file_is(fd, str(tmp_path / "missing" / "f"))
        assert not locked_file_is(fd, os.path.join(path, "f")), "ENOTDIR"
    finally:
        os.close(fd)


@pytest.mark.parametrize("code, expected", [(errno.ESTALE, False), (errno.ENOENT, False)])
def test_locked_file_is_false_on_estale(tmp_path, monkeypatch, code, expected):
    path = str(tmp_path / "f")
    fd = os.open(path, os.O_RDONLY | os.O_CREAT)
    try:
        def stale(_path):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(locks.os, "lstat", stale)
        assert locked_file_is(fd, path) is expected
    finally:
        os.close(fd)


def test_locked_file_is_raises_real_errors(tmp_path):
    fd = os.open(str(tmp_path / "f"), os.O_RDONLY | os.O_CREAT)
    os.close(fd)
    with pytest.raises(OSError) as raised:
        locked_file_is(fd, str(tmp_path / "f"))
    assert raised.value.errno == errno.EBADF


# ---------------------------------------------------- HeldFile / take_over

# Creates a HeldFile in argv[1], prints its path, lives until stdin closes.
HOLD_FILE = """
import sys
from toilcoord.locks import HeldFile
held = HeldFile.create(sys.argv[1], prefix="p-", suffix=".lock")
print(held.path, flush=True)
sys.stdin.read()
held.release()
"""


def test_take_over_a_live_then_a_killed_holder(tmp_path, children):
    holder = children.python(HOLD_FILE, str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    path = holder.stdout.readline().strip()
    assert os.path.basename(path).startswith("p-") and path.endswith(".lock")
    before = open_fds()
    assert take_over(path) is None
    assert open_fds() == before
    holder.kill()
    holder.wait()
    fd = take_over(path)
    assert fd is not None
    assert locked_file_is(fd, path)
    assert take_over(path) is None, "now we hold it"
    discard_taken(fd, path)
    assert os.listdir(tmp_path) == []
    assert open_fds() == before
    with pytest.raises(FileNotFoundError):
        take_over(path)


# Takes over the (dead) file argv[1], forks a child that outlives us and
# reports once it runs, then waits to be killed.
TAKE_OVER_AND_FORK = """
import os, sys
from toilcoord.locks import take_over
assert take_over(sys.argv[1]) is not None
if os.fork() == 0:
    print(os.getpid(), flush=True)
    sys.stdin.read()
    os._exit(0)
sys.stdin.read()
"""


def test_a_taker_that_dies_never_leaves_the_file_locked_by_its_forked_child(tmp_path, children):
    # Regression (found in review): take_over's fd was not closed in forked
    # children, so a deferred function that forked while its dead owner's file
    # was being run kept that file "alive" after the runner was killed.
    holder = children.python(HOLD_FILE, str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    path = holder.stdout.readline().strip()
    holder.kill()
    holder.wait()
    taker = children.python(TAKE_OVER_AND_FORK, path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child_pid = int(taker.stdout.readline())
    try:
        assert take_over(path) is None, "the taker holds it"
        taker.kill()
        taker.wait()
        os.kill(child_pid, 0)  # the taker's child still lives...
        fd = take_over(path)   # ...yet the file is free
        assert fd is not None
        discard_taken(fd, path)
    finally:
        os.kill(child_pid, signal.SIGKILL)


def test_take_over_after_clean_release_finds_nothing(tmp_path, children):
    holder = children.python(HOLD_FILE, str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    path = holder.stdout.readline().strip()
    release(holder)
    with pytest.raises(FileNotFoundError):
        take_over(path)


def test_take_over_never_follows_a_symlink(tmp_path):
    target = tmp_path / "target"
    target.write_text("x")
    os.symlink(target, tmp_path / "link")
    with pytest.raises(OSError) as raised:
        take_over(str(tmp_path / "link"))
    assert raised.value.errno == errno.ELOOP


def test_held_file_lifecycle(tmp_path):
    held = HeldFile.create(str(tmp_path), prefix="x-")
    assert held.held and held.name.startswith("x-")
    assert held.name in repr(held) and "held=True" in repr(held)
    assert locked_file_is(held.fd, held.path)
    assert take_over(held.path) is None
    held.release()
    assert not held.held and held.fd == -1
    assert os.listdir(tmp_path) == []
    held.release()  # twice is harmless

    kept = HeldFile.acquire(str(tmp_path / "fixed"))
    kept.release(unlink=False)
    assert os.listdir(tmp_path) == ["fixed"]
    fd = take_over(str(tmp_path / "fixed"))
    assert fd is not None
    discard_taken(fd, str(tmp_path / "fixed"))


class TakerInTheMiddle:
    """Wraps os.open for HeldFile.create: right after the first O_EXCL
    create, another open file description takes the fresh, not yet locked
    file over (and, if *discard*, removes it), as a concurrent garbage
    collector could."""

    def __init__(self, discard):
        self.discard = discard
        self.real_open = os.open
        self.victim = None
        self.taken_fd = None

    def __call__(self, path, flags, mode=0o777):
        fd = self.real_open(path, flags, mode)
        if flags & os.O_EXCL and self.victim is None:
            self.victim = path
            self.taken_fd = self.real_open(path, os.O_RDONLY)
            fcntl.flock(self.taken_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if self.discard:
                discard_taken(self.taken_fd, path)
                self.taken_fd = None
        return fd


@pytest.mark.parametrize("discard", [False, True])
def test_held_file_create_never_returns_a_file_someone_else_holds(tmp_path, monkeypatch, discard):
    taker = TakerInTheMiddle(discard)
    monkeypatch.setattr(locks.os, "open", taker)
    held = HeldFile.create(str(tmp_path))
    monkeypatch.undo()
    try:
        assert held.path != taker.victim
        assert locked_file_is(held.fd, held.path)
        assert take_over(held.path) is None
        if discard:
            assert sorted(os.listdir(tmp_path)) == [held.name]
        else:
            assert sorted(os.listdir(tmp_path)) == sorted([held.name, os.path.basename(taker.victim)])
            discard_taken(taker.taken_fd, taker.victim)
    finally:
        held.release()
    assert os.listdir(tmp_path) == []


def test_held_file_create_skips_existing_names(tmp_path, monkeypatch):
    existing = tmp_path / ("p-" + "00" * 8)
    existing.write_text("someone's")
    randoms = iter([b"\0" * 8, b"\1" * 8])
    monkeypatch.setattr(locks.os, "urandom", lambda size: next(randoms))
    held = HeldFile.create(str(tmp_path), prefix="p-")
    monkeypatch.undo()
    assert held.name == "p-" + "01" * 8
    assert existing.read_text() == "someone's"
    held.release()


def test_held_file_create_removes_its_file_when_locking_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(locks.fcntl, "flock", FakeFlock(errno.ENOSYS))
    before, tracked = open_fds(), set(locks._held_fds)
    with pytest.raises(OSError) as raised:
        HeldFile.create(str(tmp_path))
    assert raised.value.errno == errno.ENOSYS
    assert os.listdir(tmp_path) == []
    assert open_fds() == before
    assert locks._held_fds == tracked


def test_held_file_is_inert_in_a_forked_child(tmp_path):
    held = HeldFile.create(str(tmp_path))

    def in_child():
        assert not held.held
        assert "held=False" in repr(held)
        try:
            os.fstat(held.fd)
        except OSError as error:  # the child closed its copy at fork
            assert error.errno == errno.EBADF
        else:
            raise AssertionError("the child kept the parent's lock fd")
        held.release()
        assert os.path.exists(held.path), "the child unlinked the parent's file"
        return True

    try:
        assert run_in_fork(in_child) == 0
        assert held.held
        assert os.path.exists(held.path)
        assert take_over(held.path) is None, "the parent still holds it"
    finally:
        held.release()
    assert os.listdir(tmp_path) == []


def test_no_fd_is_tracked_after_use(tmp_path):
    tracked = set(locks._held_fds)
    with global_mutex(tmp_path, "m"):
        assert len(locks._held_fds - tracked) == 1
    held = HeldFile.create(str(tmp_path))
    held.release()
    assert locks._held_fds == tracked


# ------------------------------------------------------ filesystem facts

def escape(path):
    """*path* written as the kernel writes mount points in mountinfo."""
    for char, code in (("\\", "\\134"), (" ", "\\040"), ("\t", "\\011"), ("\n", "\\012")):
        path = path.replace(char, code)
    return path


def mount_line(number, mount_point, fstype, super_options, options="rw,relatime", optional="shared:1"):
    fields = [str(number), "1", "0:%d" % number, "/", escape(mount_point), options]
    fields += [optional] if optional else []
    return " ".join(fields + ["-", fstype, "src%d" % number, super_options])


@pytest.mark.parametrize("fstype, options, scope", [
    ("ext4", ("rw", "relatime"), "node"),
    ("xfs", ("rw",), "node"),
    ("tmpfs", ("rw", "size=100k"), "node"),
    ("overlay", ("rw", "lowerdir=/a"), "node"),
    ("nfs4", ("rw", "vers=4.2", "local_lock=none"), "cluster"),
    ("nfs4", ("rw", "vers=4.2"), "cluster"),
    ("nfs4", ("rw", "local_lock=flock"), "node"),
    ("nfs4", ("rw", "local_lock=all"), "node"),
    ("nfs", ("rw", "vers=3", "local_lock=posix"), "cluster"),
    ("nfs", ("rw", "vers=3", "nolock"), "node"),
    ("lustre", ("rw", "flock"), "cluster"),
    ("lustre", ("rw", "localflock"), "node"),
    ("lustre", ("rw", "noflock"), "unsafe"),
    ("lustre", ("rw",), "unsafe"),
    ("beegfs", ("rw", "cfgFile=/etc/beegfs/beegfs-client.conf"), "node"),
    ("ceph", ("rw", "name=admin"), "unsafe"),
    ("fuse.ceph-fuse", ("rw", "user_id=0"), "unsafe"),
    ("fuse.sshfs", ("rw",), "unknown"),
    ("gpfs", ("rw",), "unknown"),
])
def test_lock_scope(fstype, options, scope):
    got, reason = lock_scope(fstype, options)
    assert got == scope
    assert reason and "\n" not in reason


def test_parse_mountinfo():
    text = "\n".join([
        "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard",
        "30 27 0:27 / /dev/shm rw,nosuid,nodev - tmpfs tmpfs rw,size=100k",
        "40 27 0:40 / /mnt/my\\040dir\\011x\\134y rw shared:2 master:1 - nfs4 srv:/e rw,vers=4.2,local_lock=flock",
        "41 27 0:41 / /scratch rw,relatime - lustre 10.0.0.1@tcp:/fs rw,flock,lazystatfs",
        "42 27 0:42 / /ceph rw - fuse.ceph-fuse ceph-fuse rw,user_id=0,allow_other",
        "garbage line",
        "43 27 0:43 / /no-separator rw shared:3 ext4 /dev/vdb rw",
        "",
    ])
    mounts = parse_mountinfo(text)
    assert [(m.mount_point, m.fstype) for m in mounts] == [
        ("/", "ext4"), ("/dev/shm", "tmpfs"), ("/mnt/my dir\tx\\y", "nfs4"),
        ("/scratch", "lustre"), ("/ceph", "fuse.ceph-fuse"),
    ]
    assert mounts[0].options == ("rw", "relatime", "discard"), "mount and superblock options, deduplicated"
    assert "local_lock=flock" in mounts[2].options
    assert "flock" in mounts[3].options


@pytest.fixture
def fake_mounts(tmp_path):
    """A fake mountinfo: / is ext4 and directories under tmp_path are other
    filesystems. Returns (root, mountinfo path)."""
    root = os.path.realpath(str(tmp_path))
    for name in ("nfs", "nfs-local", "nfs/tmp", "my dir", "stacked", "lustre", "ceph", "unknown", "nfsdir"):
        os.makedirs(os.path.join(root, name))
    lines = [
        mount_line(1, "/", "ext4", "rw"),
        mount_line(2, root + "/nfs", "nfs4", "rw,vers=4.2,local_lock=none"),
        mount_line(3, root + "/nfs/tmp", "tmpfs", "rw"),
        mount_line(4, root + "/nfs-local", "nfs", "rw,vers=3,local_lock=all", optional=""),
        mount_line(5, root + "/my dir", "nfs4", "rw,local_lock=flock", optional="shared:5 master:2"),
        mount_line(6, root + "/stacked", "ext4", "rw"),
        mount_line(7, root + "/stacked", "ceph", "rw,name=admin"),
        mount_line(8, root + "/lustre", "lustre", "rw,noflock"),
        mount_line(9, root + "/ceph", "ceph", "rw"),
        mount_line(10, root + "/unknown", "fuse.sshfs", "rw"),
    ]
    mountinfo = os.path.join(root, "mountinfo")
    with open(mountinfo, "w") as stream:
        stream.write("\n".join(lines) + "\n")
    return root, mountinfo


@pytest.mark.parametrize("relative, fstype, mount, scope", [
    ("nfs", "nfs4", "nfs", "cluster"),
    ("nfs/tmp", "tmpfs", "nfs/tmp", "node"),  # the longest prefix wins
    ("nfs-local", "nfs", "nfs-local", "node"),
    ("nfsdir", "ext4", None, "node"),  # /nfs is a prefix of the string, not of the path
    ("my dir", "nfs4", "my dir", "node"),
    ("stacked", "ceph", "stacked", "unsafe"),  # the later of stacked mounts wins
    ("lustre", "lustre", "lustre", "unsafe"),
    ("unknown", "fuse.sshfs", "unknown", "unknown"),
    ("", "ext4", None, "node"),
])
def test_filesystem_info_on_a_fake_mount_table(fake_mounts, relative, fstype, mount, scope):
    root, mountinfo = fake_mounts
    info = filesystem_info(os.path.join(root, relative), mountinfo=mountinfo)
    assert info.fstype == fstype
    assert info.mount_point == (os.path.join(root, mount) if mount else "/")
    assert info.lock_scope == scope
    assert info.reason


def test_filesystem_info_follows_symlinks_to_the_real_path(fake_mounts):
    root, mountinfo = fake_mounts
    os.symlink(os.path.join(root, "ceph"), os.path.join(root, "link"))
    assert filesystem_info(os.path.join(root, "link"), mountinfo=mountinfo).fstype == "ceph"


def test_filesystem_info_missing_path_and_unreadable_table(tmp_path):
    with pytest.raises(FileNotFoundError):
        filesystem_info(tmp_path / "missing")
    info = filesystem_info(tmp_path, mountinfo=str(tmp_path / "no-mountinfo"))
    assert info.lock_scope == "unknown"


def test_filesystem_info_on_this_machine(tmp_path):
    info = filesystem_info(tmp_path)
    assert os.path.realpath(str(tmp_path)).startswith(info.mount_point)
    assert info.lock_scope != "unsafe"
    if os.path.isdir("/dev/shm"):
        assert filesystem_info("/dev/shm").fstype == "tmpfs"


@pytest.fixture
def fresh_lockable_cache(monkeypatch):
    monkeypatch.setattr(locks, "_lockable_devices", {})


@pytest.mark.usefixtures("fresh_lockable_cache")
def test_ensure_filesystem_lockable_here_and_missing(tmp_path):
    ensure_filesystem_lockable(tmp_path)
    ensure_filesystem_lockable(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        ensure_filesystem_lockable(tmp_path / "missing")
    assert os.listdir(tmp_path) == []


@pytest.mark.usefixtures("fresh_lockable_cache")
@pytest.mark.parametrize("relative", ["ceph", "lustre", "stacked"])
def test_ensure_filesystem_lockable_refuses_unsafe_filesystems(fake_mounts, monkeypatch, relative):
    root, mountinfo = fake_mounts
    monkeypatch.setattr(locks, "_MOUNTINFO", mountinfo)
    with pytest.raises(UnsafeFilesystemError) as raised:
        ensure_filesystem_lockable(os.path.join(root, relative), hint="Use --coordination-dir.")
    assert isinstance(raised.value, RuntimeError)
    message = str(raised.value)
    assert os.path.join(root, relative) in message and message.endswith("Use --coordination-dir.")
    assert ("CephFS" if relative != "lustre" else "Lustre") in message


@pytest.mark.usefixtures("fresh_lockable_cache")
def test_ensure_filesystem_lockable_is_cached_per_device(fake_mounts, monkeypatch):
    root, mountinfo = fake_mounts
    monkeypatch.setattr(locks, "_MOUNTINFO", mountinfo)
    ensure_filesystem_lockable(os.path.join(root, "nfs"))  # same device as all of root, really
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *args, **kwargs: reads.append(args) or real_open(*args, **kwargs))
    ensure_filesystem_lockable(os.path.join(root, "ceph"))  # cached: the device was found safe
    assert reads == []


@pytest.mark.usefixtures("fresh_lockable_cache")
def test_ensure_filesystem_lockable_tries_a_lock_on_unknown_filesystems(fake_mounts, monkeypatch):
    root, mountinfo = fake_mounts
    monkeypatch.setattr(locks, "_MOUNTINFO", mountinfo)
    unknown = os.path.join(root, "unknown")
    monkeypatch.setattr(locks.fcntl, "flock", FakeFlock(errno.ENOSYS))
    with pytest.raises(UnsafeFilesystemError, match="trial lock on fuse.sshfs failed"):
        ensure_filesystem_lockable(unknown, hint="Try local storage.")
    assert os.listdir(unknown) == [], "the probe file is removed"
    monkeypatch.setattr(locks.fcntl, "flock", fcntl.flock)
    with pytest.raises(UnsafeFilesystemError, match="trial lock on fuse.sshfs failed"):
        ensure_filesystem_lockable(unknown)  # the failure is cached per device, not tried again
    monkeypatch.setattr(locks, "_lockable_devices", {})
    ensure_filesystem_lockable(unknown)
    assert os.listdir(unknown) == []


@pytest.mark.usefixtures("fresh_lockable_cache")
def test_no_subprocess_in_any_lock_path(fake_mounts, monkeypatch):
    root, mountinfo = fake_mounts
    spawned = []

    def no_spawning(*args, **kwargs):
        spawned.append(args)
        raise AssertionError("a lock path spawned a process")

    for module, name in ((subprocess, "Popen"), (os, "fork"), (os, "posix_spawn"), (os, "system")):
        monkeypatch.setattr(module, name, no_spawning)
    ensure_filesystem_lockable(root)
    ensure_filesystem_lockable(root)
    monkeypatch.setattr(locks, "_MOUNTINFO", mountinfo)
    monkeypatch.setattr(locks, "_lockable_devices", {})
    ensure_filesystem_lockable(os.path.join(root, "unknown"))  # the trial-lock path
    filesystem_info(root)
    with global_mutex(root, "m", timeout=5):
        pass
    with global_mutex(root, "m"):
        pass
    assert spawned == []
