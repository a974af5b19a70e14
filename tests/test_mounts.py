"""Tests for toilcoord.mounts: mount tables, lock scopes, stale names."""

from __future__ import annotations

import os

import pytest

from toilcoord import mounts
from toilcoord.mounts import filesystem_info, lock_scope, parse_mountinfo

from fuzzing import SEED, rng_for, sizes

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "fstype, options, scope",
    [
        ("ext4", ("rw", "relatime"), "node"),
        ("xfs", ("rw",), "node"),
        ("tmpfs", ("rw", "size=100k"), "node"),
        ("overlay", ("rw", "lowerdir=/a"), "node"),
        ("nfs4", ("rw", "vers=4.2", "local_lock=none"), "cluster"),
        ("nfs4", ("rw", "vers=4.2"), "cluster"),
        ("nfs4", ("rw", "local_lock=flock"), "node"),
        ("nfs4", ("rw", "local_lock=all"), "node"),
        ("nfs", ("rw", "vers=3", "local_lock=posix"), "cluster"),
        ("nfs", ("rw", "vers=3", "nolock"), "node"),
        ("lustre", ("rw", "flock"), "cluster"),
        ("lustre", ("rw", "localflock"), "node"),
        ("lustre", ("rw", "noflock"), "unsafe"),
        ("lustre", ("rw",), "unsafe"),
        ("beegfs", ("rw", "cfgFile=/etc/beegfs/beegfs-client.conf"), "node"),
        ("ceph", ("rw", "name=admin"), "unsafe"),
        ("fuse.ceph-fuse", ("rw", "user_id=0"), "unsafe"),
        ("fuse.sshfs", ("rw",), "unknown"),
        ("gpfs", ("rw",), "unknown"),
        ("cifs", ("rw", "vers=3.1.1"), "unknown"),
        ("smb3", ("rw",), "unknown"),
        ("fuse.gcsfuse", ("rw",), "unknown"),
    ],
)
def test_lock_scope(fstype, options, scope):
    got, reason = lock_scope(fstype, options)
    assert got == scope
    assert reason and "\n" not in reason


def test_lock_scope_reasons_say_what_a_user_must_know():
    assert "tuneUseGlobalFileLocks" in lock_scope("beegfs", ())[1]
    assert "noflock" in lock_scope("lustre", ())[1]
    assert "90 s" in lock_scope("nfs4", ("vers=4.2",))[1], "a dead node's locks outlive it"
    assert "SMB" in lock_scope("cifs", ())[1] and "GPFS" in lock_scope("gpfs", ())[1]


def test_parse_mountinfo():
    text = "\n".join(
        [
            "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard",
            "30 27 0:27 / /dev/shm rw,nosuid,nodev - tmpfs tmpfs rw,size=100k",
            "40 27 0:40 / /mnt/my\\040dir\\011x\\134y rw shared:2 master:1 - nfs4 srv:/e rw,vers=4.2,local_lock=flock",
            "41 27 0:41 / /scratch rw,relatime - lustre 10.0.0.1@tcp:/fs rw,flock,lazystatfs",
            "42 27 0:42 / /ceph rw - fuse.ceph-fuse ceph-fuse rw,user_id=0,allow_other",
            "garbage line",
            "43 27 0:43 / /no-separator rw shared:3 ext4 /dev/vdb rw",
            "",
        ]
    )
    mounts = parse_mountinfo(text)
    assert [(m.mount_point, m.fstype) for m in mounts] == [
        ("/", "ext4"),
        ("/dev/shm", "tmpfs"),
        ("/mnt/my dir\tx\\y", "nfs4"),
        ("/scratch", "lustre"),
        ("/ceph", "fuse.ceph-fuse"),
    ]
    assert mounts[0].options == ("rw", "relatime", "discard"), "mount and superblock options, deduplicated"
    assert "local_lock=flock" in mounts[2].options
    assert "flock" in mounts[3].options


