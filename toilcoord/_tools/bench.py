"""Benchmarks behind ``python -m toilcoord bench``.

Every primitive is timed beside its physical floor, the raw system calls it
cannot avoid, with the two interleaved round by round so that the machine's
mood affects both alike; the table gives medians and their ratio.
"""

from __future__ import annotations

import fcntl
import os
import signal
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..arena import LastProcessStandingArena
from ..files import robust_rmtree
from ..holder import RECORD_SIZE
from ..mutex import global_mutex, retire_mutex_files
from ..procnames import get_process_name, process_name_exists
from ..slots import ResourceSlots
from ..smoke import Forked
from .bench_core import FULL, QUICK, Row, Settings, Timer, interleaved, latency_row, timer
from .bench_more import bench_defer, bench_import, bench_orphans, bench_rmtree, bench_rtlog

__all__ = ["Row", "measure", "run_bench", "summary_line"]

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
    file is the one at its name in the directory opened once (fstat,
    fstatat), say who holds it (one record-sized pwrite: issue 12's promise
    to ``status``), unlock. One fd (and one directory fd) per process."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.directory, self.name = os.path.split(path)
        self.fds: Dict[int, Tuple[int, int]] = {}

    def cycle(self) -> None:
        pid = os.getpid()
        fds = self.fds.get(pid)
        if fds is None:
            folder = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fds = self.fds[pid] = (folder, os.open(self.name, _LOCK_FLAGS, 0o600, dir_fd=folder))
        folder, fd = fds
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.fstat(fd)
        os.stat(self.name, dir_fd=folder, follow_symlinks=False)
        os.pwrite(fd, _RECORD, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in self.fds.pop(os.getpid(), ()):
            os.close(fd)
        os.unlink(self.path)


def _acquire_release(directory: str, name: str) -> Callable[[], None]:
    def cycle() -> None:
        with global_mutex(directory, name):
            pass

    return cycle


def bench_mutex(directory: str, settings: Settings) -> Row:
    kept = _KeptFile(os.path.join(directory, "floor-kept"))
    try:
        contenders = {"primitive": timer(_acquire_release(directory, "bench")), "floor": timer(kept.cycle)}
        times = interleaved(contenders, settings.rounds, settings.ops)
    finally:
        kept.close()
    return latency_row("mutex acquire+release (vs flock+fstat+fstatat+pwrite+unlock)", times, 1.5)


def _unrecorded(cycle: Callable[[], None]) -> Timer:
    """*cycle* timed as the mutex was before holders recorded themselves."""
    from .. import mutex

    def timed(n: int) -> float:
        recording, mutex._record_holder = mutex._record_holder, lambda gate, purpose: None
        try:
            return timer(cycle)(n)
        finally:
            mutex._record_holder = recording

    return timed


def bench_holder_record(directory: str, settings: Settings) -> Row:
    """The cost of the holder record: the same mutex with and without it."""
    cycle = _acquire_release(directory, "bench")
    contenders = {"primitive": timer(cycle), "floor": _unrecorded(cycle)}
    times = interleaved(contenders, settings.rounds, settings.ops)
    return latency_row("mutex with its holder record (vs without)", times, None)


def bench_arena(directory: str, settings: Settings) -> Row:
    arena = LastProcessStandingArena(directory, "bench")

    def enter_leave() -> None:
        arena.enter()
        for _ in arena.leave():
            pass

    contenders = {"primitive": timer(enter_leave), "floor": timer(_acquire_release(directory, "bench"))}
    return latency_row("arena enter+leave (vs the mutex)", interleaved(contenders, settings.rounds, settings.ops), 3)


def bench_shared(directory: str, settings: Settings) -> Row:
    def shared() -> None:
        with global_mutex(directory, "bench", shared=True):
            pass

    contenders = {"primitive": timer(shared), "floor": timer(_acquire_release(directory, "bench"))}
    return latency_row(
        "shared mutex acquire+release (vs the mutex)", interleaved(contenders, settings.rounds, settings.ops), 1.5
    )


def bench_slots(directory: str, settings: Settings) -> Row:
    slots = ResourceSlots(directory, "bench", 4)

    def cycle() -> None:
        with slots.acquire():
            pass

    contenders = {"primitive": timer(cycle), "floor": timer(_acquire_release(directory, "bench"))}
    return latency_row(
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
    return latency_row("process_name_exists (live)", times, None)


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
        # With more processes than cores, the holder mostly takes the lock
        # again before a waiter runs: its whole cycle, Python included, sets
        # the pace, as the uncontended row's does.
        Row(
            f"contended mutex, {procs} processes (vs the kept-file floor)",
            ours,
            floor,
            "acq/s",
            ours / floor,
            ">= 0.8x",
            ours / floor >= 0.8,
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
