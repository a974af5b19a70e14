"""Threads that hand their exception to ``join()``, and an honest CPU count.

:class:`ExceptionalThread` is Toil's: ``join()`` re-raises what ``run()``
raised. :func:`cpu_count` is what a pipeline may really use on a shared node:
the machine's CPUs, narrowed by the affinity mask and by the CPU quota of the
process's own cgroup *and every ancestor* (Toil reads only one cgroup's
quota), with ``PYTHON_CPU_COUNT`` overriding everything as in Python 3.13.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import threading
from typing import Callable, List, NamedTuple, Optional, Tuple

__all__ = [
    "CpuCountSources",
    "ExceptionalThread",
    "cgroup_cpu_limit",
    "cpu_count",
    "cpu_count_sources",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------- ExceptionalThread

class ExceptionalThread(threading.Thread):
    """A thread whose ``join()`` re-raises the exception ``run()`` raised.

    Subclasses override :meth:`tryRun` instead of ``run()``; or pass
    ``target`` as to :class:`threading.Thread`. The exception is raised once,
    by the first ``join()`` that finds the thread finished (even when several
    threads join at once), and later joins raise nothing; a ``join()`` that
    times out raises nothing (the next one that joins does). As in Toil, the exception also goes to
    :func:`threading.excepthook` when the thread dies, so it is reported even
    if nobody joins.
    """

    exc_info = None

    def run(self) -> None:
        try:
            self.tryRun()
        except BaseException:
            self.exc_info = sys.exc_info()
            raise

    def tryRun(self) -> None:
        """The thread's work; by default calls ``target(*args, **kwargs)``."""
        super().run()

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait for the thread as ``Thread.join``; then, if it has finished and
        its exception was not raised yet, raise it here."""
        super().join(timeout)
        if self.is_alive():
            return
        # dict.pop is atomic: of two threads joining at once, one gets it.
        error = self.__dict__.pop("exc_info", (None, None, None))[1]
        if error is not None:
            try:
                raise error
            finally:
                del error  # no cycle through this frame's traceback


# --------------------------------------------------------------- cpu_count

class CpuCountSources(NamedTuple):
    """How :func:`cpu_count` got its answer.

    ``machine``: ``os.cpu_count()``; ``affinity``: CPUs in this process's
    affinity mask; ``cgroup``: the smallest cgroup quota in CPUs
    (fractional); ``env``: a valid ``PYTHON_CPU_COUNT``. Each is None when
    unknown, unlimited or unset. ``count`` is the answer and ``decided_by``
    names the source it came from: ``"env"``, ``"cgroup"``, ``"affinity"``,
    ``"machine"`` or ``"default"`` (nothing known: 1).
    """

    machine: Optional[int]
    affinity: Optional[int]
    cgroup: Optional[float]
    env: Optional[int]
    count: int
    decided_by: str


# (os.cpu_count(), cgroup_cpu_limit()) of this process; None until first
# asked. The affinity mask and the environment are read on every call instead:
# they are this process's own, cheap to read, and may change at any time
# (os.sched_setaffinity, taskset -p). A forked child may be moved to another
# cgroup before it asks (batch systems do this), so it forgets the cache.
_cached: Optional[Tuple[Optional[int], Optional[float]]] = None


def _forget_cache() -> None:
    global _cached
    _cached = None


os.register_at_fork(after_in_child=_forget_cache)


def cpu_count() -> int:
    """The number of whole CPUs this process may use, at least 1.

    The smallest of the machine's CPUs, the affinity mask and the CPU quota
    of this process's cgroup and all its ancestors (cgroup v1 and v2),
    rounded up. ``PYTHON_CPU_COUNT`` set to a positive integer wins; any
    other value in it is ignored. Hyperthreads count as CPUs; cpu shares and
    weights are ignored (they are relative, not limits). The cgroup quota is
    read once per process (again in a forked child); the affinity mask and
    the environment variable on every call.
    """
    return cpu_count_sources().count


def cpu_count_sources() -> CpuCountSources:
    """Every input of :func:`cpu_count` and its answer, for reports and CLIs."""
    global _cached
    if _cached is None:
        _cached = (os.cpu_count(), cgroup_cpu_limit())
    machine, cgroup = _cached
    affinity = _affinity_count()
    env = _env_cpu_count()
    if env is not None:
        return CpuCountSources(machine, affinity, cgroup, env, env, "env")
    candidates = [
        (math.ceil(value), name)
        for value, name in ((machine, "machine"), (affinity, "affinity"), (cgroup, "cgroup"))
        if value is not None
    ]
    # min() keeps the first of equal counts, so a narrower source is named
    # only when it really lowered the count.
    count, decided_by = min(candidates, key=lambda pair: pair[0]) if candidates else (1, "default")
    return CpuCountSources(machine, affinity, cgroup, env, count, decided_by)


def _affinity_count() -> Optional[int]:
    if not hasattr(os, "sched_getaffinity"):  # macOS
        return None
    return len(os.sched_getaffinity(0)) or None


def _env_cpu_count() -> Optional[int]:
    # Python 3.13 accepts a positive decimal integer (or "default").
    value = os.environ.get("PYTHON_CPU_COUNT", "")
    if value.isascii() and value.isdigit() and int(value) > 0:
        return int(value)
    return None


# -------------------------------------------------------- cgroup quotas

def cgroup_cpu_limit(
    proc_self_cgroup: str = "/proc/self/cgroup", cgroup_root: str = "/sys/fs/cgroup"
) -> Optional[float]:
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
    limits: List[float] = []
    for read_quota, mount, path in _cpu_cgroups(proc_self_cgroup, cgroup_root):
        for directory in _dirs_to_check(mount, path):
            quota = read_quota(directory)
            if quota is not None:
                limits.append(quota)
    return min(limits) if limits else None


_QuotaReader = Callable[[str], Optional[float]]


def _cpu_cgroups(proc_self_cgroup: str, cgroup_root: str) -> List[Tuple[_QuotaReader, str, List[str]]]:
    """[(quota reader, mount directory, cgroup path parts)] of the cpu controller."""
    try:
        with open(proc_self_cgroup, encoding="utf-8", errors="surrogateescape") as lines:
            text = lines.read()
    except OSError as error:
        logger.debug("cannot read %s (%s): no cgroup CPU limit", proc_self_cgroup, error)
        return []
    found = []
    for line in text.splitlines():
        # "hierarchy-id:controller,list:/path"; the path may contain ':'.
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":
            read_quota, mount = _read_v2_quota, _v2_mount(cgroup_root)
        elif "cpu" in controllers.split(","):
            read_quota, mount = _read_v1_quota, _v1_cpu_mount(cgroup_root, controllers)
        else:
            continue
        # A process outside its cgroup namespace's root sees "/../x": the
        # ".." parts name nothing under the mount.
        parts = [part for part in path.split("/") if part not in ("", ".", "..")]
        found.append((read_quota, mount, parts))
    return found


def _v2_mount(cgroup_root: str) -> str:
    # Pure v2: the root is the unified hierarchy. Hybrid (systemd): it is a
    # tmpfs of v1 mounts with the unified one in "unified".
    unified = os.path.join(cgroup_root, "unified")
    if not os.path.exists(os.path.join(cgroup_root, "cgroup.controllers")) and os.path.isdir(unified):
        return unified
    return cgroup_root


def _v1_cpu_mount(cgroup_root: str, controllers: str) -> str:
    for name in (controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu"):
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


def _read_v2_quota(directory: str) -> Optional[float]:
    # cpu.max is "$MAX $PERIOD"; $MAX "max" means unlimited.
    # https://docs.kernel.org/admin-guide/cgroup-v2.html#cpu-interface-files
    fields = _read_words(os.path.join(directory, "cpu.max"))
    if fields is None or fields[:1] == ["max"]:
        return None
    if len(fields) != 2:
        logger.debug("ignoring garbled %s: %r", os.path.join(directory, "cpu.max"), fields)
        return None
    return _ratio(fields[0], fields[1], directory)


def _read_v1_quota(directory: str) -> Optional[float]:
    # cpu.cfs_quota_us is -1 when unlimited.
    # https://docs.kernel.org/scheduler/sched-bwc.html
    quota = _read_words(os.path.join(directory, "cpu.cfs_quota_us"))
    if quota is None or quota == ["-1"]:
        return None
    period = _read_words(os.path.join(directory, "cpu.cfs_period_us"))
    if period is None or len(quota) != 1 or len(period) != 1:
        return None
    return _ratio(quota[0], period[0], directory)


def _read_words(path: str) -> Optional[List[str]]:
    try:
        with open(path, "rb") as file:
            return file.read(256).decode("ascii").split()
    except (OSError, UnicodeDecodeError) as error:
        if not isinstance(error, FileNotFoundError):
            logger.debug("cannot read %s: %s", path, error)
        return None


def _ratio(quota: str, period: str, directory: str) -> Optional[float]:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        quota_us = period_us = 0
    if quota_us <= 0 or period_us <= 0:
        logger.debug("ignoring CPU quota %r/%r in %s", quota, period, directory)
        return None
    return quota_us / period_us
