"""The torture run (every primitive at once under random SIGKILLs), the
soundness of its checks, and seeded fuzzing of what users' environments
throw at toilcoord: corrupt deferred state files, hostile datagrams, odd
mountinfo lines, odd mutex and arena names.

Every fuzzer is seeded (``TOILCOORD_FUZZ_SEED`` overrides the seed) and
reproducible; the default suite runs small sizes, ``-m slow`` big ones.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, child_env, run_python

from toilcoord import LastProcessStandingArena, global_mutex, process_name_exists
from toilcoord.deferred import DeferredFunctionManager
from toilcoord.mounts import filesystem_info, parse_mountinfo
from toilcoord.mutex import retire_mutex_files
from toilcoord.rtlog import RealtimeLogHandler, RealtimeLogServer
from toilcoord._tools.torture_check import check_journal

SEED = int(os.environ.get("TOILCOORD_FUZZ_SEED", "20261121"))


def sizes(default, slow):
    """Parameters for a fuzzer: *default* in every run, *slow* behind -m slow."""
    return [default, pytest.param(slow, marks=(pytest.mark.slow, pytest.mark.timeout(900)))]


def rng_for(name):
    return random.Random("%d:%s" % (SEED, name))


def random_bytes(rng, count):
    return bytes(rng.getrandbits(8) for _ in range(count))


# ------------------------------------------------------------- torture runs

def torture(tmp_path, *args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "toilcoord", "torture", "--dir", str(tmp_path), *args],
        env=child_env(), cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


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
    script = 'mount --bind "$1" "$2" && exec "$3" -m toilcoord torture --seconds 4 --procs 4 --dir "$1" --split-dir "$2"'
    done = subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", str(first), str(second), sys.executable],
                          env=child_env(), cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=200)
    if "mount" in done.stderr and done.returncode != 0 and not invariant_lines(done.stdout):
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(line.startswith("ok") for line in invariant_lines(done.stdout)), done.stdout
    assert os.listdir(first) == []


def test_split_dir_needs_dir(tmp_path):
    done = subprocess.run([sys.executable, "-m", "toilcoord", "torture", "--split-dir", str(tmp_path)],
                          env=child_env(), cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "--split-dir needs --dir" in done.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_long_torture_run_holds_every_invariant(tmp_path):
    done = torture(tmp_path, "--seconds", "120", "--procs", "8", "--seed", str(SEED), timeout=800)
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(line.startswith("ok") for line in invariant_lines(done.stdout)), done.stdout


@pytest.mark.parametrize("args", [["--procs", "1"], ["--seconds", "0"], ["--procs", "x"]])
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
    "arena last one out": "import os, toilcoord.arena as arena; arena.take_over = lambda path: os.open(path, os.O_RDONLY)",
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


@pytest.mark.parametrize("broken", DEFAULT_SABOTAGES + [
    pytest.param(other, marks=pytest.mark.slow) for other in sorted(set(SABOTAGES) - set(DEFAULT_SABOTAGES))])
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
    fine = journal("i1 arena-entered i1.a1", "i2 arena-entered i2.a2", "i1 arena-leaving i1.a1",
                   "i2 arena-leaving i2.a2", "i2 arena-clean-begin", "i2 arena-clean-end removed=2 died-inside=0")
    inside = journal("i1 arena-entered i1.a1", "i2 arena-entered i2.a2", "i2 arena-leaving i2.a2",
                     "i2 arena-clean-begin", "i2 arena-clean-end removed=2 died-inside=0", "i1 arena-leaving i1.a1")
    died_inside = journal("i1 arena-entered i1.a1", "sup killed i1 5 random", "i2 arena-entered i2.a2",
                          "i2 arena-leaving i2.a2", "i2 arena-clean-begin",
                          "i2 arena-clean-end removed=2 died-inside=1")
    assert verdict(fine, "arena last one out").held
    assert not verdict(inside, "arena last one out").held
    assert verdict(died_inside, "arena last one out").held


def test_two_cleanups_of_one_generation_are_caught():
    twice = journal("i1 arena-entered i1.a1", "i2 arena-entered i2.a2", "i1 arena-leaving i1.a1",
                    "i2 arena-leaving i2.a2", "i1 arena-clean-begin", "i1 arena-clean-end removed=2 died-inside=0",
                    "i2 arena-clean-begin", "i2 arena-clean-end removed=0 died-inside=0")
    redone = journal("i1 arena-entered i1.a1", "i1 arena-leaving i1.a1", "i1 arena-clean-begin",
                     "sup killed i1 7 random", "i2 arena-entered i2.a2", "i2 arena-leaving i2.a2",
                     "i2 arena-clean-begin", "i2 arena-clean-end removed=1 died-inside=0")
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
    assert verdict(journal(*head, "i2 polling", "i2 poll toil-proc-1 1", "sup killed i1 0 random",
                           "i2 polling", "i2 poll toil-proc-1 0"), "process names").held
    assert not verdict(journal(*head, "i2 polling", "i2 poll toil-proc-1 0", "i1 mutex"), "process names").held
    assert not verdict(journal(*head, "sup killed i1 0 random", "i2 polling", "i2 poll toil-proc-1 1"),
                       "process names").held
    # Probed while i1 lived, recorded after it was reaped: not a violation.
    assert verdict(journal(*head, "i2 polling", "sup killed i1 0 random", "i2 poll toil-proc-1 1"),
                   "process names").held


def test_a_slot_held_by_two_at_once_is_caught():
    fine = journal("i1 slots-held 0 3", "i2 slots-held 1,2 3", "i1 slots-free 0", "i2 slots-free 1,2",
                   "i3 slots-held 0,1,2 3", "i3 slots-free 0,1,2")
    shared_slot = journal("i1 slots-held 0 3", "i2 slots-held 1,0 3", "i1 slots-free 0", "i2 slots-free 1,0")
    too_many = journal("i1 slots-held 0,1 2", "i2 slots-held 2 2", "i1 slots-free 0,1", "i2 slots-free 2")
    assert verdict(fine, "never more holders than slots").held
    assert not verdict(shared_slot, "never more holders than slots").held
    assert not verdict(too_many, "never more holders than slots").held


def test_a_slot_taken_from_a_holder_is_fine_only_once_the_holder_was_killed():
    # i1 dies holding slot 0; i2 finds its mark: fine, i1 was killed and never wrote again.
    killed = journal("i1 slots-held 0 3", "i1 mutex", "sup killed i1 16 random", "i2 slot-orphan i1 0",
                     "i2 slots-held 0 3", "i2 slots-free 0")
    # i1's hold is open until its last record: i2 held slot 0 inside it.
    lived_on = journal("i1 slots-held 0 3", "i2 slot-orphan i1 0", "i2 slots-held 0 3", "i1 mutex",
                       "sup killed i1 16 random", "i2 slots-free 0")
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
    assert not verdict(journal(*readers, "i3 rw-write", "i4 rw-write", "i3 rw-write-end", "i4 rw-write-end"),
                       name).held
    # A reader killed inside: its mark is the next writer's to remove, once it is dead.
    died = ("i1 rw-read", "sup killed i1 18 random", "i3 rw-orphan i1 r-i1", "i3 rw-write", "i3 rw-write-end")
    assert verdict(journal(*died), name).held
    assert not verdict(journal("i1 rw-read", "i3 rw-orphan i1 r-i1", "i3 rw-write", "i3 rw-write-end"), name).held


def test_torn_journal_records_are_counted_not_misread():
    data = journal("i1 mutex") + b"@i2 ran i1.d" + journal("i3 mutex")
    assert "1 torn" in verdict(data, "no worker errors").detail


# ------------------------------------------------ fuzz: deferred state files

def record(path, tag):
    """The deferred function of the state-file fuzzers."""
    with open(path, "a") as stream:
        stream.write(tag + "\n")


def ran(path):
    try:
        with open(path) as stream:
            tags = stream.read().split()
    except FileNotFoundError:
        return []
    os.unlink(path)
    return tags


@pytest.fixture(autouse=True)
def inside_tmp_path(tmp_path, monkeypatch):
    # A fuzzed record with a valid checksum may run record() with shuffled
    # arguments, a tag for a path: let relative paths land here.
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def state_file(tmp_path_factory):
    """A real state file of four records, and where each record ends."""
    base = tmp_path_factory.mktemp("source")
    runs = str(base / "runs")
    with DeferredFunctionManager(base) as manager:
        with manager.open() as defer:
            ends = []
            for tag in ("first", "second", "third", "fourth"):
                defer(record, runs, tag)
                ends.append(os.path.getsize(manager.stateFileName))
            with open(manager.stateFileName, "rb") as stream:
                data = stream.read()
    ran(runs)
    return data, ends, runs


def run_as_orphan(base, data, mode=0o600, owner=None):
    """Leave *data* as a dead process's state file and run cleanupWorker."""
    state_dir = base / "deferred"
    state_dir.mkdir(mode=0o700, exist_ok=True)
    path = state_dir / ("func" + os.urandom(4).hex())
    path.write_bytes(data)
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, owner, -1)
    DeferredFunctionManager.cleanupWorker(base)
    return path


