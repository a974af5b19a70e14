"""coordination_dir and job_private_reasons: real directories, planted
entries, another user's, fake mount tables and a real mount namespace."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys

import pytest

from toilcoord import coorddir, mounts
from toilcoord.coorddir import CoordinationDirError, coordination_dir, job_private_reasons
from toilcoord.locks import UnsafeFilesystemError

from conftest import ROOT, child_env, mount_line

UID = os.geteuid()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No XDG_RUNTIME_DIR, TMPDIR under tmp_path, fresh caches."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    tmp = tmp_path / "tmp"
    tmp.mkdir(mode=0o700)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(mounts, "_stale_names", {})  # fake mount tables differ from test to test
    monkeypatch.setattr(coorddir, "_warned", set())


def private_dir(path) -> str:
    os.makedirs(path)
    os.chmod(path, 0o700)
    return str(path)


def mode_of(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_xdg_runtime_dir_first(monkeypatch, tmp_path) -> None:
    xdg = private_dir(tmp_path / "xdg")
    monkeypatch.setenv("XDG_RUNTIME_DIR", xdg)
    path = coordination_dir("jobs")
    assert path == os.path.join(xdg, "jobs") and mode_of(path) == 0o700 and os.stat(path).st_uid == UID
    assert coordination_dir("jobs") == path  # found again, same place


def test_a_local_tmpdir_next(tmp_path) -> None:
    path = coordination_dir("jobs")
    assert path == str(tmp_path / "tmp" / f"jobs-{UID}") and mode_of(path) == 0o700


def test_the_umask_does_not_change_the_mode(tmp_path) -> None:
    old = os.umask(0o077 | 0o200)
    try:
        path = coordination_dir("jobs")
    finally:
        os.umask(old)
    assert mode_of(path) == 0o700


@pytest.mark.parametrize("spoil", ["missing", "mode 755", "a file", "relative", "a symlink"])
def test_a_bad_xdg_runtime_dir_is_skipped(monkeypatch, tmp_path, spoil: str, caplog) -> None:
    caplog.set_level(logging.INFO, logger="toilcoord.coorddir")
    xdg = tmp_path / "xdg"
    if spoil == "mode 755":
        xdg.mkdir(mode=0o755)
        os.chmod(xdg, 0o755)
    elif spoil == "a file":
        xdg.write_text("")
    elif spoil == "a symlink":
        os.symlink(private_dir(tmp_path / "elsewhere"), xdg)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "xdg" if spoil == "relative" else str(xdg))
    assert coordination_dir("jobs") == str(tmp_path / "tmp" / f"jobs-{UID}")
    assert not os.path.exists(tmp_path / "elsewhere" / "jobs")
    if spoil != "relative":
        assert f"not using {xdg}" in caplog.text


def test_another_users_xdg_runtime_dir_is_skipped(monkeypatch, tmp_path, other_user) -> None:
    xdg = private_dir(tmp_path / "xdg")
    os.chown(xdg, *other_user)
    monkeypatch.setenv("XDG_RUNTIME_DIR", xdg)
    assert coordination_dir("jobs") == str(tmp_path / "tmp" / f"jobs-{UID}")
    assert os.listdir(xdg) == []


def test_a_planted_symlink_is_refused_and_left_alone(tmp_path) -> None:
    target = private_dir(tmp_path / "attacker")
    planted = tmp_path / "tmp" / f"jobs-{UID}"
    os.symlink(target, planted)
    with pytest.raises(CoordinationDirError, match="symlink"):
        coordination_dir("jobs")
    assert os.readlink(planted) == target and os.listdir(target) == [] and mode_of(target) == 0o700


def test_a_planted_file_is_refused(tmp_path) -> None:
    (tmp_path / "tmp" / f"jobs-{UID}").write_text("")
    with pytest.raises(CoordinationDirError, match="not a directory"):
        coordination_dir("jobs")


def test_another_users_directory_is_refused_and_left_alone(tmp_path, other_user) -> None:
    theirs = private_dir(tmp_path / "tmp" / f"jobs-{UID}")
    os.chown(theirs, *other_user)
    with pytest.raises(PermissionError, match="belongs to uid"):
        coordination_dir("jobs")
    assert os.stat(theirs).st_uid == other_user[0] and mode_of(theirs) == 0o700


def test_our_directory_open_to_others_is_refused_not_fixed(tmp_path) -> None:
    ours = private_dir(tmp_path / "tmp" / f"jobs-{UID}")
    os.chmod(ours, 0o777)
    with pytest.raises(CoordinationDirError, match="mode 777"):
        coordination_dir("jobs")
    assert mode_of(ours) == 0o777


def test_a_tmpdir_open_to_everyone_without_sticky_bit_is_skipped(tmp_path) -> None:
    os.chmod(tmp_path / "tmp", 0o777)
    purpose = f"tc-test-{os.getpid()}"
    path = coordination_dir(purpose)
    try:
        assert path == f"/tmp/{purpose}-{UID}"
    finally:
        os.rmdir(path)


@pytest.mark.parametrize("purpose", ["", "a/b", "..", ".hidden", "nul\0", "x" * 201])
def test_bad_purposes(purpose: str) -> None:
    with pytest.raises(ValueError):
        coordination_dir(purpose)


def test_a_purpose_that_is_not_a_str() -> None:
    with pytest.raises(TypeError):
        coordination_dir(b"jobs")


# ------------------------------------------------------ fake mount tables


@pytest.mark.parametrize(
    "fstype, options",
    [
        ("nfs4", "rw,vers=4.2,local_lock=none"),
        ("nfs", "rw,vers=3,local_lock=all"),
        ("nfs4", "rw,local_lock=flock"),
        ("lustre", "rw,localflock"),
        ("lustre", "rw,noflock"),
        ("ceph", "rw"),
        ("fuse.sshfs", "rw"),
        ("beegfs", "rw"),
    ],
)
def test_a_tmpdir_on_a_network_filesystem_is_skipped(monkeypatch, tmp_path, fstype, options, caplog) -> None:
    # The "network" TMPDIR is on /dev/shm, a real device of its own: what is
    # known of a filesystem is kept per device (mounts.names_may_be_stale).
    caplog.set_level(logging.INFO, logger="toilcoord.coorddir")
    if os.stat("/dev/shm").st_dev == os.stat("/tmp").st_dev:
        pytest.skip("/dev/shm and /tmp are one filesystem here")
    network = f"/dev/shm/tc-test-{os.getpid()}"
    os.mkdir(network, 0o700)
    purpose = f"tc-test-{os.getpid()}"
    try:
        mountinfo = table(tmp_path, mount_line(1, "/", "ext4", "rw"), mount_line(2, network, fstype, options))
        monkeypatch.setenv("TMPDIR", network)
        path = coordination_dir(purpose, mountinfo=mountinfo)
        assert path == f"/tmp/{purpose}-{UID}"
        os.rmdir(path)
        assert os.listdir(network) == []
    finally:
        os.rmdir(network)
    assert "not a filesystem local to this node" in caplog.text


def test_a_tmpfs_under_nfs_is_local(monkeypatch, fake_mounts) -> None:
    root, mountinfo = fake_mounts
    monkeypatch.setenv("TMPDIR", os.path.join(root, "nfs", "tmp"))
    assert coordination_dir("jobs", mountinfo=mountinfo) == os.path.join(root, "nfs", "tmp", f"jobs-{UID}")


def table(tmp_path, *lines: str) -> str:
    path = tmp_path / "mountinfo"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_nothing_node_local_is_an_error(monkeypatch, tmp_path) -> None:
    mountinfo = table(tmp_path, mount_line(1, "/", "nfs4", "rw,vers=4.2"))
    with pytest.raises(UnsafeFilesystemError, match="no node-local directory"):
        coordination_dir("jobs", mountinfo=mountinfo)
    assert os.listdir(tmp_path / "tmp") == []


def per_job_tmp_line(number: int, point: str = "/tmp") -> str:
    # Slurm's job_container/tmpfs bind-mounts <BasePath>/<job>/.<job> on /tmp.
    line = mount_line(number, point, "xfs", "rw")
    fields = line.split(" ")
    fields[3] = "/slurm/4711/.4711"
    return " ".join(fields)


def test_a_per_job_tmp_in_the_mount_table_is_reported(tmp_path, caplog) -> None:
    mountinfo = table(
        tmp_path,
        mount_line(1, "/", "ext4", "rw"),
        mount_line(2, "/tmp", "tmpfs", "rw"),
        per_job_tmp_line(3),
        per_job_tmp_line(4, "/dev/shm"),
    )
    reasons = job_private_reasons("/tmp/x", mountinfo)
    assert any("/tmp is /slurm/4711/.4711" in reason for reason in reasons)
    assert any("/dev/shm" in reason for reason in job_private_reasons("/dev/shm", mountinfo))
    assert not any("/slurm" in reason for reason in job_private_reasons(str(tmp_path), mountinfo)) or str(
        tmp_path
    ).startswith("/tmp/")


def test_coordination_dir_warns_of_a_per_job_tmp_once(monkeypatch, tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="toilcoord.coorddir")
    monkeypatch.delenv("TMPDIR")
    mountinfo = table(tmp_path, mount_line(1, "/", "ext4", "rw"), per_job_tmp_line(2))
    purpose = f"tc-test-{os.getpid()}"
    try:
        path = coordination_dir(purpose, mountinfo=mountinfo)
        coordination_dir(purpose, mountinfo=mountinfo)
    finally:
        os.rmdir(f"/tmp/{purpose}-{UID}")
    assert caplog.text.count("may be private to this job") == 1 and path in caplog.text


def test_an_ordinary_tmpfs_tmp_is_not_per_job(tmp_path) -> None:
    mountinfo = table(tmp_path, mount_line(1, "/", "ext4", "rw"), mount_line(2, "/tmp", "tmpfs", "rw"))
    assert not any("/tmp is" in reason for reason in job_private_reasons("/tmp/x", mountinfo))


@pytest.mark.timeout(60)
def test_a_real_private_mount_namespace_with_a_bound_tmp(tmp_path) -> None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to make a mount namespace")
    job_tmp = private_dir(tmp_path / "job-4711")
    code = "import sys; from toilcoord.coorddir import job_private_reasons as r; print('\\n'.join(r('/tmp/x')))"
    done = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount --bind "$1" /tmp && exec "$2" -c "$3"',
            "sh",
            job_tmp,
            os.path.realpath(sys.executable),
            code,
        ],
        # The package through the working directory's magic link, which still
        # reaches the checkout when it is under the /tmp the bind mount hides.
        env=dict(child_env(), PYTHONPATH="/proc/self/cwd"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    if done.returncode != 0 and ("Operation not permitted" in done.stderr or "unshare failed" in done.stderr):
        pytest.skip(f"cannot make a mount namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert f"/tmp is {job_tmp}" in done.stdout or "mount namespace of its own" in done.stdout, done.stdout


def test_public_names() -> None:
    assert set(coorddir.__all__) == {"CoordinationDirError", "coordination_dir", "job_private_reasons"}
    assert issubclass(CoordinationDirError, PermissionError)
