"""Unpacking a shipped ZIP archive without trusting it (used by
:class:`~.resources.DirectoryResource`).

Every member is checked before anything is written: its name (no NUL or
other control character, no absolute path, no ``..`` component), its kind
(no symbolic link), the number of members (at most :data:`MAX_MEMBERS`) and
the total size the archive declares (at most :data:`MAX_UNPACKED_BYTES`).
While unpacking, the bytes actually written are counted against the same
limit, so an archive whose declared sizes lie is stopped too (CPython's
``zipfile`` already cuts a member at its declared size and then fails its
CRC check; the count does not rely on that). Both limits are read at call
time, so a caller may lower or raise them.
"""

from __future__ import annotations

import os
import stat
import zipfile
import zlib
from typing import IO, List

from .resource_errors import ResourceException

# Generous bounds for a shipped directory or site-packages; beyond them an
# archive is refused rather than fill the node's disk.
MAX_UNPACKED_BYTES = 1 << 30
MAX_MEMBERS = 100_000

_CHUNK = 1 << 20


def unpack(archive: IO[bytes], dirPath: str) -> None:
    """Unpack the ZIP file *archive* into the existing directory *dirPath*.

    Raises ResourceException, naming the member or the limit, for a refused
    or damaged archive; refusals found by :func:`check_members` come before
    anything is written. After a refusal while writing, *dirPath* holds a
    partial copy: the caller removes it."""
    try:
        with zipfile.ZipFile(archive) as zipFile:
            members = zipFile.infolist()
            check_members(members)
            write_members(zipFile, members, dirPath)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError) as error:
        raise ResourceException(f"refusing to unpack a damaged or unsupported archive: {error}") from error


def check_members(members: List[zipfile.ZipInfo]) -> None:
    """Raise ResourceException unless every member may be unpacked and the
    archive stays within :data:`MAX_MEMBERS` and, by its declared sizes,
    :data:`MAX_UNPACKED_BYTES`."""
    if len(members) > MAX_MEMBERS:
        raise ResourceException(
            f"refusing to unpack an archive of {len(members)} members: the limit is "
            f"{__name__}.MAX_MEMBERS = {MAX_MEMBERS}"
        )
    for member in members:
        check_member(member)
    declared = sum(member.file_size for member in members)
    if declared > MAX_UNPACKED_BYTES:
        raise _too_big(f"an archive that declares {declared} bytes")


def check_member(member: zipfile.ZipInfo) -> None:
    """Raise ResourceException if *member* would land outside the copy, is
    a symbolic link, or has a control character (NUL included) in its name.
    The name checked is the one stored in the archive, before ``zipfile``
    cuts it at a NUL."""
    name = member.orig_filename
    if any(ord(char) < 32 or 127 <= ord(char) < 160 for char in name):
        raise ResourceException(f"refusing to unpack {name!r}: its name holds a control character")
    if name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"):
        raise ResourceException(f"refusing to unpack {name!r}: it points outside the copy")
    if stat.S_ISLNK(member.external_attr >> 16):
        raise ResourceException(f"refusing to unpack {name!r}: archives may not hold symlinks")


def write_members(zipFile: zipfile.ZipFile, members: List[zipfile.ZipInfo], dirPath: str) -> None:
    """Write the (already checked) *members* below *dirPath*, raising
    ResourceException as soon as the bytes written pass
    :data:`MAX_UNPACKED_BYTES`, whatever the archive declared."""
    budget = MAX_UNPACKED_BYTES
    for member in members:
        target = os.path.join(dirPath, *member.filename.split("/"))
        if member.is_dir():
            os.makedirs(target, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with zipFile.open(member) as source, open(target, "wb") as copy:
            for chunk in iter(lambda: source.read(_CHUNK), b""):
                budget -= len(chunk)
                if budget < 0:
                    raise _too_big(f"{member.filename!r}, which unpacks past the limit")
                copy.write(chunk)


def _too_big(what: str) -> ResourceException:
    return ResourceException(
        f"refusing to unpack {what}: the limit is {__name__}.MAX_UNPACKED_BYTES = {MAX_UNPACKED_BYTES} bytes"
    )
