"""The smoke check behind ``python -m toilcoord``: every primitive exercised
with real processes and signals in one directory."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, List, NamedTuple, Optional, Tuple

from .arena import LastProcessStandingArena
from .files import robust_rmtree
from .mutex import global_mutex, retire_mutex_files
from .procnames import destroy_all_process_names, get_process_name, process_name_exists
from .watchdog import Interruption

__all__ = ["CHECKS", "CheckResult", "import_root", "run_checks", "smoke_check"]


class CheckResult(NamedTuple):
    name: str
    status: str  # "ok", "FAIL" or "skip"
    seconds: float
    detail: str


class Skip(Exception):
    """A check that cannot run here (say, PID namespaces are refused)."""


#: (name, function taking a fresh directory and returning a detail line)
CHECKS: List[tuple] = []


def check(name: str) -> Callable:
    def register(function: Callable[[str], str]) -> Callable[[str], str]:
        CHECKS.append((name, function))
        return function

    return register


def run_checks(directory: str, on_result: Optional[Callable[[CheckResult], None]] = None) -> List[CheckResult]:
    """Run every check in its own subdirectory of *directory*, calling
    *on_result* with each result as it comes."""
    results = []
    for index, (name, function) in enumerate(CHECKS):
        workdir = os.path.join(directory, f"check-{index}")
        os.mkdir(workdir)
        start = time.monotonic()
        try:
            status, detail = "ok", function(workdir)
        except Skip as skipped:
            status, detail = "skip", str(skipped)
        except Exception as error:  # a failed check is reported, not raised
            status, detail = "FAIL", f"{type(error).__name__}: {error}"
        _let_go()
        results.append(CheckResult(name, status, time.monotonic() - start, detail))
        if on_result is not None:
            on_result(results[-1])
        if status == "ok":
            robust_rmtree(workdir)
    return results


def smoke_check(
    directory: Optional[str] = None, on_result: Optional[Callable[[CheckResult], None]] = None
) -> List[CheckResult]:
    """Run every check in a fresh scratch directory in *directory* (or the
    temporary directory), calling *on_result* with each result as it comes.

    The checks run in a forked child leading a process group of its own,
    which every helper process joins. On SIGINT, SIGTERM or SIGHUP, at any
    moment, that group is killed, the child reaped, the scratch directory
    removed, and SystemExit(128 + signal) raised: nothing is left behind.
    """
    with Interruption() as interruption:
        scratch = tempfile.mkdtemp(prefix="toilcoord-smoke-", dir=directory)
        try:
            runner = _Runner(scratch, interruption)
            try:
                return runner.results(on_result, interruption.fd)
            finally:
                runner.stop()
        finally:
            _remove_scratch(scratch)


def _remove_scratch(scratch: str) -> None:
    try:
        robust_rmtree(scratch)
    except OSError as error:  # say what is left; the report still counts
        print(f"could not remove {scratch}: {error}", file=sys.stderr)


class _Runner:
    """The checks in a forked child leading its own process group; each
    result comes back as a JSON line on a pipe."""

    def __init__(self, scratch: str, interruption: Interruption) -> None:
        self._read, write = os.pipe()

        def child() -> int:  # pragma: no cover - in the child
            os.close(self._read)
            run_checks(scratch, lambda result: os.write(write, json.dumps(result._asdict()).encode() + b"\n"))
            return 0

        self.pid = interruption.fork_group(child)
        os.close(write)
        self.reaped = False

    def results(self, on_result: Optional[Callable[[CheckResult], None]], interrupted: int) -> List[CheckResult]:
        """The results, as they come, until the runner is done, or until
        the file descriptor *interrupted* is readable (then those so far)."""
        results, buffer = [], b""
        while True:
            if interrupted in select.select([self._read, interrupted], [], [])[0]:
                return results
            chunk = os.read(self._read, 65536)
            if not chunk:
                break
            *lines, buffer = (buffer + chunk).split(b"\n")
            for line in lines:
                results.append(CheckResult(**json.loads(line)))
                if on_result is not None:
                    on_result(results[-1])
        while not self.reaped:  # it is exiting: its last close may wait for the filesystem
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            self.reaped = pid != 0
            if not self.reaped and select.select([interrupted], [], [], 0.01)[0]:
                return results
        if status != 0 and len(results) < len(CHECKS):
            raise RuntimeError(f"the smoke check's runner died (wait status {status}) after {len(results)} checks")
        return results

    def stop(self, patience: float = 10) -> None:
        """Kill the runner's group, reap the runner, and wait (at most
        *patience* seconds) for its helpers to be gone, so that their files
        can be removed; one stuck in the kernel is left to init."""
        os.close(self._read)
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            try:
                os.killpg(self.pid, signal.SIGKILL)  # helpers still dying (init reaps them)
            except ProcessLookupError:
                if self.reaped:
                    return
            if not self.reaped:
                self.reaped = os.waitpid(self.pid, os.WNOHANG)[0] != 0
            time.sleep(0.01)


def _let_go() -> None:
    """Close every file this process holds in the checks' directories, so
    that they can be removed (on NFS a file still open is silly-renamed to
    ``.nfsXXXX`` and its directory cannot go)."""
    retire_mutex_files()
    destroy_all_process_names()


# ------------------------------------------------------------ processes


class Forked:
    """A forked child running ``target(child, *args)``; its exit status is 0
    iff *target* returned. The child talks to the parent with ``tell()``,
    the parent listens with ``hear()``."""

    def __init__(self, target: Callable[..., object], *args: object) -> None:
        self._read, self._write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # child
            code = 1
            try:
                os.close(self._read)
                target(self, *args)
                retire_mutex_files()  # what exiting normally does (os._exit runs no atexit)
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()  # the parent only sees the exit status
            finally:
                os._exit(code)
        os.close(self._write)

    def tell(self, message: bytes = b"ready") -> None:
        os.write(self._write, message)

    def hear(self, timeout: float = 10) -> bytes:
        import select

        readable, _, _ = select.select([self._read], [], [], timeout)
        message = os.read(self._read, 4096) if readable else b""
        if not message:
            raise RuntimeError(f"child {self.pid} said nothing within {timeout} s")
        return message

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        """Reap the child; its exit code, or minus the signal that killed it."""
        _, status = os.waitpid(self.pid, 0)
        os.close(self._read)
        return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)


def _pause(_: Forked) -> None:
    while True:
        signal.pause()


# ---------------------------------------------------------------- checks

_PROCS, _ROUNDS = 4, 50


@check("filesystem is safe for locks")
def check_filesystem(directory: str) -> str:
    from .locks import ensure_filesystem_lockable
    from .mounts import filesystem_info

    ensure_filesystem_lockable(directory)  # UnsafeFilesystemError carries the advice
    info = filesystem_info(directory)
    return f"{info.fstype} at {info.mount_point}: {info.reason}"


def _race_on_potato(directory: str, rounds: int) -> None:
    """Hold the mutex and prove nobody else does: the holder alone may
    create (O_EXCL), see and remove the potato."""
    potato = os.path.join(directory, "potato")
    for _ in range(rounds):
        with global_mutex(directory, "smoke"):
            os.close(os.open(potato, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            os.unlink(potato)


@check("mutex exclusion between processes")
def check_mutex_processes(directory: str) -> str:
    children = [Forked(lambda _, d: _race_on_potato(d, _ROUNDS), directory) for _ in range(_PROCS)]
    codes = [child.wait() for child in children]
    if codes != [0] * _PROCS:
        raise AssertionError(f"racing processes exited with {codes}: two held the mutex at once")
    _assert_empty(directory)
    return f"{_PROCS} processes x {_ROUNDS} rounds, never two holders"


@check("mutex exclusion between threads")
def check_mutex_threads(directory: str) -> str:
    errors: List[BaseException] = []

    def race() -> None:
        try:
            _race_on_potato(directory, _ROUNDS)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=race) for _ in range(_PROCS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise AssertionError(f"two threads held the mutex at once: {errors[0]!r}")
    _assert_empty(directory)
    return f"{_PROCS} threads x {_ROUNDS} rounds, never two holders"


def _hold_mutex_forever(child: Forked, directory: str) -> None:
    with global_mutex(directory, "smoke"):
        child.tell()
        _pause(child)


@check("SIGKILLed holder releases the mutex")
def check_killed_holder(directory: str) -> str:
    holder = Forked(_hold_mutex_forever, directory)
    holder.hear()
    holder.kill()
    holder.wait()
    start = time.monotonic()
    with global_mutex(directory, "smoke", timeout=10):
        waited = time.monotonic() - start
    _assert_empty(directory)
    return f"acquired {waited * 1000:.1f} ms after the kill; no lock file left once its users exit"


def _enter_arena_forever(child: Forked, directory: str) -> None:
    LastProcessStandingArena(directory, "smoke").enter()
    child.tell()
    _pause(child)


@check("arena election with a killed member")
def check_arena(directory: str) -> str:
    killed = Forked(_enter_arena_forever, directory)
    live = Forked(_enter_arena_forever, directory)
    killed.hear()
    live.hear()
    killed.kill()
    killed.wait()
    arena = LastProcessStandingArena(directory, "smoke")
    arena.enter()
    if list(arena.leave()):
        raise AssertionError("elected last while a live member remained")
    live.kill()
    live.wait()
    arena.enter()
    if list(arena.leave()) != [True]:
        raise AssertionError("not elected last once every other member was dead")
    _assert_empty(directory)
    return "killed members ignored and reaped; last one elected; nothing left"


def _take_name(child: Forked, directory: str) -> None:
    child.tell(get_process_name(directory).encode())
    _pause(child)


@check("process names")
def check_process_names(directory: str) -> str:
    child = Forked(_take_name, directory)
    name = child.hear().decode()
    mine = get_process_name(directory)
    try:
        if name == mine or not process_name_exists(directory, name):
            raise AssertionError("a live child's name is not distinct and alive")
    finally:
        child.kill()
        child.wait()
    if process_name_exists(directory, name):
        raise AssertionError("a SIGKILLed process's name still reads as alive")
    return "distinct per process; alive while it lives, dead once killed"


def import_root() -> Tuple[str, str]:
    """(sys.path entry, package name) that import this package in a fresh
    interpreter, wherever it was vendored."""
    package = __name__.rpartition(".")[0]
    root = os.path.dirname(os.path.abspath(__file__))
    for _ in package.split("."):
        root = os.path.dirname(root)
    return root, package


_NAMESPACE_CHILD = """
import importlib, os, sys
sys.path.insert(0, sys.argv[1])
package = importlib.import_module(sys.argv[2])
print(os.getpid(), package.get_process_name(sys.argv[3]), flush=True)
sys.stdin.read()
"""


@check("process names across PID namespaces")
def check_pid_namespace(directory: str) -> str:
    unshare = shutil.which("unshare")
    if unshare is None:
        raise Skip("no unshare command")
    root, package = import_root()
    inner = subprocess.Popen(
        [unshare, "--pid", "--fork", "--kill-child", sys.executable, "-c", _NAMESPACE_CHILD, root, package, directory],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = inner.stdout.readline().split()
        if len(line) != 2:
            raise Skip("PID namespaces are not permitted here: " + inner.stderr.read().strip()[:120])
        pid, name = line
        if not process_name_exists(directory, name) or name == get_process_name(directory):
            raise AssertionError("a process in another PID namespace is not seen alive under its own name")
    finally:
        inner.kill()  # --kill-child takes the namespace down with it
        inner.communicate()
    return f"PID {pid} in its namespace, distinct name, seen alive from outside"


def _assert_empty(directory: str) -> None:
    """Fail unless nothing is left, once this process's users have exited
    (mutexes keep their files open while their users live)."""
    retire_mutex_files()
    left = left_in(directory)
    if left:
        raise AssertionError(f"left behind in the directory: {left}")


def left_in(directory: str, patience: float = 5) -> List[str]:
    """The entries of *directory*, once NFS has removed the ``.nfsXXXX``
    files it made of files unlinked while open (after their last close,
    asynchronously): they are waited out for up to *patience* seconds."""
    left = sorted(os.listdir(directory))
    deadline = time.monotonic() + patience
    while any(name.startswith(".nfs") for name in left) and time.monotonic() < deadline:
        time.sleep(0.05)
        left = sorted(os.listdir(directory))
    return left


_MODULE_WORKER = """
import importlib, sys
sys.path.insert(0, sys.argv[1])
modules = importlib.import_module(sys.argv[2] + ".modules")
modules.Resource.prepareSystem()
print(modules.ModuleDescriptor.fromCommand(sys.argv[3:]).load().ANSWER)
"""


@check("module descriptor round trip")
def check_module_round_trip(directory: str) -> str:
    """Ship a probe module through a LocalJobStore and load it in a fresh
    interpreter that has only the shipped copy."""
    from .modules import LocalJobStore, ModuleDescriptor

    app = os.path.join(directory, "app")
    os.mkdir(app)
    with open(os.path.join(app, "coord_probe.py"), "w") as probe:
        probe.write("ANSWER = 42\n")
    descriptor = ModuleDescriptor(app, "coord_probe", False)
    resource = descriptor.saveAsResourceTo(LocalJobStore(os.path.join(directory, "store")))
    shutil.rmtree(app)  # the worker can only use the shipped copy
    root, package = import_root()
    os.mkdir(os.path.join(directory, "worker"))
    env = dict(os.environ, JTRES_ROOT=os.path.join(directory, "worker"))
    env[resource.resourceEnvNamePrefix + resource.pathHash] = resource.pickle()
    worker = subprocess.run(
        [sys.executable, "-c", _MODULE_WORKER, root, package, *descriptor.toCommand()],
        env=env,
        cwd=directory,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if worker.stdout.strip() != "42":
        raise AssertionError(f"the worker could not load the shipped module: {worker.stderr.strip()[-300:]}")
    return "saved through LocalJobStore, downloaded and imported by a fresh interpreter"


# A worker in a fresh interpreter (forking would copy the leader's threads):
# it finds the leader through the environment the leader exported.
_LOG_WORKER = """
import importlib, os, sys
sys.path.insert(0, sys.argv[1])
rtlog = importlib.import_module(sys.argv[2] + ".rtlog")
rtlog.RealtimeLogger.info("smoke record from pid %d", os.getpid())
rtlog.RealtimeLogger.getLogger().debug("below the leader's level: never sent")
print(os.getpid())
"""


@check("real-time log round trip over loopback")
def check_realtime_log(directory: str) -> str:
    import logging

    from .rtlog import RealtimeLogger

    arrived = threading.Event()
    seen: List[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)
            arrived.set()

    catch = Catch()
    receiver = logging.getLogger("toil-rt")
    receiver.addHandler(catch)
    try:
        with RealtimeLogger(level="INFO", host="127.0.0.1"):
            root, package = import_root()
            worker = subprocess.run(
                [sys.executable, "-c", _LOG_WORKER, root, package],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
            )
            if worker.returncode != 0:
                raise AssertionError(f"the worker failed to log: {worker.stderr.strip()[-300:]}")
            if not arrived.wait(10):
                raise AssertionError("no record reached the leader within 10 s")
    finally:
        receiver.removeHandler(catch)
    if [record.levelname for record in seen] != ["INFO"] or f"from pid {worker.stdout.strip()}" not in seen[
        0
    ].getMessage():
        raise AssertionError(f"unexpected records at the leader: {[r.getMessage() for r in seen]}")
    return "a worker's INFO record arrived at the leader; its DEBUG did not"


def _append(path: str, text: str) -> None:
    with open(path, "a") as journal:
        journal.write(text)


def _defer_and_hang(child: Forked, directory: str, journal: str) -> None:
    from .deferred import DeferredFunctionManager

    with DeferredFunctionManager(directory).open() as defer:
        defer(_append, journal, "a")
        defer(_append, journal, "b")
        child.tell()
        _pause(child)


@check("deferred functions of a SIGKILLed process")
def check_deferred(directory: str) -> str:
    from .deferred import DeferredFunctionManager

    journal = os.path.join(directory, "journal")
    state = os.path.join(directory, "state")
    os.mkdir(state)
    owner = Forked(_defer_and_hang, state, journal)
    owner.hear()
    owner.kill()
    owner.wait()
    if os.path.exists(journal):
        raise AssertionError("the killed owner's functions ran before anyone recovered them")
    for _ in range(2):  # the second pass must find nothing left to run
        with DeferredFunctionManager(state) as manager:
            with manager.open():
                pass
    with open(journal) as ran:
        if ran.read() != "ab":
            raise AssertionError("the killed owner's functions did not run exactly once, in order")
    DeferredFunctionManager.cleanupWorker(state)
    _assert_empty(state)
    return "both ran exactly once, in order, in another process; nothing left"


@check("cpu_count")
def check_cpu_count(directory: str) -> str:
    from .threads import cpu_count, cpu_count_sources

    sources = cpu_count_sources()
    if cpu_count() != sources.count or sources.count < 1:
        raise AssertionError(f"cpu_count() gave {cpu_count()}, its sources say {sources}")
    cgroup = "unlimited" if sources.cgroup is None else f"{sources.cgroup:g}"
    env = "" if sources.env is None else f", PYTHON_CPU_COUNT {sources.env}"
    return (
        f"{sources.count} (decided by {sources.decided_by}: machine {sources.machine}, "
        f"affinity {sources.affinity}, cgroup quota {cgroup}{env})"
    )
