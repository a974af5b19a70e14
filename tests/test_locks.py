"""Tests for toilcoord.locks: real processes, threads, signals and files;
mocks only for faults that cannot be caused (EIO, ENOLCK, ESTALE)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import subprocess
import threading

import pytest

from toilcoord import locks, mounts
from toilcoord.heldfiles import release_taken, take_over
from toilcoord.locks import (
    UnsafeFilesystemError,
    ensure_filesystem_lockable,
    locked_file_is,
    safe_lock,
    safe_unlock_and_close,
)
from toilcoord.mounts import filesystem_info
from toilcoord.mutex import global_mutex
from toilcoord.smoke import left_in

from conftest import FakeFlock, fstat_failing_once, open_fds, wait_until

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------- safe_lock


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


@pytest.mark.parametrize(
    "code, advice",
    [
        (errno.ENOLCK, "no working lock daemon"),
        (errno.EIO, "lock service keeps failing"),
    ],
)
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
    other = os.open(str(tmp_path / "lockfile"), os.O_RDWR)  # NFSv4 locks exclusively only what is open for writing
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
    other = os.open(str(tmp_path / "lockfile"), os.O_RDWR)
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
    release_taken(fd)  # untracked too


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

        def stale(_path, **_):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(locks.os, "stat", stale)
        assert locked_file_is(fd, path) is expected
    finally:
        os.close(fd)


def test_locked_file_is_raises_real_errors(tmp_path):
    fd = os.open(str(tmp_path / "f"), os.O_RDONLY | os.O_CREAT)
    os.close(fd)
    with pytest.raises(OSError) as raised:
        locked_file_is(fd, str(tmp_path / "f"))
    assert raised.value.errno == errno.EBADF


# ----------------------------------------------- ensure_filesystem_lockable


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
    monkeypatch.setattr(mounts, "_MOUNTINFO", mountinfo)
    with pytest.raises(UnsafeFilesystemError) as raised:
        ensure_filesystem_lockable(os.path.join(root, relative), hint="Use --coordination-dir.")
    assert isinstance(raised.value, RuntimeError)
    message = str(raised.value)
    assert os.path.join(root, relative) in message and message.endswith("Use --coordination-dir.")
    assert ("CephFS" if relative != "lustre" else "Lustre") in message


@pytest.mark.usefixtures("fresh_lockable_cache")
def test_ensure_filesystem_lockable_is_cached_per_device(fake_mounts, monkeypatch):
    root, mountinfo = fake_mounts
    monkeypatch.setattr(mounts, "_MOUNTINFO", mountinfo)
    ensure_filesystem_lockable(os.path.join(root, "nfs"))  # same device as all of root, really
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *args, **kwargs: reads.append(args) or real_open(*args, **kwargs))
    ensure_filesystem_lockable(os.path.join(root, "ceph"))  # cached: the device was found safe
    assert reads == []


@pytest.mark.usefixtures("fresh_lockable_cache")
@pytest.mark.parametrize("opened", [False, True], ids=["path", "dir_fd"])
def test_ensure_filesystem_lockable_tries_a_lock_on_unknown_filesystems(fake_mounts, monkeypatch, opened):
    root, mountinfo = fake_mounts
    monkeypatch.setattr(mounts, "_MOUNTINFO", mountinfo)
    unknown = os.path.join(root, "unknown")
    dir_fd = os.open(unknown, os.O_RDONLY | os.O_DIRECTORY) if opened else None
    before, tracked = open_fds(), set(locks._held_fds)

    def probe_fds_closed():
        assert locks._held_fds <= tracked
        # Polled: on Python 3.8 the probe thread's exit, after join() returns,
        # briefly opens a file of its own (glibc loading libgcc_s).
        wait_until(lambda: open_fds() == before, timeout=5)

    try:
        monkeypatch.setattr(locks.fcntl, "flock", FakeFlock(errno.ENOSYS))
        with pytest.raises(UnsafeFilesystemError, match="trial lock on fuse.sshfs failed"):
            ensure_filesystem_lockable(unknown, hint="Try local storage.", dir_fd=dir_fd)
        assert left_in(unknown) == [], "the probe file is removed"
        probe_fds_closed()
        monkeypatch.setattr(locks.fcntl, "flock", fcntl.flock)
        with pytest.raises(UnsafeFilesystemError, match="trial lock on fuse.sshfs failed"):
            ensure_filesystem_lockable(unknown, dir_fd=dir_fd)  # the failure is cached per device, not tried again
        monkeypatch.setattr(locks, "_lockable_devices", {})
        ensure_filesystem_lockable(unknown, dir_fd=dir_fd)
        assert left_in(unknown) == []
        probe_fds_closed()
    finally:
        if dir_fd is not None:
            os.close(dir_fd)


@pytest.mark.usefixtures("fresh_lockable_cache")
def test_a_trial_lock_that_wakes_after_its_timeout_removes_its_own_probe(fake_mounts, monkeypatch):
    # The caller closes its directory fd once the trial times out; the
    # probe, woken later, must not remove by a number now another directory's.
    root, mountinfo = fake_mounts
    monkeypatch.setattr(mounts, "_MOUNTINFO", mountinfo)
    unknown, elsewhere = os.path.join(root, "unknown"), os.path.join(root, "nfsdir")
    wake, real_flock = threading.Event(), fcntl.flock

    def hung(fd, operation):
        wake.wait(30)
        real_flock(fd, operation)

    monkeypatch.setattr(locks.fcntl, "flock", hung)
    dir_fd = os.open(unknown, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(UnsafeFilesystemError, match="did not finish within 0.2 s"):
            ensure_filesystem_lockable(unknown, timeout=0.2, dir_fd=dir_fd)
        assert len(left_in(unknown)) == 1, "the probe, made before the lock hung"
    finally:
        os.close(dir_fd)
    reused = os.open(elsewhere, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert reused == dir_fd, "the lowest free number"
        (probe,) = [thread for thread in threading.enumerate() if thread.name == "toilcoord-lock-probe"]
        wake.set()
        probe.join(10)
        assert not probe.is_alive()
    finally:
        wake.set()
        os.close(reused)
    assert left_in(unknown) == [] and left_in(elsewhere) == []


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
    monkeypatch.setattr(mounts, "_MOUNTINFO", mountinfo)
    monkeypatch.setattr(locks, "_lockable_devices", {})
    ensure_filesystem_lockable(os.path.join(root, "unknown"))  # the trial-lock path
    filesystem_info(root)
    with global_mutex(root, "m", timeout=5):
        pass
    with global_mutex(root, "m"):
        pass
    assert spawned == []


@pytest.mark.parametrize("create", [False, True])
def test_a_stale_nfs_handle_at_open_is_gone_or_tried_again(tmp_path, monkeypatch, create):
    # On NFS a file removed by another client between the lookup and the
    # fstat gives ESTALE (seen in the torture on the rig); cannot be caused here.
    path = tmp_path / "f"
    path.write_text("")
    fstat_failing_once(monkeypatch, locks, errno.ESTALE)
    tracked = set(locks._held_fds)
    if create:
        fd = locks._open_tracked(str(path), locks._OPEN_OR_CREATE)
        locks._close_tracked(fd)
    else:
        with pytest.raises(FileNotFoundError, match="stale NFS file handle"):
            take_over(str(path))
    assert locks._held_fds == tracked
