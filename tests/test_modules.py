from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import urllib.request
import zipfile

import pytest
from conftest import ROOT, becoming, child_env, join_or_kill, run_python

from toilcoord import archives
from toilcoord.modules import (
    DirectoryResource,
    FileResource,
    LocalJobStore,
    ModuleDescriptor,
    Resource,
    ResourceException,
    VirtualEnvResource,
)

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


def write(path, text=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


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
    write(app / "greet.py", """
        from helper import WORD
        def answer():
            return WORD + " from greet"
    """)
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
    write(src / "pkg" / "sub" / "mod.py", """
        from .. import BASE
        from . import data
        def answer():
            return BASE + data.TWO
    """)
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
    script = write(tmp_path / "app" / "pipeline.py", """
        import json, os, sys
        from toilcoord.modules import LocalJobStore, ModuleDescriptor
        def answer():
            return "ran " + __name__
        if __name__ == "__main__":
            descriptor = ModuleDescriptor.forModule("__main__")
            descriptor.saveAsResourceTo(LocalJobStore(sys.argv[1])).register()
            print(json.dumps({"command": list(descriptor.toCommand()),
                              "env": {k: v for k, v in os.environ.items() if k.startswith("JTRES_")}}))
    """)
    leader = subprocess.run([sys.executable, str(script), str(tmp_path / "store")], env=child_env(),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
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
    return subprocess.run([sys.executable, *args], env=env, cwd=str(cwd), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)


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
    shutil.copytree(os.path.join(ROOT, "toilcoord"), str(vendor / "toilcoord"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = """
        import sys
        from mypipeline._vendor.toilcoord.modules import ModuleDescriptor
        own = ModuleDescriptor.forModule("mypipeline._vendor.toilcoord.modules")
        print(own.belongsToToil, ModuleDescriptor("/x", "toilcoord.modules", False).belongsToToil,
              "toilcoord" in sys.modules)
    """
    env = dict(os.environ, PYTHONPATH=str(tmp_path))

    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=str(tmp_path),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False", "False"]


@pytest.mark.skipif(sys.prefix == getattr(sys, "base_prefix", sys.prefix), reason="needs a virtualenv")
def test_module_of_the_virtualenv_ships_its_site_packages():
    import pluggy

    descriptor = ModuleDescriptor.forModule("pluggy")

    assert descriptor.fromVirtualEnv and os.path.basename(descriptor.dirPath) == "site-packages"
    assert descriptor._resourcePath == descriptor.dirPath
    assert descriptor._resourceClass() is VirtualEnvResource
    assert pluggy.__file__.startswith(descriptor.dirPath)


def test_command_round_trip():
    descriptor = ModuleDescriptor("/some dir", "pkg.mod", True)

    assert descriptor.toCommand() == ("/some dir", "pkg.mod", "True")
    assert ModuleDescriptor.fromCommand(descriptor.toCommand()) == descriptor
    # Toil raises RuntimeError for the count, ValueError for the flag: ours is both, for both.
    for command, message in ((["/x", "mod"], "3 items"), (["/x", "mod", "True", "extra"], "3 items"),
                             (["/x", "mod", "true"], "'true'")):
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


# ----------------------------------------------------------------- resources

@pytest.fixture
def root(tmp_path, monkeypatch):
    """A resource root for in-process downloads; JTRES_ variables are
    restored afterwards."""
    for key in [key for key in os.environ if key.startswith(Resource.resourceEnvNamePrefix)]:
        monkeypatch.delenv(key)
    path = tmp_path / "root"
    path.mkdir(mode=0o700)
    monkeypatch.setenv(Resource.rootDirPathEnvName, str(path))
    yield path
    for key in [key for key in os.environ if key.startswith(Resource.resourceEnvNamePrefix)]:
        del os.environ[key]  # those register() set; monkeypatch restores the rest


def store_bytes(store, name, data):
    """Put *data* in *store* as a resource of class DirectoryResource."""
    with store.write_shared_file_stream(name) as writer:
        writer.write(data)
    return DirectoryResource(name="d", pathHash=name, url=store.get_shared_public_url(name),
                             contentHash=hashlib.md5(data).hexdigest())


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


@pytest.mark.parametrize("member", [
    ("../evil", "x"),
    ("a/../../evil", "x"),
    ("/tmp/evil-absolute", "x"),
    symlink_member("link", "../../evil-target"),
    symlink_member("inner", "inside"),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink-out", "symlink-in"])
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


@pytest.mark.parametrize("raw_name", [b"evil.py\0.txt", b"red\x1b[31m.py", b"two\nlines.py", b"del\x7f.py"],
                         ids=["nul", "escape", "newline", "del"])
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
        data = data[:entry] + declared.to_bytes(4, "little") + data[entry + 4:]
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
    resource = store_bytes(LocalJobStore(tmp_path / "store"), "many",
                           zip_of(*[(f"m{i}.py", "") for i in range(11)]))

    with pytest.raises(ResourceException, match=r"11 members: the limit is toilcoord\.archives\.MAX_MEMBERS = 10"):
        resource.download()
    assert os.listdir(root) == []


def test_default_limits_are_generous():
    assert archives.MAX_UNPACKED_BYTES == 1 << 30 and archives.MAX_MEMBERS == 100_000


def test_corrupted_resource_is_refused(tmp_path, root):
    store = LocalJobStore(tmp_path / "store")
    write(tmp_path / "data.txt", "original")
    resource = FileResource.create(store, str(tmp_path / "data.txt"))
    with store.write_shared_file_stream(resource.pathHash) as writer:
        writer.write(b"tampered")

    with pytest.raises(ResourceException, match="corrupted"):
        resource.download()
    assert os.listdir(root) == []


def test_file_resource_round_trip_and_registration(tmp_path, root):
    store = LocalJobStore(tmp_path / "store")
    leader_path = str(write(tmp_path / "data.txt", "payload"))
    resource = FileResource.create(store, leader_path)
    resource.register()

    found = Resource.lookup(leader_path)
    found.download()
    found.download()  # a second download finds the copy and does nothing

    assert type(found) is FileResource and found == resource
    assert resource.name == "data.txt" and resource.contentHash == hashlib.md5(b"payload").hexdigest()
    assert open(found.localPath).read() == "payload"
    assert os.listdir(root) == [resource.contentHash]
    assert Resource.lookup(str(tmp_path / "other.txt")) is None


def test_concurrent_downloads_publish_one_whole_copy(tmp_path, root):
    src = tmp_path / "src"
    for i in range(20):
        write(src / "pkg" / f"m{i}.py", f"X = {i}\n" * 100)
    write(src / "pkg" / "__init__.py")
    resource = DirectoryResource.create(LocalJobStore(tmp_path / "store"), str(src / "pkg"))
    context = multiprocessing.get_context("fork")
    workers = 4
    barrier = context.Barrier(workers, timeout=30)

    def localize():
        def all_unpacked(tempDirPath):
            # Nobody publishes before everyone has unpacked: a real race.
            assert not os.path.exists(resource.localDirPath)
            assert len(os.listdir(os.path.join(tempDirPath, "pkg"))) == 21
            barrier.wait()
        resource.download(callback=all_unpacked)
        assert len(os.listdir(os.path.join(resource.localPath, "pkg"))) == 21

    processes = [context.Process(target=localize) for _ in range(workers)]
    try:
        for process in processes:
            process.start()
    finally:
        exit_codes = join_or_kill(processes, 60)
    assert exit_codes == [0] * workers
    assert os.listdir(root) == [resource.contentHash]


def test_directory_hash_is_stable_and_skips_bytecode(tmp_path):
    store = LocalJobStore(tmp_path / "store")
    write(tmp_path / "app" / "mod.py", "X = 1\n")
    first = DirectoryResource.create(store, str(tmp_path / "app"))
    write(tmp_path / "app" / "__pycache__" / "mod.cpython-99.pyc", "junk")

    second = DirectoryResource.create(store, str(tmp_path / "app"))

    assert first == second
    with zipfile.ZipFile(os.path.join(store.path, first.pathHash)) as archive:
        assert archive.namelist() == ["mod.py"]


def test_symlinks_leading_out_of_a_shipped_directory_are_not_shipped(tmp_path, caplog):
    secret = write(tmp_path / "someone" / ".ssh" / "id_ed25519", "PRIVATE KEY of someone else\n")
    app = tmp_path / "app"
    write(app / "mod.py", "X = 1\n")
    write(app / "lib" / "real.py", "Y = 2\n")
    os.symlink(secret, app / "absolute_key")
    os.symlink(os.path.relpath(secret, app / "lib"), app / "lib" / "relative_key")
    os.symlink("absolute_key", app / "chain_out")  # a link to a link that leaves
    os.symlink("lib/real.py", app / "alias.py")  # inside: shipped as its content
    os.symlink("alias.py", app / "chain_in.py")
    os.symlink(secret.parent, app / "keys")  # directories are never followed

    resource = DirectoryResource.create(LocalJobStore(tmp_path / "store"), str(app))

    with zipfile.ZipFile(os.path.join(tmp_path / "store", resource.pathHash)) as archive:
        assert sorted(archive.namelist()) == ["alias.py", "chain_in.py", "lib/real.py", "mod.py"]
        assert archive.read("alias.py") == archive.read("chain_in.py") == b"Y = 2\n"
        assert not any(b"PRIVATE KEY" in archive.read(name) for name in archive.namelist())
    skipped = sorted(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert len(skipped) == 4 and sum(f"leads out of {app}" in message for message in skipped) == 3, skipped


def test_virtualenv_resource_round_trip(tmp_path, root):
    site = tmp_path / "venv" / "lib" / "site-packages"
    write(site / "dep" / "__init__.py", "X = 1\n")
    write(site / "single.py")
    store = LocalJobStore(tmp_path / "store")
    resource = VirtualEnvResource.create(store, str(site))

    resource.download()

    assert sorted(os.listdir(resource.localPath)) == ["dep", "single.py"]
    with pytest.raises(ResourceException, match="site-packages"):
        VirtualEnvResource.create(store, str(tmp_path / "venv"))


def test_whole_system_directories_are_not_shipped(tmp_path):
    import tempfile

    for path in ("/", tempfile.gettempdir(), os.path.expanduser("~")):
        with pytest.raises(ResourceException, match="refusing to ship all of"):
            DirectoryResource.create(LocalJobStore(tmp_path / "s"), path)
    assert os.listdir(tmp_path / "s") == []


def test_pickle_round_trip_never_imports(root):
    resource = FileResource("n", "a" * 32, "file:///x", "b" * 32)

    assert Resource.unpickle(resource.pickle()) == resource
    assert type(Resource.unpickle(resource.pickle())) is FileResource
    toil_style = "toil.resource.DirectoryResource:" + json.dumps(list(resource))
    assert type(Resource.unpickle(toil_style)) is DirectoryResource
    bad_fields = [["../n", "a" * 32, "u", "b" * 32], ["n", "a" * 32, "u", "../" + "b" * 29], ["n", "A" * 32, "u", "b" * 32]]
    for bad in ["os.system:" + json.dumps(list(resource)), "no colon", "toilcoord.modules.FileResource:[1, 2]",
                "FileResource:{not json"] + ["FileResource:" + json.dumps(fields) for fields in bad_fields]:
        with pytest.raises(ValueError):
            Resource.unpickle(bad)


def test_lookup_rejects_a_resource_registered_under_another_path(tmp_path, root, monkeypatch):
    resource = FileResource("n", "a" * 32, "file:///x", "b" * 32)
    leader_path = str(tmp_path / "x")
    key = Resource.resourceEnvNamePrefix + hashlib.md5(leader_path.encode()).hexdigest()
    monkeypatch.setenv(key, resource.pickle())

    with pytest.raises(ResourceException, match="another path"):
        Resource.lookup(leader_path)


def test_prepare_and_clean_system(tmp_path, monkeypatch):
    for key in [key for key in os.environ if key.startswith("JTRES_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("JTRES_" + "c" * 32, "anything")

    Resource.prepareSystem()
    made = os.environ["JTRES_ROOT"]
    Resource.prepareSystem()  # idempotent
    assert os.environ["JTRES_ROOT"] == made and os.path.isdir(made)
    Resource.cleanSystem()

    assert not os.path.exists(made)
    assert [key for key in os.environ if key.startswith("JTRES_")] == []
    monkeypatch.setenv("JTRES_ROOT", str(write(tmp_path / "file")))
    with pytest.raises(NotADirectoryError, match="JTRES_ROOT"):
        Resource.prepareSystem()


def test_a_bad_resource_root_is_also_the_runtime_error_toil_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("JTRES_ROOT", str(write(tmp_path / "file")))
    for caught in (RuntimeError, NotADirectoryError, OSError):
        with pytest.raises(caught) as raised:
            Resource.prepareSystem()
        assert isinstance(raised.value, RuntimeError) and isinstance(raised.value, NotADirectoryError)
        assert raised.value.filename == str(tmp_path / "file")
    monkeypatch.setenv("JTRES_ROOT", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="not a directory"):
        Resource.prepareSystem()


def test_download_without_prepare_system_says_so(monkeypatch):
    monkeypatch.delenv("JTRES_ROOT", raising=False)

    with pytest.raises(ResourceException, match=r"prepareSystem\(\)"):
        FileResource("n", "a" * 32, "file:///x", "b" * 32).download()



# ----------------------------------------------------------------- whose copy

def trust_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Not trusting")]


def test_a_loose_copy_is_not_used_and_a_private_one_is(tmp_path, root, caplog):
    write(tmp_path / "app" / "mod.py", "X = 'genuine'\n")
    resource = DirectoryResource.create(LocalJobStore(tmp_path / "store"), str(tmp_path / "app"))
    planted = root / resource.contentHash
    write(planted / "mod.py", "X = 'planted'\n")
    planted.chmod(0o777)

    resource.download()
    resource.download()  # finds its private copy again

    local = resource.localPath
    assert os.path.dirname(local) == str(root) and local != str(planted)
    assert stat.S_IMODE(os.lstat(local).st_mode) == 0o700
    assert open(os.path.join(local, "mod.py")).read() == "X = 'genuine'\n"
    assert (planted / "mod.py").read_text() == "X = 'planted'\n", "not ours to delete"
    (warning,) = trust_warnings(caplog)
    assert str(planted) in warning and "group or others may write to it (mode 0777)" in warning


def test_a_copy_published_during_the_download_must_be_ours_too(tmp_path, root, caplog):
    write(tmp_path / "app" / "mod.py", "X = 'genuine'\n")
    resource = DirectoryResource.create(LocalJobStore(tmp_path / "store"), str(tmp_path / "app"))
    theirs = write(tmp_path / "theirs" / "mod.py", "X = 'planted'\n").parent

    resource.download(callback=lambda _: os.symlink(theirs, root / resource.contentHash))

    assert open(os.path.join(resource.localPath, "mod.py")).read() == "X = 'genuine'\n"
    assert os.path.islink(root / resource.contentHash), "not ours to delete"
    (warning,) = trust_warnings(caplog)
    assert "it is a symlink" in warning


def test_a_loose_or_symlinked_root_is_replaced_by_a_private_one(tmp_path, root, monkeypatch, caplog):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root.chmod(0o777)
    Resource.prepareSystem()
    fresh = os.environ[Resource.rootDirPathEnvName]
    os.symlink(fresh, tmp_path / "link")
    monkeypatch.setenv(Resource.rootDirPathEnvName, str(tmp_path / "link") + "/")
    Resource.prepareSystem()

    fresher = os.environ[Resource.rootDirPathEnvName]
    for made in (fresh, fresher):
        assert os.path.dirname(made) == str(tmp_path) and stat.S_IMODE(os.lstat(made).st_mode) == 0o700
    loose, link = trust_warnings(caplog)
    assert f"{root}: group or others may write to it" in loose and f"{fresh}" in loose
    assert "link/: it is a symlink" in link and fresher in link

    monkeypatch.setenv(Resource.rootDirPathEnvName, str(root))
    Resource.cleanSystem()  # not ours to remove
    assert root.is_dir() and "Not removing" in caplog.records[-1].getMessage()


def run_as(user, script, **env):
    """Run the shell *script* as *user*, with only *env* (and PATH) set."""
    return subprocess.run(["/bin/sh", "-c", script], env=dict(env, PATH="/usr/bin:/bin"), cwd="/",
                          preexec_fn=becoming(user), capture_output=True, text=True, timeout=30)


# How the other user plants greet.py, as (shell script, JTRES_ROOT below
# $S, what the warning says). $S is a sticky world-writable directory, $R
# the victim's root (loose while the other user plants, 0700 afterwards),
# $H the content hash, $E the planted module.
PLANTS = {
    "foreign-root": ('mkdir -m 777 "$S/theirs" "$S/theirs/$H" && printf %s "$E" > "$S/theirs/$H/greet.py"',
                     "theirs", "it belongs to uid"),
    "shared-root": ('mkdir "$S/$H" && printf %s "$E" > "$S/$H/greet.py"', "", "group or others may write"),
    "foreign-copy": ('mkdir "$R/$H" && printf %s "$E" > "$R/$H/greet.py"', "root", "it belongs to uid"),
    "symlinked-copy": ('mkdir "$S/theirs" && printf %s "$E" > "$S/theirs/greet.py" && ln -s "$S/theirs" "$R/$H"',
                       "root", "it is a symlink"),
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

        result = run_python(WORKER, *command, env=child_env(
            JTRES_ROOT=os.path.join(shared, jtres_root) if jtres_root else shared, TMPDIR=str(tmp_path / "tmp"), **env))

        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout.splitlines()[-1])["answer"] == "genuine"
        assert not os.path.exists(marker), "the planted module was imported"
        warnings = [line for line in result.stderr.splitlines() if line.startswith("Not trusting")]
        assert len(warnings) == 1 and why in warnings[0], result.stderr
    finally:
        shutil.rmtree(shared)


# ----------------------------------------------------------------- FIPS

def fips_md5(python38):
    real = hashlib.md5

    def md5(*args, **kwargs):
        if python38 and "usedforsecurity" in kwargs:
            raise TypeError("'usedforsecurity' is an invalid keyword argument for openssl_md5()")
        if kwargs.pop("usedforsecurity", True) is not False:
            raise ValueError("[digital envelope routines] unsupported")
        return real(*args, **kwargs)
    return md5


@pytest.mark.parametrize("python38", [False, True], ids=["3.9+", "3.8"])
def test_resources_work_in_fips_mode(tmp_path, root, monkeypatch, python38):
    monkeypatch.setattr(hashlib, "md5", fips_md5(python38))
    leader_path = str(write(tmp_path / "data.txt", "payload"))

    resource = FileResource.create(LocalJobStore(tmp_path / "store"), leader_path)
    resource.register()
    Resource.lookup(leader_path).download()

    assert len(resource.contentHash) == len(resource.pathHash) == (64 if python38 else 32)
    assert open(resource.localPath).read() == "payload"


def test_md5_resource_on_a_python_without_md5_says_why(root, monkeypatch):
    monkeypatch.setattr(hashlib, "md5", fips_md5(python38=True))

    with pytest.raises(ResourceException, match="cannot compute MD5"):
        FileResource("n", "a" * 32, "file:///x", "b" * 32).download()
    assert os.listdir(root) == []


# ----------------------------------------------------------------- job store

def test_local_job_store_writes_atomically(tmp_path):
    store = LocalJobStore(tmp_path / "store dir")
    with store.write_shared_file_stream("shared") as writer:
        writer.write(b"first")

    with pytest.raises(KeyError):
        with store.write_shared_file_stream("shared", encrypted=False) as writer:
            writer.write(b"half")
            raise KeyError("interrupted")

    assert os.listdir(store.path) == ["shared"]
    url = store.get_shared_public_url("shared")
    assert url.startswith("file:///") and " " not in url
    with urllib.request.urlopen(url) as response:
        assert response.read() == b"first"


def test_local_job_store_rejects_bad_input(tmp_path):
    store = LocalJobStore(tmp_path / "store")
    for name in ("", "..", "a/b", None):
        with pytest.raises(ValueError, match="shared file name"):
            with store.write_shared_file_stream(name):
                pass
    with pytest.raises(ValueError, match="encrypt"):
        with store.write_shared_file_stream("x", encrypted=True):
            pass
    with pytest.raises(TypeError):
        LocalJobStore(42)
    assert os.listdir(store.path) == []


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


def test_refresh_asks_the_job_store_for_the_url_again(tmp_path):
    write(tmp_path / "app" / "mod.py", "X = 1\n")
    store = LocalJobStore(tmp_path / "store")
    resource = ModuleDescriptor(str(tmp_path / "app"), "mod", False).saveAsResourceTo(store)

    class MovedStore(LocalJobStore):
        def get_shared_public_url(self, shared_file_name):
            return "file:///moved/" + shared_file_name

    refreshed = resource.refresh(MovedStore(tmp_path / "store"))
    assert refreshed.url == "file:///moved/" + resource.pathHash
    assert refreshed._replace(url=resource.url) == resource, "only the URL changes"
    assert type(refreshed) is type(resource)
