"""Tests for toilcoord.status and ``python -m toilcoord status``: live,
dead and planted holders, in real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from toilcoord.status import directory_status, format_status

from conftest import ROOT, blocked_on_flock, child_env, release, wait_until

pytestmark = pytest.mark.timeout(60)

# Holds mutex "m" in argv[1] with purpose argv[2], takes a process name and
# enters arena "a" there, says "ready", and lets go when stdin closes.
HOLD_ALL = """
import sys
from toilcoord.arena import LastProcessStandingArena
from toilcoord.mutex import global_mutex
from toilcoord.procnames import get_process_name
print(get_process_name(sys.argv[1]), flush=True)
LastProcessStandingArena(sys.argv[1], "a").enter()
with global_mutex(sys.argv[1], "m", purpose=sys.argv[2]):
    print("ready", flush=True)
    sys.stdin.read()
"""

# Waits for mutex "m" in argv[1].
WAIT = """
import sys
from toilcoord.mutex import global_mutex
with global_mutex(sys.argv[1], "m"):
    pass
"""

# Defers two functions that would create argv[2], says "deferred", waits.
DEFER = """
import pathlib, sys
from toilcoord.deferred import DeferredFunctionManager
with DeferredFunctionManager(sys.argv[1]) as manager:
    with manager.open() as defer:
        defer(pathlib.Path(sys.argv[2]).touch)
        defer(pathlib.Path(sys.argv[2]).touch)
        print("deferred", flush=True)
        sys.stdin.read()