def removed_unless_not_ours(base, path, data):
    """A file that does not begin with a record is never deleted; clear it
    away for the next round."""
    from toilcoord.deferred_records import starts_with_a_record
    if starts_with_a_record(data):
        assert not (base / "deferred").exists()
    else:
        path.unlink()  # FileNotFoundError if it was deleted
        (base / "deferred").rmdir()


TAGS = ["first", "second", "third", "fourth"]


def test_a_state_file_cut_at_every_offset_runs_exactly_its_whole_records(tmp_path, state_file, caplog):
    data, ends, runs = state_file
    caplog.set_level(logging.CRITICAL, logger="toilcoord.deferred")  # one error per torn tail
    for offset in range(len(data) + 1):
        run_as_orphan(tmp_path, data[:offset])
        expected = [tag for tag, end in zip(TAGS, ends) if end <= offset]
        assert ran(runs) == expected, "cut at offset %d" % offset
        assert not (tmp_path / "deferred").exists(), "a torn record is still ours to remove"


def flip_bytes(rng, data, count, ends, fix_crc):
    """Change *count* random bytes; return the data, the records left intact
    that come before any damaged header (records are read only at frame
    boundaries: nothing after a header that cannot be trusted runs)."""
    import struct
    import zlib

    data = bytearray(data)
    starts = [0] + ends[:-1]
    touched, headers = set(), set()
    for _ in range(count):
        where = rng.randrange(len(data))
        data[where] = (data[where] + rng.randrange(1, 256)) % 256
        touched.update(index for index, (start, end) in enumerate(zip(starts, ends)) if start <= where < end)
        headers.update(index for index, start in enumerate(starts) if start <= where < start + 12)
    if fix_crc:  # valid frames around mutated pickles: exercises the decoder
        for index in touched:
            start, end = starts[index], ends[index]
            length = struct.unpack_from("<I", data, start + 4)[0]
            if start + 12 + length == end:
                struct.pack_into("<I", data, start + 8, zlib.crc32(bytes(data[start + 12:end])))
    readable = min(headers, default=len(TAGS))
    return bytes(data), [tag for index, tag in enumerate(TAGS) if index not in touched and index < readable]


