"""ExceptionalThread, cpu_count and cgroup_cpu_limit."""
from __future__ import annotations

import functools
import math
import os
import threading
from typing import Dict, List

import pytest

from toilcoord import threads
from toilcoord.threads import ExceptionalThread, cgroup_cpu_limit, cpu_count, cpu_count_sources

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


# ------------------------------------------------------ fake cgroup trees

def fake_cgroups(tmp_path, proc_self_cgroup: str, files: Dict[str, object]) -> functools.partial:
    """Write /proc/self/cgroup and cgroup files (relative path -> str, bytes,
    or None for a directory) under tmp_path; return cgroup_cpu_limit bound to them."""
    root = tmp_path / "cgroup"
    root.mkdir()
    for relative, content in files.items():
        path = root / relative
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(proc_self_cgroup)
    return functools.partial(cgroup_cpu_limit, str(proc), str(root))


V1_LINES = "12:pids:/user.slice\n4:cpu,cpuacct:/a/b\n3:memory:/a/b\n0::/a/b\n"


def v1_quota(quota: object, period: object = "100000") -> Dict[str, object]:
    return {"cpu.cfs_quota_us": quota, "cpu.cfs_period_us": period}


def under(directory: str, files: Dict[str, object]) -> Dict[str, object]:
    return {directory + "/" + name: content for name, content in files.items()}


def test_v1_combined_cpu_cpuacct_controller(tmp_path) -> None:
    limit = fake_cgroups(tmp_path, V1_LINES, {
        **under("cpu,cpuacct", v1_quota("-1\n")),
        **under("cpu,cpuacct/a", v1_quota("-1\n")),
        **under("cpu,cpuacct/a/b", v1_quota("150000\n")),
    })
    assert limit() == 1.5


def test_v1_an_ancestors_quota_limits_too(tmp_path) -> None:
    limit = fake_cgroups(tmp_path, V1_LINES, {
        **under("cpu,cpuacct/a", v1_quota("50000\n", "100000\n")),
        **under("cpu,cpuacct/a/b", v1_quota("-1\n")),
    })
    assert limit() == 0.5


def test_v1_unlimited_everywhere(tmp_path) -> None:
    limit = fake_cgroups(tmp_path, V1_LINES, {
        **under("cpu,cpuacct", v1_quota("-1")),
        **under("cpu,cpuacct/a/b", v1_quota("-1")),
    })
    assert limit() is None


def test_v1_separate_cpu_mount(tmp_path) -> None:
    lines = "3:cpuacct:/job\n2:cpu:/job\n"
    limit = fake_cgroups(tmp_path, lines, {
        **under("cpu/job", v1_quota("300000", "100000")),
        **under("cpuacct/job", v1_quota("100000", "100000")),  # not the cpu controller: ignored
    })
    assert limit() == 3.0


V2_LINES = "0::/a/b/c\n"


def test_v2_nested_the_smallest_quota_wins(tmp_path) -> None:
    limit = fake_cgroups(tmp_path, V2_LINES, {
        "cgroup.controllers": "cpu memory\n",
        "a/cpu.max": "max 100000\n",
        "a/b/cpu.max": "150000 100000\n",
        "a/b/c/cpu.max": "max 100000\n",
    })
    assert limit() == 1.5


def test_v2_a_deeper_quota_is_smaller(tmp_path) -> None:
    limit = fake_cgroups(tmp_path, V2_LINES, {
        "a/cpu.max": "400000 100000\n",
        "a/b/cpu.max": "max 100000\n",
        "a/b/c/cpu.max": "25000 50000\n",
    })
    assert limit() == 0.5


def test_v2_the_mounts_root_counts(tmp_path) -> None:
    # In a cgroup namespace the root of the mount is the container's cgroup,
    # which has a cpu.max of its own.
    limit = fake_cgroups(tmp_path, "0::/\n", {"cpu.max": "200000 100000\n"})
    assert limit() == 2.0


def test_v2_unlimited(tmp_path) -> None:
    limit = fake_cgroups(tmp_path, V2_LINES, {
        "a/cpu.max": "max 100000\n",
        "a/b/c/cpu.max": "max 100000\n",
    })
    assert limit() is None


def test_hybrid_v1_cpu_and_v2_unified(tmp_path) -> None:
    lines = "9:cpu,cpuacct:/job\n0::/job\n"
    files = {**under("cpu,cpuacct/job", v1_quota("300000")), "unified/job/cpu.max": "150000 100000\n"}
    assert fake_cgroups(tmp_path, lines, files)() == 1.5


def test_hybrid_v1_limit_alone(tmp_path) -> None:
    lines = "9:cpu,cpuacct:/job\n0::/job\n"
    files = {**under("cpu,cpuacct/job", v1_quota("250000")), "unified/job/cgroup.procs": "1\n"}
    assert fake_cgroups(tmp_path, lines, files)() == 2.5


