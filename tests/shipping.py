"""Helpers shared by the tests of shipping user code: test_modules.py,
test_resources.py, test_archives.py."""

from __future__ import annotations

import os
import textwrap

from toilcoord.resources import Resource


def write(path, text=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def resource_root(tmp_path, monkeypatch):
    """A resource root for in-process downloads; JTRES_ variables are
    restored afterwards. Test modules make it their fixture ``root``:
    ``root = pytest.fixture(name="root")(resource_root)``."""
    for key in [key for key in os.environ if key.startswith(Resource.resourceEnvNamePrefix)]:
        monkeypatch.delenv(key)
    path = tmp_path / "root"
    path.mkdir(mode=0o700)
    monkeypatch.setenv(Resource.rootDirPathEnvName, str(path))
    yield path
    for key in [key for key in os.environ if key.startswith(Resource.resourceEnvNamePrefix)]:
        del os.environ[key]  # those register() set; monkeypatch restores the rest