@pytest.mark.parametrize(
    "relative, fstype, mount, scope",
    [
        ("nfs", "nfs4", "nfs", "cluster"),
        ("nfs/tmp", "tmpfs", "nfs/tmp", "node"),  # the longest prefix wins
        ("nfs-local", "nfs", "nfs-local", "node"),
        ("nfsdir", "ext4", None, "node"),  # /nfs is a prefix of the string, not of the path
        ("my dir", "nfs4", "my dir", "node"),
        ("stacked", "ceph", "stacked", "unsafe"),  # the later of stacked mounts wins
        ("lustre", "lustre", "lustre", "unsafe"),
        ("unknown", "fuse.sshfs", "unknown", "unknown"),
        ("", "ext4", None, "node"),
    ],
)
def test_filesystem_info_on_a_fake_mount_table(fake_mounts, relative, fstype, mount, scope):
    root, mountinfo = fake_mounts
    info = filesystem_info(os.path.join(root, relative), mountinfo=mountinfo)
    assert info.fstype == fstype
    assert info.mount_point == (os.path.join(root, mount) if mount else "/")
    assert info.lock_scope == scope
    assert info.reason


def test_filesystem_info_follows_symlinks_to_the_real_path(fake_mounts):
    root, mountinfo = fake_mounts
    os.symlink(os.path.join(root, "ceph"), os.path.join(root, "link"))
    assert filesystem_info(os.path.join(root, "link"), mountinfo=mountinfo).fstype == "ceph"


def test_filesystem_info_missing_path_and_unreadable_table(tmp_path):
    with pytest.raises(FileNotFoundError):
        filesystem_info(tmp_path / "missing")
    info = filesystem_info(tmp_path, mountinfo=str(tmp_path / "no-mountinfo"))
    assert info.lock_scope == "unknown"


def test_filesystem_info_on_this_machine(tmp_path):
    info = filesystem_info(tmp_path)
    assert os.path.realpath(str(tmp_path)).startswith(info.mount_point)
    assert info.lock_scope != "unsafe"
    if os.path.isdir("/dev/shm"):
        assert filesystem_info("/dev/shm").fstype == "tmpfs"


# --------------------------------------------------------- stale names


def device_line(number, device, mount_point, fstype, super_options="rw"):
    return f"{number} 1 {device} / {mount_point} rw shared:1 - {fstype} src{number} {super_options}"


@pytest.fixture
def stale_cache(monkeypatch):
    monkeypatch.setattr(mounts, "_stale_names", {})


@pytest.mark.usefixtures("stale_cache")
@pytest.mark.parametrize(
    "fstype, stale",
    [
        ("ext4", False),
        ("xfs", False),
        ("tmpfs", False),
        ("overlay", False),
        ("btrfs", False),
        ("nfs", True),
        ("nfs4", True),
        ("cifs", True),
        ("smb3", True),
        ("fuse.sshfs", True),
        ("lustre", True),
        ("beegfs", True),
        ("gpfs", True),
        ("somethingnew", True),
    ],
)
def test_names_may_be_stale_by_filesystem_type(tmp_path, fstype, stale):
    table = tmp_path / "mountinfo"
    table.write_text(device_line(1, "0:1", "/", "ext4") + "\n" + device_line(2, "0:77", "/elsewhere", fstype) + "\n")
    device = os.makedev(0, 77)
    assert mounts.names_may_be_stale(device, "/not/consulted", mountinfo=str(table)) is stale


