"""Root's cleanup racing another user who swaps her coordination directory
(or its parent) for a symlink to a victim's, where live processes hold a
mutex, a process name and an arena membership under the same names as the
dead files she planted in her own: the victim's files are never removed, and
no second process ever gets the victim's mutex."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time

import pytest

from toilcoord import LastProcessStandingArena, LockTimeout, global_mutex, process_name_exists
from toilcoord.files import robust_rmtree

from conftest import ROOT, becoming

pytestmark = pytest.mark.timeout(180)

#: Every user can run it (pytest's interpreter may live under /root).
SYSTEM_PYTHON = "/usr/bin/python3"
#: The race is run this many times, or for this long, whichever ends first.
ROUNDS = 40
SECONDS = 40.0

# The victim (root here): holds the mutex "m", a process name and a
# membership of the arena "job" in argv[1]; prints the name, then the inode
# of each file; lets go when stdin closes.
VICTIM = """
import os, sys
from toilcoord import LastProcessStandingArena, get_process_name, global_mutex
base = sys.argv[1]
name = get_process_name(base)
arena = LastProcessStandingArena(base, "job")
arena.enter()
with global_mutex(base, "m"):
    print(name, flush=True)
    sys.stdin.read()
list(arena.leave())
"""

# The other user: flips argv[1]/argv[2] between her real directory and a
# symlink to argv[3], planting in her coordination directory (argv[4], when
# all is real) dead files named like the victim's live ones (argv[5:]),
# until argv[1]/stop appears. Prints "ready" once the first plant is made.
SWAPPER = """
import os, sys
stage, swapped, target, real, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
at = os.path.join(stage, swapped)
def plant():
    for name in names:
        os.close(os.open(os.path.join(real, name), os.O_WRONLY | os.O_CREAT, 0o666))
plant()
os.symlink(target, at + ".link")
print("ready", flush=True)
while not os.path.exists(os.path.join(stage, "stop")):
    os.rename(at, at + ".real")
    os.rename(at + ".link", at)
    os.rename(at, at + ".link")
    os.rename(at + ".real", at)
    plant()
"""


@pytest.fixture
def stage(other_user):
    """top/ (root's, 0755): coord/ the victim's directory, and stage/ (hers)
    holding p/coord, her coordination directory. Removed after."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"no {SYSTEM_PYTHON} that another user can run")
    top = tempfile.mkdtemp(prefix="toilcoord-race-")
    try:
        os.chmod(top, 0o755)
        os.mkdir(os.path.join(top, "coord"), 0o755)  # readable by her: the worse case
        for part, mode in (("stage", 0o755), ("stage/p", 0o755), ("stage/p/coord", 0o700)):
            os.mkdir(os.path.join(top, part), mode)
            os.chown(os.path.join(top, part), *other_user)
        yield top
    finally:
        robust_rmtree(top)


def started(children, popen):
    children.started.append(popen)
    return popen


def snapshot(directory):
    with os.scandir(directory) as entries:
        return sorted((entry.name, entry.inode()) for entry in entries)


def cleanup_as_root(directory):
    return subprocess.run(
        [SYSTEM_PYTHON, "-m", "toilcoord", "cleanup", "--dir", directory],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ROOT},
        cwd="/",
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("swapped", ["p/coord", "p"], ids=["her directory", "its parent"])
def test_root_cleanup_racing_a_directory_swap_never_removes_a_victims_live_files(stage, other_user, children, swapped):
    victim_dir = os.path.join(stage, "coord")
    victim = started(
        children,
        subprocess.Popen(
            [SYSTEM_PYTHON, "-c", VICTIM, victim_dir],
            env={"PYTHONPATH": ROOT},
            cwd="/",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ),
    )
    name = victim.stdout.readline().strip()
    live = snapshot(victim_dir)
    assert [entry for entry, _ in live] == ["job-arena-live", "toil-mutex-m", name]
    hers = os.path.join(stage, "stage")
    target = victim_dir if swapped == "p/coord" else stage  # stage/p -> top, so stage/p/coord is the victim's
    swapper = started(
        children,
        subprocess.Popen(
            [
                SYSTEM_PYTHON,
                "-c",
                SWAPPER,
                hers,
                swapped,
                target,
                os.path.join(hers, "p", "coord"),
                *(entry for entry, _ in live),
            ],
            env={"PYTHONPATH": ROOT},
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=becoming(other_user),
        ),
    )
    assert swapper.stdout.readline().strip() == "ready"

    outcomes = set()
    deadline = time.monotonic() + SECONDS
    for _ in range(ROUNDS):
        done = cleanup_as_root(os.path.join(hers, "p", "coord"))
        outcomes.add(done.returncode)
        assert "Traceback" not in done.stderr, done.stderr
        # Root's cleanup of root's directory (when the path led there) may add
        # the arena's mutex file; nothing live may go or be replaced.
        assert set(live) <= set(snapshot(victim_dir)), done.stdout + done.stderr
        if time.monotonic() > deadline:
            break
    open(os.path.join(hers, "stop"), "w").close()
    assert swapper.wait(timeout=30) == 0
    assert outcomes <= {0, 1, 2}  # done, refused (a symlink, a file it may not open), or gone meanwhile

    # Still one holder of the mutex, a live name, a live member.
    with pytest.raises(LockTimeout):
        with global_mutex(victim_dir, "m", timeout=0.05):
            pytest.fail("a second holder of the victim's mutex")
    assert process_name_exists(victim_dir, name)
    arena = LastProcessStandingArena(victim_dir, "job")
    arena.enter()
    assert list(arena.leave()) == [], "the victim is still a member"
    victim.stdin.close()
    assert victim.wait(timeout=30) == 0