def fuzz_corrupt_state_files(tmp_path, state_file, rounds):
    data, ends, runs = state_file
    rng = rng_for("state-bytes")
    for round_ in range(rounds):
        fix_crc = round_ % 2 == 1
        corrupt, intact = flip_bytes(rng, data, rng.randint(1, 3), ends, fix_crc)
        path = run_as_orphan(tmp_path, corrupt)
        done = ran(runs)
        context = "round %d (seed %d)" % (round_, SEED)
        assert [tag for tag in done if tag in intact] == intact, context
        if not fix_crc:  # without a valid checksum nothing else can run, nor anything twice
            # (with one, a mutated pickle may record anything, newlines too)
            assert len(done) <= len(TAGS), context
            assert sorted(set(done)) == sorted(done) and set(done) <= set(TAGS), context
        removed_unless_not_ours(tmp_path, path, corrupt)


@pytest.mark.parametrize("rounds", sizes(120, 5000))
def test_corrupt_state_files_never_crash_and_intact_records_run_once(tmp_path, state_file, caplog, rounds):
    caplog.set_level(logging.CRITICAL)
    fuzz_corrupt_state_files(tmp_path, state_file, rounds=rounds)


def fuzz_garbage_state_files(tmp_path, state_file, rounds):
    data, ends, runs = state_file
    rng = rng_for("state-garbage")
    records = [data[start:end] for start, end in zip([0] + ends[:-1], ends)]
    for round_ in range(rounds):
        kept = sorted(rng.sample(range(4), rng.randint(0, 4)))
        garbage = [random_bytes(rng, rng.randrange(0, 300) if rng.random() < 0.7 else 0)]
        pieces, expected = [garbage[0]], []
        for index in kept:
            pieces.append(records[index])
            if not any(garbage):  # only what is framed from offset 0 runs
                expected.append(TAGS[index])
            garbage.append(random_bytes(rng, rng.randrange(0, 40)))
            pieces.append(garbage[-1])
        data = b"".join(pieces)
        path = run_as_orphan(tmp_path, data)
        assert ran(runs) == expected, "round %d (seed %d)" % (round_, SEED)
        removed_unless_not_ours(tmp_path, path, data)


