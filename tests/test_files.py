"""robust_rmtree on real trees: symlinks, odd names, depth, concurrent
deleters, and busy entries (real mounts; an emulated NFS silly rename)."""

from __future__ import annotations

import errno
import inspect
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from typing import Callable, List, Optional

import pytest

from toilcoord import files
from toilcoord.files import robust_rmtree

from conftest import ROOT, child_env, run_python

pytestmark = pytest.mark.timeout(60)


def make_tree(top: str, width: int = 4, depth: int = 3, per_dir: int = 5) -> int:
    """A tree of *width*-ary directories *depth* levels deep, with files,
    a FIFO and a symlink in each; returns the number of entries made."""
    os.mkdir(top)
    made = 0
    level = [top]
    for _ in range(depth):
        below = []
        for directory in level:
            for number in range(per_dir):
                with open(os.path.join(directory, "f%d" % number), "w") as file:
                    file.write("x")
            os.mkfifo(os.path.join(directory, "fifo"))
            os.symlink("f0", os.path.join(directory, "link"))
            made += per_dir + 2
            for number in range(width):
                below.append(os.path.join(directory, "d%d" % number))
                os.mkdir(below[-1])
                made += 1
        level = below
    return made


def make_chain(top: str, depth: int) -> None:
    """*top*/d/d/d/... *depth* levels deep, a file in each; built relative
    to directory fds, since the path is far longer than PATH_MAX."""
    os.mkdir(top)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.close(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def open_fds() -> List[str]:
    return sorted(os.listdir("/proc/self/fd"))


def gone(path: object) -> bool:
    return not os.path.lexists(path)


# ------------------------------------------------------------ what it removes


@pytest.mark.parametrize("as_arg", [str, os.fsencode, pathlib.Path], ids=["str", "bytes", "PathLike"])
def test_removes_a_tree_given_any_path_type(tmp_path, as_arg: Callable) -> None:
    top = str(tmp_path / "tree")
    make_tree(top)
    before = open_fds()
    robust_rmtree(as_arg(top))
    assert gone(top) and os.listdir(tmp_path) == []
    assert open_fds() == before


@pytest.mark.parametrize("as_arg", [str, os.fsencode, pathlib.Path], ids=["str", "bytes", "PathLike"])
def test_removes_a_file(tmp_path, as_arg: Callable) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    robust_rmtree(as_arg(str(path)))
    assert gone(path)


def test_removes_a_fifo_without_opening_it(tmp_path) -> None:
    os.mkfifo(tmp_path / "fifo")
    robust_rmtree(tmp_path / "fifo")  # opening it would block forever
    assert gone(tmp_path / "fifo")


def test_removes_a_symlink_to_a_file_not_the_file(tmp_path) -> None:
    (tmp_path / "target").write_text("keep")
    os.symlink(tmp_path / "target", tmp_path / "link")
    robust_rmtree(tmp_path / "link")
    assert gone(tmp_path / "link") and (tmp_path / "target").read_text() == "keep"


def test_removes_a_dangling_symlink(tmp_path) -> None:
    # Toil's robust_rmtree checks os.path.exists first and leaves it.
    os.symlink(tmp_path / "nothing", tmp_path / "dangling")
    robust_rmtree(tmp_path / "dangling")
    assert gone(tmp_path / "dangling")


@pytest.mark.parametrize("suffix", ["", "/", "//"])
def test_removes_a_symlink_to_a_directory_not_the_directory(tmp_path, suffix: str) -> None:
    outside = tmp_path / "outside"
    make_tree(str(outside), depth=2)
    count = sum(1 for _ in outside.rglob("*"))
    os.symlink(outside, tmp_path / "link")
    robust_rmtree(str(tmp_path / "link") + suffix)
    assert gone(tmp_path / "link")
    assert sum(1 for _ in outside.rglob("*")) == count


def test_never_follows_symlinks_out_of_the_tree(tmp_path) -> None:
    outside = tmp_path / "outside"
    make_tree(str(outside), depth=2)
    count = sum(1 for _ in outside.rglob("*"))
    top = tmp_path / "tree"
    make_tree(str(top), depth=2)
    os.symlink(outside, top / "to-outside-dir")
    os.symlink(outside / "f0", top / "d1" / "to-outside-file")
    os.symlink("../outside", top / "d0" / "relative-out")
    os.symlink(top / "d1", top / "d0" / "to-inside-dir")
    os.symlink("/", top / "to-root")
    robust_rmtree(top)
    assert gone(top)
    assert sum(1 for _ in outside.rglob("*")) == count
    assert (outside / "f0").read_text() == "x"


def test_a_symlink_to_a_directory_inside_the_tree_is_not_descended(tmp_path, monkeypatch) -> None:
    top = tmp_path / "tree"
    make_tree(str(top), depth=1)
    os.symlink("d0", top / "alias")
    listed = []
    real_scandir = os.scandir

    def scandir(fd: int):
        listed.append(os.fstat(fd).st_ino)
        return real_scandir(fd)

    monkeypatch.setattr(os, "scandir", scandir)
    inodes = {os.stat(top).st_ino} | {os.stat(top / ("d%d" % n)).st_ino for n in range(4)}
    robust_rmtree(top)
    assert gone(top)
    assert sorted(listed) == sorted(inodes)  # each real directory listed once, d0 not again via alias


def test_a_missing_path_is_fine(tmp_path) -> None:
    robust_rmtree(tmp_path / "nothing")
    robust_rmtree(os.fsencode(str(tmp_path / "no" / "such" / "thing")))
    (tmp_path / "file").write_text("x")
    robust_rmtree(tmp_path / "file" / "below")  # a path through a file names nothing
    assert (tmp_path / "file").exists()


@pytest.mark.parametrize("bad", ["", ".", "..", "/", "//", "a/..", "a/.", "./", b"", b"..", b"x/."])
def test_paths_nobody_means_to_remove_are_refused_before_anything_is_touched(tmp_path, monkeypatch, bad) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "file").write_text("x")
    monkeypatch.chdir(tmp_path / "a")
    with pytest.raises(ValueError, match="refuses"):
        robust_rmtree(bad)
    assert (tmp_path / "a" / "file").exists()


