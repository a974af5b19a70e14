"""ExceptionalThread, cpu_count (with scheduler allocations) and memory_limit."""

from __future__ import annotations

import functools
import math
import os
import threading
from typing import Dict, List

import pytest
from test_cgroups import GIB, V2_LINES, fake_cgroups

from toilcoord import threads
from toilcoord.cgroups import cgroup_memory_limit
from toilcoord.threads import ExceptionalThread, cpu_count, cpu_count_sources, memory_limit, scheduler_cpus

from conftest import child_env, run_in_fork, run_python

# The threads here die of their exceptions on purpose: threading.excepthook
# reports them (as in Toil) and pytest would turn each into a warning.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


# ------------------------------------------------------- ExceptionalThread


class Boom(Exception):
    pass


def fail(error: BaseException) -> None:
    raise error


@pytest.mark.timeout(10)
def test_join_reraises_the_targets_exception_once() -> None:
    error = Boom("from the thread")
    thread = ExceptionalThread(target=fail, args=(error,))
    thread.start()
    with pytest.raises(Boom) as raised:
        thread.join()
    assert raised.value is error
    thread.join()  # idempotent: nothing the second time


@pytest.mark.timeout(60)
def test_the_exception_is_reported_when_the_thread_dies_even_unjoined() -> None:
    result = run_python("""
        import threading
        from toilcoord.threads import ExceptionalThread
        def fail():
            raise KeyError("lost-if-nobody-joins")
        thread = ExceptionalThread(target=fail)
        thread.start()
        threading.Thread.join(thread)  # waits without taking the exception
        print("finished")
    """)
    assert result.returncode == 0 and result.stdout == "finished\n"
    assert "KeyError: 'lost-if-nobody-joins'" in result.stderr


@pytest.mark.timeout(10)
def test_subclass_overrides_tryRun() -> None:
    class MyThread(ExceptionalThread):
        def tryRun(self) -> None:
            assert 0

    thread = MyThread()
    thread.start()
    with pytest.raises(AssertionError):
        thread.join()
    thread.join()


@pytest.mark.timeout(10)
def test_a_join_that_times_out_raises_nothing() -> None:
    go = threading.Event()

    def wait_then_fail() -> None:
        go.wait()
        raise Boom()

    thread = ExceptionalThread(target=wait_then_fail)
    thread.start()
    try:
        thread.join(timeout=0.01)
        assert thread.is_alive()
    finally:
        go.set()
    with pytest.raises(Boom):
        thread.join()


@pytest.mark.timeout(10)
def test_a_thread_that_succeeds_joins_quietly() -> None:
    results = []
    thread = ExceptionalThread(target=results.append, args=(42,))
    thread.start()
    thread.join()
    assert results == [42]


@pytest.mark.timeout(10)
def test_base_exceptions_are_handed_over_too() -> None:
    thread = ExceptionalThread(target=fail, args=(SystemExit(3),))
    thread.start()
    with pytest.raises(SystemExit):
        thread.join()


@pytest.mark.timeout(20)
def test_of_many_concurrent_joiners_exactly_one_gets_the_exception() -> None:
    for _ in range(20):
        go = threading.Event()
        worker = ExceptionalThread(target=lambda: (go.wait(), fail(Boom())))
        worker.start()
        outcomes: List[str] = []
        ready = threading.Barrier(9)

        def join_it() -> None:
            ready.wait()
            try:
                worker.join()
                outcomes.append("quiet")
            except Boom:
                outcomes.append("raised")

        joiners = [threading.Thread(target=join_it) for _ in range(8)]
        for joiner in joiners:
            joiner.start()
        ready.wait()
        go.set()
        for joiner in joiners:
            joiner.join()
        assert sorted(outcomes) == ["quiet"] * 7 + ["raised"]


# ---------------------------------------------------------------- cpu_count


@pytest.fixture
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "_cached", None)
    for name in ("PYTHON_CPU_COUNT",) + SCHEDULER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


SCHEDULER_VARIABLES = (
    "SLURM_JOB_ID",
    "SLURM_JOBID",
    "SLURM_CPUS_PER_TASK",
    "SLURM_CPUS_ON_NODE",
    "SLURM_JOB_CPUS_PER_NODE",
    "SLURM_NODEID",
    "PBS_JOBID",
    "PBS_NUM_PPN",
    "NCPUS",
    "PBS_NP",
    "LSB_JOBID",
    "LSB_DJOB_NUMPROC",
    "LSB_MAX_NUM_PROCESSORS",
    "JOB_ID",
    "NSLOTS",
)


