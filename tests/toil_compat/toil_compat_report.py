"""A pytest plugin for the compatibility harness's runs of Toil's own tests:
writes each test's outcome (passed, failed, error, skipped) as JSON to
$TOILCOORD_COMPAT_REPORT, keyed by its id below toil/test/."""

import json
import os

_outcomes = {}
_RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}


def _key(nodeid):
    """The id below toil/test/ (the harness makes Toil's package directory
    the rootdir, so ids begin with "test/")."""
    marker = "toil/test/"
    if marker in nodeid:
        return nodeid[nodeid.index(marker) + len(marker) :]
    return nodeid[len("test/") :] if nodeid.startswith("test/") else nodeid


def pytest_runtest_logreport(report):
    if report.when == "call":
        outcome = report.outcome
    elif report.failed:
        outcome = "error"  # setup or teardown
    elif report.skipped:
        outcome = "skipped"
    else:
        outcome = "passed"
    key = _key(report.nodeid)
    if _RANK[outcome] >= _RANK.get(_outcomes.get(key, "passed"), 0) or key not in _outcomes:
        _outcomes[key] = outcome


def pytest_collectreport(report):
    if report.failed:
        _outcomes[_key(report.nodeid) + " (collection)"] = "error"


def pytest_sessionfinish(session):
    path = os.environ.get("TOILCOORD_COMPAT_REPORT")
    if path:
        with open(path, "w") as stream:
            json.dump(_outcomes, stream, indent=1, sort_keys=True)
