"""Tests of toilcoord.resources: saving, registering, downloading and trusting resources."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import stat
import tempfile
import zipfile

import pytest

from toilcoord.jobstore import LocalJobStore
from toilcoord.modules import ModuleDescriptor
from toilcoord.resource_errors import ResourceException
from toilcoord.resources import DirectoryResource, FileResource, Resource, VirtualEnvResource

from conftest import join_or_kill
from shipping import resource_root, write

pytestmark = pytest.mark.timeout(60)

root = pytest.fixture(name="root")(resource_root)


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
    bad_fields = [
        ["../n", "a" * 32, "u", "b" * 32],
        ["n", "a" * 32, "u", "../" + "b" * 29],
        ["n", "A" * 32, "u", "b" * 32],
    ]
    for bad in [
        "os.system:" + json.dumps(list(resource)),
        "no colon",
        "toilcoord.modules.FileResource:[1, 2]",
        "FileResource:{not json",
    ] + ["FileResource:" + json.dumps(fields) for fields in bad_fields]:
        with pytest.raises(ValueError):
            Resource.unpickle(bad)


def test_pickle_names_the_defining_module_and_reads_the_old_layout():
    # Resources moved from toilcoord.modules to toilcoord.resources: a string
    # encoded by a leader running the old layout still decodes, by bare name.
    resource = DirectoryResource("n", "a" * 32, "file:///x", "b" * 32)

    assert resource.pickle().startswith(DirectoryResource.__module__ + ".DirectoryResource:")
    assert DirectoryResource.__module__.endswith(".resources")
    for old in ("toilcoord.modules.DirectoryResource:", "toilcoord.modules.VirtualEnvResource:"):
        decoded = Resource.unpickle(old + json.dumps(list(resource)))
        assert type(decoded).__name__ == old.split(".")[-1][:-1] and tuple(decoded) == tuple(resource)


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