def test_not_a_path_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        robust_rmtree(3)  # type: ignore[arg-type]


def test_undecodable_names(tmp_path) -> None:
    for as_arg in (os.fsencode, str):
        top = os.path.join(os.fsencode(str(tmp_path)), b"tree-\xff")
        os.mkdir(top)
        os.mkdir(os.path.join(top, b"dir-\xfe\xff"))
        for parent in (top, os.path.join(top, b"dir-\xfe\xff")):
            with open(os.path.join(parent, b"file-\x80\x81"), "w"):
                pass
            os.symlink(b"\xff-nowhere", os.path.join(parent, b"link-\xc3"))
        robust_rmtree(as_arg(top) if as_arg is os.fsencode else os.fsdecode(top))
        assert os.listdir(tmp_path) == []


def test_deeper_than_the_recursion_limit_with_few_descriptors(tmp_path) -> None:
    top = str(tmp_path / "deep")
    try:
        make_chain(top, 2000)
        result = run_python(
            """
            import os, resource, sys
            from toilcoord.files import robust_rmtree
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))  # far fewer than 2000 levels
            sys.setrecursionlimit(100)
            robust_rmtree(sys.argv[1])
            print("removed")
        """,
            top,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == "removed\n" and gone(top)
    finally:
        # Left behind, it would break pytest's own (recursive) cleanup of old
        # temporary directories in later sessions.
        robust_rmtree(top)


def test_deep_trees_leak_no_descriptors(tmp_path) -> None:
    top = str(tmp_path / "deep")
    make_chain(top, 300)
    before = open_fds()
    robust_rmtree(top)
    assert gone(top) and open_fds() == before


# ------------------------------------------------- races with other removers


def another_process_removes(*paths: pathlib.Path) -> None:
    subprocess.run(["rm", "-rf", "--", *map(str, paths)], check=True, timeout=30)


def test_parts_vanishing_between_listing_and_removing(tmp_path, monkeypatch) -> None:
    top = tmp_path / "tree"
    make_tree(str(top), depth=3)
    real_scandir = os.scandir
    top_inode = os.stat(top).st_ino

    class Listing:
        """What scandir saw, after which another process removes parts."""

        def __init__(self, fd: int) -> None:
            with real_scandir(fd) as listing:
                self.entries = list(listing)
            if os.fstat(fd).st_ino == top_inode:
                another_process_removes(top / "d1", top / "f2", top / "d3" / "d0")

        def __enter__(self):
            return iter(self.entries)

        def __exit__(self, *exc_info: object) -> None:
            pass

    monkeypatch.setattr(os, "scandir", Listing)
    robust_rmtree(top)
    assert gone(top)


def test_the_whole_tree_vanishing_midway(tmp_path, monkeypatch) -> None:
    top = tmp_path / "tree"
    make_tree(str(top), depth=3)
    real_scandir = os.scandir
    deep_inode = os.stat(top / "d2" / "d2").st_ino

    def scandir(fd: int):
        if os.fstat(fd).st_ino == deep_inode:
            another_process_removes(top)  # everything, including where we are
        return real_scandir(fd)

    monkeypatch.setattr(os, "scandir", scandir)
    before = open_fds()
    robust_rmtree(top)
    assert gone(top) and open_fds() == before


def deep_chain_with_mover(tmp_path, monkeypatch, destination: pathlib.Path) -> pathlib.Path:
    """A chain deeper than the open-descriptor window; when its deepest
    directory is listed, level 10 is renamed to *destination*."""
    top = tmp_path / "tree"
    depth = files._OPEN_LEVELS + 16
    make_chain(str(top), depth)
    level10 = top.joinpath(*["d"] * 10)
    deepest = os.stat(top.joinpath(*["d"] * depth)).st_ino
    real_scandir = os.scandir

    def scandir(fd: int):
        if os.fstat(fd).st_ino == deepest:
            os.rename(level10, destination)
        return real_scandir(fd)

    monkeypatch.setattr(os, "scandir", scandir)
    return top


def test_a_subtree_moved_within_the_tree_is_still_removed(tmp_path, monkeypatch) -> None:
    top = deep_chain_with_mover(tmp_path, monkeypatch, tmp_path / "tree" / "moved")
    before = open_fds()
    robust_rmtree(top)
    assert gone(top) and open_fds() == before


def test_a_subtree_moved_out_of_the_tree_is_not_followed_back_up(tmp_path, monkeypatch) -> None:
    # Going back up through ".." from the moved directory would lead to its
    # new parent, outside: the identity check makes it start over instead.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    top = deep_chain_with_mover(tmp_path, monkeypatch, outside / "moved")
    robust_rmtree(top)
    assert gone(top)
    assert (outside / "keep").read_text() == "x" and (outside / "moved").is_dir()


@pytest.mark.timeout(120)
def test_concurrent_deleter_processes(tmp_path, children) -> None:
    for round_number in range(3):
        top = str(tmp_path / ("tree%d" % round_number))
        make_tree(top, width=5, depth=3, per_dir=20)
        make_chain(os.path.join(top, "chain"), 100)
        deleters = [
            children.python(
                """
                import sys
                from toilcoord.files import robust_rmtree
                sys.stdin.read()  # the starting gate: all start when it closes
                robust_rmtree(sys.argv[1])
                print("done")
            """,
                top,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(4)
        ]
        for deleter in deleters:
            deleter.stdin.close()
        for deleter in deleters:
            output = deleter.stdout.read()
            assert (deleter.wait(timeout=60), output) == (0, "done\n")
        assert gone(top)


@pytest.mark.timeout(60)
def test_concurrent_deleter_threads(tmp_path) -> None:
    for round_number in range(3):
        top = str(tmp_path / ("tree%d" % round_number))
        make_tree(top, width=5, depth=3, per_dir=10)
        gate = threading.Barrier(4)
        errors: List[BaseException] = []

        def delete() -> None:
            gate.wait()
            try:
                robust_rmtree(top)
            except BaseException as error:  # noqa: B902 - reported below
                errors.append(error)

        deleters = [threading.Thread(target=delete) for _ in range(4)]
        for deleter in deleters:
            deleter.start()
        for deleter in deleters:
            deleter.join()
        assert errors == [] and gone(top)


# ------------------------------------------------------------------ errors


def test_permission_errors_propagate_and_leak_nothing() -> None:
    # As root, mode bits stop nobody: the child drops to "nobody" instead.
    # The tree lives in a world-traversable directory for that user to reach.
    scratch = tempfile.mkdtemp(prefix="toilcoord-perm-")
    try:
        os.chmod(scratch, 0o755)
        make_tree(os.path.join(scratch, "tree"), depth=2)
        if os.getuid() != 0:
            os.chmod(os.path.join(scratch, "tree", "d1"), 0o555)
        result = run_python(
            """
            import os, sys
            from toilcoord.files import robust_rmtree
            if os.getuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            before = sorted(os.listdir("/proc/self/fd"))
            try:
                robust_rmtree(sys.argv[1])
            except PermissionError as error:
                print("PermissionError", sorted(os.listdir("/proc/self/fd")) == before)
        """,
            os.path.join(scratch, "tree"),
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == "PermissionError True\n"
        assert os.path.isdir(os.path.join(scratch, "tree"))
    finally:
        for directory, _, _ in os.walk(scratch):
            os.chmod(directory, 0o755)
        shutil.rmtree(scratch)


# ------------------------------------------------------------ busy entries
#
# A real EBUSY comes from a mount point: unlink of a file something is bound
# onto, rmdir of a directory something is mounted on. Each such test runs a
# child in a private mount namespace of its own, so its mounts vanish with it
# whatever happens. NFS's silly rename (unlinking a file some process holds
# open renames it to .nfsXXXX instead, which gives EBUSY until the holder
# closes it) cannot be made locally: those tests emulate it in os.unlink.

SILLY = ".nfs000000000123abcd00000001"  # the shape of an NFS client's name

MOUNTING = """
    import errno, json, os, subprocess, sys, time
    from toilcoord.files import BusyEntriesError, robust_rmtree

    def make_busy(path):
        # A file or directory bound onto itself: unlink or rmdir gives EBUSY.
        if not os.path.isdir(path):
            open(path, "w").close()
        subprocess.run(["mount", "--bind", path, path], check=True)

    def release(path):
        subprocess.run(["umount", path], check=True)

    def spy_on_unlinks_of(name, on_busy=lambda: None):
        # Not a mock: every call is the real os.unlink, and counted.
        real_unlink, calls = os.unlink, []
        def unlink(path, *, dir_fd=None):
            if os.path.basename(os.fsdecode(path)) == name:
                calls.append(path)
            try:
                return real_unlink(path, dir_fd=dir_fd)
            except OSError as error:
                if error.errno == errno.EBUSY:
                    on_busy()
                raise
        os.unlink = unlink
        return calls

    def fds():
        return sorted(os.listdir("/proc/self/fd"))
"""


def run_unshared(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``python -c MOUNTING+CODE ARGS`` in a private mount namespace."""
    return subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            "-c",
            textwrap.dedent(MOUNTING) + textwrap.dedent(code),
            *args,
        ],
        env=child_env(**env),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def mounts() -> None:
    """Skip unless this process may mount in a mount namespace of its own."""
    probe = tempfile.mkdtemp(prefix="toilcoord-unshare-")
    try:
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "mount", "--bind", probe, probe],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
        refusal = result.stderr.strip() if result.returncode else ""
    except FileNotFoundError as error:
        refusal = str(error)
    finally:
        os.rmdir(probe)
    if refusal:
        pytest.skip("no private mount namespace, so no real EBUSY (unshare -m refused): " + refusal)


def test_a_busy_file_is_retried_until_it_is_released(tmp_path, mounts) -> None:
    top = str(tmp_path / "tree")
    make_tree(top, depth=3)
    result = run_unshared(
        """
        busy = os.path.join(sys.argv[1], "d1", "d2", sys.argv[2])
        make_busy(busy)
        released = []  # its holder lets go right after the first EBUSY
        calls = spy_on_unlinks_of(sys.argv[2], on_busy=lambda: released or released.append(release(busy)))
        robust_rmtree(sys.argv[1])
        print(len(calls), len(released), os.path.lexists(sys.argv[1]))
    """,
        top,
        SILLY,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "2 1 False\n"  # busy, released, removed on the retry
    assert gone(top)


@pytest.mark.parametrize("as_arg", [str, os.fsencode], ids=["str", "bytes"])
def test_what_stays_busy_is_reported_in_one_error_after_all_else_is_removed(tmp_path, mounts, as_arg) -> None:
    top = str(tmp_path / "tree")
    make_tree(top, depth=2)
    busy = [
        os.path.join(top, "d0", SILLY),  # as an NFS client would leave it
        os.path.join(top, "d1", "d2", os.fsdecode(b"busy-\xff")),  # EBUSY, whatever the name
        os.path.join(top, "d2", "mounted"),
    ]  # a directory: rmdir gives EBUSY
    os.mkdir(busy[2])
    result = run_unshared(
        """
        top, busy = sys.argv[1], sys.argv[2:]
        for path in busy:
            make_busy(path)
        calls = spy_on_unlinks_of(os.path.basename(busy[0]))
        before, started = fds(), time.monotonic()
        try:
            robust_rmtree(os.fsencode(top) if os.environ["AS_BYTES"] else top, busy_timeout=0.3)
        except BusyEntriesError as error:
            print(json.dumps({
                "elapsed": time.monotonic() - started, "errno": error.errno, "filename": os.fsdecode(error.filename),
                "is_os_error": isinstance(error, OSError), "types": sorted({type(p).__name__ for p in error.left}),
                "left": [os.fsdecode(path) for path in error.left],
                "in_message": all(repr(path) in str(error) for path in error.left),
                "remaining": sorted(os.path.join(d, name) for d, dirs, files in os.walk(top) for name in dirs + files),
                "attempts": len(calls), "leaked": fds() != before,
            }))
    """,
        top,
        *busy,
        AS_BYTES="1" if as_arg is os.fsencode else "",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert sorted(report["left"]) == sorted(busy)
    assert report["types"] == ["bytes" if as_arg is os.fsencode else "str"]
    assert report["remaining"] == sorted(busy + [os.path.join(top, d) for d in ("d0", "d1", "d1/d2", "d2")])
    assert (report["errno"], report["filename"], report["is_os_error"]) == (errno.EBUSY, top, True)
    assert report["in_message"] and not report["leaked"]
    assert 0.3 <= report["elapsed"] < 3
    assert 4 <= report["attempts"] <= 12  # retried, the first within a few ms, then backing off
    robust_rmtree(top)  # the child's mounts went with its namespace
    assert gone(top)


def test_a_busy_file_given_with_no_time_to_wait_is_tried_once(tmp_path, mounts) -> None:
    path = str(tmp_path / SILLY)
    result = run_unshared(
        """
        make_busy(sys.argv[1])
        calls = spy_on_unlinks_of(os.path.basename(sys.argv[1]))
        try:
            robust_rmtree(sys.argv[1], busy_timeout=0)
        except BusyEntriesError as error:
            print(len(calls), error.left == [sys.argv[1]], error.filename == sys.argv[1])
    """,
        path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1 True True\n"
    robust_rmtree(path)
    assert gone(path)


class SillyRenamingUnlink:
    """os.unlink as an NFS client does it for *held*, a file some process
    holds open: the unlink succeeds by renaming it to SILLY in its directory;
    unlinking SILLY gives EBUSY until the holder closes it, after which the
    client removes it (here after *closes_after* EBUSY answers, or never).
    Every other name is the real os.unlink."""

    def __init__(self, monkeypatch, held: str, closes_after: Optional[int]) -> None:
        self.held, self.closes_after, self.busy_answers = held, closes_after, 0
        self.real_unlink = os.unlink
        monkeypatch.setattr(os, "unlink", self)

    def __call__(self, path, *, dir_fd: Optional[int] = None) -> None:
        name = os.path.basename(os.fsdecode(path))
        if name == self.held:
            silly = os.path.join(os.path.dirname(path), SILLY)
            os.rename(path, silly, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return
        if name == SILLY:
            if self.closes_after is None or self.busy_answers < self.closes_after:
                self.busy_answers += 1
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
            self.real_unlink(path, dir_fd=dir_fd)  # closed: the client removed it
        self.real_unlink(path, dir_fd=dir_fd)


def test_an_nfs_silly_rename_is_waited_out_until_its_holder_closes(tmp_path, monkeypatch) -> None:
    top = tmp_path / "tree"
    make_tree(str(top), depth=3)
    silly_rename = SillyRenamingUnlink(monkeypatch, "f3", closes_after=2)
    before = open_fds()
    robust_rmtree(top)  # rmdir of every directory first gives ENOTEMPTY
    assert gone(top) and open_fds() == before
    assert silly_rename.busy_answers == 2


def test_a_silly_renamed_file_still_held_is_reported_with_everything_else_removed(tmp_path, monkeypatch) -> None:
    top = tmp_path / "tree"
    make_tree(str(top), depth=2)
    (top / "d2" / "d1" / "held").write_text("x")
    SillyRenamingUnlink(monkeypatch, "held", closes_after=None)
    with pytest.raises(files.BusyEntriesError) as raised:
        robust_rmtree(top, busy_timeout=0.2)
    silly = str(top / "d2" / "d1" / SILLY)
    assert raised.value.left == [silly] and raised.value.errno == errno.EBUSY
    assert sorted(map(str, top.rglob("*"))) == sorted([str(top / "d2"), str(top / "d2" / "d1"), silly])
    monkeypatch.undo()
    robust_rmtree(top)


def appears_after_listing(monkeypatch, directory: pathlib.Path, name: str) -> None:
    """*name* is created in *directory* just after robust_rmtree lists it
    (on NFS: a file we then unlink while someone holds it open)."""
    real_scandir = os.scandir
    inode = os.stat(directory).st_ino

    class Listing:
        def __init__(self, fd: int) -> None:
            with real_scandir(fd) as listing:
                self.entries = list(listing)
            if os.fstat(fd).st_ino == inode and not (directory / name).exists():
                (directory / name).write_text("x")

        def __enter__(self):
            return iter(self.entries)

        def __exit__(self, *exc_info: object) -> None:
            pass

    monkeypatch.setattr(os, "scandir", Listing)


def test_a_dot_nfs_entry_appearing_after_the_listing_is_removed_on_a_later_pass(tmp_path, monkeypatch) -> None:
    top = tmp_path / "tree"
    make_tree(str(top), depth=2)
    appears_after_listing(monkeypatch, top / "d1", SILLY)
    robust_rmtree(top)
    assert gone(top)


def test_other_entries_appearing_after_the_listing_still_fail_with_enotempty(tmp_path, monkeypatch) -> None:
    # Not retried: only busy entries and .nfs ones are.
    top = tmp_path / "tree"
    make_tree(str(top), depth=2)
    appears_after_listing(monkeypatch, top / "d1", "newcomer")
    with pytest.raises(OSError) as raised:
        robust_rmtree(top)
    assert raised.value.errno == errno.ENOTEMPTY
    assert not isinstance(raised.value, files.BusyEntriesError)
    monkeypatch.undo()
    robust_rmtree(top)


def test_busy_timeout_is_a_keyword_defaulting_to_10_seconds_and_not_negative(tmp_path) -> None:
    parameter = inspect.signature(robust_rmtree).parameters["busy_timeout"]
    assert (parameter.kind, parameter.default) == (parameter.KEYWORD_ONLY, 10.0)
    (tmp_path / "file").write_text("x")
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError):
            robust_rmtree(tmp_path / "file", busy_timeout=bad)
    assert (tmp_path / "file").exists()


def test_busy_entries_error_survives_pickling() -> None:
    # As it must to cross from a multiprocessing worker.
    error = files.BusyEntriesError(errno.EBUSY, "busy", "/scratch/job")
    error.left = ["/scratch/job/" + SILLY]
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is files.BusyEntriesError and isinstance(copy, OSError)
    assert (copy.errno, copy.strerror, copy.filename, copy.left) == (errno.EBUSY, "busy", "/scratch/job", error.left)


def test_public_names() -> None:
    assert files.__all__ == ["BusyEntriesError", "robust_rmtree"]


# ------------------------------------------------------ relative to dir_fd


@pytest.fixture
def opened(tmp_path):
    """An fd on tmp_path/"ours", closed after the test."""
    (tmp_path / "ours").mkdir()
    fd = os.open(str(tmp_path / "ours"), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        yield fd
    finally:
        os.close(fd)


def victims_tree(tmp_path) -> pathlib.Path:
    """Another user's directory, whose subtree "a/tree" must survive."""
    victim = tmp_path / "victim"
    (victim / "a").mkdir(parents=True)
    make_tree(str(victim / "a" / "tree"), depth=2)
    return victim


def listing(top: pathlib.Path) -> List[str]:
    return sorted(str(path.relative_to(top)) for path in top.rglob("*"))


@pytest.mark.parametrize("as_arg", [str, os.fsencode, pathlib.Path], ids=["str", "bytes", "PathLike"])
def test_removes_a_path_relative_to_dir_fd_and_keeps_the_fd_open(tmp_path, opened, as_arg) -> None:
    make_tree(str(tmp_path / "ours" / "tree"), depth=2)
    (tmp_path / "ours" / "a").mkdir()
    make_tree(str(tmp_path / "ours" / "a" / "tree"), depth=2)
    before = open_fds()
    robust_rmtree(as_arg("tree"), dir_fd=opened)
    robust_rmtree(as_arg("a/tree"), dir_fd=opened)
    robust_rmtree(as_arg("missing/tree"), dir_fd=opened)
    assert os.listdir(opened) == ["a"] and open_fds() == before


def test_a_dir_fd_directory_swapped_for_a_symlink_removes_only_what_it_opened(tmp_path, opened) -> None:
    # The fd's own name and its parent's are swapped by another user: the
    # tree removed is the one in the directory opened, never the victim's.
    victim = victims_tree(tmp_path)
    (tmp_path / "ours" / "a").mkdir()
    make_tree(str(tmp_path / "ours" / "a" / "tree"), depth=2)
    before = listing(victim)
    os.rename(tmp_path / "ours", tmp_path / "moved")
    os.symlink(victim, tmp_path / "ours")
    robust_rmtree("a/tree", dir_fd=opened)
    assert listing(tmp_path / "moved") == ["a"]
    assert listing(victim) == before
    robust_rmtree(tmp_path / "ours" / "a" / "tree")  # the caveat: by path, a swapped parent is followed
    assert listing(victim) == ["a"]


@pytest.mark.parametrize("swapped", ["a", "a/b"])
def test_a_component_under_dir_fd_that_is_a_symlink_is_never_followed(tmp_path, opened, swapped) -> None:
    victim = victims_tree(tmp_path)
    before = listing(victim)
    if swapped == "a/b":
        (tmp_path / "ours" / "a").mkdir()
    os.symlink(victim / "a", tmp_path / "ours" / swapped)  # <swapped>/tree leads to the victim's tree
    robust_rmtree(swapped + "/tree", dir_fd=opened)
    robust_rmtree(swapped + "/tree/d0", dir_fd=opened)
    assert listing(victim) == before
    robust_rmtree(swapped, dir_fd=opened)  # the symlink itself is unlinked, not its target
    assert os.path.lexists(tmp_path / "ours" / swapped) is False and listing(victim) == before


def test_components_swapped_in_a_loop_never_cost_the_victim_anything(tmp_path, opened, children) -> None:
    # Another process flips "a" under our directory between a real directory
    # holding a tree and a symlink to the victim's, as fast as it can, while
    # we remove "a/tree" relative to the fd again and again.
    victim = victims_tree(tmp_path)
    before = listing(victim)
    flipper = children.python(
        """
        import os, sys
        ours, victim = sys.argv[1], sys.argv[2]
        os.symlink(os.path.join(victim, "a"), os.path.join(ours, "link"))
        os.makedirs(os.path.join(ours, "a", "tree"))
        print("ready", flush=True)
        while not os.path.exists(os.path.join(ours, "stop")):
            os.rename(os.path.join(ours, "a"), os.path.join(ours, "real"))
            os.rename(os.path.join(ours, "link"), os.path.join(ours, "a"))
            try:
                os.makedirs(os.path.join(ours, "real", "tree", "d"), exist_ok=True)
            except FileNotFoundError:
                pass  # we removed tree between its mkdir and d's: next round
            os.rename(os.path.join(ours, "a"), os.path.join(ours, "link"))
            os.rename(os.path.join(ours, "real"), os.path.join(ours, "a"))
    """,
        str(tmp_path / "ours"),
        str(victim),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert flipper.stdout.readline().strip() == "ready"
    for _ in range(300):
        try:
            robust_rmtree("a/tree", dir_fd=opened)
        except OSError as error:
            # The flipper makes tree/d again while we remove the tree: a
            # directory someone keeps filling cannot always be emptied.
            assert error.errno == errno.ENOTEMPTY, error
    (tmp_path / "ours" / "stop").touch()
    assert flipper.wait(timeout=30) == 0
    assert listing(victim) == before


@pytest.mark.parametrize("bad", ["/abs/tree", "../tree", "a/../tree", "./tree", "a/./tree", b"../tree"])
def test_dir_fd_takes_only_a_path_inside_it(tmp_path, opened, bad) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "ours" / "tree").mkdir()
    with pytest.raises(ValueError, match="relative"):
        robust_rmtree(bad, dir_fd=opened)
    assert (tmp_path / "tree").is_dir() and (tmp_path / "ours" / "tree").is_dir()


def test_a_dir_fd_that_is_not_a_directory_is_refused(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    fd = os.open(str(tmp_path / "file"), os.O_RDONLY)
    try:
        with pytest.raises(NotADirectoryError):
            robust_rmtree("file", dir_fd=fd)
    finally:
        os.close(fd)
    assert (tmp_path / "file").exists()


def test_busy_entries_under_dir_fd_are_named_by_the_path_given(tmp_path, opened, monkeypatch) -> None:
    top = tmp_path / "ours" / "a" / "tree"
    top.parent.mkdir()
    make_tree(str(top), depth=2)
    (top / "d1" / "held").write_text("x")
    SillyRenamingUnlink(monkeypatch, "held", closes_after=None)
    with pytest.raises(files.BusyEntriesError) as raised:
        robust_rmtree("a/tree", dir_fd=opened, busy_timeout=0.1)
    assert raised.value.left == [os.path.join("a", "tree", "d1", SILLY)] and raised.value.filename == "a/tree"
    monkeypatch.undo()
    robust_rmtree("a/tree", dir_fd=opened)
    assert os.listdir(tmp_path / "ours" / "a") == []
