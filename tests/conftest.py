"""Shared helpers: child Python processes that can import this checkout."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from typing import Iterator, List

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