@pytest.mark.parametrize("rounds", sizes(60, 3000))
def test_garbage_before_or_between_records_stops_the_reading(tmp_path, state_file, caplog, rounds):
    caplog.set_level(logging.CRITICAL)
    fuzz_garbage_state_files(tmp_path, state_file, rounds=rounds)


def trusted_and_usable(mode, owner):
    if owner != os.geteuid() or mode & 0o022:
        return False
    return os.geteuid() == 0 or mode & 0o600 == 0o600


def fuzz_owners_and_modes(tmp_path, state_file, modes):
    data, _, runs = state_file
    owners = [os.geteuid()] + ([4242] if os.geteuid() == 0 else [])
    for mode in modes:
        for owner in owners:
            path = run_as_orphan(tmp_path, data, mode=mode, owner=owner if owner != os.geteuid() else None)
            context = "mode %o, owner %d" % (mode, owner)
            if trusted_and_usable(mode, owner):
                assert ran(runs) == TAGS and not path.exists(), context
            else:
                assert ran(runs) == [], context
                os.chmod(path, 0o600)
                assert path.read_bytes() == data, "an untrusted file is left alone: " + context
                path.unlink()


def test_state_files_of_wrong_owners_or_modes_are_never_run(tmp_path, state_file, caplog):
    caplog.set_level(logging.CRITICAL)
    fuzz_owners_and_modes(tmp_path, state_file, rng_for("modes").sample(range(0o1000), 24) + [0o600, 0o620, 0o602])


@pytest.mark.slow
def test_state_files_of_every_mode_and_a_wrong_owner(tmp_path, state_file, caplog):
    caplog.set_level(logging.CRITICAL)
    fuzz_owners_and_modes(tmp_path, state_file, range(0o1000))


# ------------------------------------------------------- fuzz: datagrams

def random_json_value(rng, depth=0):
    choice = rng.randrange(12 if depth < 3 else 8)
    return [
        lambda: None, lambda: rng.random() < 0.5, lambda: rng.randint(-2 ** 70, 2 ** 70),
        lambda: rng.choice([0.0, -1.5, 1e308, -1e308, float("inf"), float("-inf"), float("nan"), 1e11, 3e9]),
        lambda: rng.choice(["", "x", "%s", "%d", "%c", "%(k)s", "%*d", "%.*f", "%0999999999d", "%-99999s",
                            "%", "%%", "\ud800", "\x00", "é" * 50, "%(" * 30]),
        lambda: rng.randint(0, 0x10FFFF * 100), lambda: "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(8)),
        lambda: rng.choice([10 ** 10, -1, 0x110000, 2 ** 63]),
        lambda: [random_json_value(rng, depth + 1) for _ in range(rng.randrange(4))],
        lambda: {rng.choice(["k", "msg", "", "a b"]): random_json_value(rng, depth + 1) for _ in range(rng.randrange(3))},
        lambda: [random_json_value(rng, depth + 1)],
        lambda: {"k": random_json_value(rng, depth + 1)},
    ][choice]()


