"""The user module beside hotdeploy.py, imported by the workers."""

import json
import os

from toil.job import Job

VALUE = 42


def where():
    """Where this module was imported from: the copy shipped through the job
    store (under JTRES_ROOT), or the leader's directory."""
    root = os.environ.get("JTRES_ROOT", "")
    here = os.path.realpath(os.path.dirname(__file__))
    return "shipped copy" if root and here.startswith(os.path.realpath(root) + os.sep) else "leader's directory"


def report(out, kind):
    from wfcommon import append_line, swapped

    append_line(out, json.dumps({"kind": kind, "from": where(), "value": VALUE, "swapped": swapped()}, sort_keys=True))


class HotJob(Job):
    def __init__(self, out):
        super().__init__(cores=0.1, memory="100M", disk="10M")
        self.out = out

    def run(self, fileStore):
        report(self.out, "Job subclass")


def hot_function(job, out):
    report(out, "job function")
