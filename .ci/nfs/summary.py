"""The NFS rig's verdict: summary.py LOGS_DIR HEADLINE.

Reads LOGS_DIR/results-*.jsonl (one JSON object a line: "check" and "race"
lines from the guests, "vm" lines from the host) and prints one line per
check, race and VM, the race totals per NFS version and variant, and last
`nfs race: O overlaps, L lost updates, E errors in A acquisitions`.
Exit status 0 only if every check and race passed and every VM ran all its
steps.
"""

from __future__ import annotations

import glob
import json
import os
import sys


def load(logs: str) -> list:
    entries = []
    # the one VM, then the two-VM run, then the host's VM lines
    order = {"onevm": 0, "node1": 1, "node2": 2}
    for path in sorted(
        glob.glob(os.path.join(logs, "results-*.jsonl")), key=lambda p: order.get(os.path.basename(p)[8:-6], 3)
    ):
        with open(path, errors="replace") as f:
            for line in f:
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    entries.append(
                        dict(
                            kind="check",
                            label=f"a line of {os.path.basename(path)}",
                            status=1,
                            seconds=0,
                            note=f"not JSON: {line.strip()[:100]}",
                            detail=[],
                        )
                    )
    return entries


def race_line(r: dict) -> list:
    errors = sum(r["errors"].values())
    kinds = ", ".join(f"{name} x{n}" for name, n in sorted(r["errors"].items(), key=lambda kv: -kv[1]))
    lost = "unreadable counter:" if r["lost"] is None else r["lost"]
    total = sum(r["contended"].values()) or 1
    stale = r.get("stale_reads")
    shares = ", ".join(f"{g} {100 * n // total}%" for g, n in sorted(r["contended"].items()))
    lines = [
        f"{'ok  ' if r['ok'] else 'FAIL'}  {r['label']} ({r['elapsed_s']:.0f} s): {r['overlaps']} overlaps, "
        f"{lost} lost updates, {errors} errors{f' ({kinds})' if kinds else ''} in {r['acquired']} acquisitions"
        f"{f'; {stale} stale cached reads of the counter (not counted against the mutex)' if stale else ''}",
        f"        per worker {', '.join(r['per_worker'])}; contended share {shares}"
        f"{' STARVED: ' + ', '.join(r['starved']) if r['starved'] else ''}; longest wait {r['longest_wait_s']} s",
    ]
    if r["first_error"]:
        lines.append(f"        first error: {r['first_error'][:300]}")
    if r["example"]:
        lines.append(f"        an overlap: {r['example'][:300]}")
    if r.get("tolerated"):
        lines.append(f"        up to {r['tolerated']} overlaps and lost updates tolerated: {r.get('why', '')[:300]}")
    return lines


def main(logs: str, headline: str) -> int:
    entries = load(logs)
    ok = bool(entries)
    totals: dict = {}
    print(f"== NFS rig summary ({headline})")
    for e in entries:
        if e["kind"] == "check":
            ok &= e["status"] == 0
            print(f"{'ok  ' if e['status'] == 0 else 'FAIL'}  {e['label']} ({e['seconds']} s): {e['note']}")
            shown = e["detail"] if e["status"] else [d for d in e["detail"] if d.startswith("filesystem:")]
            for d in shown[:12]:
                print(f"        {d[:600]}")
            if e["status"] and len(e["detail"]) > 12:
                print(f"        ... {len(e['detail']) - 12} more")
        elif e["kind"] == "race":
            ok &= e["ok"]
            print("\n".join(race_line(e)))
            if e.get("plain_flock"):
                continue  # the platform's control: not a race of the mutex
            for key in (f"NFSv{e['version']}, {e['variant']}", f"NFSv{e['version']}", "all"):
                t = totals.setdefault(key, dict(o=0, l=0, e=0, a=0, unknown=False))
                t["o"] += e["overlaps"]
                t["e"] += sum(e["errors"].values())
                t["a"] += e["acquired"]
                t["l"] += e["lost"] or 0
                t["unknown"] |= e["lost"] is None
        elif e["kind"] == "vm":
            done = e["guest_rc"] == 0
            ok &= done
            boot = f", its guest started after {e['ready_s']} s" if e["ready_s"] is not None else ""
            why = (
                "ran every step"
                if done
                else (
                    f"guest exit status {e['guest_rc']} (see its .log)"
                    if e["guest_rc"] is not None
                    else f"no guest exit status: {'killed at its deadline' if e['qemu_rc'] == 124 else 'crashed or killed'}"
                    f" (qemu/timeout exit {e['qemu_rc']}; see its .console and .qemu)"
                )
            )
            print(f"{'ok  ' if done else 'FAIL'}  VM {e['name']}: {e['seconds']} s{boot}; {why}")
    if totals:
        print("race totals:")
        lines = {
            key: f"{t['o']} overlaps, {t['l']}{' (and an unreadable counter)' if t['unknown'] else ''} "
            f"lost updates, {t['e']} errors in {t['a']} acquisitions"
            for key, t in totals.items()
        }
        for key in sorted(k for k in lines if k != "all"):
            print(f"  {key}: {lines[key]}")
        print(f"nfs race: {lines['all']}")
    print(f"NFS rig: {'every check passed' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""))
