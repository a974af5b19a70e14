"""global_mutex(shared=True): many readers or one writer, writers first."""

from __future__ import annotations

import os
import select
import subprocess
import threading

import pytest

from toilcoord.locks import LockTimeout
from toilcoord.mutex import global_mutex

from conftest import blocked_on_flock, left_after_exit, release, wait_until

pytestmark = pytest.mark.timeout(60)

# Holds mutex argv[2] in directory argv[1] (shared if argv[3] == "shared"),
# says "held", and lets go when its stdin closes; then says "out".
HOLD = """
import sys
from toilcoord.mutex import global_mutex
with global_mutex(sys.argv[1], sys.argv[2], shared=sys.argv[3] == "shared"):
    print("held", flush=True)
    sys.stdin.read()
print("out", flush=True)
"""


def start(children, directory, mode):
    return children.python(HOLD, str(directory), "m", mode, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def holding(children, directory, mode):
    holder = start(children, directory, mode)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_readers_share_across_processes_and_exclude_a_writer(tmp_path, children):
    reader = holding(children, tmp_path, "shared")
    with global_mutex(tmp_path, "m", timeout=0, shared=True):
        pass
    with pytest.raises(LockTimeout):
        with global_mutex(tmp_path, "m", timeout=0):
            pass
    release(reader)
    with global_mutex(tmp_path, "m", timeout=0):
        pass
    assert left_after_exit(tmp_path) == []


def test_a_writer_excludes_readers(tmp_path, children):
    writer = holding(children, tmp_path, "exclusive")
    with pytest.raises(LockTimeout):
        with global_mutex(tmp_path, "m", timeout=0.05, shared=True):
            pass
    release(writer)
    with global_mutex(tmp_path, "m", timeout=0, shared=True):
        pass


def test_a_waiting_writer_keeps_new_readers_out(tmp_path, children):
    """Readers that would overlap forever (each arriving while another is
    inside) starve a plain flock writer; here the first new reader waits."""
    first = holding(children, tmp_path, "shared")
    writer = start(children, tmp_path, "exclusive")
    wait_until(lambda: blocked_on_flock(writer.pid))
    second = start(children, tmp_path, "shared")
    wait_until(lambda: blocked_on_flock(second.pid))  # behind the writer, though only a reader is inside
    release(first)
    assert writer.stdout.readline() == "held\n"
    release(writer)
    assert second.stdout.readline() == "held\n"
    release(second)


# A reader that leaves as the exit-time retire (or cleanup) does: holding the
# lock file (a shared lock, made exclusive when it is the last), it unlinks
# it; here a new reader has meanwhile made the new file and holds it shared.
LAST_READER_RETIRES = """
import fcntl, os, sys
path = sys.argv[1]
old = os.open(path, os.O_RDWR)
fcntl.flock(old, fcntl.LOCK_SH)
print("held", flush=True)
sys.stdin.readline()
fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the waiting writer does not hold it yet
os.unlink(path)
new = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
fcntl.flock(new, fcntl.LOCK_SH)
os.close(old)  # the writer's lock lands on the removed file
print("retired", flush=True)
sys.stdin.read()
"""


def first_to_say_held(*processes, timeout=30):
    ready, _, _ = select.select([process.stdout for process in processes], [], [], timeout)
    assert ready, "nobody got the mutex"
    return next(process for process in processes if process.stdout in ready)


# The reader's chance to slip in (with the writer letting go of the intent
# file too early) is a race it wins about one time in five: a few rounds.
@pytest.mark.parametrize("round_", range(12))
def test_a_waiting_writer_keeps_readers_out_when_its_file_is_retired_under_it(tmp_path, children, round_):
    with global_mutex(tmp_path, "m", shared=True):
        pass  # the files a reader makes: the lock file and the writer-intent file
    retire = children.python(
        LAST_READER_RETIRES, str(tmp_path / "toil-mutex-m"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert retire.stdout.readline() == "held\n"
    writer = start(children, tmp_path, "exclusive")
    wait_until(lambda: blocked_on_flock(writer.pid))
    reader = start(children, tmp_path, "shared")
    wait_until(lambda: blocked_on_flock(reader.pid))  # on the intent file, behind the writer
    retire.stdin.write("\n")
    retire.stdin.flush()
    assert retire.stdout.readline() == "retired\n"
    wait_until(lambda: blocked_on_flock(writer.pid))  # on the new file
    release(retire)
    first = first_to_say_held(writer, reader)
    assert first is writer, "a reader got in while the writer waited"
    assert writer.stdout.readline() == "held\n"
    release(writer)
    assert reader.stdout.readline() == "held\n"
    release(reader)


def test_threads_of_one_process_share(tmp_path):
    inside = threading.Barrier(3, timeout=20)

    def read() -> None:
        with global_mutex(tmp_path, "m", shared=True):
            inside.wait()  # all three inside at once
            inside.wait()

    threads = [threading.Thread(target=read) for _ in range(2)]
    for thread in threads:
        thread.start()
    with global_mutex(tmp_path, "m", shared=True):
        inside.wait()
        with pytest.raises(LockTimeout):  # a writer thread of ours is excluded too
            with global_mutex(tmp_path, "m", timeout=0):
                pass
        inside.wait()
    for thread in threads:
        thread.join()
    with global_mutex(tmp_path, "m", timeout=0):
        pass


def test_a_writer_thread_waits_for_reader_threads_and_keeps_new_ones_out(tmp_path):
    order = []
    writer_waits = threading.Event()
    with global_mutex(tmp_path, "m", shared=True):

        def write() -> None:
            writer_waits.set()
            with global_mutex(tmp_path, "m"):
                order.append("writer")

        def read() -> None:
            with global_mutex(tmp_path, "m", shared=True):
                order.append("reader")

        writer = threading.Thread(target=write)
        writer.start()
        writer_waits.wait()
        wait_until(lambda: blocked_on_flock(os.getpid()))
        reader = threading.Thread(target=read)
        reader.start()
        wait_until(lambda: sum(blocked_on_flock_lines(os.getpid())) >= 2)  # the reader waits too
        assert order == []
    writer.join(30)
    reader.join(30)
    assert order == ["writer", "reader"]


def blocked_on_flock_lines(pid):
    with open("/proc/locks") as table:
        return [line.split()[1:3] == ["->", "FLOCK"] and line.split()[5] == str(pid) for line in table]


def test_a_killed_reader_lets_the_writer_in(tmp_path, children):
    reader = holding(children, tmp_path, "shared")
    writer = start(children, tmp_path, "exclusive")
    wait_until(lambda: blocked_on_flock(writer.pid))
    reader.kill()
    reader.wait()
    assert writer.stdout.readline() == "held\n"
    release(writer)


def test_a_killed_waiting_writer_lets_readers_in(tmp_path, children):
    reader = holding(children, tmp_path, "shared")
    writer = start(children, tmp_path, "exclusive")
    wait_until(lambda: blocked_on_flock(writer.pid))
    writer.kill()  # it held the writer-intent file
    writer.wait()
    with global_mutex(tmp_path, "m", timeout=0, shared=True):
        pass
    release(reader)


def test_shared_times_out_behind_a_waiting_writer(tmp_path, children):
    reader = holding(children, tmp_path, "shared")
    writer = start(children, tmp_path, "exclusive")
    wait_until(lambda: blocked_on_flock(writer.pid))
    with pytest.raises(LockTimeout):
        with global_mutex(tmp_path, "m", timeout=0.05, shared=True):
            pass
    release(reader)
    assert writer.stdout.readline() == "held\n"
    release(writer)


def test_shared_is_keyword_only_and_names_are_checked_first(tmp_path):
    with pytest.raises(TypeError):
        global_mutex(tmp_path, "m", None, True)  # type: ignore[misc]
    with pytest.raises(ValueError):
        global_mutex(tmp_path, "a/b", shared=True)
    with pytest.raises(FileNotFoundError):
        with global_mutex(tmp_path / "missing", "m", shared=True):
            pass


def test_files_are_removed_at_exit_and_by_cleanup(tmp_path, children):
    from toilcoord.cleanup import cleanup_directory

    reader = holding(children, tmp_path, "shared")
    writer = start(children, tmp_path, "exclusive")
    wait_until(lambda: blocked_on_flock(writer.pid))
    writer.kill()
    reader.kill()
    writer.wait()
    reader.wait()
    assert sorted(os.listdir(tmp_path)) == ["toil-mutex-m", "toil-mutex-m.writer-intent"]
    list(cleanup_directory(str(tmp_path)))
    assert os.listdir(tmp_path) == []
    with global_mutex(tmp_path, "m", shared=True):
        pass
    assert left_after_exit(tmp_path) == []
