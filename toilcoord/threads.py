"""Threads that hand their exception to ``join()``, and honest resource limits.

:class:`ExceptionalThread` is Toil's: ``join()`` re-raises what ``run()``
raised. :func:`cpu_count` is what a pipeline may really use on a shared node:
the machine's CPUs, narrowed by the affinity mask, by the CPU quota of the
process's own cgroup *and every ancestor* (Toil reads only one cgroup's
quota) and by the batch scheduler's allocation (Slurm, PBS/Torque, LSF,
SGE), with ``PYTHON_CPU_COUNT`` overriding everything as in Python 3.13.
:func:`memory_limit` is the cgroup memory limit. The cgroup files are read
by :mod:`.cgroups`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from typing import List, Mapping, NamedTuple, Optional, Tuple

from .cgroups import cgroup_cpu_limit, cgroup_memory_limit

__all__ = [
    "CpuCountSources",
    "ExceptionalThread",
    "cgroup_cpu_limit",
    "cpu_count",
    "cpu_count_sources",
    "memory_limit",
    "scheduler_cpus",
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
    (fractional); ``env``: a valid ``PYTHON_CPU_COUNT``; ``scheduler``: the
    batch scheduler's allocation and ``scheduler_variable`` the environment
    variable it came from (``"SLURM_CPUS_PER_TASK"``...). Each is None when
    unknown, unlimited or unset. ``count`` is the answer and ``decided_by``
    names the source it came from: ``"env"``, ``"cgroup"``, ``"affinity"``,
    ``"machine"``, ``"slurm"``, ``"pbs"``, ``"lsf"``, ``"sge"`` or
    ``"default"`` (nothing known: 1).
    """

    machine: Optional[int]
    affinity: Optional[int]
    cgroup: Optional[float]
    env: Optional[int]
    count: int
    decided_by: str
    # Added later, with defaults, so six-field constructions still work.
    scheduler: Optional[int] = None
    scheduler_variable: Optional[str] = None


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

    The smallest of the machine's CPUs, the affinity mask, the CPU quota of
    this process's cgroup and all its ancestors (cgroup v1 and v2), rounded
    up, and the batch scheduler's allocation (see :func:`scheduler_cpus`
    for the variables read and their precedence). ``PYTHON_CPU_COUNT`` set
    to a positive integer wins; any other value in it is ignored.
    Hyperthreads count as CPUs; cpu shares and weights are ignored (they are
    relative, not limits). The cgroup quota is read once per process (again
    in a forked child); the affinity mask and the environment on every call.
    """
    return cpu_count_sources().count


def cpu_count_sources() -> CpuCountSources:
    """Every input of :func:`cpu_count` and its answer, for reports and CLIs."""
    global _cached
    if _cached is None:
        _cached = (os.cpu_count(), cgroup_cpu_limit())
    machine, cgroup = _cached
    affinity = _affinity_count()
    scheduler, variable, scheduler_name = scheduler_cpus(os.environ) or (None, None, "")
    env = _env_cpu_count()
    if env is not None:
        return CpuCountSources(machine, affinity, cgroup, env, env, "env", scheduler, variable)
    candidates = [
        (math.ceil(value), name)
        for value, name in (
            (machine, "machine"),
            (affinity, "affinity"),
            (cgroup, "cgroup"),
            (scheduler, scheduler_name),
        )
        if value is not None
    ]
    # min() keeps the first of equal counts, so a narrower source is named
    # only when it really lowered the count.
    count, decided_by = min(candidates, key=lambda pair: pair[0]) if candidates else (1, "default")
    return CpuCountSources(machine, affinity, cgroup, env, count, decided_by, scheduler, variable)


def _affinity_count() -> Optional[int]:
    if not hasattr(os, "sched_getaffinity"):  # macOS
        return None
    return len(os.sched_getaffinity(0)) or None


def _positive(value: str) -> Optional[int]:
    # Python 3.13's PYTHON_CPU_COUNT rule, used for every count read here:
    # ASCII decimal digits only ("+2", " 3", "3.5" and "٣" are not counts).
    return int(value) if value.isascii() and value.isdigit() and int(value) > 0 else None


def _env_cpu_count() -> Optional[int]:
    # Python 3.13 also accepts "default", which means: no override.
    return _positive(os.environ.get("PYTHON_CPU_COUNT", ""))


# ------------------------------------------------- scheduler allocations

# (scheduler, its job-id variables, its CPU variables, best first). A
# scheduler counts only inside one of its jobs (a job id is set): NCPUS and
# NSLOTS are common names that other software sets too.
_SCHEDULERS: Tuple[Tuple[str, Tuple[str, ...], Tuple[str, ...]], ...] = (
    # SLURM_CPUS_PER_TASK: the -c of the step (or of the job, in the batch
    # script), set only when -c was given; SLURM_CPUS_ON_NODE: the CPUs of
    # the allocation on this node; SLURM_JOB_CPUS_PER_NODE: the job's CPUs
    # on each of its nodes, as "72(x2),36".
    (
        "slurm",
        ("SLURM_JOB_ID", "SLURM_JOBID"),
        ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE", "SLURM_JOB_CPUS_PER_NODE"),
    ),
    # Torque: PBS_NUM_PPN per node, PBS_NP for the whole job; PBS Pro:
    # NCPUS, the ncpus of the job's chunk on this node.
    ("pbs", ("PBS_JOBID",), ("PBS_NUM_PPN", "NCPUS", "PBS_NP")),
    # LSB_DJOB_NUMPROC: the slots allocated to the job; LSB_MAX_NUM_PROCESSORS:
    # the most it asked for (bsub -n min,max). Both are for the whole job.
    ("lsf", ("LSB_JOBID",), ("LSB_DJOB_NUMPROC", "LSB_MAX_NUM_PROCESSORS")),
    # NSLOTS: the slots granted to the job (its parallel environment).
    ("sge", ("JOB_ID",), ("NSLOTS",)),
)


def scheduler_cpus(environ: Mapping[str, str]) -> Optional[Tuple[int, str, str]]:
    """The CPUs a batch scheduler allocated to this job, as ``(count,
    variable, scheduler)``, from the environment *environ*; None outside a
    job or when no value is usable.

    The first scheduler whose job id is set (``SLURM_JOB_ID``/``SLURM_JOBID``,
    ``PBS_JOBID``, ``LSB_JOBID``, ``JOB_ID``; in that order) decides, with
    the first of its variables that holds a positive decimal integer:
    Slurm ``SLURM_CPUS_PER_TASK``, ``SLURM_CPUS_ON_NODE``,
    ``SLURM_JOB_CPUS_PER_NODE`` (this node's entry, by ``SLURM_NODEID``, or
    the one value all nodes share); PBS ``PBS_NUM_PPN``, ``NCPUS``,
    ``PBS_NP``; LSF ``LSB_DJOB_NUMPROC``, ``LSB_MAX_NUM_PROCESSORS``; SGE
    ``NSLOTS``. Whole-job counts are still upper bounds for one node. A
    malformed value is ignored (logged at debug level) and the next
    variable is tried.
    """
    for scheduler, job_ids, variables in _SCHEDULERS:
        if not any(environ.get(name) for name in job_ids):
            continue
        for variable in variables:
            value = environ.get(variable)
            if value is None:
                continue
            count = _slurm_node_cpus(value, environ) if variable == "SLURM_JOB_CPUS_PER_NODE" else _positive(value)
            if count is not None:
                return count, variable, scheduler
            logger.debug("ignoring %s=%r: not a CPU count", variable, value)
        return None
    return None


def _slurm_node_cpus(value: str, environ: Mapping[str, str]) -> Optional[int]:
    """This node's count in SLURM_JOB_CPUS_PER_NODE ("72(x2),36"): the
    entry of node SLURM_NODEID, or the count every node has."""
    runs: List[Tuple[int, int]] = []  # (count, nodes), never expanded
    for entry in value.split(","):
        count, repeated, repeat = entry.partition("(x")
        nodes = (_positive(repeat[:-1]) if repeat.endswith(")") else None) if repeated else 1
        if _positive(count) is None or nodes is None:
            return None
        runs.append((int(count), nodes))
    node = environ.get("SLURM_NODEID", "")
    if node.isascii() and node.isdigit():
        index = int(node)
        for count, nodes in runs:
            if index < nodes:
                return count
            index -= nodes
    return runs[0][0] if len({count for count, _ in runs}) == 1 else None


# ------------------------------------------------------------ memory_limit


def memory_limit() -> Optional[int]:
    """The memory this process's cgroups allow, in bytes; None when
    unlimited or unknown.

    The smallest ``memory.max`` (cgroup v2) or ``memory.limit_in_bytes``
    (v1) of this process's cgroup and every ancestor; values of 2**60 bytes
    or more mean unlimited. Read on every call (a cgroup's limit may be
    changed at any time). Swap and ``memory.high`` are not counted, nor are
    rlimits or the scheduler's requested memory.
    """
    return cgroup_memory_limit()
