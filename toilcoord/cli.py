"""``python -m toilcoord``: smoke check, filesystem probe, benchmark, cleanup."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, Optional, Sequence

from . import __version__
from .mounts import filesystem_info

__all__ = ["main"]


class UsageError(ValueError):
    """Bad command line: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        raise UsageError(message)


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description=(
            "Check that toilcoord's primitives work on this node (and in --dir), "
            "benchmark them, check a coordination directory, or clean up after dead processes."
        ),
    )
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
    cleanup.add_argument(
        "--dir",
        dest="sub_dir",
        action="append",
        required=True,
        help="a coordination directory to clean (may be given several times)",
    )
    cleanup.add_argument(
        "--user",
        help="refuse unless this user owns the directory (as root, the cleanup always runs as the directory's owner)",
    )
    cleanup.add_argument(
        "--timeout",
        type=float,
        default=CLEANUP_TIMEOUT,
        help=f"give up (exit 1) after this many seconds (default {CLEANUP_TIMEOUT:g}, below Slurm's 60 s epilog limit)",
    )
    cleanup.add_argument("--json", dest="sub_json", action="store_true", help="print one JSON document")
    check = commands.add_parser("check", help="health check of a coordination directory (for NHC): one line")
    check.add_argument("--dir", dest="sub_dir", required=True, help="the coordination directory to check")
    torture = commands.add_parser(
        "torture", help="every primitive at once under random SIGKILLs, then check every guarantee"
    )
    torture.add_argument("--seconds", type=float, default=60.0, help="how long to torture (default 60)")
    torture.add_argument("--procs", type=int, default=4, help="worker processes, at least 2 (default 4)")
    torture.add_argument("--dir", dest="sub_dir", help="torture in this directory (default: a temporary one)")
    torture.add_argument("--seed", help="seed of every random choice (default: a random one, printed)")
    torture.add_argument(
        "--split-dir",
        help="--dir seen through another mount (another NFS client of the same export): half of the workers use it",
    )
    torture.add_argument(
        "--lifetime",
        type=float,
        default=0.2,
        help="mean life in seconds of a worker that may be killed (default 0.2; longer where each operation "
        "takes milliseconds, as on NFS between machines, or workers die starting)",
    )
    status = commands.add_parser("status", help="show who holds what in a coordination directory (read-only)")
    status.add_argument("--dir", dest="status_dir", required=True, help="the coordination directory to show")
    status.add_argument("--json", dest="sub_json", action="store_true", help="print one JSON document")
    for sub in (bench, cleanup, check, torture, status):
        sub.error = parser.error  # type: ignore[method-assign]
    return parser


#: Seconds before cleanup gives up: below the 60 s Slurm allows an epilog.
CLEANUP_TIMEOUT = 50.0
#: Seconds the health check may take in all (NHC wants an answer within 5).
CHECK_TIMEOUT = 4.0


