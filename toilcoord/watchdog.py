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
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence

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

    def __init__(self, job: Callable[[Callable[[dict], None]], int], interruption: Interruption) -> None:
        read, write = os.pipe()

        def child() -> int:  # pragma: no cover - in the child; its status is the result
            os.close(read)
            return _run_child(job, write)

        self.pid = interruption.fork_group(child)
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

    def finish(self, deadline: float, interruption: Interruption) -> None:
        """Reap the child, killing its process group if it is past
        *deadline* or *interruption* has come; one stuck in the kernel is
        abandoned (init reaps it)."""
        os.close(self.fd)
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1
            elif time.monotonic() >= deadline or interruption.signum is not None:
                break
            else:  # exiting: its last close may wait for the filesystem
                select.select([interruption.fd], [], [], 0.01)
        if self.status is None:
            _kill_group(self.pid)
            _reap_briefly(self.pid)


def _run_child(job: Callable[[Callable[[dict], None]], int], write: int) -> int:  # pragma: no cover
    try:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # nothing of the caller's (its pipes) is held by a hung child
            os.dup2(null, fd)

        def send(event: dict) -> None:
            os.write(write, json.dumps(event).encode() + b"\n")

        return job(send)
    except BaseException as error:
        try:
            os.write(write, json.dumps({"note": f"failed: {describe_error(error)}"}).encode() + b"\n")
        except BaseException:
            pass
        return 1


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
    are all of them, at once, if this process gets SIGINT, SIGTERM or SIGHUP
    (which then exits with 128 + the signal, see `Interruption`)."""
    deadline = time.monotonic() + timeout
    children: List[_Child] = []
    with Interruption() as interruption:
        try:
            for job in jobs:
                children.append(_Child(job, interruption))
            _read_until(children, deadline, interruption)
        finally:
            for child in children:
                child.finish(deadline, interruption)
    return [Watched(child.events, child.status) for child in children]


def _read_until(children: List[_Child], deadline: float, interruption: Interruption) -> None:
    open_ = {child.fd: child for child in children}
    while open_ and interruption.signum is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        readable, _, _ = select.select([*open_, interruption.fd], [], [], remaining)
        for fd in readable:
            if fd in open_ and not open_[fd].read():
                del open_[fd]


class Interruption:
    """SIGINT, SIGTERM and SIGHUP, for as long as the ``with`` block runs:
    the first one is remembered (`signum`), every process group forked by
    `fork_group` is SIGKILLed at once, `fd` becomes readable (for
    ``select``), and leaving the block raises ``SystemExit(128 + signum)``.

    The handler never raises: a signal cannot cut the block's own cleanup
    short, or strike between a fork and the line that remembers the child,
    the windows in which a raising handler leaks a child or a directory.
    A signal the caller ignores (``nohup``) stays ignored. Outside the main
    thread nothing is installed (signals stay the caller's business) and
    `fd` never becomes readable."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._groups: List[int] = []
        self._previous: dict = {}
        self.fd, self._wake = os.pipe()

    def __enter__(self) -> Interruption:
        try:
            for signum in _SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread
            pass
        return self

    def __exit__(self, *_: object) -> None:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)  # a second signal waits till all is put back
        try:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        finally:
            os.close(self.fd)
            os.close(self._wake)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if self.signum is not None:
            raise SystemExit(128 + self.signum)

    def fork_group(self, child: Callable[[], int]) -> int:
        """Fork a child that leads a process group of its own, one to
        SIGKILL on a signal (at once, if one has come already); return its
        pid. The child, its signals back to their defaults (ignored ones
        stay ignored), exits with the status ``child()`` returns (1 if it
        raises): it never comes back into the caller's code."""
        sys.stdout.flush()  # nothing buffered is written twice
        sys.stderr.flush()
        # Blocked across the fork: the child must not run our handler.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                _become_child(child, mask, (self.fd, self._wake))
            try:
                os.setpgid(pid, pid)  # also done by the child: whichever runs first
            except OSError:
                pass  # it has exited already
            self._groups.append(pid)
            if self.signum is not None:
                _kill_group(pid)
            return pid
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _handle(self, signum: int, _: object) -> None:
        if self.signum is None:
            self.signum = signum
            os.write(self._wake, b"!")
        for pgid in self._groups:
            _kill_group(pgid)


def _become_child(child: Callable[[], int], mask: Iterable[int], ours: Iterable[int]) -> None:  # pragma: no cover
    code = 1
    try:
        os.setpgid(0, 0)
        for signum in _SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, signal.SIG_DFL)  # also a caller's own, off the main thread
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for fd in ours:
            os.close(fd)
        code = child()
    finally:
        os._exit(code)


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
