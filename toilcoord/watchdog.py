"""Run jobs in child processes killed at a deadline.

What an epilog or a health check needs: a hung NFS call must not hold the
node. Each job runs in a forked child that leads its own process group,
with stdin, stdout and stderr on /dev/null (a hung child holds none of the
caller's pipes), and reports back in JSON lines on a pipe. At the deadline
the whole group is SIGKILLed; a child stuck in the kernel is abandoned to
init after one more second. SIGINT, SIGTERM and SIGHUP to the caller kill
the children too.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from typing import Callable, List, NamedTuple, Optional, Sequence

__all__ = ["Watched", "describe_error", "run_watched"]


def describe_error(error: BaseException) -> str:
    """One line for *error*: an OSError's message and file, else its type
    and text."""
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    return f"{type(error).__name__}: {error}"


class Watched(NamedTuple):
    """A watched child's messages, and its exit status (None: killed at
    the deadline)."""

    events: List[dict]
    status: Optional[int]


class _Child:
    """A forked child in a process group of its own, sending JSON lines."""

    def __init__(self, job: Callable[[Callable[[dict], None]], int]) -> None:
        read, write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child; its status is the result
            os.close(read)
            _run_child(job, write)
        try:
            os.setpgid(self.pid, self.pid)  # also done by the child: whichever runs first
        except OSError:
            pass  # it has exited already
        os.close(write)
        self.fd, self.buffer, self.events = read, b"", []  # type: int, bytes, List[dict]
        self.status: Optional[int] = None

    def read(self) -> bool:
        """Take what the child sent; False at end of file."""
        data = os.read(self.fd, 65536)
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        self.events.extend(json.loads(line) for line in lines if line)
        return bool(data)

    def finish(self, deadline: float) -> None:
        """Reap the child, killing its process group if it is past
        *deadline*; one stuck in the kernel is abandoned (init reaps it)."""
        os.close(self.fd)
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1
            elif time.monotonic() >= deadline:
                break
            else:
                time.sleep(0.01)  # exiting: its last close may wait for the filesystem
        if self.status is None:
            _kill_group(self.pid)
            _reap_briefly(self.pid)


def _run_child(job: Callable[[Callable[[dict], None]], int], write: int) -> None:  # pragma: no cover
    code = 1
    try:
        os.setpgid(0, 0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # nothing of the caller's (its pipes) is held by a hung child
            os.dup2(null, fd)

        def send(event: dict) -> None:
            os.write(write, json.dumps(event).encode() + b"\n")

        code = job(send)
    except BaseException as error:
        try:
            os.write(write, json.dumps({"note": f"failed: {describe_error(error)}"}).encode() + b"\n")
        except BaseException:
            pass
    finally:
        os._exit(code)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap_briefly(pid: int, patience: float = 1.0) -> None:
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return
        time.sleep(0.01)


def run_watched(jobs: Sequence[Callable[[Callable[[dict], None]], int]], timeout: float) -> List[Watched]:
    """Run each job in a forked child, all at once, each in a process group
    of its own with stdin, stdout and stderr on /dev/null. A job gets a
    ``send(dict)`` to report with and returns its exit status. Children
    still running after *timeout* seconds are killed with their groups; so
    are all of them if this process gets SIGINT, SIGTERM or SIGHUP (which
    then exits with 128 + the signal)."""
    deadline = time.monotonic() + timeout
    children: List[_Child] = []
    previous = _raise_on_signals()
    try:
        children.extend(_Child(job) for job in jobs)
        _read_until(children, deadline)
    finally:
        for child in children:
            child.finish(deadline)
        _restore_signals(previous)
    return [Watched(child.events, child.status) for child in children]


def _read_until(children: List[_Child], deadline: float) -> None:
    open_ = {child.fd: child for child in children}
    while open_:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        readable, _, _ = select.select(list(open_), [], [], remaining)
        for fd in readable:
            if not open_[fd].read():
                del open_[fd]


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _exit_on(signum: int, _: object) -> None:
    raise SystemExit(128 + signum)


def _raise_on_signals() -> dict:
    try:
        return {signum: signal.signal(signum, _exit_on) for signum in _SIGNALS}
    except ValueError:  # not the main thread: signals stay the caller's business
        return {}


def _restore_signals(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
