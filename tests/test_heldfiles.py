"""Tests for toilcoord.heldfiles: real processes, forks and files; mocks
only for faults that cannot be caused (ENOSYS, ESTALE) and to stage a race
at its one instant (a taker between a file's create and its lock)."""

from __future__ import annotations

import ast
import errno
import fcntl
import inspect
import os
import signal
import subprocess

import pytest

from toilcoord import heldfiles, locks
from toilcoord.heldfiles import HeldFile, discard_taken, take_over
from toilcoord.locks import locked_file_is
from toilcoord.mutex import global_mutex, retire_mutex_files
from toilcoord.smoke import left_in

from conftest import FakeFlock, fstat_failing_once, open_fds, release, run_in_fork

pytestmark = pytest.mark.timeout(60)


def imported_modules(module):
    """The modules *module* imports names from (relative ones without their dots)."""
    tree = ast.parse(inspect.getsource(module))
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}


def test_the_interface_is_built_on_locks_never_the_other_way():
    assert heldfiles.__all__ == ["HeldFile", "discard_taken", "release_taken", "take_over"]
    assert "locks" in imported_modules(heldfiles)
    assert "heldfiles" not in imported_modules(locks), "locks.py must not import heldfiles.py (an import cycle)"


# ---------------------------------------------------- HeldFile / take_over

# Creates a HeldFile in argv[1], prints its path, lives until stdin closes.
HOLD_FILE = """
import sys
from toilcoord.heldfiles import HeldFile
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
from toilcoord.heldfiles import take_over
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
        fd = take_over(path)  # ...yet the file is free
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

    kept = HeldFile.create(str(tmp_path), prefix="kept-")
    kept.release(unlink=False)
    assert os.listdir(tmp_path) == [kept.name]
    fd = take_over(kept.path)
    assert fd is not None
    discard_taken(fd, kept.path)
    assert os.listdir(tmp_path) == []


def absolute(path, dir_fd):
    """*path* as an absolute path, if relative to the directory fd *dir_fd*."""
    return path if dir_fd is None else os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)


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

    def __call__(self, path, flags, mode=0o777, **keywords):
        fd = self.real_open(path, flags, mode, **keywords)
        if flags & os.O_EXCL and self.victim is None:
            path = self.victim = absolute(path, keywords.get("dir_fd"))
            self.taken_fd = self.real_open(path, os.O_RDWR)
            fcntl.flock(self.taken_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if self.discard:
                discard_taken(self.taken_fd, path)
                self.taken_fd = None
        return fd


@pytest.mark.parametrize("discard", [False, True])
def test_held_file_create_never_returns_a_file_someone_else_holds(tmp_path, monkeypatch, discard):
    taker = TakerInTheMiddle(discard)
    monkeypatch.setattr(heldfiles.os, "open", taker)
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
    assert left_in(str(tmp_path)) == [], "on NFS the silly-renamed victim goes a moment later"


class ProberOnAnotherClient(TakerInTheMiddle):
    """Right after HeldFile.create's O_EXCL create, a process-name prober on
    another NFS client (a second mount, its own caches) finds the fresh file
    unlocked, so takes it for a dead process's: it unlinks it and unlocks
    it, but has not closed it yet. Its client renames the open file to
    ``.nfsXXXX`` instead of removing it, so the file keeps one link, while
    our client still has the name cached as ours."""

    def __init__(self, twin_of):
        super().__init__(discard=True)
        self.twin_of = twin_of

    def __call__(self, path, flags, mode=0o777, **keywords):
        fd = self.real_open(path, flags, mode, **keywords)
        if flags & os.O_EXCL and self.victim is None:
            self.victim = absolute(path, keywords.get("dir_fd"))
            twin = self.twin_of(self.victim)
            self.taken_fd = self.real_open(twin, os.O_RDWR)
            fcntl.flock(self.taken_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            os.unlink(twin)
            fcntl.flock(self.taken_fd, fcntl.LOCK_UN)
        return fd


def test_held_file_create_sees_its_file_removed_through_another_nfs_client(
    tmp_path, monkeypatch, through_another_client
):
    prober = ProberOnAnotherClient(through_another_client)
    monkeypatch.setattr(heldfiles.os, "open", prober)
    try:
        held = HeldFile.create(str(tmp_path), prefix="p-")
    finally:
        monkeypatch.undo()
        if prober.taken_fd is not None:
            os.close(prober.taken_fd)  # its client now removes the renamed file
    try:
        assert held.path != prober.victim, "took the file another client removed for ours"
        assert locked_file_is(held.fd, held.path)
    finally:
        held.release()
    assert left_in(str(tmp_path)) == []


def test_held_file_create_skips_existing_names(tmp_path, monkeypatch):
    existing = tmp_path / ("p-" + "00" * 8)
    existing.write_text("someone's")
    randoms = iter([b"\0" * 8, b"\1" * 8])
    monkeypatch.setattr(heldfiles.os, "urandom", lambda size: next(randoms))
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
    assert left_in(str(tmp_path)) == [], "on NFS the silly-renamed victim goes a moment later"


def test_no_fd_is_tracked_after_use(tmp_path):
    tracked = set(locks._held_fds)
    with global_mutex(tmp_path, "m"):
        assert len(locks._held_fds - tracked) == 1
    retire_mutex_files()  # the one fd the mutex keeps between acquisitions
    held = HeldFile.create(str(tmp_path))
    held.release()
    assert locks._held_fds == tracked


def test_a_new_held_file_gone_stale_after_its_lock_is_not_ours(tmp_path, monkeypatch):
    # Seen in the NFSv4.2 torture: a deferred-function file another client
    # took over and removed between our create and our check after locking.
    failures = fstat_failing_once(monkeypatch, heldfiles, errno.ESTALE)
    tracked = set(locks._held_fds)
    held = HeldFile.create(str(tmp_path), prefix="p-")
    monkeypatch.undo()
    assert failures == [], "the check after locking never ran"
    try:
        assert locked_file_is(held.fd, held.path)
        assert locks._held_fds == tracked | {held.fd, held.dir_fd}
        # Here the "stale" first file is still on disk (nothing removed it).
        assert len(os.listdir(tmp_path)) == 2
    finally:
        held.release()
    for name in os.listdir(tmp_path):
        os.unlink(tmp_path / name)


def test_a_stale_nfs_handle_at_lock_means_the_file_is_gone(tmp_path, monkeypatch):
    # Seen in the torture on the rig: a name file removed on the server by
    # another client between our open and our flock.
    path = tmp_path / "toil-proc-0123456789abcdef"
    path.write_text("")
    real_flock = fcntl.flock

    def stale(fd, operation):
        if operation & fcntl.LOCK_UN:
            return real_flock(fd, operation)
        raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))

    monkeypatch.setattr(locks.fcntl, "flock", stale)
    tracked = set(locks._held_fds)
    with pytest.raises(FileNotFoundError, match="stale NFS file handle"):
        take_over(str(path), shared=True)
    assert locks._held_fds == tracked
