"""The benchmark rows beyond the locks: deferred functions, the orphan
scan, robust_rmtree, importing the package, real-time logging."""

from __future__ import annotations

import fcntl
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List

from ..deferred import DeferredFunctionManager
from ..files import robust_rmtree
from ..smoke import import_root
from .bench_core import Row, Settings, interleaved, latency_row
from .rtlog_burst import rtlog_burst

__all__ = ["bench_defer", "bench_import", "bench_orphans", "bench_rmtree", "bench_rtlog"]


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
    return latency_row("defer() (vs pickle + write)", times, 2)


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