def _usable_directory(path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    if not os.path.isdir(path):
        raise UsageError(f"--dir {path}: no such directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--dir {path}: not writable by this user")
    return os.path.abspath(path)


def _default_prog() -> str:
    return f"python -m {__name__.rpartition('.')[0]}"


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Run the command line; returns the exit status. *prog* names the
    command in help and error lines (``python -m`` and the package's module
    path, wherever it was vendored, by default)."""
    prog = prog or _default_prog()
    try:
        args = _parser(prog).parse_args(argv)
        return _COMMANDS[args.command](args)
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _as_json(args: argparse.Namespace) -> bool:
    return args.json or getattr(args, "sub_json", False)


def _tool(name: str) -> Any:
    """The tooling module *name* (``_tools/``), which a vendored copy may
    leave out: then one line says so."""
    import importlib

    try:
        return importlib.import_module(f"{__name__.rpartition('.')[0]}._tools.{name}")
    except ModuleNotFoundError as error:
        if not (error.name or "").endswith(("._tools", f"._tools.{name}")):
            raise
        raise UsageError(
            f"{name} is not in this copy of {__name__.rpartition('.')[0]} "
            "(its _tools/ folder was left out when it was vendored)"
        ) from None


def _bench(args: argparse.Namespace) -> int:
    if args.procs < 1:
        raise UsageError(f"--procs must be at least 1, not {args.procs}")
    bench = _tool("bench")
    STEPS, run_bench = bench.STEPS, bench.run_bench
    only = None if args.only is None else [label.strip() for label in args.only.split(",")]
    unknown = sorted(set(only or ()) - set(STEPS))
    if unknown:
        raise UsageError(f"--only takes benchmarks of: {', '.join(STEPS)}; not {', '.join(unknown)}")
    return run_bench(_usable_directory(args.sub_dir or args.dir), args.procs, args.quick, _as_json(args), only)


def _torture(args: argparse.Namespace) -> int:
    if args.procs < 2 or not args.seconds > 0 or not args.lifetime > 0:
        raise UsageError(
            "torture needs --procs of at least 2 and --seconds and --lifetime above 0, "
            f"not {args.procs}, {args.seconds} and {args.lifetime}"
        )
    directory = _usable_directory(args.sub_dir or args.dir)
    if args.split_dir is not None and directory is None:
        raise UsageError("torture --split-dir needs --dir: the same directory through another mount")
    torture = _tool("torture").main
    return torture(directory, args.seconds, args.procs, args.seed, args.split_dir, args.lifetime)


def _smoke_command(args: argparse.Namespace) -> int:
    return _smoke(_usable_directory(args.dir), _as_json(args))


def _cleanup(args: argparse.Namespace) -> int:
    from .cleanup import NotACoordinationDirectoryError, clean_directories

    if not args.timeout > 0:
        raise UsageError(f"--timeout must be above 0, not {args.timeout:g}")
    try:
        reports = clean_directories(args.sub_dir, args.timeout, args.user)
    except NotACoordinationDirectoryError as error:
        raise UsageError(str(error)) from None
    if _as_json(args):
        _print_cleanup_json(reports)
    else:
        _print_cleanup(reports)
    return max(report.status for report in reports)


def _print_cleanup(reports: list) -> None:
    from .cleanup import summary_lines

    several = len(reports) > 1
    for report in reports:
        prefix = f"{report.directory}: " if several else ""
        lines = summary_lines(report.findings) if report.findings or report.status == 0 and not report.note else []
        for line in lines:
            print(prefix + line, file=sys.stderr if line.startswith("could not") else sys.stdout)
        if report.note:
            print(prefix + report.note, file=sys.stdout if report.status == 0 else sys.stderr)
    sys.stdout.flush()


def _print_cleanup_json(reports: list) -> None:
    import json
    import socket
    import time

    directories = [
        {
            "directory": report.directory,
            "status": report.status,
            "note": report.note,
            "removed": [
                {"kind": f.kind, "name": f.name, "why": f.detail} for f in report.findings if f.action == "removed"
            ],
            "left": [
                {"kind": f.kind, "name": f.name, "reason": f.reason, "why": f.detail}
                for f in report.findings
                if f.action == "left"
            ],
            "failed": [
                {"kind": f.kind, "name": f.name, "why": f.detail} for f in report.findings if f.action == "failed"
            ],
        }
        for report in reports
    ]
    print(
        json.dumps(
            {
                "host": socket.gethostname(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "status": max(report.status for report in reports),
                "directories": directories,
            },
            indent=2,
        )
    )


def _check(args: argparse.Namespace) -> int:
    from .cleanup import check_directory
    from .watchdog import run_watched

    directory = args.sub_dir
    if not directory:
        raise UsageError("--dir is empty (an unset variable?)")

    def job(send: Callable[[dict], None]) -> int:
        send({"line": check_directory(directory)})
        return 0

    watched = run_watched([job], CHECK_TIMEOUT)[0]
    said = [event.get("line") or event.get("note", "") for event in watched.events]
    if watched.status == 0 and said:
        print(said[-1])
        return 0
    why = said[-1].replace("failed: ", "", 1) if said else f"no answer within {CHECK_TIMEOUT:g} s (a hung filesystem?)"
    print(f"ERROR: toilcoord check {directory}: {why}")
    return 1


def _smoke(directory: Optional[str], as_json: bool) -> int:
    from .smoke import smoke_check

    report: dict = {"version": __version__, "python": sys.version.split()[0]}
    if directory is not None:
        report["filesystem"] = filesystem_info(directory)._asdict()
    if not as_json:
        _print_filesystem(report.get("filesystem"))
    results = smoke_check(directory, on_result=None if as_json else _print_result)
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


def _status(args: argparse.Namespace) -> int:
    from .status import directory_status, format_status

    directory = args.status_dir
    try:
        report = directory_status(directory)
    except OSError as error:  # missing, not a directory, a symlink, unreadable
        print(f"status: cannot read {directory!r}: {error.strerror or error}", file=sys.stderr)
        return 1
    if args.json or args.sub_json:
        import json

        print(json.dumps(report, indent=2))
    else:
        print(format_status(report))
    return 0


_COMMANDS: Dict[Optional[str], Callable[[argparse.Namespace], int]] = {
    None: _smoke_command,
    "bench": _bench,
    "check": _check,
    "cleanup": _cleanup,
    "status": _status,
    "torture": _torture,
}
