"""Shared helpers: child Python processes that can import this checkout."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import traceback
import warnings
from typing import Callable, Iterator, List

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(**extra: str) -> dict:
    """The environment for a child interpreter that imports this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


class Children:
    """Starts child interpreters and reaps every one of them at teardown."""

    def __init__(self) -> None:
        self.started: List[subprocess.Popen] = []

    def python(self, code: str, *args: str, env: dict = None, **popen: object) -> subprocess.Popen:
        """Start ``python -c CODE ARGS...``; CODE is dedented."""
        popen.setdefault("stdin", subprocess.DEVNULL)
        child = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            env=env if env is not None else child_env(),
            cwd=ROOT,
            **popen,
        )
        self.started.append(child)
        return child

    def reap(self) -> None:
        for child in self.started:
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)
            child.wait()
            for stream in (child.stdin, child.stdout, child.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def children() -> Iterator[Children]:
    """Start child interpreters with ``children.python(code, *args)``; all are
    killed (if still running) and reaped when the test ends."""
    started = Children()
    try:
        yield started
    finally:
        started.reap()


def run_python(code: str, *args: str, timeout: float = 60, env: dict = None) -> subprocess.CompletedProcess:
    """Run ``python -c CODE`` to completion and capture its output."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env if env is not None else child_env(),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_in_fork(function: Callable[[], object]) -> int:
    """Run *function* in a forked child; return its exit code (0 iff it
    returned true, 1 if false, 2 if it raised). The child is always reaped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork while threads run
        pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 2
        try:
            code = 0 if function() else 1
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    try:
        _, status = os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1


def join_or_kill(processes: list, timeout: float) -> List[int]:
    """Join multiprocessing children, killing any still running after
    *timeout* seconds; return their exit codes."""
    for process in processes:
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
    return [process.exitcode for process in processes]


def release(holder):
    """Close a holder child's stdin (its signal to let go) and reap it."""
    holder.stdin.close()
    assert holder.wait() == 0


@pytest.fixture(autouse=True)
def no_kept_lock_files():
    """Each test starts with no lock file kept open by an earlier one."""
    from toilcoord.mutex import retire_mutex_files

    retire_mutex_files()
    yield


@pytest.fixture(scope="module")
def other_user():
    """A real second user, (uid, gid), created here and removed after."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second user")
    import pwd

    name = f"tc{os.getpid()}{os.urandom(2).hex()}"
    made = subprocess.run(
        ["useradd", "--no-create-home", "--user-group", "--shell", "/bin/sh", name],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if made.returncode != 0:
        pytest.skip(f"useradd failed: {made.stderr.strip()}")
    try:
        entry = pwd.getpwnam(name)
        yield entry.pw_uid, entry.pw_gid
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=30)


def becoming(user):
    """A preexec_fn that makes a child *user*, a (uid, gid) pair."""
    uid, gid = user

    def become():
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    return become


def fstat_failing_once(monkeypatch, module, code):
    """Make *module*'s os.fstat fail once with errno *code* (a fault such as
    NFS's ESTALE that cannot be caused here); returns the list that is empty
    once it has failed."""
    real_fstat, failures = os.fstat, [code]

    def failing_once(fd):
        if failures:
            failed = failures.pop()
            raise OSError(failed, os.strerror(failed))
        return real_fstat(fd)

    monkeypatch.setattr(module.os, "fstat", failing_once)
    return failures


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


def on_network_filesystem(path):
    """True where names may be cached by the client (NFS and the like)."""
    from toilcoord.mounts import names_may_be_stale

    return names_may_be_stale(os.stat(path).st_dev, str(path))


@pytest.fixture
def through_another_client():
    """Maps a path on an NFS mount to the same file seen through a second
    mount of the same export, which has its own name and attribute caches
    (as another client would). The NFS rig's tests stage names the two
    mount points in ``TOILCOORD_TEST_TWIN_MOUNTS`` (``A:B``); elsewhere the
    test skips."""
    twins = os.environ.get("TOILCOORD_TEST_TWIN_MOUNTS", "")
    if ":" not in twins:
        pytest.skip("needs two mounts of one NFS export (the NFS rig's tests stage has them)")
    mount, twin = twins.split(":", 1)

    def twin_of(path):
        relative = os.path.relpath(os.path.realpath(path), mount)
        assert not relative.startswith(".."), f"{path} is not on {mount}"
        return os.path.join(twin, relative)

    return twin_of


def left_after_exit(directory):
    """What this process leaves in *directory* once it exits normally (the
    mutex and arena files it keeps open for its next use are removed)."""
    from toilcoord.mutex import retire_mutex_files
    from toilcoord.smoke import left_in

    retire_mutex_files()
    return left_in(directory)  # NFS removes the files it silly-renamed a moment later


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


# ------------------------------------------------ fake mount tables


def escape(path):
    """*path* written as the kernel writes mount points in mountinfo."""
    for char, code in (("\\", "\\134"), (" ", "\\040"), ("\t", "\\011"), ("\n", "\\012")):
        path = path.replace(char, code)
    return path


def mount_line(number, mount_point, fstype, super_options, options="rw,relatime", optional="shared:1"):
    fields = [str(number), "1", "0:%d" % number, "/", escape(mount_point), options]
    fields += [optional] if optional else []
    return " ".join(fields + ["-", fstype, "src%d" % number, super_options])


@pytest.fixture
def fake_mounts(tmp_path, monkeypatch):
    """A fake mountinfo: / is ext4 and directories under tmp_path are other
    filesystems. Returns (root, mountinfo path). What the process learns of
    a device while a test reads the fake table is forgotten after it: read
    through the fake table, the real device of tmp_path (on the NFS rig, an
    NFS mount) would otherwise stay "local" for the tests that follow."""
    from toilcoord import mounts

    monkeypatch.setattr(mounts, "_stale_names", {})
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
