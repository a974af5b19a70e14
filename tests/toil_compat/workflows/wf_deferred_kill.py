"""A job defers a function and is SIGKILLed: the function still runs (by
the leader's batch-system cleanup), exactly once."""

import os
import signal
import sys

from toil.common import Toil
from toil.exceptions import FailedJobsException
from toil.job import Job
from wfcommon import append_line, finish, lines, options, swapped


def die(job, out):
    append_line(out + ".worker", "swapped %s" % swapped())
    job.defer(append_line, out, "deferred function ran")
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    out = sys.argv[2] + ".lines"
    failed = False
    try:
        with Toil(options(sys.argv[1])) as toil:
            toil.start(Job.wrapJobFn(die, out, cores=0.1, memory="100M", disk="10M"))
    except FailedJobsException:
        failed = True
    finish({"workflow_failed": failed, "deferred": lines(out), "workers": lines(out + ".worker")})
