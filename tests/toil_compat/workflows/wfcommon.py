"""Shared by the workflow scripts of the Toil compatibility harness."""

import json
import os
import sys


def swapped() -> bool:
    """Whether this process runs Toil with toilcoord's names swapped in."""
    import toil.lib.threading

    return bool(getattr(toil.lib.threading, "__toilcoord_swapped__", False))


def options(jobstore: str, **settings):
    from toil.job import Job

    opts = Job.Runner.getDefaultOptions(jobstore)
    opts.batchSystem = "single_machine"
    opts.logLevel = "INFO"
    opts.colored_logs = False
    opts.clean = "always"
    opts.retryCount = 0
    opts.maxCores = 2
    for name, value in settings.items():
        setattr(opts, name, value)
    return opts


def append_line(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def lines(path: str):
    try:
        with open(path) as stream:
            return stream.read().splitlines()
    except FileNotFoundError:
        return []


def finish(result: dict) -> None:
    """Write the result (argv[2]) as JSON."""
    result["leader_swapped"] = swapped()
    with open(sys.argv[2], "w") as stream:
        json.dump(result, stream, indent=1, sort_keys=True)