@pytest.mark.usefixtures("stale_cache")
def test_names_may_be_stale_tells_two_mounts_of_one_export_apart_by_device(tmp_path):
    # Two nosharecache mounts of one export: the same source, other devices;
    # a local bind mount under one of them has the local device.
    table = tmp_path / "mountinfo"
    table.write_text(
        "\n".join(
            [
                device_line(1, "8:1", "/", "ext4"),
                device_line(2, "0:50", "/mnt/a", "nfs4", "rw,vers=4.2"),
                device_line(3, "0:51", "/mnt/b", "nfs4", "rw,vers=4.2"),
                device_line(4, "8:1", "/mnt/a/local", "ext4"),
            ]
        )
        + "\n"
    )
    assert mounts.names_may_be_stale(os.makedev(0, 51), "/", mountinfo=str(table))
    assert not mounts.names_may_be_stale(os.makedev(8, 1), "/mnt/a/local", mountinfo=str(table))


@pytest.mark.usefixtures("stale_cache")
def test_names_may_be_stale_falls_back_to_the_path_and_then_to_caution(tmp_path):
    table = tmp_path / "mountinfo"
    table.write_text(device_line(1, "8:1", "/", "ext4") + "\n")
    # A device not in the table (a btrfs subvolume, say): found by its path.
    assert not mounts.names_may_be_stale(os.makedev(0, 99), str(tmp_path), mountinfo=str(table))
    unreadable = str(tmp_path / "missing")
    assert mounts.names_may_be_stale(os.makedev(0, 98), str(tmp_path), mountinfo=unreadable)


@pytest.mark.usefixtures("stale_cache")
def test_names_may_be_stale_is_cached_per_device(tmp_path):
    table = tmp_path / "mountinfo"
    table.write_text(device_line(1, "0:60", "/", "nfs") + "\n")
    assert mounts.names_may_be_stale(os.makedev(0, 60), "/", mountinfo=str(table))
    table.write_text(device_line(1, "0:60", "/", "ext4") + "\n")
    assert mounts.names_may_be_stale(os.makedev(0, 60), "/", mountinfo=str(table)), "read once per device"


def test_this_machines_local_disk_has_current_names(tmp_path):
    info = filesystem_info(tmp_path)
    if info.fstype not in ("ext4", "xfs", "tmpfs", "btrfs", "overlay"):
        pytest.skip(f"the test directory is on {info.fstype}")
    assert not mounts.names_may_be_stale(os.stat(tmp_path).st_dev, str(tmp_path))


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
    return " ".join(
        filter(
            None,
            [
                str(20 + index),
                "1",
                "0:%d" % index,
                kernel_escape(rng.choice(["/", "/sub dir"])),
                kernel_escape(mount_point),
                kernel_escape(",".join(options[:1]) or "rw"),
                optional,
                "-",
                kernel_escape(fstype),
                kernel_escape(rng.choice(["server:/export", "none", "/dev/sda1", "a b"])),
                kernel_escape(",".join(options[1:]) or "rw"),
            ],
        )
    )


def garbage_line(rng):
    tokens = ["-", "", "\\", "\\0", "\\777", "\\12", "\\040", "a", "1", "rw", "nfs", "\udcff", " "]
    return " ".join(rng.choice(tokens) for _ in range(rng.randrange(0, 14)))


def fuzz_mountinfo(rounds):
    rng = rng_for("mountinfo")
    for round_ in range(rounds):
        mounts = [
            (
                odd_mount_point(rng),
                rng.choice(["nfs", "ext4", "fuse.odd fs", "lustre", "x\\y"]),
                rng.sample(["rw", "ro", "local_lock=flock", "flock", "nolock", "a b"], rng.randint(0, 4)),
            )
            for _ in range(rng.randint(1, 5))
        ]
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
        lines = [
            mountinfo_line(rng, 0, "/", "ext4", ["rw"]),
            mountinfo_line(rng, 1, str(mount), "nfs", ["rw", "local_lock=flock"]),
            mountinfo_line(rng, 2, decoy, "ceph", ["rw"]),
        ]
        rng.shuffle(lines)
        table = tmp_path / "mountinfo"
        table.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogateescape")
        info = filesystem_info(mount / "job", mountinfo=str(table))
        assert (info.mount_point, info.fstype, info.lock_scope) == (str(mount), "nfs", "node"), repr(odd)