def machine_and_affinity() -> List[int]:
    counts = [os.cpu_count() or 1]
    if hasattr(os, "sched_getaffinity"):
        counts.append(len(os.sched_getaffinity(0)))
    return counts


def test_cpu_count_is_the_smallest_source(fresh_cache) -> None:
    sources = cpu_count_sources()
    assert sources.machine == os.cpu_count()
    limits = machine_and_affinity() + ([math.ceil(sources.cgroup)] if sources.cgroup is not None else [])
    assert cpu_count() == sources.count == min(limits)
    assert sources.env is None and sources.decided_by in ("machine", "affinity", "cgroup")


def with_fake_cgroup(monkeypatch: pytest.MonkeyPatch, limit: functools.partial) -> None:
    monkeypatch.setattr(threads, "cgroup_cpu_limit", limit)


def test_a_quota_below_one_cpu_gives_one(fresh_cache, monkeypatch, tmp_path) -> None:
    with_fake_cgroup(monkeypatch, fake_cgroups(tmp_path, V2_LINES, {"a/b/cpu.max": "10000 100000\n"}))
    sources = cpu_count_sources()
    assert sources.cgroup == 0.1 and sources.count == 1 and cpu_count() == 1
    if max(machine_and_affinity()) > 1:
        assert sources.decided_by == "cgroup"


def test_a_fractional_quota_rounds_up(fresh_cache, monkeypatch, tmp_path) -> None:
    with_fake_cgroup(monkeypatch, fake_cgroups(tmp_path, V2_LINES, {"a/cpu.max": "100001 100000\n"}))
    assert cpu_count() == min(machine_and_affinity() + [2])


@pytest.mark.parametrize("value, expected", [("1", 1), ("7", 7), ("64", 64)])
def test_python_cpu_count_wins(fresh_cache, monkeypatch, value: str, expected: int) -> None:
    monkeypatch.setenv("PYTHON_CPU_COUNT", value)
    sources = cpu_count_sources()
    assert cpu_count() == expected and sources.env == expected and sources.decided_by == "env"


@pytest.mark.parametrize("value", ["", "0", "-1", "abc", "default", " 3", "3.5", "\u0663", "+2"])
def test_other_python_cpu_count_values_are_ignored(fresh_cache, monkeypatch, value: str) -> None:
    expected = cpu_count()
    monkeypatch.setenv("PYTHON_CPU_COUNT", value)
    assert cpu_count() == expected and cpu_count_sources().env is None


def test_the_cgroup_limit_is_read_once_per_process(fresh_cache, monkeypatch) -> None:
    reads = []
    real = threads.cgroup_cpu_limit
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: reads.append(1) or real())
    first = cpu_count()
    assert cpu_count() == first and cpu_count_sources().count == first
    assert len(reads) == 1


@pytest.mark.timeout(20)
def test_a_forked_child_reads_the_cgroup_limit_afresh(fresh_cache, monkeypatch) -> None:
    reads = []
    real = threads.cgroup_cpu_limit
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: reads.append(1) or real())
    cpu_count()

    def child_reads_once_more():
        cpu_count()
        cpu_count()
        return len(reads) == 2  # the parent's read, and one of its own

    assert run_in_fork(child_reads_once_more) == 0
    assert len(reads) == 1


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity masks here")
@pytest.mark.timeout(60)
def test_affinity_narrows_cpu_count_even_after_caching() -> None:
    result = run_python(
        """
        import os
        from toilcoord.threads import cpu_count, cpu_count_sources
        before = cpu_count()                      # fills the cache
        one = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {one})
        after = cpu_count_sources()
        pid = os.fork()
        if pid == 0:
            os._exit(cpu_count())
        _, status = os.waitpid(pid, 0)
        print(before, after.count, after.affinity, after.decided_by, os.WEXITSTATUS(status))
    """,
        env=_env_without_cpu_override(),
    )
    assert result.returncode == 0, result.stderr
    before, count, affinity, decided_by, in_child = result.stdout.split()
    assert (count, affinity, in_child) == ("1", "1", "1")
    if int(before) > 1:
        assert decided_by == "affinity"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity masks here")
