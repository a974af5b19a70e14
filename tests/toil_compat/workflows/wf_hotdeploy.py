"""A user module next to the workflow script, imported by workers from the
copy shipped through Toil's job store (saveAsResourceTo, register, and the
workers' download). The root job is a plain Job; argv[3] "user" makes it a
job of the user module instead."""

import os
import sys
import tempfile

import hotmod
from toil.common import Toil
from toil.job import Job
from toil.resource import ModuleDescriptor
from wfcommon import finish, lines, options

if __name__ == "__main__":
    out = sys.argv[2] + ".lines"
    os.environ["JTRES_ROOT"] = tempfile.mkdtemp(prefix="jtres-", dir=os.path.dirname(sys.argv[2]))
    with Toil(options(sys.argv[1])) as toil:
        # What a batch system that supports auto-deployment has Toil do.
        resource = ModuleDescriptor.forModule("hotmod").saveAsResourceTo(toil._jobStore)
        resource.register()
        if sys.argv[3] == "plain":
            root = Job()
        else:
            root = hotmod.HotJob(out)
        root.addChild(hotmod.HotJob(out))
        root.addChildJobFn(hotmod.hot_function, out, cores=0.1, memory="100M", disk="10M")
        toil.start(root)
    finish(
        {
            "resource": type(resource).__name__,
            "jobs": sorted(lines(out)),
            "root_belongs_to_toil": Job().getUserScript().belongsToToil,
        }
    )
