"""The cgroup limits: CPU quota and memory, from fake cgroup trees."""

from __future__ import annotations

import functools
from typing import Dict

import pytest

from toilcoord import cgroups
from toilcoord.cgroups import cgroup_cpu_limit, cgroup_memory_limit

# ------------------------------------------------------ fake cgroup trees


def fake_cgroups(
    tmp_path, proc_self_cgroup: str, files: Dict[str, object], limit=cgroup_cpu_limit
) -> functools.partial:
    """Write /proc/self/cgroup and cgroup files (relative path -> str, bytes,
    or None for a directory) under tmp_path; return *limit* (by default
    cgroup_cpu_limit) bound to them."""
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
    return functools.partial(limit, str(proc), str(root))


V1_LINES = "12:pids:/user.slice\n4:cpu,cpuacct:/a/b\n3:memory:/a/b\n0::/a/b\n"


def v1_quota(quota: object, period: object = "100000") -> Dict[str, object]:
    return {"cpu.cfs_quota_us": quota, "cpu.cfs_period_us": period}


def under(directory: str, files: Dict[str, object]) -> Dict[str, object]:
    return {directory + "/" + name: content for name, content in files.items()}


def test_v1_combined_cpu_cpuacct_controller(tmp_path) -> None:
    limit = fake_cgroups(
        tmp_path,
        V1_LINES,
        {
            **under("cpu,cpuacct", v1_quota("-1\n")),
            **under("cpu,cpuacct/a", v1_quota("-1\n")),
            **under("cpu,cpuacct/a/b", v1_quota("150000\n")),
        },
    )
    assert limit() == 1.5


def test_v1_an_ancestors_quota_limits_too(tmp_path) -> None:
    limit = fake_cgroups(
        tmp_path,
        V1_LINES,
        {
            **under("cpu,cpuacct/a", v1_quota("50000\n", "100000\n")),
            **under("cpu,cpuacct/a/b", v1_quota("-1\n")),
        },
    )
    assert limit() == 0.5


def test_v1_unlimited_everywhere(tmp_path) -> None:
    limit = fake_cgroups(
        tmp_path,
        V1_LINES,
        {
            **under("cpu,cpuacct", v1_quota("-1")),
            **under("cpu,cpuacct/a/b", v1_quota("-1")),
        },
    )
    assert limit() is None


def test_v1_separate_cpu_mount(tmp_path) -> None:
    lines = "3:cpuacct:/job\n2:cpu:/job\n"
    limit = fake_cgroups(
        tmp_path,
        lines,
        {
            **under("cpu/job", v1_quota("300000", "100000")),
            **under("cpuacct/job", v1_quota("100000", "100000")),  # not the cpu controller: ignored
        },
    )
    assert limit() == 3.0


V2_LINES = "0::/a/b/c\n"


def test_v2_nested_the_smallest_quota_wins(tmp_path) -> None:
    limit = fake_cgroups(
        tmp_path,
        V2_LINES,
        {
            "cgroup.controllers": "cpu memory\n",
            "a/cpu.max": "max 100000\n",
            "a/b/cpu.max": "150000 100000\n",
            "a/b/c/cpu.max": "max 100000\n",
        },
    )
    assert limit() == 1.5


def test_v2_a_deeper_quota_is_smaller(tmp_path) -> None:
    limit = fake_cgroups(
        tmp_path,
        V2_LINES,
        {
            "a/cpu.max": "400000 100000\n",
            "a/b/cpu.max": "max 100000\n",
            "a/b/c/cpu.max": "25000 50000\n",
        },
    )
    assert limit() == 0.5


def test_v2_the_mounts_root_counts(tmp_path) -> None:
    # In a cgroup namespace the root of the mount is the container's cgroup,
    # which has a cpu.max of its own.
    limit = fake_cgroups(tmp_path, "0::/\n", {"cpu.max": "200000 100000\n"})
    assert limit() == 2.0


def test_v2_unlimited(tmp_path) -> None:
    limit = fake_cgroups(
        tmp_path,
        V2_LINES,
        {
            "a/cpu.max": "max 100000\n",
            "a/b/c/cpu.max": "max 100000\n",
        },
    )
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
    limit = fake_cgroups(
        tmp_path,
        "0::/system.slice/docker-123.scope\n",
        {
            "cgroup.controllers": "cpu\n",
            "cpu.max": "100000 100000\n",
        },
    )
    assert limit() == 1.0


def test_the_tail_of_a_missing_path_is_found(tmp_path) -> None:
    limit = fake_cgroups(
        tmp_path,
        "0::/host/ctr/job\n",
        {
            "cpu.max": "300000 100000\n",
            "job/cpu.max": "150000 100000\n",
        },
    )
    assert limit() == 1.5


def test_existing_ancestors_of_a_missing_path_count(tmp_path) -> None:
    limit = fake_cgroups(tmp_path, V2_LINES, {"a/cpu.max": "50000 100000\n"})  # a/b/c is gone
    assert limit() == 0.5


def test_a_path_outside_the_namespace_root(tmp_path) -> None:
    limit = fake_cgroups(tmp_path, "0::/../../job\n", {"job/cpu.max": "200000 100000\n"})
    assert limit() == 2.0


@pytest.mark.parametrize(
    "content",
    [
        "",
        "banana\n",
        "50000\n",
        "1 2 3\n",
        "0 100000\n",
        "-5 100000\n",
        "50000 0\n",
        "max\n",
        "x 100000\n",
        b"\xff\xfe\n",
        "50000 100000 trailing\n",
    ],
)
def test_garbage_cpu_max_does_not_limit(tmp_path, content: object) -> None:
    limit = fake_cgroups(tmp_path, V2_LINES, {"a/b/c/cpu.max": content, "a/cpu.max": "300000 100000\n"})
    assert limit() == 3.0