@pytest.mark.timeout(60)
def test_a_process_started_with_one_cpu_counts_one() -> None:
    result = run_python(
        """
        import os, sys
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        os.execv(sys.executable, [sys.executable, "-c",
                 "from toilcoord.threads import cpu_count; print(cpu_count())"])
    """,
        env=_env_without_cpu_override(),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1"]


def _env_without_cpu_override(**extra: str) -> Dict[str, str]:
    env = child_env()
    for name in ("PYTHON_CPU_COUNT",) + SCHEDULER_VARIABLES:
        env.pop(name, None)
    env.update(extra)
    return env


# ------------------------------------------------- scheduler allocations


@pytest.mark.parametrize(
    "environ, expected",
    [
        (
            {"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "2", "SLURM_CPUS_ON_NODE": "8"},
            (2, "SLURM_CPUS_PER_TASK", "slurm"),
        ),
        (
            {"SLURM_JOBID": "7", "SLURM_CPUS_ON_NODE": "8", "SLURM_JOB_CPUS_PER_NODE": "16"},
            (8, "SLURM_CPUS_ON_NODE", "slurm"),
        ),
        ({"SLURM_JOB_ID": "7", "SLURM_JOB_CPUS_PER_NODE": "4(x3)"}, (4, "SLURM_JOB_CPUS_PER_NODE", "slurm")),
        (
            {"SLURM_JOB_ID": "7", "SLURM_JOB_CPUS_PER_NODE": "72(x2),36", "SLURM_NODEID": "2"},
            (36, "SLURM_JOB_CPUS_PER_NODE", "slurm"),
        ),
        (
            {"SLURM_JOB_ID": "7", "SLURM_JOB_CPUS_PER_NODE": "72(x2),36", "SLURM_NODEID": "1"},
            (72, "SLURM_JOB_CPUS_PER_NODE", "slurm"),
        ),
        ({"PBS_JOBID": "1.srv", "PBS_NUM_PPN": "6", "PBS_NP": "24"}, (6, "PBS_NUM_PPN", "pbs")),
        ({"PBS_JOBID": "1.srv", "NCPUS": "12"}, (12, "NCPUS", "pbs")),
        ({"PBS_JOBID": "1.srv", "PBS_NP": "24"}, (24, "PBS_NP", "pbs")),
        ({"LSB_JOBID": "9", "LSB_DJOB_NUMPROC": "3", "LSB_MAX_NUM_PROCESSORS": "8"}, (3, "LSB_DJOB_NUMPROC", "lsf")),
        ({"LSB_JOBID": "9", "LSB_MAX_NUM_PROCESSORS": "8"}, (8, "LSB_MAX_NUM_PROCESSORS", "lsf")),
        ({"JOB_ID": "5", "NSLOTS": "5"}, (5, "NSLOTS", "sge")),
        # Slurm first, then PBS, LSF, SGE: the first whose job id is set decides.
        (
            {"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "8", "JOB_ID": "5", "NSLOTS": "2"},
            (8, "SLURM_CPUS_ON_NODE", "slurm"),
        ),
    ],
)
def test_scheduler_variables_and_their_precedence(environ, expected) -> None:
    assert scheduler_cpus(environ) == expected


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"SLURM_CPUS_PER_TASK": "2", "NCPUS": "3", "NSLOTS": "4", "LSB_DJOB_NUMPROC": "5"},  # no job id: not a job
        {"SLURM_JOB_ID": "7", "SLURM_JOB_CPUS_PER_NODE": "72(x2),36"},  # nodes differ, this one unknown
        {"SLURM_JOB_ID": "7", "SLURM_JOB_CPUS_PER_NODE": "72(x2),36", "SLURM_NODEID": "3"},
        {"SLURM_JOB_ID": "7", "SLURM_JOB_CPUS_PER_NODE": "4(x", "SLURM_NODEID": "0"},
        {"SLURM_JOB_ID": "7", "SLURM_JOB_CPUS_PER_NODE": "4(x0)"},
        {"JOB_ID": "5", "NSLOTS": ""},
    ],
)
def test_no_usable_scheduler_value(environ) -> None:
    assert scheduler_cpus(environ) is None


