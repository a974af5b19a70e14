"""Race toilcoord's global_mutex through several NFS mounts (or nodes) and
count what must never happen.

  race.py run --label L --dirs D1[,D2] --groups G1[,G2] --procs N --rounds R
              --oracle DIR [--seconds CAP] [--timeout T] [--hold-ms MS]
              (--results FILE [--version V --variant W] | --part FILE)
  race.py combine --label L --counter-dir DIR --results FILE
              [--version V --variant W] PART...

Worker i uses directory and group i modulo their count (group: the mount, or
the node), and does R rounds of `with global_mutex(dir, "race")`. Inside:

- it creates ORACLE/potato with O_CREAT|O_EXCL on storage every worker sees
  coherently (the guest's tmpfs in one VM, the host's directory over 9p
  across VMs) and removes it on the way out: EEXIST is an overlap, two
  holders at once;
- it adds one to DIR/counter on NFS by read-modify-write, with O_DIRECT
  (straight to the server): the rounds that did not show up in the counter
  are lost updates. It also reads the counter through the client's cache
  first: a value older than the server's is a stale read, reported only (NFS
  close-to-open caching can miss another client's write made in the same
  clock tick; a mutex cannot help that for files it does not lock).

With --plain-flock the workers take no global_mutex but a bare `flock` on
DIR/plain-flock (kept open, LOCK_EX, LOCK_UN): the platform alone, as the
control for an overlap (see docs/guarantees.md, "On real NFS"). With
--tolerate N the verdict allows N overlaps and N lost updates, which the
platform's own flock accounts for (--why says why, beside the verdict).

Every exception out of the `with` is an error, counted by errno name.
Starvation: the first worker to finish its rounds creates ORACLE/stop; each
worker's acquisitions up to then are its contended ones, and every group must
have at least a quarter of those (a starved group would have almost none).

`run --results` writes the verdict as one JSON line; `run --part` writes
this node's workers for `combine`, which reads the counter once every node is
done. The last line printed is `nfs race: O overlaps, L lost updates, E errors
in A acquisitions`. Exit status 0 whenever a verdict was written.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import random
import sys
import time
import traceback

MUTEX = "race"
FAIR_SHARE = 0.25  # the least share of contended acquisitions any group must get


def errname(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    return errno.errorcode.get(code, type(exc).__name__) if code else type(exc).__name__


def read_counter(directory: str) -> int | None:
    """The counter's value at the server (0 when absent), None when it is not a number."""
    try:
        fd = open_counter(directory, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        text = os.read(fd, 64).strip()
    finally:
        os.close(fd)
    return int(text) if text.isdigit() else None


def open_counter(directory: str, flags: int) -> int:
    """O_DIRECT: read from and write to the server itself, past the client's cache."""
    path = os.path.join(directory, "counter")
    try:
        return os.open(path, flags | os.O_DIRECT, 0o600)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: no direct I/O here (not NFS): cached will do
            raise
        return os.open(path, flags, 0o600)


def bump_counter(directory: str, tally: dict) -> None:
    # First what the client's cache says: after another mount's write in the
    # same clock tick (coarse timestamps), close-to-open revalidation can miss
    # it. Counted as stale reads, not as a failure of the mutex.
    try:
        with open(os.path.join(directory, "counter"), "rb") as f:
            cached = f.read().strip()
    except FileNotFoundError:
        cached = b"0"
    fd = open_counter(directory, os.O_RDWR | os.O_CREAT)
    try:
        value = int(os.read(fd, 64).strip() or b"0")  # ValueError on garbage: an error, counted
        os.pwrite(fd, b"%020d\n" % (value + 1), 0)  # fixed width: no truncation needed
    finally:
        os.close(fd)
    if cached.isdigit() and int(cached) < value:
        tally["stale_reads"] += 1


def hold(directory: str, oracle: str, me: str, tally: dict, seconds: float) -> None:
    """The critical section: potato, counter, a short random hold."""
    potato = os.path.join(oracle, "potato")
    try:
        fd = os.open(potato, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        fd = None
        tally["overlaps"] += 1
        if tally["example"] is None:
            try:
                with open(potato) as f:
                    other = f.read() or "a holder that had not written its name yet"
            except OSError:
                other = "a holder that just left"
            # When: a worker that finished retires the lock file at its exit,
            # so say whether one had finished (the likeliest moment to suspect).
            finished = os.path.exists(os.path.join(oracle, "stop"))
            tally["example"] = (
                f"{me} got the mutex while {other} held it, in its round {tally['acquired']}, "
                f"{'after' if finished else 'before'} the first worker finished"
            )
    try:
        if fd is not None:
            os.write(fd, me.encode())
            os.close(fd)
        bump_counter(directory, tally)
        tally["bumps"] += 1
        time.sleep(seconds)
    finally:
        if fd is not None:
            os.unlink(potato)


class PlainFlock:
    """The platform's flock alone, in place of global_mutex: a file kept
    open per worker, locked exclusively for each round."""

    def __init__(self) -> None:
        self.fd = -1

    @contextlib.contextmanager
    def __call__(self, directory: str, name: str, timeout: float):
        if self.fd < 0:
            self.fd = os.open(os.path.join(directory, "plain-flock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)


def worker(index: int, args: argparse.Namespace) -> dict:
    if args.plain_flock:
        global_mutex = PlainFlock()
    else:
        from toilcoord import global_mutex  # from PYTHONPATH: the tree under test

    directory = args.dirs[index % len(args.dirs)]
    group = args.groups[index % len(args.groups)]
    stop = os.path.join(args.oracle, "stop")
    me = f"pid {os.getpid()} ({group})"
    tally = dict(
        group=group,
        acquired=0,
        contended=None,
        bumps=0,
        overlaps=0,
        stale_reads=0,
        errors={},
        first_error=None,
        example=None,
        longest_wait_s=0.0,
    )
    rng = random.Random(os.getpid())
    deadline = time.monotonic() + args.seconds
    for _ in range(args.rounds):
        if time.monotonic() > deadline:
            tally["errors"]["out of time"] = tally["errors"].get("out of time", 0) + 1
            break
        if tally["contended"] is None and os.path.exists(stop):
            tally["contended"] = tally["acquired"]
        began = time.monotonic()
        try:
            with global_mutex(directory, MUTEX, timeout=args.timeout):
                tally["longest_wait_s"] = max(tally["longest_wait_s"], time.monotonic() - began)
                tally["acquired"] += 1
                hold(directory, args.oracle, me, tally, rng.uniform(0, args.hold_ms) / 1000)
        except Exception as exc:  # counted and reported: that is what the race is for
            name = errname(exc)
            tally["errors"][name] = tally["errors"].get(name, 0) + 1
            if tally["first_error"] is None:
                frames = traceback.extract_tb(exc.__traceback__)[-3:]
                where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(frames))
                tally["first_error"] = f"{type(exc).__name__}: {exc} (at {where})"
    if tally["contended"] is None:  # the first to finish: the contended window ends for all
        tally["contended"] = tally["acquired"]
        open(stop, "a").close()
    return tally


def run_workers(args: argparse.Namespace) -> list:
    """Fork the workers, each reporting its tally through a pipe; reap them all."""
    children = []
    for index in range(args.procs):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                os.close(read_end)
                tally = worker(index, args)
                with os.fdopen(write_end, "w") as pipe:
                    pipe.write(json.dumps(tally))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(write_end)
        children.append((pid, read_end))
    tallies = []
    for index, (pid, read_end) in enumerate(children):
        with os.fdopen(read_end) as pipe:
            text = pipe.read()
        _, status = os.waitpid(pid, 0)
        tallies.append(
            json.loads(text)
            if text
            else dict(group=args.groups[index % len(args.groups)], died=f"worker {pid} died (wait status {status})")
        )
    return tallies


def verdict(args: argparse.Namespace, tallies: list, counted: int | None, elapsed: float) -> dict:
    live = [t for t in tallies if "died" not in t]
    errors: dict = {}
    for t in tallies:
        for name, n in t.get("errors", {"worker died": 1}).items():
            errors[name] = errors.get(name, 0) + n
    acquired = sum(t["acquired"] for t in live)
    lost = None if counted is None else sum(t["bumps"] for t in live) - counted
    shares: dict = {}
    for t in live:
        shares[t["group"]] = shares.get(t["group"], 0) + t["contended"]
    for t in tallies:  # a group whose every worker died has a share of 0
        shares.setdefault(t["group"], 0)
    contended = sum(shares.values())
    starved = sorted(g for g, n in shares.items() if len(shares) > 1 and n < FAIR_SHARE * contended)
    overlaps = sum(t["overlaps"] for t in live)
    tolerated = args.tolerate  # the platform's own rate (see --tolerate)
    ok = bool(acquired) and lost is not None and lost <= tolerated and overlaps <= tolerated
    ok = ok and not errors and not starved
    if args.plain_flock:  # the control: information, unless it could not run
        ok = bool(acquired) and not errors
    return dict(
        kind="race",
        label=args.label,
        version=args.version,
        variant=args.variant,
        ok=ok,
        acquired=acquired,
        overlaps=overlaps,
        tolerated=tolerated,
        why=args.why,
        plain_flock=args.plain_flock,
        lost=lost,
        errors=errors,
        stale_reads=sum(t["stale_reads"] for t in live),
        per_worker=[f"{t['group']}: {t.get('acquired', 0)}" for t in tallies],
        contended=shares,
        starved=starved,
        longest_wait_s=round(max([t["longest_wait_s"] for t in live] or [0]), 2),
        first_error=next(
            (t.get("first_error") or t.get("died") for t in tallies if t.get("first_error") or t.get("died")), None
        ),
        example=next((t["example"] for t in live if t["example"]), None),
        elapsed_s=round(elapsed, 1),
    )


def report(result: dict, results_file: str) -> None:
    with open(results_file, "a") as f:
        f.write(json.dumps(result) + "\n")
    errors = sum(result["errors"].values())
    lost = "?" if result["lost"] is None else result["lost"]
    print(json.dumps(result))
    print(
        f"nfs race: {result['overlaps']} overlaps, {lost} lost updates, {errors} errors "
        f"in {result['acquired']} acquisitions",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "combine"))
    parser.add_argument("parts", nargs="*", help="combine: the nodes' part files")
    parser.add_argument("--label", required=True)
    parser.add_argument("--version", default="?")
    parser.add_argument("--variant", default="?")
    parser.add_argument("--dirs", type=lambda s: s.split(","))
    parser.add_argument("--groups", type=lambda s: s.split(","))
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=300, help="no round starts after this")
    parser.add_argument("--timeout", type=float, default=30, help="global_mutex's timeout")
    parser.add_argument("--hold-ms", type=float, default=1, help="longest random hold inside")
    parser.add_argument("--oracle")
    parser.add_argument("--results")
    parser.add_argument("--part")
    parser.add_argument("--counter-dir")
    parser.add_argument("--plain-flock", action="store_true", help="bare flock instead of global_mutex")
    parser.add_argument(
        "--tolerate", type=int, default=0, help="overlaps (and lost updates) the platform alone accounts for"
    )
    parser.add_argument("--why", default="", help="why --tolerate: said beside the verdict")
    args = parser.parse_intermixed_args()
    began = time.monotonic()
    if args.action == "run":
        if not (args.dirs and args.groups and args.oracle and (args.results or args.part)):
            parser.error("run needs --dirs, --groups, --oracle and --results or --part")
        os.makedirs(args.oracle, exist_ok=True)
        start = read_counter(args.dirs[0])
        tallies = run_workers(args)
        if args.part:  # one node of several: combine counts the lost updates
            with open(args.part, "w") as f:
                json.dump(dict(tallies=tallies, elapsed_s=time.monotonic() - began), f)
            print(f"{args.label}: this node's workers: {[t.get('acquired') for t in tallies]} acquisitions")
            return 0
        end = read_counter(args.dirs[0])
        counted = None if start is None or end is None else end - start
        report(verdict(args, tallies, counted, time.monotonic() - began), args.results)
        return 0
    if not (args.counter_dir and args.results and args.parts):
        parser.error("combine needs --counter-dir, --results and the part files")
    tallies, elapsed = [], 0.0
    for path in args.parts:
        try:
            with open(path) as f:
                part = json.load(f)
            tallies += part["tallies"]
            elapsed = max(elapsed, part["elapsed_s"])
        except (OSError, ValueError, KeyError) as exc:
            tallies.append(dict(group=os.path.basename(path), died=f"no result from {path}: {errname(exc)}"))
    report(verdict(args, tallies, read_counter(args.counter_dir), elapsed), args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
