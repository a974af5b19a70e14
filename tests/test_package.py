"""The package as users get it: its names, a vendored copy, a non-POSIX host."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

import pytest

import toilcoord

from conftest import ROOT, run_python

pytestmark = pytest.mark.timeout(120)

PACKAGE = os.path.join(ROOT, "toilcoord")

# Every name the contract promises at the top level.
CONTRACT_NAMES = (
    """
    safe_lock safe_unlock_and_close locked_file_is ensure_filesystem_lockable filesystem_info FilesystemInfo
    UnsafeFilesystemError global_mutex LockTimeout get_process_name process_name_exists
    collect_process_name_garbage destroy_all_process_names current_process_name_lock current_process_name_for
    LastProcessStandingArena DeferredFunction DeferredFunctionManager RealtimeLogger ModuleDescriptor Resource
    FileResource DirectoryResource VirtualEnvResource ResourceException LocalJobStore ExceptionalThread
    cpu_count cgroup_cpu_limit robust_rmtree
""".split()
    + """
    cpu_count_sources memory_limit ResourceSlots ids_environment coordination_dir job_private_reasons
    CoordinationDirError install_termination_cleanup directory_status
""".split()
)  # API.md's names, then what issues 12 and 14 added


def test_every_contract_name_is_exported():
    assert sorted(CONTRACT_NAMES) == sorted(toilcoord.__all__)
    for name in toilcoord.__all__:
        assert getattr(toilcoord, name) is not None


def test_version_is_a_literal_and_py_typed_ships():
    tree = ast.parse(open(os.path.join(PACKAGE, "__init__.py")).read())
    versions = [
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "__version__" for target in node.targets)
    ]
    assert len(versions) == 1 and isinstance(versions[0], ast.Constant)
    assert os.path.exists(os.path.join(PACKAGE, "py.typed"))


def test_only_relative_self_imports_and_only_the_standard_library():
    stdlib = getattr(sys, "stdlib_module_names", None)
    for name in sorted(os.listdir(PACKAGE)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(PACKAGE, name)).read(), name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                assert root != "toilcoord", f"{name}:{node.lineno}: absolute self-import"
                if stdlib is not None:
                    assert root in stdlib or root == "__future__", f"{name}:{node.lineno}: imports {root}"


def test_import_pulls_in_no_heavy_module():
    done = run_python("""
        import sys
        import toilcoord
        heavy = ("json", "zipfile", "urllib", "socketserver", "hmac", "pickle", "subprocess", "tempfile", "hashlib")
        print(",".join(name for name in heavy if name in sys.modules))
    """)
    assert done.returncode == 0, done.stderr
    # site's .pth hooks may import some before us; -S is checked by the benchmark.
    baseline = run_python("""
        import sys
        heavy = ("json", "zipfile", "urllib", "socketserver", "hmac", "pickle", "subprocess", "tempfile", "hashlib")
        print(",".join(name for name in heavy if name in sys.modules))
    """)
    assert set(done.stdout.split(",")) <= set(baseline.stdout.split(",")) | {"\n", ""}


def test_a_vendored_copy_works_under_another_name(tmp_path):
    vendor = tmp_path / "mypipeline" / "_vendor"
    vendor.mkdir(parents=True)
    (tmp_path / "mypipeline" / "__init__.py").write_text("")
    (vendor / "__init__.py").write_text("")
    # Without the tooling (bench, torture), as a pipeline may vendor it.
    shutil.copytree(PACKAGE, vendor / "toilcoord", ignore=shutil.ignore_patterns("__pycache__", "_tools"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    code = """
import sys
from mypipeline._vendor.toilcoord import ModuleDescriptor, global_mutex
assert "toilcoord" not in sys.modules, "the vendored copy imported the original"
with global_mutex(sys.argv[1], "m"):
    pass
print(ModuleDescriptor.forModule("mypipeline._vendor.toilcoord.locks").belongsToToil)
"""
    coord = tmp_path / "coord"  # not a mkdtemp of its own: nothing may be left in $TMPDIR
    coord.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", code, str(coord)], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
    smoke = subprocess.run(
        [sys.executable, "-m", "mypipeline._vendor.toilcoord"],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    bench = subprocess.run(
        [sys.executable, "-m", "mypipeline._vendor.toilcoord", "bench"],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bench.returncode == 2 and bench.stderr == (
        "python -m mypipeline._vendor.toilcoord: error: bench is not in this copy of mypipeline._vendor.toilcoord "
        "(its _tools/ folder was left out when it was vendored)\n"
    ), bench.stderr


def test_without_fcntl_the_import_says_posix_is_needed():
    done = run_python("""
        import sys
        sys.modules["fcntl"] = None  # what a platform without fcntl looks like
        try:
            import toilcoord
        except ImportError as error:
            print(error)
    """)
    assert "needs a POSIX system" in done.stdout, done.stdout + done.stderr


def test_a_vendored_copy_carries_the_license():
    # Copying toilcoord/ is how pipelines vendor it: the license goes along.
    with open(os.path.join(PACKAGE, "LICENSE")) as inside, open(
        os.path.join(os.path.dirname(PACKAGE), "LICENSE")
    ) as top:
        assert inside.read() == top.read()