@pytest.mark.parametrize("bad", ["", "0", "-2", "two", " 2", "2.5", "+2", "\u0663", "2 "])
def test_a_malformed_value_is_skipped_for_the_next_one(bad: str, caplog) -> None:
    caplog.set_level("DEBUG", logger="toilcoord.threads")
    environ = {"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": bad, "SLURM_CPUS_ON_NODE": "3"}
    assert scheduler_cpus(environ) == (3, "SLURM_CPUS_ON_NODE", "slurm")
    assert "SLURM_CPUS_PER_TASK" in caplog.text


def run_cpu_count(**environ: str) -> List[str]:
    result = run_python(
        """
        from toilcoord.threads import cpu_count, cpu_count_sources
        s = cpu_count_sources()
        print(cpu_count(), s.count, s.decided_by, s.scheduler, s.scheduler_variable)
    """,
        env=_env_without_cpu_override(**environ),
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.timeout(60)
def test_srun_c1_in_a_real_process_counts_one() -> None:
    # Toil 4767: 128 CPUs inside "srun -c2". One CPU allocated here.
    count, same, decided_by, scheduler, variable = run_cpu_count(SLURM_JOB_ID="42", SLURM_CPUS_PER_TASK="1")
    assert (count, same, scheduler, variable) == ("1", "1", "1", "SLURM_CPUS_PER_TASK")
    if max(machine_and_affinity()) > 1:
        assert decided_by == "slurm"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "environ, name",
    [
        ({"PBS_JOBID": "1", "NCPUS": "1"}, "pbs"),
        ({"LSB_JOBID": "1", "LSB_DJOB_NUMPROC": "1"}, "lsf"),
        ({"JOB_ID": "1", "NSLOTS": "1"}, "sge"),
    ],
)
def test_other_schedulers_in_real_processes(environ, name: str) -> None:
    count, _, decided_by, scheduler, _ = run_cpu_count(**environ)
    assert (count, scheduler) == ("1", "1")
    if max(machine_and_affinity()) > 1:
        assert decided_by == name


@pytest.mark.timeout(60)
def test_an_allocation_larger_than_the_machine_does_not_raise_the_count() -> None:
    count, _, decided_by, scheduler, _ = run_cpu_count(SLURM_JOB_ID="42", SLURM_CPUS_ON_NODE="100000")
    assert int(count) == min(machine_and_affinity()) and scheduler == "100000" and decided_by != "slurm"


@pytest.mark.timeout(60)
def test_python_cpu_count_beats_the_scheduler() -> None:
    count, _, decided_by, scheduler, _ = run_cpu_count(SLURM_JOB_ID="42", SLURM_CPUS_PER_TASK="1", PYTHON_CPU_COUNT="5")
    assert (count, decided_by, scheduler) == ("5", "env", "1")


def test_the_scheduler_is_read_on_every_call(fresh_cache, monkeypatch) -> None:
    before = cpu_count()
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert cpu_count() == 1 and cpu_count_sources().scheduler_variable == "SLURM_CPUS_PER_TASK"
    monkeypatch.delenv("SLURM_JOB_ID")
    assert cpu_count() == before


def test_cpu_count_sources_still_builds_from_six_fields() -> None:
    old = threads.CpuCountSources(4, 4, None, None, 4, "machine")
    assert (
        old.scheduler is None and old.scheduler_variable is None and tuple(old)[:6] == (4, 4, None, None, 4, "machine")
    )


# ------------------------------------------------------------ memory_limit


def test_memory_limit_is_the_cgroup_limit(monkeypatch, tmp_path) -> None:
    fake = fake_cgroups(tmp_path, V2_LINES, {"a/memory.max": f"{GIB}\n"}, limit=cgroup_memory_limit)
    monkeypatch.setattr(threads, "cgroup_memory_limit", fake)
    assert memory_limit() == GIB


def test_memory_limit_of_this_process_matches_the_cgroup() -> None:
    assert memory_limit() == cgroup_memory_limit()


def test_public_names() -> None:
    assert set(threads.__all__) == {
        "CpuCountSources",
        "ExceptionalThread",
        "cgroup_cpu_limit",
        "cpu_count",
        "cpu_count_sources",
        "memory_limit",
        "scheduler_cpus",
    }
