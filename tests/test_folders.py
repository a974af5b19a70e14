"""Directories opened once and checked (toilcoord.folders): lock files and
process names are reached relative to the directory first opened, never by
a path looked up again."""

from __future__ import annotations

import os
import subprocess

import pytest

from toilcoord import folders
from toilcoord.locks import LockTimeout
from toilcoord.mutex import global_mutex, retire_mutex_files
from toilcoord.procnames import destroy_all_process_names, get_process_name, process_name_exists
from toilcoord.slots import ResourceSlots

from conftest import open_fds, release, run_in_fork

pytestmark = pytest.mark.timeout(60)

MUTEX_FILE = "toil-mutex-m"

# Takes mutex "m" in directory argv[1] and lets it go (keeping its lock
# file open, as every process does), says "ready"; at a line on stdin tries
# it again with timeout 0 and says whether it got it.
KNOW_THEN_TRY = """
import sys
from toilcoord.locks import LockTimeout
from toilcoord.mutex import global_mutex
with global_mutex(sys.argv[1], "m"):
    pass
print("ready", flush=True)
sys.stdin.readline()
try:
    with global_mutex(sys.argv[1], "m", timeout=0):
        print("got it", flush=True)
except LockTimeout:
    print("timed out", flush=True)
"""


def remake(directory):
    """Remove *directory* and its files, and make it again, empty."""
    for name in os.listdir(directory):
        os.unlink(directory / name)
    os.rmdir(directory)
    directory.mkdir()


def swap_for_symlink(directory, elsewhere):
    """Move *directory* aside and put a symlink to *elsewhere* at its path
    (what another user who could write its parent would do)."""
    aside = directory.with_name(directory.name + "-aside")
    os.rename(directory, aside)
    os.symlink(elsewhere, directory)
    return aside


@pytest.fixture
def dirs(tmp_path):
    mine, victim = tmp_path / "mine", tmp_path / "victim"
    mine.mkdir()
    victim.mkdir()
    yield mine, victim
    retire_mutex_files()
    destroy_all_process_names()


def test_a_kept_mutex_never_follows_its_directory_swapped_for_a_symlink(dirs):
    mine, victim = dirs
    with global_mutex(mine, "m"):
        pass
    aside = swap_for_symlink(mine, victim)
    with global_mutex(mine, "m"):
        assert os.listdir(victim) == [], "acted in the directory the symlink leads to"
    assert os.listdir(aside) == [MUTEX_FILE]


def test_reaping_at_exit_never_follows_a_swapped_directory(dirs):
    mine, victim = dirs
    (victim / MUTEX_FILE).write_text("the victim's")
    with global_mutex(mine, "m"):
        pass
    aside = swap_for_symlink(mine, victim)
    retire_mutex_files()  # what exit does: removes the unheld lock file
    assert (victim / MUTEX_FILE).read_text() == "the victim's"
    assert os.listdir(aside) == []


def test_a_process_name_is_released_where_it_was_made(dirs):
    mine, victim = dirs
    name = get_process_name(mine)
    (victim / name).write_text("the victim's, of the same name")
    aside = swap_for_symlink(mine, victim)
    destroy_all_process_names()  # what exit does: unlinks our name file
    assert (victim / name).read_text() == "the victim's, of the same name"
    assert os.listdir(aside) == []


def test_a_process_that_knew_a_removed_directory_finds_the_new_one_held(tmp_path, children):
    base = tmp_path / "base"
    base.mkdir()
    other = children.python(KNOW_THEN_TRY, str(base), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline() == "ready\n"
    remake(base)
    with global_mutex(base, "m"):
        assert os.listdir(base) == [MUTEX_FILE]
        other.stdin.write("\n")
        other.stdin.flush()
        assert other.stdout.readline() == "timed out\n", "two holders: one in the removed directory"
    other.stdin.close()
    assert other.wait() == 0  # at its exit it removes the lock file nobody holds: not looked at


def test_a_holder_in_a_remade_directory_excludes_a_process_that_knew_the_old_one(tmp_path, children):
    base = tmp_path / "base"
    base.mkdir()
    with global_mutex(base, "m"):
        pass  # our gate and folder now know the first directory
    remake(base)
    holder = children.python(
        "import sys\nfrom toilcoord.mutex import global_mutex\n"
        "with global_mutex(sys.argv[1], 'm'):\n    print('held', flush=True)\n    sys.stdin.read()\n",
        str(base),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "held\n"
    try:
        with pytest.raises(LockTimeout):
            with global_mutex(base, "m", timeout=0.2):
                pytest.fail("two holders: one in the removed directory")
    finally:
        release(holder)


def test_a_directory_is_opened_once_while_its_lock_files_are_kept(dirs, monkeypatch):
    mine, _ = dirs
    opened = []
    real = folders._open_checked
    monkeypatch.setattr(folders, "_open_checked", lambda path: opened.append(path) or real(path))
    for mutex in ("a", "b", "c"):
        with global_mutex(mine, mutex):
            pass
    with ResourceSlots(mine, "gpus", 2).acquire(2):
        pass
    assert opened == [str(mine)]


def test_folders_are_closed_once_nothing_is_kept_in_them(dirs):
    mine, _ = dirs
    retire_mutex_files()
    before = open_fds()
    with global_mutex(mine, "m"):
        assert len(open_fds()) == len(before) + 2, "the lock file and its directory"
    retire_mutex_files()
    assert open_fds() == before
    assert folders._folders == {}


def test_a_forked_child_opens_the_directory_again(dirs):
    mine, _ = dirs
    with global_mutex(mine, "m"):
        pass
    kept = folders._folders[str(mine)].fd

    def child():
        assert folders._folders == {}
        try:
            os.fstat(kept)
        except OSError:
            pass
        else:
            raise AssertionError("the parent's directory fd is still open in the child")
        with global_mutex(mine, "n"):
            return True

    assert run_in_fork(child) == 0


def test_a_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        with global_mutex(tmp_path / "missing", "m"):
            pass
    assert process_name_exists(tmp_path / "missing", "toil-proc-x") is False
    assert folders._folders == {}


@pytest.mark.parametrize("access_works", [True, False], ids=["faccessat", "stat"])
def test_a_lookup_sees_a_file_there_and_none_missing(tmp_path, monkeypatch, access_works):
    if not access_works:
        # As where a seccomp filter refuses faccessat2, which glibc tries
        # first (older container runtimes): every faccessat fails.
        monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    (tmp_path / "there").write_text("")
    folder = folders.hold_folder(str(tmp_path))
    try:
        assert folder.by_access is access_works
        assert folders.exists_in(folder, "there")
        assert not folders.exists_in(folder, "missing")
    finally:
        folders.let_go(folder)
