"""``disttrain trace RUN_DIR``: the last hang dump of a run, as the report the launcher printed.

Each rank's flight recorder copies its dump into ``RUN_DIR/traces/rank<R>.dump.json`` when the
launcher's hang watch asks for it (``launch.hang_timeout``); this reads them back.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

from launcher import format_hang_report, read_hang_dumps


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="disttrain trace", description="Print the last hang dump of a run.")
    p.add_argument("run_dir", help="the run directory (run.dir)")
    p.add_argument("--stacks", action="store_true", help="also print every thread's Python stack of every rank")
    ns = p.parse_args(argv)
    directory = os.path.join(ns.run_dir, "traces")
    dumps = read_hang_dumps(directory)
    if not dumps:
        print(f"disttrain trace: no dumps in {directory} (written when launch.hang_timeout fires)", file=sys.stderr)
        return 1
    when = datetime.datetime.fromtimestamp(max(d.get("time", 0) for d in dumps)).isoformat(timespec="seconds")
    print(format_hang_report(dumps, f"dump of {when}"))
    if ns.stacks:
        for d in dumps:
            for t in d.get("stacks", []):
                print(f"\n--- rank {d['rank']}@{d.get('host', '?')} thread {t['thread']}")
                for f in t["frames"]:
                    print(f"  {f['file']}:{f['line']} in {f['function']}")
    return 0
