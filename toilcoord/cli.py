"""``python -m toilcoord``: smoke check, filesystem probe, benchmark, cleanup."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Optional, Sequence

from . import __version__
from .files import robust_rmtree
from .mounts import filesystem_info

__all__ = ["main"]


class UsageError(ValueError):
    """Bad command line: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m toilcoord", description=(
        "Check that toilcoord's primitives work on this node (and in --dir), "
        "benchmark them, or clean up after dead processes."))
    parser.add_argument("--version", action="version", version=f"toilcoord {__version__}")
    parser.add_argument("--dir", help="run in this directory (say, the scratch filesystem a pipeline will use)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON document")
    commands = parser.add_subparsers(dest="command")
    bench = commands.add_parser("bench", help="benchmark each primitive beside its physical floor")
    bench.add_argument("--dir", dest="sub_dir", help="benchmark in this directory")
    bench.add_argument("--procs", type=int, default=4, help="processes for the contended rows (default 4)")
    bench.add_argument("--quick", action="store_true", help="fewer repetitions: a fast sanity run")
    bench.add_argument("--json", dest="sub_json", action="store_true", help="print the table as JSON")
    bench.add_argument("--only", help="comma-separated benchmarks to run (say: mutex,contended mutex,arena)")
    cleanup = commands.add_parser("cleanup", help="run dead processes' deferred functions and remove their leftovers")
    cleanup.add_argument("--dir", dest="sub_dir", required=True, help="the coordination directory to clean")
    cleanup.add_argument("--user", help="refuse unless this user owns the directory (as root, the cleanup "
                         "always runs as the directory's owner)")
    torture = commands.add_parser("torture", help="every primitive at once under random SIGKILLs, then check every guarantee")
    torture.add_argument("--seconds", type=float, default=60.0, help="how long to torture (default 60)")
    torture.add_argument("--procs", type=int, default=4, help="worker processes, at least 2 (default 4)")
    torture.add_argument("--dir", dest="sub_dir", help="torture in this directory (default: a temporary one)")
    torture.add_argument("--seed", help="seed of every random choice (default: a random one, printed)")
    torture.add_argument("--split-dir", help="--dir seen through another mount (another NFS client of the same "
                         "export): half of the workers use it")
    status = commands.add_parser("status", help="show who holds what in a coordination directory (read-only)")
    status.add_argument("--dir", dest="status_dir", required=True, help="the coordination directory to show")
    status.add_argument("--json", dest="sub_json", action="store_true", help="print one JSON document")
    for sub in (bench, cleanup, torture, status):
        sub.error = parser.error  # type: ignore[method-assign]
    return parser


def _usable_directory(path: str) -> str:
    if not os.path.isdir(path):
        raise UsageError(f"--dir {path}: no such directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--dir {path}: not writable by this user")
    return os.path.abspath(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = _parser().parse_args(argv)
        directory = getattr(args, "sub_dir", None) or args.dir
        if directory is not None:
            directory = _usable_directory(directory)
        as_json = args.json or getattr(args, "sub_json", False)
        if args.command == "status":
            return _status(args.status_dir, as_json)
        if args.command == "bench":
            if args.procs < 1:
                raise UsageError(f"--procs must be at least 1, not {args.procs}")
            from .bench import STEPS, run_bench
            only = None if args.only is None else [label.strip() for label in args.only.split(",")]
            unknown = sorted(set(only or ()) - set(STEPS))
            if unknown:
                raise UsageError(f"--only takes benchmarks of: {', '.join(STEPS)}; not {', '.join(unknown)}")
            return run_bench(directory, args.procs, args.quick, as_json, only)
        if args.command == "cleanup":
            return _cleanup(directory, args.user)
        if args.command == "torture":
            if args.procs < 2 or not args.seconds > 0:
                raise UsageError(f"torture needs --procs of at least 2 and --seconds above 0, not {args.procs} and {args.seconds}")
            from .torture import main as torture
            if args.split_dir is not None and directory is None:
                raise UsageError("torture --split-dir needs --dir: the same directory through another mount")
            return torture(directory, args.seconds, args.procs, args.seed, args.split_dir)
        return _smoke(directory, as_json)
    except UsageError as error:
        print(f"python -m toilcoord: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _remove_scratch(workdir: str) -> None:
    try:
        robust_rmtree(workdir)
    except OSError as error:  # say what is left; the report still counts
        print(f"could not remove {workdir}: {error}", file=sys.stderr)


def _smoke(directory: Optional[str], as_json: bool) -> int:
    from .smoke import run_checks

    report: dict = {"version": __version__, "python": sys.version.split()[0]}
    if directory is not None:
        report["filesystem"] = filesystem_info(directory)._asdict()
    workdir = tempfile.mkdtemp(prefix="toilcoord-smoke-", dir=directory)
    try:
        if not as_json:
            _print_filesystem(report.get("filesystem"))
        results = run_checks(workdir, on_result=None if as_json else _print_result)
    finally:
        _remove_scratch(workdir)
    failed = [result for result in results if result.status == "FAIL"]
    report["checks"] = [result._asdict() for result in results]
    report["passed"] = not failed
    if as_json:
        import json
        print(json.dumps(report, indent=2))
    else:
        counts = {status: sum(r.status == status for r in results) for status in ("ok", "FAIL", "skip")}
        print(f"{counts['ok']} passed, {counts['FAIL']} failed, {counts['skip']} skipped")
    return 1 if failed else 0


def _print_filesystem(info: Optional[dict]) -> None:
    if info is None:
        return
    print(f"filesystem: {info['fstype']} mounted at {info['mount_point']}; lock scope: {info['lock_scope']}")
    print(f"  {info['reason']}")


_NAME_WIDTH = 42


def _print_result(result: object) -> None:
    print(f"{result.status:<4}  {result.name:<{_NAME_WIDTH}} {result.seconds:6.2f} s  {result.detail}", flush=True)


def _cleanup(directory: str, user: Optional[str]) -> int:
    from .cleanup import cleanup_directory, run_as_owner

    def work() -> int:
        for line in cleanup_directory(directory):
            print(line, flush=True)
        return 0

    try:
        return run_as_owner(directory, work, user)
    except OSError as error:  # refused (not the owner, a symlink) or unusable
        print(f"cleanup refused: {error}", file=sys.stderr)
        return 1


def _status(directory: str, as_json: bool) -> int:
    from .status import directory_status, format_status

    try:
        report = directory_status(directory)
    except OSError as error:  # missing, not a directory, a symlink, unreadable
        print(f"status: cannot read {directory!r}: {error.strerror or error}", file=sys.stderr)
        return 1
    if as_json:
        import json
        print(json.dumps(report, indent=2))
    else:
        print(format_status(report))
    return 0
