"""Tests of toilcoord.modules: describing, shipping and loading a module end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from toilcoord.modules import (
    LocalJobStore,
    ModuleDescriptor,
    Resource,
    ResourceException,
    VirtualEnvResource,
)

from conftest import ROOT, becoming, child_env, run_python
from shipping import write

pytestmark = pytest.mark.timeout(60)

# Leader: import argv[2] from directory argv[1], save it to the job store in
# argv[3], register it and print the descriptor command and JTRES_ variables.
LEADER = """
import importlib, json, os, sys
sys.path.insert(0, sys.argv[1])
from toilcoord.modules import LocalJobStore, ModuleDescriptor
importlib.import_module(sys.argv[2])
descriptor = ModuleDescriptor.forModule(sys.argv[2])
descriptor.saveAsResourceTo(LocalJobStore(sys.argv[3])).register()
print(json.dumps({"command": list(descriptor.toCommand()),
                  "env": {k: v for k, v in os.environ.items() if k.startswith("JTRES_")}}))
"""

# Worker: load the descriptor in argv[1:4], call its answer() and report
# where everything came from.
WORKER = """
import json, sys
from toilcoord.modules import ModuleDescriptor, Resource
Resource.prepareSystem()
descriptor = ModuleDescriptor.fromCommand(sys.argv[1:4])
module = descriptor.load()
local = descriptor.localize()
print(json.dumps({"file": module.__file__, "answer": module.answer(),
                  "local": list(local), "global": list(local.globalize())}))
