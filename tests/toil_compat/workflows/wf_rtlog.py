"""20 jobs each log through RealtimeLogger; every message must reach the
leader (a handler on the root logger, as in Toil's realtimeLoggerTest)."""

import logging
import sys

from toil.common import Toil
from toil.job import Job
from toil.realtimeLogger import RealtimeLogger
from wfcommon import finish, options, swapped

JOBS = 20


def log_one(job, number):
    RealtimeLogger.info("real-time message %d of %d", number, JOBS)
    RealtimeLogger.debug("debug message %d: below the leader's level, never sent", number)
    return swapped()


def spawn(job):
    return [job.addChildJobFn(log_one, number, cores=0.1, memory="100M", disk="10M").rv() for number in range(JOBS)]


class Catch(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if "message" in message and ("real-time" in message or "debug" in message):
            self.messages.append(message)


if __name__ == "__main__":
    catch = Catch()
    logging.getLogger().addHandler(catch)
    with Toil(options(sys.argv[1], realTimeLogging=True)) as toil:
        workers = toil.start(Job.wrapJobFn(spawn, cores=0.1, memory="100M", disk="10M"))
    finish(
        {
            "messages": sorted(set(catch.messages)),
            "received": len(catch.messages),
            "workers_swapped": sorted(set(workers)),
        }
    )
