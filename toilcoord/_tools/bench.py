"""Benchmarks behind ``python -m toilcoord bench``.

Every primitive is timed beside its physical floor, the raw system calls it
cannot avoid, with the two interleaved round by round so that the machine's
mood affects both alike; the table gives medians and their ratio.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional

from ..arena import LastProcessStandingArena
from ..deferred import DeferredFunctionManager
from ..files import robust_rmtree
from ..holder import RECORD_SIZE
from ..mutex import global_mutex, retire_mutex_files
from ..procnames import get_process_name, process_name_exists
from ..slots import ResourceSlots
from ..smoke import Forked, import_root
from .rtlog_burst import rtlog_burst

__all__ = ["Row", "measure", "run_bench", "summary_line"]

Timer = Callable[[int], float]  # runs n operations, returns the seconds they took


class Row(NamedTuple):
    name: str
    value: float
    floor: Optional[float]
    unit: str
    ratio: Optional[float]  # value / floor, or floor / value for rates
    target: str
    ok: Optional[bool]


class Settings(NamedTuple):
    rounds: int
    ops: int
    contended_seconds: float
    orphans: int
    tree_files: int
    burst_records: int


FULL = Settings(rounds=7, ops=2000, contended_seconds=1.0, orphans=1000, tree_files=20000, burst_records=5000)
QUICK = Settings(rounds=3, ops=200, contended_seconds=0.2, orphans=100, tree_files=2000, burst_records=500)


def interleaved(contenders: Dict[str, Timer], rounds: int, ops: int) -> Dict[str, float]:
    """Median seconds per operation of each contender, run in turn each round."""
    samples: Dict[str, List[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, timer in contenders.items():
            samples[name].append(timer(ops) / ops)
    return {name: statistics.median(values) for name, values in samples.items()}


def _latency_row(name: str, times: Dict[str, float], limit: Optional[float]) -> Row:
    value, floor = times["primitive"], times["floor"]
    ratio = value / floor
    target = f"<= {limit:g}x" if limit else ""
    return Row(name, value * 1e6, floor * 1e6, "us", ratio, target, None if limit is None else ratio <= limit)


# ------------------------------------------------------------------ mutex

_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_RECORD = bytes(RECORD_SIZE)  # what a holder writes into its lock file


def _raw_mutex_cycle(path: str) -> None:
    """What a flock mutex that creates and unlinks its file at every
    acquisition (Toil's) must do: open, lock, check the locked file is still
    the one at *path* (else a releaser unlinked it: again), unlink, close."""
    while True:
        fd = os.open(path, _LOCK_FLAGS, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.lstat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.unlink(path)
    os.close(fd)


class _KeptFile:
    """The floor of a mutex on a file kept open: lock, check the locked
    file is the one at the path (fstat, lstat), say who holds it (one
    record-sized pwrite: issue 12's promise to ``status``), unlock. One fd
    per process."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fds: Dict[int, int] = {}

    def cycle(self) -> None:
        pid = os.getpid()
        fd = self.fds.get(pid)
        if fd is None:
            fd = self.fds[pid] = os.open(self.path, _LOCK_FLAGS, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.fstat(fd)
        os.lstat(self.path)
        os.pwrite(fd, _RECORD, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        fd = self.fds.pop(os.getpid(), None)
        if fd is not None:
            os.close(fd)
        os.unlink(self.path)


def _timer(operation: Callable[[], object]) -> Timer:
    def timed(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            operation()
        return time.perf_counter() - start

    return timed


def _acquire_release(directory: str, name: str) -> Callable[[], None]:
    def cycle() -> None:
        with global_mutex(directory, name):
            pass

    return cycle


def bench_mutex(directory: str, settings: Settings) -> Row:
    kept = _KeptFile(os.path.join(directory, "floor-kept"))
    try:
        contenders = {"primitive": _timer(_acquire_release(directory, "bench")), "floor": _timer(kept.cycle)}
        times = interleaved(contenders, settings.rounds, settings.ops)
    finally:
        kept.close()
    return _latency_row("mutex acquire+release (vs flock+fstat+lstat+pwrite+unlock)", times, 1.5)


def _unrecorded(cycle: Callable[[], None]) -> Timer:
    """*cycle* timed as the mutex was before holders recorded themselves."""
    from .. import mutex

    def timed(n: int) -> float:
        recording, mutex._record_holder = mutex._record_holder, lambda gate, purpose: None
        try:
            return _timer(cycle)(n)
        finally:
            mutex._record_holder = recording

    return timed


def bench_holder_record(directory: str, settings: Settings) -> Row:
    """The cost of the holder record: the same mutex with and without it."""
    cycle = _acquire_release(directory, "bench")
    contenders = {"primitive": _timer(cycle), "floor": _unrecorded(cycle)}
    times = interleaved(contenders, settings.rounds, settings.ops)
    return _latency_row("mutex with its holder record (vs without)", times, None)


def bench_arena(directory: str, settings: Settings) -> Row:
    arena = LastProcessStandingArena(directory, "bench")

    def enter_leave() -> None:
        arena.enter()
        for _ in arena.leave():
            pass

    contenders = {"primitive": _timer(enter_leave), "floor": _timer(_acquire_release(directory, "bench"))}
    return _latency_row("arena enter+leave (vs the mutex)", interleaved(contenders, settings.rounds, settings.ops), 3)


def bench_shared(directory: str, settings: Settings) -> Row:
    def shared() -> None:
        with global_mutex(directory, "bench", shared=True):
            pass

    contenders = {"primitive": _timer(shared), "floor": _timer(_acquire_release(directory, "bench"))}
    return _latency_row(
        "shared mutex acquire+release (vs the mutex)", interleaved(contenders, settings.rounds, settings.ops), 1.5
    )


def bench_slots(directory: str, settings: Settings) -> Row:
    slots = ResourceSlots(directory, "bench", 4)

    def cycle() -> None:
        with slots.acquire():
            pass

    contenders = {"primitive": _timer(cycle), "floor": _timer(_acquire_release(directory, "bench"))}
    return _latency_row(
        "slot acquire+release, 1 of 4 (vs the mutex)", interleaved(contenders, settings.rounds, settings.ops), 2
    )


def bench_process_name(directory: str, settings: Settings) -> Row:
    holder = Forked(_report_name_and_wait, directory)
    name = holder.hear().decode()
    path = os.path.join(directory, name)
    try:

        def primitive(n: int) -> float:
            start = time.perf_counter()
            for _ in range(n):
                process_name_exists(directory, name)
            return time.perf_counter() - start

        def floor(n: int) -> float:
            start = time.perf_counter()
            for _ in range(n):
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    pass
                os.close(fd)
            return time.perf_counter() - start

        times = interleaved({"primitive": primitive, "floor": floor}, settings.rounds, settings.ops)
    finally:
        holder.kill()
        holder.wait()
    return _latency_row("process_name_exists (live)", times, None)


def _report_name_and_wait(child: Forked, directory: str) -> None:
    child.tell(get_process_name(directory).encode())
    while True:
        signal.pause()


# ------------------------------------------------------------- contention


def _contend(procs: int, seconds: float, acquire_release: Callable[[], None]) -> float:
    """Acquisitions per second, all *procs* processes together."""
    go_read, go_write = os.pipe()

    def count(child: Forked) -> None:
        os.close(go_write)
        os.read(go_read, 1)
        done, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            acquire_release()
            done += 1
        child.tell(str(done).encode())

    children = [Forked(count) for _ in range(procs)]
    os.close(go_read)
    start = time.monotonic()
    os.write(go_write, b"g" * procs)
    os.close(go_write)
    total = sum(int(child.hear(timeout=seconds + 60)) for child in children)
    elapsed = time.monotonic() - start
    for child in children:
        child.wait()
    return total / max(elapsed, seconds)


def bench_contended(directory: str, procs: int, settings: Settings) -> List[Row]:
    """Acquisitions per second of *procs* processes sharing one mutex,
    beside the same processes doing (a) the floor: lock, check and unlock
    one kept file, and (b) for information, the create-and-unlink cycle of
    a mutex that keeps no file (Toil's)."""
    kept = _KeptFile(os.path.join(directory, "floor-kept"))
    cycle_path = os.path.join(directory, "toil-mutex-raw")
    contenders = {
        "ours": _acquire_release(directory, "contended"),
        "kept": kept.cycle,
        "cycle": lambda: _raw_mutex_cycle(cycle_path),
    }
    rates: Dict[str, List[float]] = {name: [] for name in contenders}
    try:
        for _ in range(max(1, settings.rounds // 2)):
            for name, operation in contenders.items():
                rates[name].append(_contend(procs, settings.contended_seconds, operation))
    finally:
        kept.close()
    ours, floor, cycle = (statistics.median(rates[name]) for name in ("ours", "kept", "cycle"))
    return [
        # Information: on a loaded machine, with more processes than cores,
        # the Python around each acquisition decides this ratio, not design.
        Row(
            f"contended mutex, {procs} processes (vs the kept-file floor)", ours, floor, "acq/s", ours / floor, "", None
        ),
        Row(
            f"contended create-and-unlink mutex, {procs} processes (Toil's design)",
            cycle,
            floor,
            "acq/s",
            cycle / floor,
            "",
            None,
        ),
    ]


# ---------------------------------------------------------------- deferred


def _noop() -> None:
    pass


def bench_defer(directory: str, settings: Settings) -> Row:
    floor_path = os.path.join(directory, "floor-state")
    record = (_noop, (), {})

    with DeferredFunctionManager(directory) as manager:

        def primitive(n: int) -> float:
            with manager.open() as defer:
                start = time.perf_counter()
                for _ in range(n):
                    defer(_noop)
                return time.perf_counter() - start

        def floor(n: int) -> float:
            fd = os.open(floor_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                start = time.perf_counter()
                for _ in range(n):
                    os.write(fd, pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))
                return time.perf_counter() - start
            finally:
                os.close(fd)
                os.unlink(floor_path)

        times = interleaved({"primitive": primitive, "floor": floor}, settings.rounds, settings.ops)
    return _latency_row("defer() (vs pickle + write)", times, 2)


def _leave_orphans(directory: str, count: int) -> None:
    """*count* state files of dead owners, each with one pending no-op: one
    made by a child that dies inside open(), and copies of it."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            manager = DeferredFunctionManager(directory)
            opened = manager.open()
            opened.__enter__()(_noop)
            os.write(write, manager.stateFileName.encode())
        finally:
            os._exit(0)  # dies inside open(): the record stays pending
    os.close(write)
    with os.fdopen(read, "rb") as stream:
        original = stream.read().decode()
    os.waitpid(pid, 0)
    with open(original, "rb") as stream:
        content = stream.read()
    for number in range(count - 1):
        fd = os.open(f"{original}-{number}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, content)
        os.close(fd)


def bench_orphans(directory: str, settings: Settings) -> Row:
    count = settings.orphans
    values, floors = [], []
    for round_number in range(max(1, settings.rounds // 2)):
        state = os.path.join(directory, f"orphans-{round_number}")
        os.mkdir(state)
        _leave_orphans(state, count)
        start = time.perf_counter()
        with DeferredFunctionManager(state) as manager:
            with manager.open():
                pass
        values.append(time.perf_counter() - start)
        floors.append(_raw_orphan_scan(os.path.join(directory, f"raw-{round_number}"), count))
        robust_rmtree(state)
    value, floor = statistics.median(values), statistics.median(floors)
    return Row(f"orphan scan of {count} dead owners", value * 1e3, floor * 1e3, "ms", value / floor, "", None)


def _raw_orphan_scan(directory: str, count: int) -> float:
    os.mkdir(directory)
    payload = pickle.dumps((_noop, (), {}))
    for number in range(count):
        with open(os.path.join(directory, f"func{number}"), "wb") as stream:
            stream.write(payload)
    start = time.perf_counter()
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.fstat(fd)
        pickle.loads(os.read(fd, 1 << 16))[0]()
        os.unlink(path)
        os.close(fd)
    elapsed = time.perf_counter() - start
    os.rmdir(directory)
    return elapsed


# ------------------------------------------------------------------ rmtree


def _make_tree(top: str, files: int) -> None:
    per_dir = 200
    os.mkdir(top)
    for number in range(files):
        if number % per_dir == 0:
            folder = os.path.join(top, f"d{number // per_dir}")
            os.mkdir(folder)
        os.close(os.open(os.path.join(folder, f"f{number}"), os.O_CREAT | os.O_WRONLY, 0o644))


def bench_rmtree(directory: str, settings: Settings) -> Row:
    times: Dict[str, List[float]] = {"primitive": [], "floor": []}
    for round_number in range(max(1, settings.rounds // 2)):
        for name, remove in (("floor", shutil.rmtree), ("primitive", robust_rmtree)):
            top = os.path.join(directory, f"tree-{name}-{round_number}")
            _make_tree(top, settings.tree_files)
            start = time.perf_counter()
            remove(top)
            times[name].append(time.perf_counter() - start)
    value, floor = statistics.median(times["primitive"]), statistics.median(times["floor"])
    ratio = value / floor
    return Row(
        f"robust_rmtree, {settings.tree_files} files (vs shutil.rmtree)",
        value * 1e3,
        floor * 1e3,
        "ms",
        ratio,
        "<= 1.3x",
        ratio <= 1.3,
    )


# ------------------------------------------------------------------ import

_HEAVY = ("json", "zipfile", "urllib", "socketserver", "hmac", "pickle", "subprocess", "tempfile")
_IMPORT_PROBE = (
    "import sys, time; start = time.perf_counter(); import {modules}; "
    "print(time.perf_counter() - start, ','.join(m for m in {heavy!r} if m in sys.modules))"
)
# What the package cannot avoid importing: the standard modules it builds on.
_IMPORT_FLOOR = "logging, threading, typing, fcntl, errno"


def bench_import(directory: str, settings: Settings) -> Row:
    """Time ``import toilcoord`` in fresh interpreters started without site
    (whose .pth hooks import all sorts) and with bytecode cached (in a
    private pycache), beside importing the standard modules it builds on;
    list the heavy modules it pulls in (of json, zipfile, urllib,
    socketserver, hmac, pickle, subprocess, tempfile)."""
    package = import_root()[1]
    env = dict(os.environ, PYTHONPATH=import_root()[0])
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    command = [sys.executable, "-S", "-X", "pycache_prefix=" + os.path.join(directory, "pycache"), "-c"]

    def probe(modules: str) -> Any:
        out = subprocess.run(
            command + [_IMPORT_PROBE.format(modules=modules, heavy=_HEAVY)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        seconds, pulled = out.stdout.split(" ")
        return float(seconds), pulled.strip()

    probe(package)  # compiles and caches the bytecode
    samples: Dict[str, List[float]] = {"primitive": [], "floor": []}
    for _ in range(settings.rounds):
        samples["floor"].append(probe(_IMPORT_FLOOR)[0])
        seconds, pulled = probe(package)
        samples["primitive"].append(seconds)
    value, floor = statistics.median(samples["primitive"]), statistics.median(samples["floor"])
    name = f"import {package} (heavy modules: {pulled or 'none'})"
    return Row(name, value * 1e3, floor * 1e3, "ms", value / floor, "no heavy modules", not pulled)


# ------------------------------------------------------------------ rtlog


def bench_rtlog(procs: int, settings: Settings) -> List[Row]:
    burst = rtlog_burst(procs=procs, records=settings.burst_records)
    return [
        Row(
            f"rtlog burst, {procs} x {settings.burst_records} records delivered",
            burst["fraction"] * 100,
            None,
            "%",
            None,
            ">= 99%",
            burst["fraction"] >= 0.99,
        ),
        Row(
            "rtlog receive rate",
            burst["receive_rate"],
            burst["send_rate"],
            "rec/s",
            burst["receive_rate"] / burst["send_rate"],
            "",
            None,
        ),
    ]


# ------------------------------------------------------------------- table

STEPS = (
    "mutex",
    "holder record",
    "contended mutex",
    "arena",
    "shared mutex",
    "slots",
    "defer",
    "orphan scan",
    "process names",
    "rtlog burst",
    "robust_rmtree",
    "import",
)


def measure(
    directory: str, procs: int, quick: bool, progress: Callable[[str], None], only: Optional[List[str]] = None
) -> List[Row]:
    """Run the benchmarks (those of *only*, a list of ``STEPS``, if given)
    in *directory* and return the rows."""
    settings = QUICK if quick else FULL
    steps: List[Any] = [
        ("mutex", lambda: [bench_mutex(directory, settings)]),
        ("holder record", lambda: [bench_holder_record(directory, settings)]),
        ("contended mutex", lambda: bench_contended(directory, procs, settings)),
        ("arena", lambda: [bench_arena(directory, settings)]),
        ("shared mutex", lambda: [bench_shared(directory, settings)]),
        ("slots", lambda: [bench_slots(directory, settings)]),
        ("defer", lambda: [bench_defer(directory, settings)]),
        ("orphan scan", lambda: [bench_orphans(directory, settings)]),
        ("process names", lambda: [bench_process_name(directory, settings)]),
        ("rtlog burst", lambda: bench_rtlog(procs, settings)),
        ("robust_rmtree", lambda: [bench_rmtree(directory, settings)]),
        ("import", lambda: [bench_import(directory, settings)]),
    ]
    if only is not None:
        steps = [(label, step) for label, step in steps if label in only]
    rows: List[Row] = []
    for number, (label, step) in enumerate(steps, 1):
        progress(f"[{number}/{len(steps)}] {label} ...")
        rows.extend(step())
    return rows


def format_table(rows: List[Row]) -> str:
    header = ("benchmark", "median", "floor", "ratio", "target", "")
    lines = [header]
    for row in rows:
        floor = "" if row.floor is None else _number(row.floor, row.unit)
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}x"
        verdict = "" if row.ok is None else ("ok" if row.ok else "MISSED")
        lines.append((row.name, _number(row.value, row.unit), floor, ratio, row.target, verdict))
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if column in (0, 4) else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(line, widths))
        ).rstrip()
        for line in lines
    )


def _number(value: float, unit: str) -> str:
    if unit in ("acq/s", "rec/s"):
        return f"{value:,.0f} {unit}"
    return f"{value:.1f} {unit}" if value >= 10 else f"{value:.2f} {unit}"


def run_bench(
    directory: Optional[str], procs: int, quick: bool, as_json: bool, only: Optional[List[str]] = None
) -> int:
    """The ``bench`` subcommand: 0 if every target is met, 1 otherwise
    (rows without a target are information only)."""

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    workdir = tempfile.mkdtemp(prefix="toilcoord-bench-", dir=directory)
    try:
        rows = measure(workdir, procs, quick, progress, only)
    finally:
        retire_mutex_files()  # its kept lock files: open files cannot go on NFS
        robust_rmtree(workdir)
    if as_json:
        import json

        print(
            json.dumps(
                {
                    "python": sys.version.split()[0],
                    "cpus": os.cpu_count(),
                    "quick": quick,
                    "rows": [row._asdict() for row in rows],
                },
                indent=2,
            )
        )
    else:
        print(
            f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {procs} processes" + (", quick" if quick else "")
        )
        print(format_table(rows))
    print(summary_line(rows), file=sys.stderr if as_json else sys.stdout)
    return 0 if all(row.ok is not False for row in rows) else 1


def summary_line(rows: List[Row]) -> str:
    """``N targets met, M missed (names); K rows information only``."""
    missed = [row.name for row in rows if row.ok is False]
    met = sum(row.ok is True for row in rows)
    said = f"{met} targets met, {len(missed)} missed" + (f" ({'; '.join(missed)})" if missed else "")
    return f"{said}; {sum(row.ok is None for row in rows)} rows information only"
