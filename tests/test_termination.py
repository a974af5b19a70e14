"""install_termination_cleanup: real processes, real signals, sent at
moments the child reports through pipes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from toilcoord import termination
from toilcoord.termination import install_termination_cleanup

from conftest import child_env, run_python

# The child's common start: a manager on argv[1], functions that append
# their tag to argv[2], the handler installed, logging to stderr.
PRELUDE = """
    import logging, os, signal, sys
    from toilcoord import DeferredFunctionManager
    from toilcoord.termination import install_termination_cleanup
    logging.basicConfig(level=logging.INFO)
    base, log = sys.argv[1], sys.argv[2]

    def note(tag, *ignored):
        with open(log, "a") as out:
            out.write(f"{tag}\\n")

    def say(text):
        sys.stdout.write(text + "\\n")
        sys.stdout.flush()
"""


def script(body: str) -> str:
    return textwrap.dedent(PRELUDE) + textwrap.dedent(body)


def start(children, tmp_path, body: str, *fds: int) -> subprocess.Popen:
    log = tmp_path / "log"
    log.touch()
    return children.python(
        script(body),
        str(tmp_path),
        str(log),
        *map(str, fds),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=fds,
    )


def finish(child: subprocess.Popen, tmp_path) -> tuple:
    _, stderr = child.communicate(timeout=60)
    return child.returncode, (tmp_path / "log").read_text().split(), stderr


def state_files(tmp_path) -> list:
    return sorted(os.listdir(tmp_path / "deferred"))


@pytest.mark.timeout(60)
def test_sigterm_runs_every_managers_functions_in_order_then_dies_of_it(children, tmp_path) -> None:
    child = start(
        children,
        tmp_path,
        """
        first, second = DeferredFunctionManager(base), DeferredFunctionManager(base)
        install_termination_cleanup()
        with first.open() as defer_first, second.open() as defer_second:
            defer_first(note, "a")
            defer_second(note, "b")
            defer_first(note, "c")
            say("ready")
            sys.stdin.read()        # the job's work; the signal comes here
            say("not reached")
    """,
    )
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGTERM)
    status, log, stderr = finish(child, tmp_path)
    assert status == -signal.SIGTERM, stderr
    # Each manager's in the order registered (managers in no set order).
    assert sorted(log) == ["a", "b", "c"] and log.index("a") < log.index("c")
    assert "got SIGTERM" in stderr and "Traceback" not in stderr


@pytest.mark.timeout(60)
def test_the_shell_sees_128_plus_the_signal(tmp_path) -> None:
    done = subprocess.run(
        [
            "sh",
            "-c",
            '"$0" -c "$1" "$2" "$3"; echo "status $?"',
            sys.executable,
            script("""
                               manager = DeferredFunctionManager(base)
                               install_termination_cleanup(manager, signals=(signal.SIGUSR1,))
                               with manager.open() as defer:
                                   defer(note, "ran")
                                   os.kill(os.getpid(), signal.SIGUSR1)
                           """),
            str(tmp_path),
            str(tmp_path / "log"),
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.split() == ["status", str(128 + signal.SIGUSR1)], done.stderr
    assert (tmp_path / "log").read_text() == "ran\n"


@pytest.mark.timeout(60)
def test_a_function_running_when_the_signal_comes_finishes_and_never_runs_twice(children, tmp_path) -> None:
    started_read, started_write = os.pipe()
    go_read, go_write = os.pipe()
    child = start(
        children,
        tmp_path,
        """
        started, go = int(sys.argv[3]), int(sys.argv[4])

        def slow(tag):
            os.write(started, b"s")
            os.read(go, 1)          # the signal comes while we wait here
            note(tag)

        manager = DeferredFunctionManager(base)
        install_termination_cleanup(manager)
        with manager.open() as defer:
            defer(note, "one")
            defer(slow, "two")
            defer(note, "three")
        say("after the block")      # reached: the signal waits for the run
    """,
        started_write,
        go_read,
    )
    os.close(started_write)
    os.close(go_read)
    try:
        assert os.read(started_read, 1) == b"s"
        child.send_signal(signal.SIGTERM)
        # Two bytes: a handler that ran "slow" again would not block, and
        # the log would show it twice.
        os.write(go_write, b"gg")
    finally:
        os.close(started_read)
        os.close(go_write)
    status, log, stderr = finish(child, tmp_path)
    assert status == -signal.SIGTERM, stderr
    assert log == ["one", "two", "three"]


@pytest.mark.timeout(60)
def test_a_defer_cut_by_the_signal_finishes_and_its_function_runs(children, tmp_path) -> None:
    # The signal lands while defer() is serialising its arguments: inside
    # defer, before its record is written.
    inside_read, inside_write = os.pipe()
    go_read, go_write = os.pipe()
    child = start(
        children,
        tmp_path,
        """
        inside, go = int(sys.argv[3]), int(sys.argv[4])

        class Gate:
            def __reduce__(self):
                os.write(inside, b"d")
                os.read(go, 1)
                return (str, ("gate",))

        manager = DeferredFunctionManager(base)
        install_termination_cleanup(manager)
        with manager.open() as defer:
            defer(note, "before")
            defer(note, "cut", Gate())
            say("defer returned")   # not reached: the handler exits first
            sys.stdin.read()
    """,
        inside_write,
        go_read,
    )
    os.close(inside_write)
    os.close(go_read)
    try:
        assert os.read(inside_read, 1) == b"d"
        child.send_signal(signal.SIGTERM)
        os.write(go_write, b"g")
    finally:
        os.close(inside_read)
        os.close(go_write)
    status, log, stderr = finish(child, tmp_path)
    assert status == -signal.SIGTERM, stderr
    assert log == ["before", "cut"]
    assert "torn" not in stderr and "corrupt" not in stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("after", [1, 7, 40, 200])
def test_sigterm_during_defers_in_a_loop(children, tmp_path, after: int) -> None:
    child = start(
        children,
        tmp_path,
        """
        manager = DeferredFunctionManager(base)
        install_termination_cleanup(manager)
        with manager.open() as defer:
            for index in range(10**6):
                defer(note, str(index))
                say(str(index))
    """,
    )
    promised = []
    for _ in range(after):
        promised.append(int(child.stdout.readline()))
    child.send_signal(signal.SIGTERM)
    # Read on through the buffered reader: communicate() would skip what
    # readline() already buffered. Its stderr is a few lines: no deadlock.
    promised += [int(line) for line in child.stdout.read().split()]
    stderr = child.stderr.read()
    child.wait(timeout=60)
    ran = [int(tag) for tag in (tmp_path / "log").read_text().split()]
    assert child.returncode == -signal.SIGTERM, stderr
    # Each deferred function ran once, in order; every defer that returned
    # was run; at most one more (deferred, not yet reported) ran too.
    assert ran == list(range(len(ran)))
    assert promised == list(range(len(promised))) and len(promised) <= len(ran) <= len(promised) + 1
    assert "torn" not in stderr and "corrupt" not in stderr


@pytest.mark.timeout(60)
def test_when_the_grace_period_runs_out_the_rest_is_left_for_the_next_process(children, tmp_path) -> None:
    never_read, never_write = os.pipe()
    child = start(
        children,
        tmp_path,
        """
        never = int(sys.argv[3])

        def hang():
            os.read(never, 1)       # nothing ever comes (in another process: EBADF)

        manager = DeferredFunctionManager(base)
        install_termination_cleanup(manager, grace=0.5)
        with manager.open() as defer:
            defer(note, "first")
            defer(hang)
            defer(note, "last")
            say("ready")
            sys.stdin.read()
    """,
        never_read,
    )
    os.close(never_read)
    try:
        assert child.stdout.readline() == "ready\n"
        child.send_signal(signal.SIGTERM)
        status, log, stderr = finish(child, tmp_path)
    finally:
        os.close(never_write)
    assert status == -signal.SIGTERM, stderr
    assert log == ["first"]
    assert "grace period" in stderr and "hang" in stderr
    assert len(state_files(tmp_path)) == 1  # the dead worker's file, for the next process
    later = run_python(
        """
        import sys
        from toilcoord import DeferredFunctionManager
        DeferredFunctionManager.cleanupWorker(sys.argv[1])
    """,
        str(tmp_path),
    )
    assert later.returncode == 0, later.stderr
    assert (tmp_path / "log").read_text().split() == ["first", "last"]


@pytest.mark.timeout(60)
def test_a_second_signal_during_the_cleanup_ends_the_process_at_once(children, tmp_path) -> None:
    started_read, started_write = os.pipe()
    child = start(
        children,
        tmp_path,
        """
        started = int(sys.argv[3])

        def stuck():
            os.write(started, b"s")
            sys.stdin.read()

        manager = DeferredFunctionManager(base)
        install_termination_cleanup(manager, grace=600)
        with manager.open() as defer:
            defer(stuck)
            defer(note, "never")
            say("ready")
            signal.pause()
    """,
        started_write,
    )
    os.close(started_write)
    try:
        assert child.stdout.readline() == "ready\n"
        child.send_signal(signal.SIGTERM)
        assert os.read(started_read, 1) == b"s"
        child.send_signal(signal.SIGTERM)
    finally:
        os.close(started_read)
    status, log, _ = finish(child, tmp_path)
    assert status == -signal.SIGTERM and log == []


@pytest.mark.timeout(60)
def test_uninstall_puts_the_previous_handler_back() -> None:
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGUSR2, mine)
    try:
        uninstall = install_termination_cleanup(signals=[signal.SIGUSR2])
        assert signal.getsignal(signal.SIGUSR2) is not mine
        uninstall()
        assert signal.getsignal(signal.SIGUSR2) is mine
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_only_the_main_thread_may_install() -> None:
    errors = []

    def install() -> None:
        try:
            install_termination_cleanup()
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=install)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])
    assert (
        signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        or not callable(signal.getsignal(signal.SIGTERM))
        or signal.getsignal(signal.SIGTERM).__module__ != termination.__name__
    )


@pytest.mark.parametrize(
    "arguments, error",
    [
        ({"grace": 0}, ValueError),
        ({"grace": -1}, ValueError),
        ({"grace": float("nan")}, ValueError),
        ({"grace": "30"}, ValueError),
        ({"grace": True}, ValueError),
        ({"signals": ()}, ValueError),
        ({"signals": (signal.SIGKILL,)}, ValueError),
        ({"signals": ("TERM",)}, ValueError),
        ({"signals": (99999,)}, ValueError),
        ({"manager": "dir"}, TypeError),
    ],
)
def test_bad_arguments_are_refused_before_any_handler_is_set(arguments, error) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(error):
        install_termination_cleanup(**arguments)
    assert signal.getsignal(signal.SIGTERM) is before


def test_public_names() -> None:
    assert termination.__all__ == ["install_termination_cleanup"]
