"""robust_rmtree on real trees: symlinks, odd names, depth, concurrent deleters."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
from typing import Callable, List

import pytest

from toilcoord import files
from toilcoord.files import robust_rmtree

from conftest import run_python

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
        result = run_python("""
            import os, resource, sys
            from toilcoord.files import robust_rmtree
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))  # far fewer than 2000 levels
            sys.setrecursionlimit(100)
            robust_rmtree(sys.argv[1])
            print("removed")
        """, top)
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
            children.python("""
                import sys
                from toilcoord.files import robust_rmtree
                sys.stdin.read()  # the starting gate: all start when it closes
                robust_rmtree(sys.argv[1])
                print("done")
            """, top, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
        result = run_python("""
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
        """, os.path.join(scratch, "tree"))
        assert result.returncode == 0, result.stderr
        assert result.stdout == "PermissionError True\n"
        assert os.path.isdir(os.path.join(scratch, "tree"))
    finally:
        for directory, _, _ in os.walk(scratch):
            os.chmod(directory, 0o755)
        shutil.rmtree(scratch)


def test_public_names() -> None:
    assert files.__all__ == ["robust_rmtree"]