FIELDS = ["name", "levelno", "levelname", "msg", "args", "created", "msecs", "relativeCreated", "lineno",
          "pathname", "exc_text", "stack_info", "thread", "process", "rt_seq", "rt_sender", "funcName",
          "getMessage", "__dict__", "exc_info", "message", "asctime", "extra"]


def hostile_datagram(rng, real):
    kind = rng.randrange(6)
    if kind == 0:  # random bytes
        return random_bytes(rng, rng.randrange(1, 1200))
    if kind == 1:  # a real record with bytes flipped or cut
        data = bytearray(real)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.getrandbits(8)
        return bytes(data[:rng.randrange(1, len(data) + 1)] if rng.random() < 0.3 else data)
    fields = json.loads(real)
    if kind == 2:  # fields given random values
        for _ in range(rng.randint(1, 4)):
            fields[rng.choice(FIELDS)] = random_json_value(rng)
    elif kind == 3:  # a hostile format with hostile arguments
        fields["msg"] = rng.choice(["%c", "%d", "%*d", "%.*f", "%0999999999d", "%s %s", "%(a)s", "%x", "%%%s"])
        fields["args"] = random_json_value(rng)
    elif kind == 4:  # hostile times
        fields[rng.choice(["created", "msecs", "relativeCreated"])] = random_json_value(rng)
    else:  # deep nesting, huge numbers, odd escapes as raw text
        return rng.choice([b"[" * 5000 + b"]" * 5000, b'{"name":"n","levelno":20,"msg":' + b"1" * 5000 + b"}",
                           b'{"name":"n","levelno":20,"msg":"\\ud800\\udc00\\u0000"}',
                           b'{"name":"n","levelno":20,"msg":"x","args":' + b"[" * 3000 + b"]" * 3000 + b"}"])
    return json.dumps(fields).encode()


class Formatting(logging.Handler):
    """Formats every received record as a leader's handler would."""

    def __init__(self):
        super().__init__()
        self.level = float("-inf")  # see records of any level, negative ones too
        self.setFormatter(logging.Formatter(
            "%(asctime)s %(msecs)03d %(relativeCreated)d %(levelname)s %(name)s %(lineno)d %(message)s"))
        self.seen = []
        self.errors = []
        self.changed = threading.Condition()

    def emit(self, record):
        try:
            text = self.format(record)
        except Exception as error:  # what a leader's formatter would choke on
            self.errors.append("%r: %r" % (error, record.__dict__))
            text = ""
        with self.changed:
            self.seen.append(text)
            self.changed.notify_all()

    def wait_for(self, marker, timeout=30):
        deadline = time.monotonic() + timeout
        with self.changed:
            while not any(marker in text for text in self.seen[-50:]):
                if not self.changed.wait(max(0.0, deadline - time.monotonic())):
                    return False
        return True


