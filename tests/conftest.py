"""Shared helpers: child Python processes that can import this checkout."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
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
            env=env if env is not None else child_env(), cwd=ROOT, **popen,
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
        env=env if env is not None else child_env(), cwd=ROOT,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
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
