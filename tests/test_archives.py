"""Tests of toilcoord.archives: refusing hostile or oversized archives before and while unpacking."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import zipfile

import pytest

from toilcoord import archives
from toilcoord.jobstore import LocalJobStore
from toilcoord.resource_errors import ResourceException
from toilcoord.resources import DirectoryResource

from shipping import resource_root

pytestmark = pytest.mark.timeout(60)

root = pytest.fixture(name="root")(resource_root)


def store_bytes(store, name, data):
    """Put *data* in *store* as a resource of class DirectoryResource."""
    with store.write_shared_file_stream(name) as writer:
        writer.write(data)
    return DirectoryResource(
        name="d", pathHash=name, url=store.get_shared_public_url(name), contentHash=hashlib.md5(data).hexdigest()
    )


def zip_of(*members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for info, data in members:
            archive.writestr(info, data)
    return buffer.getvalue()


def symlink_member(name, target):
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target


@pytest.mark.parametrize(
    "member",
    [
        ("../evil", "x"),
        ("a/../../evil", "x"),
        ("/tmp/evil-absolute", "x"),
        symlink_member("link", "../../evil-target"),
        symlink_member("inner", "inside"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-out", "symlink-in"],
)
def test_malicious_zip_is_refused_before_anything_is_written(tmp_path, root, member):
    resource = store_bytes(LocalJobStore(tmp_path / "store"), "evil", zip_of(("fine.txt", "ok"), member))
    before = sorted(os.listdir(tmp_path))

    with pytest.raises(ResourceException, match="refusing to unpack"):
        resource.download()

    assert os.listdir(root) == []
    assert sorted(os.listdir(tmp_path)) == before
    assert not os.path.exists("/tmp/evil-absolute")


def zip_with_name(raw_name):
    """A real archive whose second member's stored name is the bytes
    *raw_name* (zipfile cuts names it is given at a NUL, so the name is
    patched into the archive's bytes)."""
    placeholder = b"P" * len(raw_name)
    data = zip_of(("fine.txt", "ok"), (placeholder.decode(), "x"))
    assert data.count(placeholder) == 2  # the local header and the central directory
    return data.replace(placeholder, raw_name)


@pytest.mark.parametrize(
    "raw_name",
    [b"evil.py\0.txt", b"red\x1b[31m.py", b"two\nlines.py", b"del\x7f.py"],
    ids=["nul", "escape", "newline", "del"],
)
def test_member_name_with_a_control_character_is_refused(tmp_path, root, raw_name):
    resource = store_bytes(LocalJobStore(tmp_path / "store"), "evil", zip_with_name(raw_name))
    before = sorted(os.listdir(tmp_path))

    with pytest.raises(ResourceException, match="refusing to unpack .* control character"):
        resource.download()

    assert os.listdir(root) == []
    assert sorted(os.listdir(tmp_path)) == before


def zeros_zip(size, declared=None):
    """A real deflated archive of one member, *size* zero bytes (about a
    thousandth of that on disk); *declared* overwrites the size its central
    directory states, so the archive lies."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("zeros.bin", "w") as member:
            for _ in range(size >> 20):
                member.write(bytes(1 << 20))
    data = buffer.getvalue()
    if declared is not None:
        entry = data.index(b"PK\x01\x02") + 24  # the uncompressed size in the central directory
        data = data[:entry] + declared.to_bytes(4, "little") + data[entry + 4 :]
    return data


@pytest.fixture
def small_limit(monkeypatch):
    """A 4 MiB unpacking limit, so bombs stay small and fast."""
    monkeypatch.setattr(archives, "MAX_UNPACKED_BYTES", 4 << 20)
    return 4 << 20


@pytest.mark.parametrize("declared", [None, 1], ids=["honest", "lying"])
def test_archive_unpacking_past_the_limit_is_refused(tmp_path, root, small_limit, declared):
    bomb = zeros_zip(8 << 20, declared)
    assert len(bomb) < 16 << 10
    resource = store_bytes(LocalJobStore(tmp_path / "store"), "bomb", bomb)
    before = sorted(os.listdir(tmp_path))

    with pytest.raises(ResourceException, match="refusing to unpack") as refused:
        resource.download()

    if declared is None:  # refused from the declared sizes, before writing anything
        assert str(small_limit) in str(refused.value) and "MAX_UNPACKED_BYTES" in str(refused.value)
    assert os.listdir(root) == []
    assert sorted(os.listdir(tmp_path)) == before


def test_bytes_written_are_counted_whatever_the_archive_declares(tmp_path, small_limit):
    with zipfile.ZipFile(io.BytesIO(zeros_zip(8 << 20))) as archive:
        with pytest.raises(ResourceException, match=r"'zeros.bin', which unpacks past the limit.*4194304"):
            archives.write_members(archive, archive.infolist(), str(tmp_path))  # the declared check skipped
    assert os.path.getsize(tmp_path / "zeros.bin") <= small_limit


def test_archive_with_too_many_members_is_refused(tmp_path, root, monkeypatch):
    monkeypatch.setattr(archives, "MAX_MEMBERS", 10)
    resource = store_bytes(LocalJobStore(tmp_path / "store"), "many", zip_of(*[(f"m{i}.py", "") for i in range(11)]))

    with pytest.raises(ResourceException, match=r"11 members: the limit is toilcoord\.archives\.MAX_MEMBERS = 10"):
        resource.download()
    assert os.listdir(root) == []


def test_default_limits_are_generous():
    assert archives.MAX_UNPACKED_BYTES == 1 << 30 and archives.MAX_MEMBERS == 100_000
