"""Tests of toilcoord.jobstore: LocalJobStore."""

from __future__ import annotations

import os
import urllib.request

import pytest

from toilcoord.jobstore import LocalJobStore

pytestmark = pytest.mark.timeout(60)


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
