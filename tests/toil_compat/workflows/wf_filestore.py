"""Jobs on Toil's caching file store (process names) that use the mutex and
the arena in the file store's coordination directory."""

import os
import sys
import time

from toil.common import Toil
from toil.job import Job
from toil.lib.threading import LastProcessStandingArena, global_mutex
from wfcommon import append_line, finish, lines, options, swapped

JOBS = 12


def coordinate(job, number, shared, file_id):
    store = job.fileStore
    with open(store.readGlobalFile(file_id)) as stream:
        content = stream.read()
    base = store.coordination_dir
    counter = os.path.join(shared, "counter")
    with global_mutex(base, "toilcoord-compat-counter"):
        try:
            with open(counter) as stream:
                value = int(stream.read())
        except FileNotFoundError:
            value = 0
        time.sleep(0.01)  # a lost update shows any overlap
        with open(counter, "w") as stream:
            stream.write(str(value + 1))
    arena = LastProcessStandingArena(base, "toilcoord-compat")
    arena.enter()
    try:
        marker = os.path.join(shared, "member-%d" % number)
        open(marker, "w").close()
        time.sleep(0.05)
    finally:
        for _ in arena.leave():
            append_line(os.path.join(shared, "last"), str(number))
            for name in os.listdir(shared):
                if name.startswith("member-"):
                    os.remove(os.path.join(shared, name))
    local = os.path.join(store.getLocalTempDir(), "out")
    with open(local, "w") as stream:
        stream.write("%s from %d" % (content, number))
    written = store.writeGlobalFile(local)
    return {"store": type(store).__name__, "swapped": swapped(), "written": written}


def gather(job, results):
    contents = []
    for result in results:
        with open(job.fileStore.readGlobalFile(result["written"])) as stream:
            contents.append(stream.read())
    return {
        "stores": sorted({r["store"] for r in results}),
        "swapped": sorted({r["swapped"] for r in results}),
        "contents": sorted(contents),
    }


def spawn(job, shared, file_id):
    results = [
        job.addChildJobFn(coordinate, number, shared, file_id, cores=0.1, memory="100M", disk="10M").rv()
        for number in range(JOBS)
    ]
    return job.addFollowOnJobFn(gather, results, cores=0.1, memory="100M", disk="10M").rv()


if __name__ == "__main__":
    shared = os.path.join(os.path.dirname(sys.argv[2]), "shared")
    os.mkdir(shared)
    with Toil(options(sys.argv[1], caching=True)) as toil:
        source = os.path.join(shared, "input")
        with open(source, "w") as stream:
            stream.write("input")
        file_id = toil.importFile("file://" + source)
        result = toil.start(Job.wrapJobFn(spawn, shared, file_id, cores=0.1, memory="100M", disk="10M"))
    with open(os.path.join(shared, "counter")) as stream:
        result["counter"] = int(stream.read())
    result["last_out"] = len(lines(os.path.join(shared, "last")))
    result["members_left"] = sorted(name for name in os.listdir(shared) if name.startswith("member-"))
    finish(result)