"""

# Holds argv[1] with a bare flock (as Toil's mutex does: no record).
HOLD_BARE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def start(children, code, *args, **popen):
    return children.python(code, *map(str, args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **popen)


def start_all(children, directory, purpose="nightly build"):
    holder = start(children, HOLD_ALL, directory, purpose)
    name = holder.stdout.readline().strip()
    assert holder.stdout.readline() == "ready\n"
    return holder, name


def snapshot(directory):
    """Every file under *directory* with its size, mtime and inode."""
    found = {}
    for top, dirs, files in os.walk(directory):
        for name in dirs + files:
            info = os.lstat(os.path.join(top, name))
            found[os.path.join(top, name)] = (info.st_size, info.st_mtime_ns, info.st_ino)
    return found


def by_name(entries):
    return {entry["name"]: entry for entry in entries}


def status_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "toilcoord", "status", *args],
        env=child_env(),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_live_holder_is_shown_with_its_purpose_and_waiters(tmp_path, children):
    holder, name = start_all(children, tmp_path)
    waiter = children.python(WAIT, str(tmp_path))
    wait_until(lambda: blocked_on_flock(waiter.pid))
    before = snapshot(tmp_path)
    report = directory_status(str(tmp_path))
    assert snapshot(tmp_path) == before, "status changed something"
    mutex = by_name(report["mutexes"])["m"]
    assert mutex["held"] is True and mutex["waiters"] == 1
    assert mutex["holder"]["pid"] == holder.pid and mutex["holder"]["purpose"] == "nightly build"
    assert mutex["holder"]["verified"] is True and mutex["holder"]["host"] == os.uname().nodename
    assert by_name(report["process_names"])[name]["alive"] is True
    assert by_name(report["arenas"])["a"] == {"name": "a", "members": 1, "live": True, "owner_uid": os.geteuid()}
    assert report["skipped"] == []
    json.dumps(report)
    release(holder)
    assert waiter.wait() == 0


def test_a_killed_holder_is_not_shown_as_holding_and_nothing_is_removed(tmp_path, children):
    holder, name = start_all(children, tmp_path, purpose="doomed")
    holder.kill()
    holder.wait()
    before = snapshot(tmp_path)
    report = directory_status(str(tmp_path))
    assert snapshot(tmp_path) == before
    mutex = by_name(report["mutexes"])["m"]
    assert (mutex["held"], mutex["holder"]) == (False, None)
    assert by_name(report["process_names"])[name]["alive"] is False
    assert by_name(report["arenas"])["a"]["live"] is False
    # Another process now holds the file without recording itself: the
    # dead holder's record stays in it, and must not be taken for its.
    bare = start(children, HOLD_BARE, tmp_path / "toil-mutex-m")
    assert bare.stdout.readline() == "held\n"
    mutex = by_name(directory_status(str(tmp_path))["mutexes"])["m"]
    assert (mutex["held"], mutex["holder"], mutex["waiters"]) == (True, None, 0)
    release(bare)


def test_deferred_functions_are_counted_per_owner_never_run(tmp_path, children):
    marker = tmp_path / "ran"
    deferring = start(children, DEFER, tmp_path, marker)
    assert deferring.stdout.readline() == "deferred\n"
    (files,) = directory_status(str(tmp_path))["deferred"]["files"]
    assert (files["format"], files["pending"], files["owner_alive"]) == ("toilcoord", 2, True)
    deferring.kill()
    deferring.wait()
    (tmp_path / "deferred" / "func0123abcd").write_bytes(b"\x80\x04not ours: a dill pickle of Toil's")
    deferred = directory_status(str(tmp_path))["deferred"]
    files = by_name(deferred["files"])
    assert files["func0123abcd"]["format"] == "toil" and files["func0123abcd"]["pending"] is None
    (ours,) = [entry for name, entry in files.items() if name.startswith("toilcoord-func")]
    assert (ours["pending"], ours["owner_alive"]) == (2, False)
    assert deferred["owners"] == [{"uid": os.geteuid(), "files": 2, "pending": 2, "uncounted": 1}]
    assert not marker.exists(), "a deferred function ran"


def test_planted_entries_are_skipped_without_blocking(tmp_path, children):
    os.symlink("/etc/passwd", tmp_path / "toil-mutex-link")
    os.mkfifo(tmp_path / "toil-mutex-fifo")
    os.mkfifo(tmp_path / "toil-proc-fifo")
    os.mkdir(tmp_path / "x-arena-live")
    with open(tmp_path / "toil-mutex-huge", "wb") as huge:
        huge.truncate(1 << 40)  # sparse: 1 TiB that must not be read
    (tmp_path / "toil-mutex-garbage").write_bytes(os.urandom(512))
    garbage = start(children, HOLD_BARE, tmp_path / "toil-mutex-garbage")
    assert garbage.stdout.readline() == "held\n"
    (tmp_path / "deferred").mkdir(mode=0o700)
    with open(tmp_path / "deferred" / "toilcoord-funchuge", "wb") as huge:
        huge.write(b"\xdfFP\x01" + (1 << 29).to_bytes(4, "little") + bytes(4))  # a record header
        huge.truncate(1 << 30)
    os.mkfifo(tmp_path / "deferred" / "funcfifo")
    report = directory_status(str(tmp_path))
    skipped = {entry["name"]: entry["reason"] for entry in report["skipped"]}
    assert skipped == {
        "toil-mutex-link": "a symbolic link",
        "toil-mutex-fifo": "a FIFO",
        "toil-proc-fifo": "a FIFO",
        "x-arena-live": "a directory",
        "deferred/funcfifo": "a FIFO",
    }
    mutexes = by_name(report["mutexes"])
    assert set(mutexes) == {"huge", "garbage"}
    assert (mutexes["huge"]["held"], mutexes["huge"]["holder"]) == (False, None)
    assert (mutexes["garbage"]["held"], mutexes["garbage"]["holder"]) == (True, None)
    (huge,) = report["deferred"]["files"]
    assert (huge["format"], huge["pending"]) == ("toilcoord", None)
    release(garbage)


def test_a_hostile_name_reaches_the_table_escaped(tmp_path):
    (tmp_path / "toil-mutex-\x1b]0;pwned\x07").write_bytes(b"")
    table = format_status(directory_status(str(tmp_path)))
    assert "\x1b" not in table and "\x07" not in table and "pwned" in table


def test_another_users_files_are_reported_as_theirs(tmp_path, children, other_user):
    (tmp_path / "deferred").mkdir(mode=0o700)
    theirs = tmp_path / "deferred" / "toilcoord-func00000000000000aa"
    theirs.write_bytes(b"")
    os.chown(theirs, *other_user)
    name = tmp_path / "toil-proc-0123456789abcdef"
    name.write_bytes(b"")
    os.chown(name, *other_user)
    report = directory_status(str(tmp_path))
    assert by_name(report["process_names"])[name.name] == {
        "name": name.name,
        "alive": False,
        "owner_uid": other_user[0],
    }
    assert report["deferred"]["owners"] == [{"uid": other_user[0], "files": 1, "pending": 0, "uncounted": 0}]
    assert name.exists() and theirs.exists()


def test_the_command_prints_a_table_or_one_json_document(tmp_path, children):
    holder, _ = start_all(children, tmp_path, purpose="shown")
    table = status_cli("--dir", str(tmp_path))
    assert table.returncode == 0 and table.stderr == ""
    assert f"by pid {holder.pid}" in table.stdout and "'shown'" in table.stdout
    document = status_cli("--dir", str(tmp_path), "--json")
    assert document.returncode == 0
    assert json.loads(document.stdout)["mutexes"][0]["holder"]["pid"] == holder.pid
    release(holder)


@pytest.mark.parametrize("where", ["missing", "empty", "file", "symlink"])
def test_a_directory_that_cannot_be_read_is_one_line_and_exit_1(tmp_path, where):
    path = {
        "missing": str(tmp_path / "nowhere"),
        "empty": "",
        "file": str(tmp_path / "file"),
        "symlink": str(tmp_path / "link"),
    }[where]
    (tmp_path / "file").write_text("")
    os.symlink(tmp_path, tmp_path / "link")
    run = status_cli("--dir", path)
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


@pytest.mark.parametrize("args", [[], ["--dir"], ["--dir", "x", "--bogus"]])
def test_usage_errors_exit_2(args):
    run = status_cli(*args)
    assert run.returncode == 2 and "Traceback" not in run.stderr


# Holds 2 of the slots "gpus" (ids 0, 1, 2) in argv[1] with purpose argv[2].
HOLD_SLOTS = """
import sys
from toilcoord.slots import ResourceSlots
with ResourceSlots(sys.argv[1], "gpus", ["0", "1", "2"]).acquire(2, purpose=sys.argv[2]) as ids:
    print(",".join(ids), flush=True)
    sys.stdin.read()
"""


def test_slots_are_shown_with_who_holds_which(tmp_path, children):
    holder = start(children, HOLD_SLOTS, tmp_path, "training run 7")
    assert holder.stdout.readline() == "0,1\n"
    open(tmp_path / "toil-mutex-gpus.slot-2", "w").close()  # a slot someone used once, free now
    report = directory_status(str(tmp_path))
    slots = {entry["slot"]: entry for entry in report["slots"]}
    assert sorted(slots) == ["0", "1", "2"] and {entry["name"] for entry in report["slots"]} == {"gpus"}
    for held in "01":
        assert slots[held]["held"] is True
        assert (slots[held]["holder"]["pid"], slots[held]["holder"]["purpose"]) == (holder.pid, "training run 7")
    assert (slots["2"]["held"], slots["2"]["holder"]) == (False, None)
    assert not any(entry["name"].startswith("gpus.slot-") for entry in report["mutexes"])
    assert "gpus slot 1  held  by pid %d" % holder.pid in format_status(report)
    release(holder)
