"""The real-time logging burst behind ``bench``'s rtlog row: a leader on
loopback, worker processes logging as fast as they can, and what arrived.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from ..rtlog import RealtimeLogger
from ..smoke import import_root

__all__ = ["rtlog_burst"]


# A worker: configure, report ready, wait for "go" on stdin, then log as fast
# as it can and print its send time and the records it saw dropped.
_BURST_WORKER = r"""
import importlib, sys, time
rtlog = importlib.import_module(sys.argv[1] + ".rtlog")
records = int(sys.argv[2])
logger = rtlog.RealtimeLogger.getLogger()
handler = rtlog.RealtimeLogger._handler
sys.stdout.write("ready %s\n" % (handler.transport if handler else "none"))
sys.stdout.flush()
sys.stdin.read(1)
start = time.monotonic()
for number in range(records):
    logger.info("burst record %d of %d", number, records)
sys.stdout.write("%f %d\n" % (time.monotonic() - start, handler.dropped if handler else records))
"""


class _Counter(logging.Handler):
    """Counts re-logged records and remembers when the last one came."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.last = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        self.last = time.monotonic()


def rtlog_burst(
    procs: int = 4, records: int = 5000, secret: Optional[str] = None, transport: str = "auto"
) -> Dict[str, Any]:
    """Start a leader on loopback, have ``procs`` worker processes each log
    ``records`` INFO records as fast as they can, and report: ``sent``,
    ``delivered``, ``fraction``, ``seconds`` (from "go" to the last record
    re-logged), ``receive_rate`` (delivered per second), ``send_rate``
    (records per second over the slowest sender's sending time),
    ``transport`` ("auto": workers on this node use the local socket; "udp":
    UDP only), ``sender_dropped`` and the leader's ``statistics``."""
    if procs < 1 or records < 1:
        raise ValueError("procs and records must be positive, not %r and %r" % (procs, records))
    if transport not in ("auto", "udp"):
        raise ValueError("transport must be 'auto' or 'udp', not %r" % (transport,))
    counter = _Counter()
    rt_logger = logging.getLogger("toil-rt")
    propagate = rt_logger.propagate
    rt_logger.propagate = False  # keep the burst off the caller's handlers
    rt_logger.addHandler(counter)
    try:
        with RealtimeLogger(level="INFO", host="127.0.0.1", secret=secret, localSocket=transport == "auto"):
            server = RealtimeLogger.loggingServer
            assert server is not None
            workers = _start_workers(procs, records)
            try:
                started, results = _run_burst(workers)
            finally:
                for worker in workers:
                    if worker.poll() is None:
                        worker.kill()
                    worker.wait()
                    worker.stdin.close()
                    worker.stdout.close()
            _wait_for_quiet(counter, procs * records)
        statistics = server.statistics()
    finally:
        rt_logger.removeHandler(counter)
        rt_logger.propagate = propagate
    sent = procs * records
    seconds = max(counter.last - started, 1e-9)
    return {
        "sent": sent,
        "delivered": counter.count,
        "fraction": counter.count / sent,
        "seconds": seconds,
        "receive_rate": counter.count / seconds,
        "send_rate": sent / max(max(duration for duration, _ in results), 1e-9),
        "transport": transport,
        "sender_dropped": sum(dropped for _, dropped in results),
        "statistics": statistics,
    }


def _start_workers(procs: int, records: int) -> List[subprocess.Popen]:
    env = dict(os.environ)
    env["PYTHONPATH"] = import_root()[0] + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    workers: List[subprocess.Popen] = []
    try:
        for _ in range(procs):
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-c", _BURST_WORKER, import_root()[1], str(records)],
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    universal_newlines=True,
                )
            )
    except BaseException:
        for worker in workers:
            worker.kill()
            worker.wait()
        raise
    return workers


def _run_burst(workers: List[subprocess.Popen]) -> Any:
    for worker in workers:
        line = worker.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError("benchmark worker failed to start (exit status %s)" % worker.wait())
    started = time.monotonic()
    for worker in workers:
        worker.stdin.write("g")
        worker.stdin.flush()
    results = []
    for worker in workers:
        duration, dropped = worker.stdout.readline().split()
        results.append((float(duration), int(dropped)))
        worker.wait()
    return started, results


def _wait_for_quiet(counter: _Counter, expected: int, quiet: float = 1.0) -> None:
    """Return once every record arrived or none came for ``quiet`` seconds."""
    idle = threading.Event()
    while counter.count < expected and time.monotonic() - counter.last < quiet:
        idle.wait(0.05)