def test_path_missing_under_the_mount_falls_back_to_what_exists(tmp_path) -> None:
    # A container without its own cgroup namespace: /proc/self/cgroup names
    # the host's path, the mount shows only the container's subtree.
    limit = fake_cgroups(tmp_path, "0::/system.slice/docker-123.scope\n", {
        "cgroup.controllers": "cpu\n",
        "cpu.max": "100000 100000\n",
    })
    assert limit() == 1.0


def test_the_tail_of_a_missing_path_is_found(tmp_path) -> None:
    limit = fake_cgroups(tmp_path, "0::/host/ctr/job\n", {
        "cpu.max": "300000 100000\n",
        "job/cpu.max": "150000 100000\n",
    })
    assert limit() == 1.5


def test_existing_ancestors_of_a_missing_path_count(tmp_path) -> None:
    limit = fake_cgroups(tmp_path, V2_LINES, {"a/cpu.max": "50000 100000\n"})  # a/b/c is gone
    assert limit() == 0.5


def test_a_path_outside_the_namespace_root(tmp_path) -> None:
    limit = fake_cgroups(tmp_path, "0::/../../job\n", {"job/cpu.max": "200000 100000\n"})
    assert limit() == 2.0


@pytest.mark.parametrize("content", [
    "", "banana\n", "50000\n", "1 2 3\n", "0 100000\n", "-5 100000\n", "50000 0\n",
    "max\n", "x 100000\n", b"\xff\xfe\n", "50000 100000 trailing\n",
])
def test_garbage_cpu_max_does_not_limit(tmp_path, content: object) -> None:
    limit = fake_cgroups(tmp_path, V2_LINES, {"a/b/c/cpu.max": content, "a/cpu.max": "300000 100000\n"})
    assert limit() == 3.0


@pytest.mark.parametrize("quota, period", [
    ("", "100000"), ("abc", "100000"), ("50000", "0"), ("50000", "nope"), ("0", "100000"), ("1 2", "100000"),
])
def test_garbage_v1_files_do_not_limit(tmp_path, quota: str, period: str) -> None:
    limit = fake_cgroups(tmp_path, V1_LINES, under("cpu,cpuacct/a/b", v1_quota(quota, period)))
    assert limit() is None


def test_a_missing_period_does_not_limit(tmp_path) -> None:
    limit = fake_cgroups(tmp_path, V1_LINES, {"cpu,cpuacct/a/b/cpu.cfs_quota_us": "50000"})
    assert limit() is None


def test_unreadable_files_do_not_limit(tmp_path) -> None:
    # A directory where the file should be: reading it fails with EISDIR,
    # which (unlike mode bits) stops root too.
    limit = fake_cgroups(tmp_path, V2_LINES, {"a/b/c/cpu.max": None, "a/b/cpu.max": "200000 100000\n"})
    assert limit() == 2.0


@pytest.mark.parametrize("text", ["", "garbage\n", "\n\n", "no colons at all\n1:only-two\n"])
def test_garbage_proc_self_cgroup(tmp_path, text: str) -> None:
    assert fake_cgroups(tmp_path, text, {"cpu.max": "100000 100000\n"})() is None


def test_missing_proc_self_cgroup(tmp_path) -> None:
    assert cgroup_cpu_limit(str(tmp_path / "nope"), str(tmp_path)) is None


def test_missing_cgroup_root(tmp_path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text(V1_LINES)
    assert cgroup_cpu_limit(str(proc), str(tmp_path / "nope")) is None


def test_the_real_system_does_not_raise() -> None:
    limit = cgroup_cpu_limit()
    assert limit is None or limit > 0


# ---------------------------------------------------------------- cpu_count

@pytest.fixture
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "_cached", None)
    monkeypatch.delenv("PYTHON_CPU_COUNT", raising=False)


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
    result = run_python("""
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
    """, env=_env_without_cpu_override())
    assert result.returncode == 0, result.stderr
    before, count, affinity, decided_by, in_child = result.stdout.split()
    assert (count, affinity, in_child) == ("1", "1", "1")
    if int(before) > 1:
        assert decided_by == "affinity"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity masks here")
@pytest.mark.timeout(60)
def test_a_process_started_with_one_cpu_counts_one() -> None:
    result = run_python("""
        import os, sys
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        os.execv(sys.executable, [sys.executable, "-c",
                 "from toilcoord.threads import cpu_count; print(cpu_count())"])
    """, env=_env_without_cpu_override())
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1"]


def _env_without_cpu_override() -> Dict[str, str]:
    env = child_env()
    env.pop("PYTHON_CPU_COUNT", None)
    return env


def test_public_names() -> None:
    assert set(threads.__all__) == {
        "CpuCountSources", "ExceptionalThread", "cgroup_cpu_limit", "cpu_count", "cpu_count_sources",
    }