"""


def check(result):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def ship(directory, name, store):
    """Run the leader in a child; return (command, JTRES_ environment)."""
    shipped = check(run_python(LEADER, str(directory), name, str(store)))
    return shipped["command"], shipped["env"]


def run_worker(command, env, root, code=WORKER, extra_path=None):
    """Run *code* as a worker in a child that has only this checkout (and
    *extra_path*) on its path, with a fresh resource root."""
    root.mkdir(mode=0o700, exist_ok=True)
    worker_env = child_env(JTRES_ROOT=str(root), **env)
    if extra_path:
        worker_env["PYTHONPATH"] += os.pathsep + str(extra_path)
    return run_python(code, *command, env=worker_env)


def gone(directory):
    """Move *directory* away so nothing can import from its old path."""
    moved = directory.with_name(directory.name + "-gone")
    directory.rename(moved)
    return moved


# ----------------------------------------------------------------- round trips


def test_single_file_module_round_trip(tmp_path):
    app = tmp_path / "app"
    write(
        app / "greet.py",
        """
        from helper import WORD
        def answer():
            return WORD + " from greet"
    """,
    )
    write(app / "helper.py", "WORD = 'hello'\n")
    command, env = ship(app, "greet", tmp_path / "store")
    assert command == [str(app), "greet", "False"]
    gone(app)

    result = check(run_worker(command, env, tmp_path / "root"))

    assert result["answer"] == "hello from greet"
    local = result["local"][0]
    assert os.path.dirname(local) == str(tmp_path / "root")
    assert result["file"] == os.path.join(local, "greet.py")
    assert result["global"] == command[:2] + [False]


def test_package_round_trip(tmp_path):
    src = tmp_path / "src"
    write(src / "pkg" / "__init__.py", "BASE = 40\n")
    write(src / "pkg" / "sub" / "__init__.py")
    write(
        src / "pkg" / "sub" / "mod.py",
        """
        from .. import BASE
        from . import data
        def answer():
            return BASE + data.TWO
    """,
    )
    write(src / "pkg" / "sub" / "data.py", "TWO = 2\n")
    write(src / "unrelated.py", "raise SystemExit('never shipped')\n")
    command, env = ship(src, "pkg.sub.mod", tmp_path / "store")
    assert command == [str(src), "pkg.sub.mod", "False"]
    gone(src)

    result = check(run_worker(command, env, tmp_path / "root"))

    assert result["answer"] == 42
    local = result["local"][0]
    assert result["file"] == os.path.join(local, "pkg", "sub", "mod.py")
    assert sorted(os.listdir(local)) == [".jtres-stash.json", "pkg"]


def test_main_script_round_trip(tmp_path):
    script = write(
        tmp_path / "app" / "pipeline.py",
        """
        import json, os, sys
        from toilcoord.modules import LocalJobStore, ModuleDescriptor
        def answer():
            return "ran " + __name__
        if __name__ == "__main__":
            descriptor = ModuleDescriptor.forModule("__main__")
            descriptor.saveAsResourceTo(LocalJobStore(sys.argv[1])).register()
            print(json.dumps({"command": list(descriptor.toCommand()),
                              "env": {k: v for k, v in os.environ.items() if k.startswith("JTRES_")}}))
    """,
    )
    leader = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "store")],
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    shipped = check(leader)
    assert shipped["command"] == [str(tmp_path / "app"), "pipeline", "False"]
    gone(tmp_path / "app")

    result = check(run_worker(shipped["command"], shipped["env"], tmp_path / "root"))

    assert result["answer"] == "ran pipeline"


def test_shipped_copy_wins_over_installed_module(tmp_path):
    write(tmp_path / "src" / "pkg" / "__init__.py", "def answer():\n    return 'shipped'\n")
    write(tmp_path / "installed" / "pkg" / "__init__.py", "def answer():\n    return 'installed'\n")
    command, env = ship(tmp_path / "src", "pkg", tmp_path / "store")
    gone(tmp_path / "src")

    result = check(run_worker(command, env, tmp_path / "root", extra_path=tmp_path / "installed"))

    assert result["answer"] == "shipped"


def test_module_imported_from_elsewhere_first_is_an_import_error(tmp_path):
    write(tmp_path / "src" / "pkg" / "__init__.py", "def answer():\n    return 'shipped'\n")
    write(tmp_path / "installed" / "pkg" / "__init__.py", "def answer():\n    return 'installed'\n")
    command, env = ship(tmp_path / "src", "pkg", tmp_path / "store")
    code = "import pkg\n" + WORKER

    result = run_worker(command, env, tmp_path / "root", code=code, extra_path=tmp_path / "installed")

    assert result.returncode == 1
    assert "ImportError: 'pkg' was imported from " + str(tmp_path / "installed") in result.stderr
    assert "before load() was called" in result.stderr


def test_failed_import_says_what_it_tried(tmp_path):
    write(tmp_path / "app" / "greet.py", "def answer():\n    return 1\n")
    command, env = ship(tmp_path / "app", "greet", tmp_path / "store")
    command[1] = "greeting"  # same directory, so the same resource; no such module in it

    result = run_worker(command, env, tmp_path / "root")

    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("ImportError: could not import 'greeting' from " + str(tmp_path / "root"))
    assert "greeting.py nor " in error and "No module named 'greeting'" in error


def test_unregistered_module_loads_from_its_own_directory(tmp_path):
    write(tmp_path / "app" / "greet.py", "def answer():\n    return 'local'\n")

    result = check(run_worker([str(tmp_path / "app"), "greet", "False"], {}, tmp_path / "root"))

    assert result["answer"] == "local"
    assert result["local"][0] == str(tmp_path / "app")
    assert os.listdir(tmp_path / "root") == []


# ----------------------------------------------------------------- __main__

PRINT_MAIN = """
from toilcoord.modules import ModuleDescriptor
print(list(ModuleDescriptor.forModule("__main__")))
"""


def run_main(args, cwd, extra_path=None):
    env = child_env()
    if extra_path:
        env["PYTHONPATH"] += os.pathsep + str(extra_path)
    return subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=str(cwd),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_main_name_of_a_script(tmp_path):
    script = write(tmp_path / "app" / "my_script.py", PRINT_MAIN)

    result = run_main([str(script)], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == repr([str(tmp_path / "app"), "my_script", False])


@pytest.mark.parametrize("module", ["pkg.tool", "pkg", "tool"])
def test_main_name_under_python_m(tmp_path, module):
    write(tmp_path / "pkg" / "__init__.py")
    write(tmp_path / "pkg" / "tool.py", PRINT_MAIN)
    write(tmp_path / "pkg" / "__main__.py", PRINT_MAIN)
    write(tmp_path / "tool.py", PRINT_MAIN)

    result = run_main(["-m", module], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    name = "pkg.__main__" if module == "pkg" else module
    assert result.stdout.strip() == repr([str(tmp_path), name, False])


def test_main_script_colliding_with_the_standard_library(tmp_path):
    script = write(tmp_path / "colorsys.py", PRINT_MAIN)

    result = run_main([str(script)], cwd=tmp_path)

    assert result.returncode == 1
    assert "ResourceException: the script " + str(script) in result.stderr
    assert "collides with the importable module 'colorsys'" in result.stderr


def test_main_collision_does_not_import_the_colliding_module(tmp_path):
    marker = tmp_path / "imported"
    write(tmp_path / "site" / "sidefx.py", f"open({str(marker)!r}, 'w').close()\n")
    script = write(tmp_path / "app" / "sidefx.py", PRINT_MAIN)

    result = run_main([str(script)], cwd=tmp_path, extra_path=tmp_path / "site")

    assert result.returncode == 1
    assert "collides with the importable module 'sidefx' from " + str(tmp_path / "site" / "sidefx.py") in result.stderr
    assert not marker.exists()


def test_main_script_colliding_with_a_package_beside_it(tmp_path):
    write(tmp_path / "app" / "tool" / "__init__.py")
    script = write(tmp_path / "app" / "tool.py", PRINT_MAIN)

    result = run_main([str(script)], cwd=tmp_path)

    assert result.returncode == 1
    assert "collides with the importable module 'tool' from " + str(tmp_path / "app" / "tool") in result.stderr


def test_main_without_a_file_cannot_be_described():
    result = run_python("from toilcoord.modules import ModuleDescriptor\nModuleDescriptor.forModule('__main__')")

    assert result.returncode == 1
    assert "has no file" in result.stderr


# ----------------------------------------------------------------- descriptors


def test_descriptor_of_this_package_belongs_to_it():
    import toilcoord.modules as own

    descriptor = ModuleDescriptor.forModule(own.__name__)

    assert descriptor == (os.path.dirname(os.path.dirname(own.__file__)), own.__name__, False)
    assert descriptor.belongsToToil
    assert not ModuleDescriptor("/x", own.__name__.rpartition(".")[0] + "x.modules", False).belongsToToil


def test_toils_own_modules_belong_to_toil_as_in_toil():
    # Toil ships neither its own modules nor, standing in for them, ours.
    assert ModuleDescriptor("/x", "toil.job", False).belongsToToil
    assert ModuleDescriptor("/x", "toil.resource", False).belongsToToil
    assert not ModuleDescriptor("/x", "toil", False).belongsToToil, "Toil's test is startswith('toil.')"
    assert not ModuleDescriptor("/x", "toilx.job", False).belongsToToil
    assert not ModuleDescriptor("/x", "mytoil.job", False).belongsToToil


def test_vendored_copy_knows_its_own_modules(tmp_path):
    vendor = tmp_path / "mypipeline" / "_vendor"
    write(tmp_path / "mypipeline" / "__init__.py")
    write(vendor / "__init__.py")
    shutil.copytree(
        os.path.join(ROOT, "toilcoord"), str(vendor / "toilcoord"), ignore=shutil.ignore_patterns("__pycache__")
    )
    code = """
        import sys
        from mypipeline._vendor.toilcoord.modules import ModuleDescriptor
        own = ModuleDescriptor.forModule("mypipeline._vendor.toilcoord.modules")
        print(own.belongsToToil, ModuleDescriptor("/x", "toilcoord.modules", False).belongsToToil,
              "toilcoord" in sys.modules)
    """
    env = dict(os.environ, PYTHONPATH=str(tmp_path))

    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=str(tmp_path),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False", "False"]


@pytest.mark.skipif(sys.prefix == getattr(sys, "base_prefix", sys.prefix), reason="needs a virtualenv")
def test_module_of_the_virtualenv_ships_its_site_packages():
    import pluggy

    descriptor = ModuleDescriptor.forModule("pluggy")

    assert descriptor.fromVirtualEnv and os.path.basename(descriptor.dirPath) == "site-packages"
    assert descriptor._resource_path == descriptor.dirPath
    assert descriptor._resource_class() is VirtualEnvResource
    assert pluggy.__file__.startswith(descriptor.dirPath)


def test_command_round_trip():
    descriptor = ModuleDescriptor("/some dir", "pkg.mod", True)

    assert descriptor.toCommand() == ("/some dir", "pkg.mod", "True")
    assert ModuleDescriptor.fromCommand(descriptor.toCommand()) == descriptor
    # Toil raises RuntimeError for the count, ValueError for the flag: ours is both, for both.
    for command, message in (
        (["/x", "mod"], "3 items"),
        (["/x", "mod", "True", "extra"], "3 items"),
        (["/x", "mod", "true"], "'true'"),
    ):
        for expected in (ValueError, RuntimeError):
            with pytest.raises(expected, match=message):
                ModuleDescriptor.fromCommand(command)


def test_descriptor_of_an_unimported_module():
    with pytest.raises(ResourceException, match="has not been imported"):
        ModuleDescriptor.forModule("surely_not_imported_module")


def test_script_inside_a_package_directory_is_refused(tmp_path):
    write(tmp_path / "pkg" / "__init__.py")
    write(tmp_path / "pkg" / "script.py")

    with pytest.raises(ResourceException, match=r"-m pkg\.script"):
        ModuleDescriptor(str(tmp_path / "pkg"), "script", False).saveAsResourceTo(LocalJobStore(tmp_path / "s"))
    assert os.listdir(tmp_path / "s") == []


def test_namespace_package_is_refused(tmp_path):
    write(tmp_path / "ns" / "mod.py")

    with pytest.raises(ResourceException, match="namespace packages"):
        ModuleDescriptor(str(tmp_path), "ns.mod", False).saveAsResourceTo(LocalJobStore(tmp_path / "s"))


def test_globalize_of_a_leader_descriptor_is_itself(tmp_path):
    descriptor = ModuleDescriptor(str(tmp_path), "mod", False)

    assert descriptor.globalize() is descriptor
    assert ModuleDescriptor(str(tmp_path / "missing"), "mod", False).globalize().dirPath == str(tmp_path / "missing")


def run_as(user, script, **env):
    """Run the shell *script* as *user*, with only *env* (and PATH) set."""
    return subprocess.run(
        ["/bin/sh", "-c", script],
        env=dict(env, PATH="/usr/bin:/bin"),
        cwd="/",
        preexec_fn=becoming(user),
        capture_output=True,
        text=True,
        timeout=30,
    )


# How the other user plants greet.py, as (shell script, JTRES_ROOT below
# $S, what the warning says). $S is a sticky world-writable directory, $R
# the victim's root (loose while the other user plants, 0700 afterwards),
# $H the content hash, $E the planted module.
PLANTS = {
    "foreign-root": (
        'mkdir -m 777 "$S/theirs" "$S/theirs/$H" && printf %s "$E" > "$S/theirs/$H/greet.py"',
        "theirs",
        "it belongs to uid",
    ),
    "shared-root": ('mkdir "$S/$H" && printf %s "$E" > "$S/$H/greet.py"', "", "group or others may write"),
    "foreign-copy": ('mkdir "$R/$H" && printf %s "$E" > "$R/$H/greet.py"', "root", "it belongs to uid"),
    "symlinked-copy": (
        'mkdir "$S/theirs" && printf %s "$E" > "$S/theirs/greet.py" && ln -s "$S/theirs" "$R/$H"',
        "root",
        "it is a symlink",
    ),
    "loose-copy": ('printf %s "$E" > "$R/$H/greet.py"', "root", "group or others may write"),
}


@pytest.mark.parametrize("attack", sorted(PLANTS))
def test_a_copy_planted_by_another_user_is_never_imported(tmp_path, other_user, attack):
    script, jtres_root, why = PLANTS[attack]
    write(tmp_path / "app" / "greet.py", "def answer():\n    return 'genuine'\n")
    command, env = ship(tmp_path / "app", "greet", tmp_path / "store")
    (encoded,) = env.values()
    contentHash = Resource.unpickle(encoded).contentHash
    shared = tempfile.mkdtemp(prefix="jtres-shared-")
    try:
        os.chmod(shared, 0o1777)  # like /tmp
        root, marker = os.path.join(shared, "root"), os.path.join(shared, "imported")
        os.mkdir(root)
        os.chmod(root, 0o777)
        if attack == "loose-copy":
            os.mkdir(os.path.join(root, contentHash))
            os.chmod(os.path.join(root, contentHash), 0o777)
        evil = f"open({marker!r}, 'w').close()\n\ndef answer():\n    return 'planted'\n"
        planted = run_as(other_user, script, S=shared, R=root, H=contentHash, E=evil)
        assert planted.returncode == 0, planted.stderr
        os.chmod(root, 0o700)
        (tmp_path / "tmp").mkdir()

        result = run_python(
            WORKER,
            *command,
            env=child_env(
                JTRES_ROOT=os.path.join(shared, jtres_root) if jtres_root else shared,
                TMPDIR=str(tmp_path / "tmp"),
                **env,
            ),
        )

        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout.splitlines()[-1])["answer"] == "genuine"
        assert not os.path.exists(marker), "the planted module was imported"
        warnings = [line for line in result.stderr.splitlines() if line.startswith("Not trusting")]
        assert len(warnings) == 1 and why in warnings[0], result.stderr
    finally:
        shutil.rmtree(shared)


class ToilStyleJobStore:
    """Shaped like Toil's FileJobStore: the URL method's parameter is
    called sharedFileName, the stream's shared_file_name."""

    def __init__(self, path):
        self.path = str(path)
        os.makedirs(self.path, exist_ok=True)
        self.calls = []

    def write_shared_file_stream(self, shared_file_name, encrypted=None, encoding=None, errors=None):
        self.calls.append(("write", shared_file_name, encrypted))
        return open(os.path.join(self.path, shared_file_name), "wb")

    def get_shared_public_url(self, sharedFileName):
        self.calls.append(("url", sharedFileName))
        return "file:" + os.path.join(self.path, sharedFileName)


def test_save_as_resource_to_a_toil_style_job_store(tmp_path):
    write(tmp_path / "app" / "mod.py", "X = 1\n")
    store = ToilStyleJobStore(tmp_path / "store")

    resource = ModuleDescriptor(str(tmp_path / "app"), "mod", False).saveAsResourceTo(store)

    assert store.calls == [("write", resource.pathHash, False), ("url", resource.pathHash)]
    assert resource.url == "file:" + str(tmp_path / "store" / resource.pathHash)
    assert resource.refresh(store) == resource
    assert store.calls[-1] == ("url", resource.pathHash)
