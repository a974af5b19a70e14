from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys

import pytest

from toilcoord import (
    collect_process_name_garbage,
    current_process_name_for,
    destroy_all_process_names,
    get_process_name,
    process_name_exists,
)
from toilcoord.procnames import NAME_PREFIX

from conftest import child_env, on_network_filesystem, run_in_fork, run_python

pytestmark = pytest.mark.timeout(60)

# A child that takes a name in argv[1], prints it, and lives until stdin closes.
HOLD_NAME = """
import sys
from toilcoord import get_process_name
print(get_process_name(sys.argv[1]), flush=True)
sys.stdin.read()
"""


def start_holder(children, directory):
    child = children.python(HOLD_NAME, str(directory), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return child, child.stdout.readline().strip()


def test_name_is_stable_and_a_locked_file(tmp_path):
    name = get_process_name(tmp_path)
    assert name.startswith(NAME_PREFIX)
    assert get_process_name(str(tmp_path)) == name
    assert (tmp_path / name).is_file()
    assert process_name_exists(tmp_path, name)


def test_other_processes_get_other_names_and_are_seen_alive_then_dead(tmp_path, children):
    first, first_name = start_holder(children, tmp_path)
    second, second_name = start_holder(children, tmp_path)
    mine = get_process_name(tmp_path)
    assert len({first_name, second_name, mine}) == 3
    assert process_name_exists(tmp_path, first_name)
    first.kill()
    first.wait()
    assert not process_name_exists(tmp_path, first_name)
    assert not (tmp_path / first_name).exists(), "a dead process's file is removed"
    assert process_name_exists(tmp_path, second_name)


def test_a_dead_name_reads_dead_while_another_prober_is_probing_it(tmp_path, children):
    # Regression (found by the torture): a probe that locked the file
    # exclusively made every concurrent probe of the same dead name see a
    # held lock, and report its owner alive.
    holder, name = start_holder(children, tmp_path)
    holder.kill()
    holder.wait()
    other_prober = os.open(tmp_path / name, os.O_RDONLY)
    try:
        fcntl.flock(other_prober, fcntl.LOCK_SH | fcntl.LOCK_NB)  # as every probe now locks it
        assert not process_name_exists(tmp_path, name)
    finally:
        os.close(other_prober)
    assert not (tmp_path / name).exists()


def test_many_processes_probing_the_same_dead_names_all_see_them_dead(tmp_path, children):
    holders = [start_holder(children, tmp_path) for _ in range(6)]
    for holder, _ in holders:
        holder.kill()
        holder.wait()
    names = [name for _, name in holders]
    go_read, go_write = os.pipe()
    probers = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:  # probe every dead name at the same moment as the others
            os.close(go_write)
            os.read(go_read, 1)
            os._exit(sum(process_name_exists(tmp_path, name) for name in names))
        probers.append(pid)
    os.close(go_read)
    os.close(go_write)  # EOF: every prober starts now
    alive_reports = [os.WEXITSTATUS(os.waitpid(pid, 0)[1]) for pid in probers]
    assert alive_reports == [0] * 4
    assert not [name for name in os.listdir(tmp_path) if name in names]


def test_clean_exit_removes_the_name_file(tmp_path):
    done = run_python("import sys, toilcoord; print(toilcoord.get_process_name(sys.argv[1]))", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(NAME_PREFIX)
    assert os.listdir(tmp_path) == []


def test_forked_child_gets_its_own_name_and_never_inherits_the_lock(tmp_path):
    parent_name = get_process_name(tmp_path)

    def child_has_its_own_name():
        return get_process_name(tmp_path) != parent_name and process_name_exists(tmp_path, parent_name)

    assert run_in_fork(child_has_its_own_name) == 0
    assert get_process_name(tmp_path) == parent_name


# The parent takes a name and forks a child that outlives it; the child
# reports both once it runs (its at-fork handlers are done by then).
PARENT_WITH_CHILD = """
import os, sys
from toilcoord import get_process_name
name = get_process_name(sys.argv[1])
if os.fork() == 0:
    print(name, os.getpid(), flush=True)
    sys.stdin.read()          # the child lives until the test closes stdin
    os._exit(0)
sys.stdin.read()
"""


def test_dead_parent_is_dead_while_its_forked_child_lives(tmp_path, children):
    parent = children.python(PARENT_WITH_CHILD, str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    name, child_pid = parent.stdout.readline().split()
    child_pid = int(child_pid)
    try:
        assert process_name_exists(tmp_path, name)
        parent.kill()
        parent.wait()
        os.kill(child_pid, 0)  # the child still lives...
        assert not process_name_exists(tmp_path, name)  # ...yet the parent is dead
    finally:
        os.kill(child_pid, signal.SIGKILL)


def test_names_survive_directory_removal_by_making_new_ones(tmp_path):
    if on_network_filesystem(tmp_path):
        pytest.skip("on NFS a directory holding an open file cannot be removed: the premise cannot be set up")
    base = tmp_path / "base"
    base.mkdir()
    old = get_process_name(base)
    shutil.rmtree(base)
    collect_process_name_garbage()
    assert str(base) not in current_process_name_for
    base.mkdir()
    new = get_process_name(base)
    assert new != old and (base / new).exists()


def test_destroy_all_process_names_removes_our_files(tmp_path):
    name = get_process_name(tmp_path)
    destroy_all_process_names()
    assert not (tmp_path / name).exists()
    assert get_process_name(tmp_path) != name


@pytest.mark.parametrize(
    "bad",
    [
        "",
        ".",
        "..",
        "a/b",
        "nul\0",
        None,
        b"toil-proc-x",
        3,
        "not-ours",
        "x" * 300,
        "../not-ours",
        "link",
        "fifo",
        "dir",
    ],
)
def test_names_that_cannot_be_ours_do_not_exist_and_nothing_is_touched(tmp_path, bad):
    victim = tmp_path / "not-ours"
    victim.write_text("precious")
    os.symlink("not-ours", str(tmp_path / "link"))
    os.mkfifo(str(tmp_path / "fifo"))
    (tmp_path / "dir").mkdir()
    before = sorted(os.listdir(tmp_path))

    assert process_name_exists(tmp_path / "dir", bad) is False

    assert process_name_exists(tmp_path, bad) is False
    assert victim.read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == before


# A child that holds a name the way Toil's get_process_name makes one (a
# mkstemp file locked exclusively), prints it, and lives until stdin closes.
HOLD_TOIL_STYLE_NAME = """
import fcntl, os, sys, tempfile
fd, path = tempfile.mkstemp(dir=sys.argv[1])
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print(os.path.basename(path), flush=True)
sys.stdin.read()
"""


def test_a_name_toil_made_is_alive_while_held_and_its_file_never_removed(tmp_path, children):
    child = children.python(
        HOLD_TOIL_STYLE_NAME, str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    name = child.stdout.readline().strip()
    assert name and not name.startswith(NAME_PREFIX)

    assert process_name_exists(tmp_path, name) is True
    assert process_name_exists(str(tmp_path), name) is True
    child.kill()
    child.wait()
    assert process_name_exists(tmp_path, name) is False
    assert (tmp_path / name).exists(), "not ours to remove (Toil removes its own dead names)"


def test_missing_directory_means_no_such_process(tmp_path):
    assert not process_name_exists(tmp_path / "missing", NAME_PREFIX + "0")


# In its own PID namespace (as PID 1), take a name, print it with our PIDs
# there and outside (NSpid in the host's /proc), then answer liveness queries
# for names read from stdin.
IN_NAMESPACE = """
import os, sys
from toilcoord import get_process_name, process_name_exists
with open("/proc/self/status") as status:
    host_pid = [line.split()[1] for line in status if line.startswith("NSpid:")][0]
print(get_process_name(sys.argv[1]), os.getpid(), host_pid, flush=True)
for line in sys.stdin:
    print(process_name_exists(sys.argv[1], line.strip()), flush=True)
"""


def start_in_pid_namespace(children, directory):
    code = IN_NAMESPACE
    child = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c", code, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    children.started.append(child)
    line = child.stdout.readline().split()
    if len(line) != 3:
        child.kill()
        _, err = child.communicate()
        pytest.skip(f"unshare --pid --fork is not permitted here: {err.strip()[:200]}")
    name, pid, host_pid = line
    return child, name, int(pid), int(host_pid)


def test_names_across_pid_namespaces(tmp_path, children):
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    first, first_name, first_pid, _ = start_in_pid_namespace(children, tmp_path)
    second, second_name, second_pid, second_host_pid = start_in_pid_namespace(children, tmp_path)
    assert first_pid == second_pid == 1, "both are PID 1 in their namespaces"
    assert first_name != second_name
    assert process_name_exists(tmp_path, first_name) and process_name_exists(tmp_path, second_name)

    first.stdin.write(second_name + "\n")
    first.stdin.flush()
    assert first.stdout.readline().strip() == "True"

    os.kill(second_host_pid, signal.SIGKILL)  # the namespace's PID 1, from outside
    second.wait()  # unshare returns once its child is dead
    first.stdin.write(second_name + "\n")
    first.stdin.flush()
    assert first.stdout.readline().strip() == "False"
    second.stdout.close()
    second.stderr.close()

    first.stdin.close()
    assert first.wait() == 0
    first.stdout.close()
    first.stderr.close()
    assert not process_name_exists(tmp_path, first_name)


# ---------------------------------------------------- shared directories


@pytest.fixture
def fresh_directory_checks(monkeypatch):
    from toilcoord import folders

    monkeypatch.setattr(folders, "_warned", set())


@pytest.mark.usefixtures("fresh_directory_checks")
def test_a_directory_anyone_can_empty_is_refused_before_a_name_is_made(tmp_path):
    from toilcoord.locks import ForeignFileError

    os.chmod(tmp_path, 0o777)
    with pytest.raises(ForeignFileError, match="writable by all, not sticky"):
        get_process_name(tmp_path)
    assert os.listdir(tmp_path) == []
    assert str(tmp_path) not in current_process_name_for


@pytest.mark.usefixtures("fresh_directory_checks")
def test_a_directory_of_another_user_is_refused_before_a_name_is_made(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another uid")
    from toilcoord.locks import ForeignFileError

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 4242, 4242)
    with pytest.raises(ForeignFileError, match="belongs to uid 4242"):
        get_process_name(theirs)
    assert os.listdir(theirs) == []


@pytest.mark.usefixtures("fresh_directory_checks")
def test_a_sticky_shared_directory_is_used_with_one_warning(tmp_path, caplog):
    os.chmod(tmp_path, 0o1777)
    first = get_process_name(tmp_path)
    destroy_all_process_names()
    second = get_process_name(tmp_path)  # made again: the directory is not checked again
    assert first != second and os.listdir(tmp_path) == [second]
    warnings = [record for record in caplog.records if "writable by other users" in record.getMessage()]
    assert len(warnings) == 1
    destroy_all_process_names()


def test_reaping_skips_what_it_cannot_probe_with_one_line_each(tmp_path, children, caplog):
    dead, dead_name = start_holder(children, tmp_path)
    dead.kill()
    dead.wait()
    os.mkfifo(str(tmp_path / (NAME_PREFIX + "fifo")))
    os.symlink(dead_name, str(tmp_path / (NAME_PREFIX + "link")))
    from toilcoord.procnames import reap_dead_process_names

    assert reap_dead_process_names(tmp_path) == [dead_name]
    assert sorted(os.listdir(tmp_path)) == [NAME_PREFIX + "fifo", NAME_PREFIX + "link"]
    skipped = [record.getMessage() for record in caplog.records if "cannot be probed" in record.getMessage()]
    assert len(skipped) == 2


def test_a_directory_swapped_for_a_symlink_after_the_probe_never_costs_another_directory_a_file(
    tmp_path, children, monkeypatch
):
    # The worst moment of another user's swap, made certain: right after the
    # dead name was taken over (and checked linked) in her directory, her
    # directory becomes a symlink to the victim's, where a live process has
    # the same name. Removing "the dead file" by its path again removed the
    # victim's live one.
    from toilcoord import procnames

    victim, hers = tmp_path / "victim", tmp_path / "hers"
    victim.mkdir()
    hers.mkdir()
    live, name = start_holder(children, victim)
    (hers / name).touch()  # a dead process's file, same name

    real_take_over = procnames.take_over

    def then_swap(*args, **keywords):
        taken = real_take_over(*args, **keywords)
        os.rename(hers, tmp_path / "moved")
        os.symlink(victim, hers)
        return taken

    monkeypatch.setattr(procnames, "take_over", then_swap)
    assert process_name_exists(hers, name) is False
    monkeypatch.undo()
    assert os.listdir(tmp_path / "moved") == [], "the dead file in the directory probed is gone"
    assert os.listdir(victim) == [name]
    assert process_name_exists(victim, name) is True
    live.stdin.close()
    assert live.wait() == 0