@pytest.mark.parametrize(
    "quota, period",
    [
        ("", "100000"),
        ("abc", "100000"),
        ("50000", "0"),
        ("50000", "nope"),
        ("0", "100000"),
        ("1 2", "100000"),
    ],
)
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


# ----------------------------------------------------------- memory limits


def memory(tmp_path, lines: str, files: Dict[str, object]) -> functools.partial:
    return fake_cgroups(tmp_path, lines, files, limit=cgroup_memory_limit)


GIB = 1 << 30
V1_UNLIMITED = "9223372036854771712\n"  # what v1 writes for "no limit" (4 KiB pages)


def test_v2_memory_the_smallest_of_the_cgroup_and_its_ancestors(tmp_path) -> None:
    limit = memory(
        tmp_path,
        V2_LINES,
        {
            "cgroup.controllers": "cpu memory\n",
            "a/memory.max": f"{8 * GIB}\n",
            "a/b/memory.max": f"{2 * GIB}\n",
            "a/b/c/memory.max": "max\n",
        },
    )
    assert limit() == 2 * GIB


def test_v2_memory_a_deeper_limit_is_smaller(tmp_path) -> None:
    limit = memory(tmp_path, V2_LINES, {"a/memory.max": f"{8 * GIB}\n", "a/b/c/memory.max": "1048576\n"})
    assert limit() == 1048576


def test_v2_memory_max_everywhere_is_unlimited(tmp_path) -> None:
    limit = memory(tmp_path, V2_LINES, {"memory.max": "max\n", "a/memory.max": "max\n", "a/b/c/memory.max": "max\n"})
    assert limit() is None


def test_v1_memory_controller(tmp_path) -> None:
    limit = memory(
        tmp_path,
        V1_LINES,
        {
            "memory/memory.limit_in_bytes": V1_UNLIMITED,
            "memory/a/memory.limit_in_bytes": f"{3 * GIB}\n",
            "memory/a/b/memory.limit_in_bytes": V1_UNLIMITED,
            "cpu,cpuacct/a/b/memory.limit_in_bytes": "1\n",  # not the memory controller: ignored
        },
    )
    assert limit() == 3 * GIB


def test_v1_huge_values_are_unlimited(tmp_path) -> None:
    limit = memory(
        tmp_path,
        V1_LINES,
        {
            "memory/memory.limit_in_bytes": V1_UNLIMITED,
            "memory/a/b/memory.limit_in_bytes": f"{1 << 60}\n",
        },
    )
    assert limit() is None


def test_hybrid_v1_memory_and_v2_unified(tmp_path) -> None:
    lines = "4:memory:/job\n0::/job\n"
    files = {"memory/job/memory.limit_in_bytes": f"{4 * GIB}\n", "unified/job/memory.max": f"{GIB}\n"}
    assert memory(tmp_path, lines, files)() == GIB


def test_memory_in_a_container_that_sees_its_subtree_only(tmp_path) -> None:
    limit = memory(tmp_path, "0::/host/ctr/job\n", {"memory.max": f"{GIB}\n", "job/memory.max": "max\n"})
    assert limit() == GIB


@pytest.mark.parametrize("content", ["", "banana\n", "0\n", "-1\n", "1 2\n", "+5\n", "1e9\n", b"\xff\n"])
def test_garbage_memory_max_does_not_limit(tmp_path, content: object) -> None:
    limit = memory(tmp_path, V2_LINES, {"a/b/c/memory.max": content, "a/memory.max": f"{GIB}\n"})
    assert limit() == GIB


def test_memory_with_no_cgroup_files(tmp_path) -> None:
    assert cgroup_memory_limit(str(tmp_path / "nope"), str(tmp_path)) is None
    assert memory(tmp_path, "garbage\n", {"memory.max": "1\n"})() is None


def test_the_real_systems_memory_limit_does_not_raise() -> None:
    limit = cgroup_memory_limit()
    assert limit is None or 0 < limit < 1 << 60


def test_public_names() -> None:
    assert set(cgroups.__all__) == {"cgroup_cpu_limit", "cgroup_memory_limit"}


def own_memory_cgroup() -> str:
    """This process's v1 memory cgroup directory, or skip."""
    with open("/proc/self/cgroup") as lines:
        for line in lines:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                return "/sys/fs/cgroup/memory" + path.rstrip("/")
    pytest.skip("no cgroup v1 memory controller here")


@pytest.mark.timeout(60)
def test_a_real_cgroup_limit_on_the_parent_is_found() -> None:
    import os
    import subprocess
    import sys

    from conftest import ROOT, child_env

    if os.geteuid() != 0:
        pytest.skip("needs root to make cgroups")
    parent = os.path.join(own_memory_cgroup(), f"tc-test-{os.getpid()}")
    child = os.path.join(parent, "job")
    try:
        os.makedirs(child)
    except OSError as error:
        pytest.skip(f"cannot make a cgroup here: {error}")
    try:
        with open(os.path.join(parent, "memory.limit_in_bytes"), "w") as limit:
            limit.write(str(256 << 20))
        code = (
            "import os, sys; open(sys.argv[1] + '/cgroup.procs', 'w').write(str(os.getpid()));"
            "from toilcoord.threads import memory_limit; print(memory_limit())"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, child], env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=50
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [str(256 << 20)]
    finally:
        os.rmdir(child)
        os.rmdir(parent)
