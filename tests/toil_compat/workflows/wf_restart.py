"""A workflow that is SIGKILLed mid-run and restarted (``--restart``, as
``toil restart`` does) on the same job store, possibly under the other
implementation.

argv: job store, result.json, then "start" or "restart". On the first
attempt the victim job defers a function, says where to kill it (its process
group, in <shared>/ready) and waits to be killed with its leader; restarted,
it finishes. The coordination and work directories are fixed beside the job
store, so both runs (and the harness) share them.
"""

import json
import os
import sys
import threading

from toil.common import Toil
from toil.job import Job
from wfcommon import append_line, finish, lines, options, swapped

SQUARES = 4


def square(job, number):
    return number * number


def victim(job, shared):
    ready = os.path.join(shared, "ready")
    if os.path.exists(ready):  # the restarted attempt
        append_line(os.path.join(shared, "attempts"), "restarted, swapped %s" % swapped())
        return "victim finished"
    job.defer(append_line, os.path.join(shared, "deferred"), "deferred function ran")
    append_line(os.path.join(shared, "attempts"), "killed, swapped %s" % swapped())
    with open(ready + ".tmp", "w") as stream:
        json.dump({"worker_group": os.getpgid(0)}, stream)
    os.rename(ready + ".tmp", ready)
    threading.Event().wait(600)  # the harness SIGKILLs this process group and the leader
    raise RuntimeError("not killed")


def gather(job, values):
    return sorted(values, key=str)


def root(job, shared):
    values = [job.addChildJobFn(square, number, cores=0.1, memory="100M", disk="10M").rv() for number in range(SQUARES)]
    return job.addFollowOnJobFn(then_the_victim, values, shared, cores=0.1, memory="100M", disk="10M").rv()


def then_the_victim(job, values, shared):
    # After every square's worker has exited: none is left to run the
    # victim's deferred function as a sibling when it is killed.
    values = values + [job.addChildJobFn(victim, shared, cores=0.1, memory="100M", disk="10M").rv()]
    return job.addFollowOnJobFn(gather, values, cores=0.1, memory="100M", disk="10M").rv()


def state_files(coordination):
    """The deferred-function state files left in the coordination directory."""
    found = []
    for directory, _, names in os.walk(coordination):
        if os.path.basename(directory) == "deferred":
            found += sorted(
                "toilcoord-func*" if name.startswith("toilcoord-func") else "func*" if name.startswith("func") else name
                for name in names
            )
    return found


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(sys.argv[2]))
    shared, coordination, work = (os.path.join(here, name) for name in ("shared", "coordination", "work"))
    for directory in (shared, coordination, work):
        os.makedirs(directory, exist_ok=True)
    restart = sys.argv[3] == "restart"
    opts = options(sys.argv[1], restart=restart, coordination_dir=coordination, workDir=work)
    with Toil(opts) as toil:
        result = (
            toil.restart() if restart else toil.start(Job.wrapJobFn(root, shared, cores=0.1, memory="100M", disk="10M"))
        )
    finish(
        {
            "result": result,
            "deferred": lines(os.path.join(shared, "deferred")),
            "attempts": lines(os.path.join(shared, "attempts")),
            "state_files": state_files(coordination),
        }
    )
