from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from toilcoord.cleanup import Finding, summary_lines

from conftest import ROOT, child_env

pytestmark = pytest.mark.timeout(120)


def cleanup(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "toilcoord", "cleanup", *args],
        cwd=ROOT,
        env=env or child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.mark.parametrize(
    "directory, status, message",
    [
        ("", 2, "--dir is empty"),
        ("/proc", 2, "pseudo filesystem"),
        ("/etc/hostname", 2, "not a directory"),
        ("/nonexistent/toilcoord", 0, "nothing to clean: /nonexistent/toilcoord does not exist"),
    ],
)
def test_each_bad_or_empty_input_is_one_line_and_its_exit_status(directory, status, message):
    done = cleanup("--dir", directory)
    assert done.returncode == status, done.stdout + done.stderr
    said = done.stdout + done.stderr
    assert said.count("\n") == 1 and message in said and "Traceback" not in said, said


def test_several_directories_and_one_json_document(tmp_path):
    (tmp_path / "toil-mutex-dead").write_text("")
    done = cleanup("--dir", str(tmp_path), "--dir", str(tmp_path / "missing"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {"host", "time", "status", "directories"} <= set(report)
    first, missing = report["directories"]
    assert first["removed"] == [{"kind": "mutex", "name": "toil-mutex-dead", "why": "nobody held it"}]
    assert missing["note"].startswith("nothing to clean") and missing["status"] == 0
    assert os.listdir(tmp_path) == []


HOLD_MUTEX = """
import sys
from toilcoord import global_mutex
with global_mutex(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


def _marked(marker):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                found += [int(pid)] if marker.encode() in environ.read() else []
        except OSError:
            pass
    return found


def _kill_marked(marker):
    for _ in range(1000):  # bounded: 10 s for the killed to be gone
        found = _marked(marker)
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    raise AssertionError(f"processes marked {marker} outlived SIGKILL: {found}")


def test_a_hung_cleanup_is_killed_at_its_timeout_and_the_rest_still_cleaned(tmp_path, children):
    # The arena's mutex held by a stopped process: reaping that arena waits
    # for ever (as a hung NFS call would); the other directory is cleaned.
    hung, fine = tmp_path / "hung", tmp_path / "fine"
    hung.mkdir()
    fine.mkdir()
    (hung / "stuck-arena-live").write_text("")
    (fine / "toil-mutex-dead").write_text("")
    holder = children.python(HOLD_MUTEX, str(hung), "stuck-arena-lock", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    holder.send_signal(signal.SIGSTOP)
    marker = f"{os.getpid()}-{os.urandom(4).hex()}"
    done = cleanup(
        "--dir", str(hung), "--dir", str(fine), "--timeout", "2", env=child_env(TOILCOORD_CLEANUP_MARK=marker)
    )
    holder.send_signal(signal.SIGCONT)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and "timed out after 2 s" in done.stderr and str(hung) in done.stderr
    assert f"{fine}: mutexes: removed 1 lock files left by dead holders" in done.stdout
    assert _marked(marker) == [], "the killed cleanup left no process behind"


def test_a_signal_kills_the_cleanups_children_at_once_not_at_the_timeout(tmp_path, children):
    # Regression: SIGTERM to a cleanup whose child hung exited only at
    # --timeout (measured: 30.2 s with --timeout 30), the child running
    # until then. A SIGHUP ignored by the caller (nohup) stays ignored.
    (tmp_path / "stuck-arena-live").write_text("")
    holder = children.python(
        HOLD_MUTEX, str(tmp_path), "stuck-arena-lock", stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert holder.stdout.readline().strip() == b"held"
    marker = f"{os.getpid()}-{os.urandom(4).hex()}"
    command = subprocess.Popen(
        [sys.executable, "-m", "toilcoord", "cleanup", "--dir", str(tmp_path), "--timeout", "600"],
        cwd=ROOT,
        env=child_env(TOILCOORD_CLEANUP_MARK=marker),
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # as under nohup
    )
    try:
        for _ in range(1000):  # until the command has forked its child (bounded: 10 s)
            if len(_marked(marker)) == 2:
                break
            time.sleep(0.01)
        assert len(_marked(marker)) == 2, "the command and its child"
        command.send_signal(signal.SIGHUP)  # ignored: the first signal it acts on is SIGTERM
        command.send_signal(signal.SIGTERM)
        assert command.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        command.kill()
        command.wait()
        _kill_marked(marker)  # if it failed: the child, in a process group of its own
    assert _marked(marker) == [], "the child went with the command"


CLOSE_AND_LINGER = """
import os, sys, time
from toilcoord.watchdog import run_watched


def job(send):
    os.closerange(3, 4096)  # its pipe too: done, as far as the caller can see
    other = os.fork()
    if other == 0:
        time.sleep(600)
        os._exit(0)
    os.setpgid(other, other)
    os.setpgid(0, other)  # out of reach of the SIGKILL to its own group, as one stuck in the kernel is
    with open(sys.argv[1], "w") as fifo:
        fifo.write("closed")
    time.sleep(600)
    return 0


run_watched([job], 600)
"""


def test_a_signal_ends_the_wait_for_a_child_that_closed_its_pipe_but_lingers(tmp_path, children):
    # Regression: the signal was recorded, but the wait for a child that
    # SIGKILL does not end went on to the deadline (here 600 s).
    fifo = tmp_path / "closed"
    os.mkfifo(fifo)
    ready = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    marker = f"{os.getpid()}-{os.urandom(4).hex()}"
    caller = children.python(CLOSE_AND_LINGER, str(fifo), env=child_env(TOILCOORD_CLEANUP_MARK=marker))
    try:
        select.select([ready], [], [], 10)
        assert os.read(ready, 16) == b"closed", "the job closed its pipe"
        caller.send_signal(signal.SIGTERM)
        assert caller.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        os.close(ready)
        _kill_marked(marker)  # the child the command abandoned, as it would one stuck in the kernel


def test_a_full_filesystem_is_one_line_per_failure_and_the_rest_still_runs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    full = tmp_path / "full"
    full.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,nr_inodes=4", "toilcoord-full", str(full)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        # The dead arena needs its mutex's lock file made: no inode is left.
        (full / "gone-arena-live").write_text("")
        (full / "toil-mutex-dead").write_text("")
        while True:
            try:
                (full / f"filler-{len(os.listdir(full))}").write_text("")
            except OSError:
                break
        done = cleanup("--dir", str(full))
        assert done.returncode == 1, done.stdout + done.stderr
        assert done.stderr.count("\n") == 1 and "could not clean arena" in done.stderr
        assert "No space left on device" in done.stderr and "Traceback" not in done.stderr
        assert "mutexes: removed 1 lock files left by dead holders" in done.stdout, "the next step still ran"
    finally:
        subprocess.run(["umount", str(full)], timeout=30)


def test_a_dead_owners_foreign_state_file_is_reported_as_foreign_not_live():
    findings = [
        Finding(
            "left",
            "deferred",
            "deferred/toilcoord-func1",
            "foreign",
            "belongs to uid 0, not to this user (uid 1000); its owner is dead: skipped",
        )
    ]
    lines = summary_lines(findings)
    assert (
        lines[0]
        == "deferred functions: ran those of 0 dead processes; 0 live state files left; 1 skipped because foreign"
    )
    assert "skipped deferred/toilcoord-func1: belongs to uid 0" in lines[-1]


def test_check_is_one_ok_line_and_leaves_nothing(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "toilcoord", "check", "--dir", str(tmp_path)],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0 and done.stdout.startswith("OK: ") and done.stdout.count("\n") == 1, done
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("directory, why", [("/proc", "pseudo filesystem"), ("/nonexistent/x", "does not exist")])
def test_check_failure_is_one_error_line_and_exit_1(directory, why):
    done = subprocess.run(
        [sys.executable, "-m", "toilcoord", "check", "--dir", directory],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1 and done.stdout.startswith("ERROR: ") and why in done.stdout, done
    assert done.stdout.count("\n") == 1 and done.stderr == ""


def test_check_of_a_hung_directory_answers_within_its_watchdog(tmp_path, children):
    # The check's mutex held by a stopped process: the check gives up.
    holder = children.python(
        HOLD_MUTEX,
        str(tmp_path),
        f"toilcoord-check-{os.uname().nodename}",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdout.readline().strip() == b"held"
    done = subprocess.run(
        [sys.executable, "-m", "toilcoord", "check", "--dir", str(tmp_path)],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1 and done.stdout.startswith("ERROR: ") and done.stdout.count("\n") == 1, done


def test_a_vendored_copy_names_itself_by_its_module_path(tmp_path):
    import shutil

    shutil.copytree(
        os.path.join(ROOT, "toilcoord"), tmp_path / "vendor" / "toilcoord", ignore=shutil.ignore_patterns("__pycache__")
    )
    (tmp_path / "vendor" / "__init__.py").write_text("")
    done = subprocess.run(
        [sys.executable, "-B", "-m", "vendor.toilcoord", "--bogus"],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and done.stderr.startswith("python -m vendor.toilcoord: error:"), done.stderr
    helped = subprocess.run(
        [sys.executable, "-B", "-m", "vendor.toilcoord", "cleanup", "--help"],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "usage: python -m vendor.toilcoord cleanup" in helped.stdout


def test_cleanup_works_in_the_directory_it_opened_when_its_path_is_swapped_meanwhile(tmp_path):
    from toilcoord.cleanup import cleanup_findings

    mine, victim = tmp_path / "mine", tmp_path / "victim"
    for directory in (mine, victim):
        directory.mkdir()
        for name in ("toil-proc-0123456789abcdef", "toil-mutex-m"):
            (directory / name).write_text("")  # unlocked: dead
    findings = cleanup_findings(str(mine))
    first = next(findings)
    assert first.kind == "process name" and first.action == "removed"
    aside = tmp_path / "mine-aside"
    os.rename(mine, aside)
    os.symlink(victim, mine)  # between two steps
    rest = list(findings)
    assert sorted(os.listdir(victim)) == ["toil-mutex-m", "toil-proc-0123456789abcdef"], "acted on the swapped path"
    assert os.listdir(aside) == []
    assert [(f.action, f.kind) for f in rest] == [("removed", "mutex")]