def fuzz_datagrams(count, batch=25):
    rng = rng_for("datagrams")
    handler = RealtimeLogHandler("127.0.0.1:9")
    real = handler.encode(logging.LogRecord("worker", logging.INFO, "/w/job.py", 7, "step %d of %s", (3, "x"), None))
    handler.close()
    server = RealtimeLogServer("127.0.0.1", 0, local_socket=False)
    receiver = logging.getLogger(server.logger_name)
    formatting, propagate = Formatting(), receiver.propagate
    receiver.addHandler(formatting)
    receiver.propagate = False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent = 0
    try:
        for first in range(0, count, batch):
            datagrams = [hostile_datagram(rng, real) for _ in range(min(batch, count - first))]
            for datagram in datagrams:
                sender.sendto(datagram, server.server_address)
            sent += len(datagrams)
            marker = "sentinel-%d" % first
            sender.sendto(json.dumps({"name": "w", "levelno": 20, "msg": marker}).encode(), server.server_address)
            sent += 1
            # Paced so the kernel never drops: a missing sentinel means the server stopped.
            assert formatting.wait_for(marker), "the server stopped serving after datagrams %d-%d (seed %d): %r" % (
                first, first + len(datagrams), SEED, [d[:120] for d in datagrams])
        stats = server.statistics()
    finally:
        sender.close()
        server.shutdown()
        server.server_close()
        receiver.removeHandler(formatting)
        receiver.propagate = propagate
    assert not formatting.errors, formatting.errors[:3]
    assert stats["received"] + stats["malformed"] == sent
    assert stats["received"] == len(formatting.seen)


@pytest.mark.parametrize("count", sizes(600, 30000))
def test_hostile_datagrams_never_stop_the_leader_or_break_its_formatters(count):
    fuzz_datagrams(count)


# ------------------------------------------------------- fuzz: mountinfo

# Characters a mount point may hold, and how the kernel writes the four it
# escapes (fs/proc_namespace.c: mangle, seq_path with " \t\n\\").
ODD = [" ", "\t", "\n", "\\", "-", "#", ",", "é", "名", "\udcff", "040", "\\040", "a", "b", "."]
KERNEL_ESCAPES = {" ": "\\040", "\t": "\\011", "\n": "\\012", "\\": "\\134"}


def kernel_escape(text):
    return "".join(KERNEL_ESCAPES.get(char, char) for char in text)


