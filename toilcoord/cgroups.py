"""Limits this process's cgroups set: CPU quota and memory.

The one place that reads ``/proc/self/cgroup`` and the cgroup filesystem
(v1, v2 and hybrid). Every limit is looked up in the process's own cgroup
*and every ancestor*, the smallest wins: a job's cgroup often has no limit
of its own while its parent (the job allocation, the container) has one.
Both functions take the paths to read, so a test can hand them a fake tree.
Missing, unreadable or garbled files never raise: they just do not limit.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, List, NamedTuple, Optional, Tuple

__all__ = ["cgroup_cpu_limit", "cgroup_memory_limit"]

logger = logging.getLogger(__name__)

_PROC_SELF_CGROUP = "/proc/self/cgroup"
_CGROUP_ROOT = "/sys/fs/cgroup"

# A memory limit this large is "no limit": v1 writes "unlimited" as
# PAGE_COUNTER_MAX pages (about 2**63 bytes, rounded to the page size), and
# no machine has an exbibyte of memory.
_UNLIMITED_MEMORY = 1 << 60


def cgroup_cpu_limit(proc_self_cgroup: str = _PROC_SELF_CGROUP, cgroup_root: str = _CGROUP_ROOT) -> Optional[float]:
    """The CPU quota, in CPUs, of the tightest cgroup this process is in.

    Reads the process's cgroups from *proc_self_cgroup* and, under
    *cgroup_root*, the v1 ``cpu`` controller's ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us`` (mounted as ``cpu``, ``cpu,cpuacct`` or
    ``cpuacct,cpu``) and the v2 ``cpu.max`` (in *cgroup_root* itself, or in
    its ``unified`` folder on hybrid systems) of the process's cgroup and of
    every ancestor; returns the smallest quota, e.g. ``0.5``, or None when
    none is limited. When the cgroup's path does not exist under the mount
    (a cgroup namespace or a container that sees only its own subtree), the
    ancestors that do exist are checked, and so is the longest tail of the
    path that exists, with its ancestors. Missing, unreadable or garbled
    files never raise: they just do not limit.
    """
    return _smallest(_CPU, proc_self_cgroup, cgroup_root)


def cgroup_memory_limit(proc_self_cgroup: str = _PROC_SELF_CGROUP, cgroup_root: str = _CGROUP_ROOT) -> Optional[int]:
    """The memory limit, in bytes, of the tightest cgroup this process is in.

    v2: ``memory.max`` (``max`` is unlimited); v1: the ``memory``
    controller's ``memory.limit_in_bytes``; of the process's cgroup and
    every ancestor, found as :func:`cgroup_cpu_limit` finds them. Values of
    2**60 bytes or more count as unlimited (v1's way of saying so). None
    when nothing limits. ``memory.high`` (a throttle, not a limit) and swap
    limits are not counted.
    """
    return _smallest(_MEMORY, proc_self_cgroup, cgroup_root)


# ------------------------------------------------------------- readers


def _read_words(path: str) -> Optional[List[str]]:
    try:
        with open(path, "rb") as file:
            return file.read(256).decode("ascii").split()
    except (OSError, UnicodeDecodeError) as error:
        if not isinstance(error, FileNotFoundError):
            logger.debug("cannot read %s: %s", path, error)
        return None


def _positive_int(word: str) -> Optional[int]:
    # int() would accept "+5", " 5", "٥" and "1_000": the kernel writes none.
    return int(word) if word.isascii() and word.isdigit() and int(word) > 0 else None


def _read_v2_cpu(directory: str) -> Optional[float]:
    # cpu.max is "$MAX $PERIOD"; $MAX "max" means unlimited.
    # https://docs.kernel.org/admin-guide/cgroup-v2.html#cpu-interface-files
    fields = _read_words(os.path.join(directory, "cpu.max"))
    if fields is None or fields[:1] == ["max"]:
        return None
    if len(fields) != 2:
        logger.debug("ignoring garbled %s: %r", os.path.join(directory, "cpu.max"), fields)
        return None
    return _ratio(fields[0], fields[1], directory)


def _read_v1_cpu(directory: str) -> Optional[float]:
    # cpu.cfs_quota_us is -1 when unlimited.
    # https://docs.kernel.org/scheduler/sched-bwc.html
    quota = _read_words(os.path.join(directory, "cpu.cfs_quota_us"))
    if quota is None or quota == ["-1"]:
        return None
    period = _read_words(os.path.join(directory, "cpu.cfs_period_us"))
    if period is None or len(quota) != 1 or len(period) != 1:
        return None
    return _ratio(quota[0], period[0], directory)


def _ratio(quota: str, period: str, directory: str) -> Optional[float]:
    quota_us, period_us = _positive_int(quota), _positive_int(period)
    if quota_us is None or period_us is None:
        logger.debug("ignoring CPU quota %r/%r in %s", quota, period, directory)
        return None
    return quota_us / period_us


def _memory_reader(file_name: str) -> Callable[[str], Optional[int]]:
    def read(directory: str) -> Optional[int]:
        # v2 memory.max: bytes or "max"; v1 memory.limit_in_bytes: bytes.
        # https://docs.kernel.org/admin-guide/cgroup-v2.html#memory-interface-files
        path = os.path.join(directory, file_name)
        fields = _read_words(path)
        if fields is None or fields == ["max"]:
            return None
        limit = _positive_int(fields[0]) if len(fields) == 1 else None
        if limit is None:
            logger.debug("ignoring garbled %s: %r", path, fields)
            return None
        return limit if limit < _UNLIMITED_MEMORY else None

    return read


class _Controller(NamedTuple):
    v1_names: Tuple[str, ...]  # the v1 controller and the mount folders it may be in
    read_v1: Callable[[str], Optional[float]]
    read_v2: Callable[[str], Optional[float]]


_CPU = _Controller(("cpu", "cpu,cpuacct", "cpuacct,cpu"), _read_v1_cpu, _read_v2_cpu)
_MEMORY = _Controller(("memory",), _memory_reader("memory.limit_in_bytes"), _memory_reader("memory.max"))


# ---------------------------------------------------------- the walk


def _smallest(controller: _Controller, proc_self_cgroup: str, cgroup_root: str) -> Optional[float]:
    limits = []
    for read, mount, parts in _cgroups_of(controller, proc_self_cgroup, cgroup_root):
        for directory in _dirs_to_check(mount, parts):
            limit = read(directory)
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


def _cgroups_of(
    controller: _Controller, proc_self_cgroup: str, cgroup_root: str
) -> List[Tuple[Callable[[str], Optional[float]], str, List[str]]]:
    """[(limit reader, mount directory, cgroup path parts)] of *controller*."""
    try:
        with open(proc_self_cgroup, encoding="utf-8", errors="surrogateescape") as lines:
            text = lines.read()
    except OSError as error:
        logger.debug("cannot read %s (%s): no cgroup limits", proc_self_cgroup, error)
        return []
    found = []
    for line in text.splitlines():
        # "hierarchy-id:controller,list:/path"; the path may contain ':'.
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":
            read, mount = controller.read_v2, _v2_mount(cgroup_root)
        elif controller.v1_names[0] in controllers.split(","):
            read, mount = controller.read_v1, _v1_mount(cgroup_root, controllers, controller.v1_names)
        else:
            continue
        # A process outside its cgroup namespace's root sees "/../x": the
        # ".." parts name nothing under the mount.
        parts = [part for part in path.split("/") if part not in ("", ".", "..")]
        found.append((read, mount, parts))
    return found


def _v2_mount(cgroup_root: str) -> str:
    # Pure v2: the root is the unified hierarchy. Hybrid (systemd): it is a
    # tmpfs of v1 mounts with the unified one in "unified".
    unified = os.path.join(cgroup_root, "unified")
    if not os.path.exists(os.path.join(cgroup_root, "cgroup.controllers")) and os.path.isdir(unified):
        return unified
    return cgroup_root


def _v1_mount(cgroup_root: str, controllers: str, names: Tuple[str, ...]) -> str:
    for name in (controllers,) + names:
        candidate = os.path.join(cgroup_root, name)
        if os.path.isdir(candidate):
            return candidate
    return os.path.join(cgroup_root, controllers)


def _dirs_to_check(mount: str, parts: List[str]) -> List[str]:
    """The cgroup's directory and its ancestors up to *mount* (missing ones
    included: reading them just finds nothing)."""
    dirs = [os.path.join(mount, *parts[:depth]) for depth in range(len(parts), -1, -1)]
    if not os.path.isdir(dirs[0]):
        # The mount's root is not the hierarchy's root (a container that was
        # given only its own subtree): the tail of the path is relative to it.
        for start in range(1, len(parts)):
            if os.path.isdir(os.path.join(mount, *parts[start:])):
                dirs += [os.path.join(mount, *parts[start:end]) for end in range(len(parts), start, -1)]
                break
    return dirs
