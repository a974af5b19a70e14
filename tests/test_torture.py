"""The torture tool (every primitive at once under random SIGKILLs): its
runs, its arguments, that it fails when a primitive is broken, and the
soundness of its checks. The seeded fuzzers of library modules live with
those modules' tests (tests/fuzzing.py holds what they share).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from toilcoord._tools.torture_check import check_journal

from conftest import ROOT, child_env, run_python
from fuzzing import SEED

# ------------------------------------------------------------- torture runs


def torture(tmp_path, *args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "toilcoord", "torture", "--dir", str(tmp_path), *args],
        env=child_env(),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def invariant_lines(output):
    return [line for line in output.splitlines() if re.match(r"(ok|FAIL)\s", line)]


@pytest.mark.timeout(240)
def test_short_torture_run_holds_every_invariant(tmp_path):
    done = torture(tmp_path, "--seconds", "8", "--procs", "4", "--seed", str(SEED))
    lines = invariant_lines(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(lines) == 10 and all(line.startswith("ok") for line in lines), done.stdout
    assert re.search(r"SIGKILLed [1-9]\d* workers", done.stdout), done.stdout
    assert os.listdir(tmp_path) == [], "a passing run removes its directory"


@pytest.mark.timeout(240)
def test_torture_split_across_two_mounts_of_one_directory(tmp_path):
    # The NFS rig splits the workers over two NFS clients of one export;
    # here a bind mount (in a private mount namespace) is the second view.
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare for a private bind mount")
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    script = (
        'mount --bind "$1" "$2" && exec "$3" -m toilcoord torture --seconds 4 --procs 4 --dir "$1" --split-dir "$2"'
    )
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, "sh", str(first), str(second), sys.executable],
        env=child_env(),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=200,
    )
    if "mount" in done.stderr and done.returncode != 0 and not invariant_lines(done.stdout):
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(line.startswith("ok") for line in invariant_lines(done.stdout)), done.stdout
    assert os.listdir(first) == []


def test_split_dir_needs_dir(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "toilcoord", "torture", "--split-dir", str(tmp_path)],
        env=child_env(),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--split-dir needs --dir" in done.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_long_torture_run_holds_every_invariant(tmp_path):
    done = torture(tmp_path, "--seconds", "120", "--procs", "8", "--seed", str(SEED), timeout=800)
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(line.startswith("ok") for line in invariant_lines(done.stdout)), done.stdout


@pytest.mark.timeout(120)
def test_lifetime_sets_how_long_killable_workers_live(tmp_path):
    # 3 killable workers living 2 s on average: one killed every 0.67 s
    # (the default 0.2 s would kill one every 0.07 s, some 45 in 3 s).
    done = torture(tmp_path, "--seconds", "3", "--procs", "4", "--lifetime", "2", "--seed", str(SEED), timeout=100)
    assert done.returncode == 0, done.stdout + done.stderr
    kills = int(re.search(r"SIGKILLed (\d+) workers", done.stdout).group(1))
    assert 2 <= kills <= 12, done.stdout


@pytest.mark.parametrize(
    "args", [["--procs", "1"], ["--seconds", "0"], ["--procs", "x"], ["--lifetime", "0"], ["--lifetime", "-1"]]
)
def test_bad_torture_arguments_are_one_line_usage_errors(tmp_path, args):
    done = torture(tmp_path, *args, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("python -m toilcoord: error:"), done.stderr
    assert os.listdir(tmp_path) == []


def test_the_package_never_imports_its_tooling():
    done = run_python("import sys, toilcoord; print(any(name.startswith('toilcoord._tools') for name in sys.modules))")
    assert done.stdout.strip() == "False", done.stderr


# A run whose primitive is sabotaged must fail, on the matching line.
SABOTAGED = """
import contextlib, sys
import toilcoord._tools.torture as torture
import toilcoord._tools.torture_workers as workers
{sabotage}
ok = torture.run_torture(sys.argv[1], seconds=float(sys.argv[2]), procs=3, seed=1)
sys.exit(0 if ok else 1)
"""

SABOTAGES = {
    "mutex exclusion": "workers.global_mutex = lambda *args, **kwargs: contextlib.nullcontext()",
    # Every member reads as dead, so the first to leave cleans up under the others.
    "arena last one out": "import toilcoord.arena as arena; arena._last_to_leave = lambda gate: True",
    # Nothing is ever marked done: what returned runs again.
    "deferred functions": "import toilcoord.deferred_records as records; records._DONE_BYTE = bytes((records._PENDING,))",
    # Slots handed out whether taken or not.
    "never more holders than slots": "import toilcoord.slots as slots; "
    "slots.ResourceSlots.acquire = lambda self, n=1, timeout=None: "
    "contextlib.nullcontext(tuple(self.ids[:n]))",
    # Writers exclude each other (on a lock file of their own) but not readers.
    "never a writer beside anyone": "real = workers.global_mutex; "
    "workers.global_mutex = lambda base, name, *args, shared=False, **kwargs: "
    "real(base, name + ('' if shared else '.apart'), *args, shared=shared, **kwargs)",
}
DEFAULT_SABOTAGES = ["mutex exclusion", "never more holders than slots", "never a writer beside anyone"]


@pytest.mark.parametrize(
    "broken",
    DEFAULT_SABOTAGES
    + [pytest.param(other, marks=pytest.mark.slow) for other in sorted(set(SABOTAGES) - set(DEFAULT_SABOTAGES))],
)
@pytest.mark.timeout(120)
def test_the_torture_fails_when_a_primitive_is_broken(tmp_path, broken):
    run_sabotaged(tmp_path, broken)


def run_sabotaged(tmp_path, broken):
    done = run_python(SABOTAGED.format(sabotage=SABOTAGES[broken]), str(tmp_path), "4", timeout=100)
    failed = [line for line in invariant_lines(done.stdout) if line.startswith("FAIL")]
    assert done.returncode == 1, done.stdout + done.stderr
    assert any(line.split("  ")[1].strip().startswith(broken) for line in failed), done.stdout


# ------------------------------------------------- soundness of the checks


def journal(*records):
    return "".join("@%s\n" % record for record in records).encode()


def verdict(data, name):
    return next(invariant for invariant in check_journal(data) if invariant.name == name)


def test_a_potato_found_while_its_holder_lived_on_is_an_overlap():
    fine = journal("i1 mutex", "sup killed i1 3 random", "i2 potato-orphan i1", "i2 mutex")
    overlap = journal("i1 mutex", "i2 potato-orphan i1", "i2 mutex", "i1 mutex")
    never_killed = journal("i1 mutex", "i2 potato-orphan i1", "i2 mutex")
    assert verdict(fine, "mutex exclusion").held
    assert not verdict(overlap, "mutex exclusion").held
    assert not verdict(never_killed, "mutex exclusion").held


def test_an_arena_cleanup_while_a_member_is_inside_is_caught():
    fine = journal(
        "i1 arena-entered i1.a1",
        "i2 arena-entered i2.a2",
        "i1 arena-leaving i1.a1",
        "i2 arena-leaving i2.a2",
        "i2 arena-clean-begin",
        "i2 arena-clean-end removed=2 died-inside=0",
    )
    inside = journal(
        "i1 arena-entered i1.a1",
        "i2 arena-entered i2.a2",
        "i2 arena-leaving i2.a2",
        "i2 arena-clean-begin",
        "i2 arena-clean-end removed=2 died-inside=0",
        "i1 arena-leaving i1.a1",
    )
    died_inside = journal(
        "i1 arena-entered i1.a1",
        "sup killed i1 5 random",
        "i2 arena-entered i2.a2",
        "i2 arena-leaving i2.a2",
        "i2 arena-clean-begin",
        "i2 arena-clean-end removed=2 died-inside=1",
    )
    assert verdict(fine, "arena last one out").held
    assert not verdict(inside, "arena last one out").held
    assert verdict(died_inside, "arena last one out").held


def test_two_cleanups_of_one_generation_are_caught():
    twice = journal(
        "i1 arena-entered i1.a1",
        "i2 arena-entered i2.a2",
        "i1 arena-leaving i1.a1",
        "i2 arena-leaving i2.a2",
        "i1 arena-clean-begin",
        "i1 arena-clean-end removed=2 died-inside=0",
        "i2 arena-clean-begin",
        "i2 arena-clean-end removed=0 died-inside=0",
    )
    redone = journal(
        "i1 arena-entered i1.a1",
        "i1 arena-leaving i1.a1",
        "i1 arena-clean-begin",
        "sup killed i1 7 random",
        "i2 arena-entered i2.a2",
        "i2 arena-leaving i2.a2",
        "i2 arena-clean-begin",
        "i2 arena-clean-end removed=1 died-inside=0",
    )
    assert not verdict(twice, "arena last one out").held
    assert verdict(redone, "arena last one out").held


def test_a_deferred_function_that_returned_and_ran_again_is_caught():
    head = ("i1 registered i1.d1", "i1 deferred i1.d1")
    # i1 ran it and lived on (so its done mark was written): a second run is a violation.
    again = journal(*head, "i1 ran i1.d1", "i1 mutex", "i2 ran i1.d1")
    # i1 was killed right after its effect, before the done mark: may run again.
    cut = journal(*head, "i1 ran i1.d1", "sup killed i1 11 random", "i2 ran i1.d1", "i2 mutex")
    stolen = journal(*head, "i2 ran i1.d1", "i1 mutex")
    lost = journal(*head, "sup killed i1 1 random")
    assert not verdict(again, "deferred functions").held
    assert verdict(cut, "deferred functions").held
    assert not verdict(stolen, "deferred functions").held
    assert not verdict(lost, "deferred functions").held


def test_process_names_read_wrong_either_way_are_caught():
    head = ("i1 name toil-proc-1", "i2 name toil-proc-2")
    assert verdict(
        journal(
            *head,
            "i2 polling",
            "i2 poll toil-proc-1 1",
            "sup killed i1 0 random",
            "i2 polling",
            "i2 poll toil-proc-1 0",
        ),
        "process names",
    ).held
    assert not verdict(journal(*head, "i2 polling", "i2 poll toil-proc-1 0", "i1 mutex"), "process names").held
    assert not verdict(
        journal(*head, "sup killed i1 0 random", "i2 polling", "i2 poll toil-proc-1 1"), "process names"
    ).held
    # Probed while i1 lived, recorded after it was reaped: not a violation.
    assert verdict(
        journal(*head, "i2 polling", "sup killed i1 0 random", "i2 poll toil-proc-1 1"), "process names"
    ).held


def test_a_name_read_dead_while_its_owner_gives_it_up_is_not_a_violation():
    # A stopping worker removes its name file, then records "stopped": a
    # probe in between rightly reads it dead (its owner wrote after).
    head = ("i1 name toil-proc-1", "i2 name toil-proc-2", "i2 polling")
    stopping = journal(*head, "i1 unnaming", "i2 poll toil-proc-1 0", "i1 stopped")
    assert verdict(stopping, "process names").held
    before = journal(*head, "i2 poll toil-proc-1 0", "i1 unnaming", "i1 stopped")
    assert not verdict(before, "process names").held


def test_a_slot_held_by_two_at_once_is_caught():
    fine = journal(
        "i1 slots-held 0 3",
        "i2 slots-held 1,2 3",
        "i1 slots-free 0",
        "i2 slots-free 1,2",
        "i3 slots-held 0,1,2 3",
        "i3 slots-free 0,1,2",
    )
    shared_slot = journal("i1 slots-held 0 3", "i2 slots-held 1,0 3", "i1 slots-free 0", "i2 slots-free 1,0")
    too_many = journal("i1 slots-held 0,1 2", "i2 slots-held 2 2", "i1 slots-free 0,1", "i2 slots-free 2")
    assert verdict(fine, "never more holders than slots").held
    assert not verdict(shared_slot, "never more holders than slots").held
    assert not verdict(too_many, "never more holders than slots").held


def test_a_slot_taken_from_a_holder_is_fine_only_once_the_holder_was_killed():
    # i1 dies holding slot 0; i2 finds its mark: fine, i1 was killed and never wrote again.
    killed = journal(
        "i1 slots-held 0 3",
        "i1 mutex",
        "sup killed i1 16 random",
        "i2 slot-orphan i1 0",
        "i2 slots-held 0 3",
        "i2 slots-free 0",
    )
    # i1's hold is open until its last record: i2 held slot 0 inside it.
    lived_on = journal(
        "i1 slots-held 0 3",
        "i2 slot-orphan i1 0",
        "i2 slots-held 0 3",
        "i1 mutex",
        "sup killed i1 16 random",
        "i2 slots-free 0",
    )
    never_killed = journal("i1 slots-held 0 3", "i2 slot-orphan i1 0", "i2 slots-held 0 3", "i2 slots-free 0")
    assert verdict(killed, "never more holders than slots").held
    assert not verdict(lived_on, "never more holders than slots").held
    assert not verdict(never_killed, "never more holders than slots").held


def test_a_writer_beside_a_reader_or_a_writer_is_caught():
    name = "never a writer beside anyone"
    readers = ("i1 rw-read", "i2 rw-read", "i1 rw-read-end", "i2 rw-read-end")
    assert verdict(journal(*readers, "i3 rw-write", "i3 rw-write-end"), name).held
    assert not verdict(journal("i1 rw-read", "i3 rw-write", "i3 rw-write-end", "i1 rw-read-end"), name).held
    assert not verdict(journal(*readers, "i3 rw-write", "i1 rw-read", "i1 rw-read-end", "i3 rw-write-end"), name).held
    assert not verdict(journal(*readers, "i3 rw-write", "i4 rw-write", "i3 rw-write-end", "i4 rw-write-end"), name).held
    # A reader killed inside: its mark is the next writer's to remove, once it is dead.
    died = ("i1 rw-read", "sup killed i1 18 random", "i3 rw-orphan i1 r-i1", "i3 rw-write", "i3 rw-write-end")
    assert verdict(journal(*died), name).held
    assert not verdict(journal("i1 rw-read", "i3 rw-orphan i1 r-i1", "i3 rw-write", "i3 rw-write-end"), name).held


def test_torn_journal_records_are_counted_not_misread():
    data = journal("i1 mutex") + b"@i2 ran i1.d" + journal("i3 mutex")
    assert "1 torn" in verdict(data, "no worker errors").detail


@pytest.mark.parametrize("cut", [b"@", b"@i", b"@i1", b"@i17", b"@i17 ar", b"@i17 arena-entered i17.a1"])
def test_a_record_cut_by_a_kill_anywhere_even_in_its_writers_name_is_expected(cut):
    # A SIGKILL ends a write at a page boundary of the file, which may fall
    # inside the writer's name: "@i1" of "@i17 ...", while i1 lives on.
    killed = journal("i1 mutex", "i17 mutex") + cut + journal("sup killed i17 3 random", "i1 mutex")
    detail = verdict(killed, "no worker errors").detail
    assert "0 torn journal records (and 1 cut short by SIGKILL)" in detail
    nobody_killed = journal("i1 mutex", "i17 mutex") + cut + journal("i1 mutex")
    assert "1 torn" in verdict(nobody_killed, "no worker errors").detail


def test_a_record_with_a_line_break_inside_is_torn_even_by_a_killed_writer():
    data = journal("i17 mutex") + b"@i17 ran\ni1.d\n" + journal("sup killed i17 3 random")
    assert "1 torn" in verdict(data, "no worker errors").detail