def odd_mount_point(rng):
    parts = ["".join(rng.choice(ODD) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
    return "/" + "/".join(part.replace("/", "_") for part in parts)


def mountinfo_line(rng, index, mount_point, fstype, options):
    optional = " ".join(rng.sample(["shared:1", "master:2", "propagate_from:3", "unbindable"], rng.randint(0, 3)))
    return " ".join(filter(None, [
        str(20 + index), "1", "0:%d" % index, kernel_escape(rng.choice(["/", "/sub dir"])),
        kernel_escape(mount_point), kernel_escape(",".join(options[:1]) or "rw"), optional, "-",
        kernel_escape(fstype), kernel_escape(rng.choice(["server:/export", "none", "/dev/sda1", "a b"])),
        kernel_escape(",".join(options[1:]) or "rw")]))


def garbage_line(rng):
    tokens = ["-", "", "\\", "\\0", "\\777", "\\12", "\\040", "a", "1", "rw", "nfs", "\udcff", " "]
    return " ".join(rng.choice(tokens) for _ in range(rng.randrange(0, 14)))


def fuzz_mountinfo(rounds):
    rng = rng_for("mountinfo")
    for round_ in range(rounds):
        mounts = [(odd_mount_point(rng), rng.choice(["nfs", "ext4", "fuse.odd fs", "lustre", "x\\y"]),
                   rng.sample(["rw", "ro", "local_lock=flock", "flock", "nolock", "a b"], rng.randint(0, 4)))
                  for _ in range(rng.randint(1, 5))]
        lines = []
        for index, mount in enumerate(mounts):
            lines += [garbage_line(rng) for _ in range(rng.randint(0, 2))]
            lines.append(mountinfo_line(rng, index, *mount))
        parsed = parse_mountinfo("\n".join(lines))
        context = "round %d (seed %d): %r" % (round_, SEED, lines)
        wanted = [(point, fstype) for point, fstype, _ in mounts]
        got = [(mount.mount_point, mount.fstype) for mount in parsed]
        assert [pair for pair in got if pair in wanted] == wanted, context
        for mount in parsed:
            assert isinstance(mount.mount_point, str) and isinstance(mount.options, tuple), context


@pytest.mark.parametrize("count", sizes(400, 40000))
def test_mountinfo_lines_with_odd_escapes_parse_back_and_garbage_never_crashes(count):
    fuzz_mountinfo(count)


def test_the_longest_odd_mount_point_holding_a_path_is_its_filesystem(tmp_path):
    rng = rng_for("mount-points")
    for round_ in range(20):
        odd = "".join(rng.choice([" ", "\t", "\n", "\\", "-", "é", "\udcff", "040", "\\040", "a"]) for _ in range(6))
        mount = tmp_path / ("m%d%s" % (round_, odd))
        (mount / "job").mkdir(parents=True)
        decoy = str(mount) + "x"  # a string prefix that is not a path prefix
        lines = [mountinfo_line(rng, 0, "/", "ext4", ["rw"]),
                 mountinfo_line(rng, 1, str(mount), "nfs", ["rw", "local_lock=flock"]),
                 mountinfo_line(rng, 2, decoy, "ceph", ["rw"])]
        rng.shuffle(lines)
        table = tmp_path / "mountinfo"
        table.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogateescape")
        info = filesystem_info(mount / "job", mountinfo=str(table))
        assert (info.mount_point, info.fstype, info.lock_scope) == (str(mount), "nfs", "node"), repr(odd)


# ------------------------------------------------- fuzz: mutex and arena names

EDGE_NAMES = [
    None, b"bytes", 7, 1.5, ["a"], "", ".", "..", "/", "a/b", "\0", "a\0b", " ", "\n", "\t", "-", "--help",
    "...", ".hidden", "a b", "名前", "🦀", "\x7f", "%s", "*", "?", "\\", "toil-proc-x", "x-arena-members",
    "x-arena-lock", "\udcff", "\ud800", "a" * 189, "a" * 190, "a" * 200, "a" * 201, "é" * 100, "é" * 100 + "a",
    "€" * 66 + "ab", "\udcff" * 200, "\udcff" * 201,
]


def name_bytes(name):
    try:
        return len(os.fsencode(name))
    except UnicodeError:
        return None


def acceptable(name, limit):
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        return False
    size = name_bytes(name)
    return size is not None and size <= limit


def generated_names(rng, count):
    pieces = ["a", "é", "€", "🦀", "\udcff", ".", "-", " ", "\n", "/", "\0", "\\", "\ud800", "x" * 50]
    names = []
    for _ in range(count):
        name = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        if rng.random() < 0.3:  # near the byte limit
            name = name + "b" * max(0, rng.randint(185, 205) - (name_bytes(name) or 0))
        names.append(name)
    return names


def exercise_name(tmp_path, name):
    before = sorted(os.listdir(tmp_path))
    mutex_ok, arena_ok = acceptable(name, 200), acceptable(name, 200 - len("-arena-lock"))
    if mutex_ok:
        with global_mutex(tmp_path, name):
            assert os.listdir(tmp_path) == ["toil-mutex-" + name]
    else:
        with pytest.raises(ValueError):
            global_mutex(tmp_path, name)
    if arena_ok:
        arena = LastProcessStandingArena(tmp_path, name)
        arena.enter()
        assert list(arena.leave()) == [True]
    else:
        with pytest.raises(ValueError):
            LastProcessStandingArena(tmp_path, name)
    # Never alive here, whatever the name: ours, Toil's or impossible (nothing touched).
    assert process_name_exists(tmp_path, name) is False
    retire_mutex_files()  # as at exit
    assert sorted(os.listdir(tmp_path)) == before, "nothing left for %r" % (name,)


def short_id(name):
    text = repr(name)
    return text if len(text) <= 24 else "%s...(%d chars)" % (text[:16], len(name))


@pytest.mark.parametrize("name", EDGE_NAMES, ids=short_id)
def test_edge_case_names_are_refused_up_front_or_work_and_leave_nothing(tmp_path, name):
    exercise_name(tmp_path, name)


@pytest.mark.parametrize("count", sizes(150, 5000))
def test_generated_names_are_refused_up_front_or_work_and_leave_nothing(tmp_path, count):
    for name in generated_names(rng_for("names"), count):
        exercise_name(tmp_path, name)
        exercise_name(tmp_path, "toil-proc-" + name if isinstance(name, str) else name)
