"""The hang watch: a job whose collectives stop finishing for ``hang_timeout`` seconds is stopped
with one report naming the rank that is behind, its sequence number and the line where it stands.

The agent makes a private directory per attempt and gives it to its workers as
``DISTTRAIN_TRACE_DIR``; each worker's flight recorder (``collectives.flight_recorder``, which
this module never imports: they meet through files) writes ``rank<R>.beat`` whenever its count
of completed collectives changes, and answers ``dump.request`` with ``rank<R>.dump.json`` (its
last collectives and every thread's Python stack). :meth:`HangWatch.poll`, called from the
agent's monitor loop, reads the beats; after ``timeout`` seconds without any, it asks for dumps,
waits briefly for them and returns :func:`format_report`'s text. ``disttrain trace RUN_DIR``
prints the same report from the copies the workers keep in the run directory.
A rank's descendants that catch the stack signal (its DataLoader workers, even a forkserver's,
which are grandchildren) are signalled too, and the report shows where each stands in Python.

Which rank is behind: one that is not inside a collective while its peers wait in one, else the
one whose newest collective has the lowest sequence number in the group most ranks wait in.
"""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import signal
import time

_OURS = os.sep + "collectives" + os.sep  # frames of the communicator itself, skipped for "where"
_RUNTIME = (os.sep + "threading.py", os.sep + "flight_recorder.py")
_STDLIB = os.path.dirname(os.__file__) + os.sep  # Python's standard library
STACK_SIGNAL = signal.SIGRTMIN + 7  # collectives.flight_recorder.STACK_SIGNAL: faulthandler's dump
_FRAME = re.compile(r'^\s+File "(.*)", line (\d+) in (.*)$')


class HangWatch:
    """One agent's view of its local ranks. ``poll()`` each monitor tick; None while progressing."""

    def __init__(self, directory: str, ranks: list[int], timeout: float, host: str = "?", dump_wait: float = 3.0):
        self.dir, self.ranks, self.timeout, self.dump_wait = directory, list(ranks), timeout, dump_wait
        self.host = host
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.pids: dict[int, int] = {}  # rank -> worker pid, for the faulthandler fallback
        self._beats: dict[int, str] = {}
        self._last = time.monotonic()
        self._next = 0.0

    def poll(self) -> str | None:
        """This node alone: the report once :meth:`stalled`, else None."""
        why = self.stalled()
        return None if why is None else format_report(self.collect(), why)

    def stalled(self) -> str | None:
        """Why this node's ranks count as hung (no beat for ``timeout`` seconds), else None.
        Reads the beat files at most every 0.2 s; a rank beats first when its first collective
        begins, so a node whose ranks are all still setting up (imports, model build) is not hung,
        while one waiting in its first collective for ``timeout`` seconds is."""
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + 0.2
        for r in self.ranks:
            try:
                with open(os.path.join(self.dir, f"rank{r}.beat")) as f:
                    beat = f.read(32)
            except OSError:
                continue
            if self._beats.get(r) != beat:
                self._beats[r], self._last = beat, now
        if not self._beats or now - self._last < self.timeout:
            return None  # no collective begun yet (set-up) or still moving
        return f"no collective finished on {self.host} for {now - self._last:.1f}s"

    def collect(self) -> list[dict]:
        """Ask every local rank for a dump; return the ones that came within ``dump_wait`` seconds."""
        nonce = secrets.token_hex(8)
        tmp = os.path.join(self.dir, "dump.request.tmp")
        with open(tmp, "w") as f:
            f.write(nonce)
        os.replace(tmp, os.path.join(self.dir, "dump.request"))
        deadline = time.monotonic() + self.dump_wait
        signalled = False
        got: dict[int, dict] = {}
        # A rank's own dump cannot show its children's Python: those that catch the stack signal write it
        # (disttrain's DataLoader workers into rank<R>.child<pid>.stacks.txt; any other forked child, which
        # inherited the rank's faulthandler, appends to the rank's own stacks file).
        kids = {r: catching(descendants(self.pids[r]), STACK_SIGNAL) for r in self.ranks if r in self.pids}
        for pid in (p for pids in kids.values() for p in pids):
            try:
                os.kill(pid, STACK_SIGNAL)
            except OSError:
                pass
        while time.monotonic() < deadline and len(got) < len(self.ranks):
            if not signalled and time.monotonic() > deadline - self.dump_wait / 2:
                signalled = True  # a rank that has not answered yet: faulthandler writes its stacks from C
                for r in self.ranks:
                    if r not in got and r in self.pids:
                        try:
                            os.kill(self.pids[r], STACK_SIGNAL)
                        except OSError:
                            pass
            for r in self.ranks:
                if r not in got:
                    d = read_dump(os.path.join(self.dir, f"rank{r}.dump.json"))
                    if d is not None and d.get("nonce") == nonce:
                        got[r] = d
            time.sleep(0.05)
        missing = [self._from_faulthandler(r, signalled) for r in self.ranks if r not in got]
        dumps = [got[r] for r in sorted(got)] + missing
        for d in dumps:
            d["child_stacks"] = self._child_stacks(d["rank"], kids.get(d["rank"], []))
        return dumps

    def _child_stacks(self, rank: int, pids: list[int]) -> list[dict]:
        """The faulthandler stacks the signalled children of ``rank`` wrote into their own files."""
        out = []
        for pid in pids:
            try:
                with open(os.path.join(self.dir, f"rank{rank}.child{pid}.stacks.txt")) as f:
                    threads = parse_faulthandler(f.read(1 << 20))
            except OSError:
                continue
            if threads:
                out.append({"pid": pid, "stacks": threads})
        return out

    def _from_faulthandler(self, rank: int, signalled: bool) -> dict:
        """A rank that sent no dump: its faulthandler stacks, when it wrote them."""
        time.sleep(0.2 if signalled else 0)
        try:
            with open(os.path.join(self.dir, f"rank{rank}.stacks.txt")) as f:
                text = f.read(1 << 20)
        except OSError:
            text = ""
        threads = parse_faulthandler(text)
        return {
            "rank": rank,
            "host": self.host,
            "missing": not threads,
            "stacks": threads,
            "records": [],
            "no_records": True,
        }

    def reset(self) -> None:
        self._last = time.monotonic()


def descendants(pid: int) -> list[int]:
    """The pids of ``pid``'s children, theirs, and so on (a forkserver's workers are grandchildren), from
    /proc's parent links; empty where there is no /proc."""
    parent: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for e in entries:
        if e.isdigit():
            try:
                with open(f"/proc/{e}/stat") as f:
                    stat = f.read()
            except OSError:
                continue  # gone meanwhile
            ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
            parent.setdefault(ppid, []).append(int(e))
    out, todo = [], [pid]
    while todo:
        kids = parent.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def catching(pids: list[int], signum: int) -> list[int]:
    """Those of ``pids`` that catch ``signum`` (``SigCgt`` in /proc): the signal's default action
    would end any other (a forkserver, a user's subprocess), so only these are sent it."""
    bit = 1 << (int(signum) - 1)
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                caught = next((int(line.split()[1], 16) for line in f if line.startswith("SigCgt:")), 0)
        except (OSError, ValueError):
            continue
        if caught & bit:
            out.append(pid)
    return out


def parse_faulthandler(text: str) -> list[dict]:
    """faulthandler's dump as threads of frames (innermost last); the signalled (current) thread first."""
    threads: list[dict] = []
    for block in text.split("\n\n"):
        lines = block.strip().splitlines()
        if not lines or "most recent call first" not in lines[0]:
            continue
        frames = [
            {"file": m.group(1), "line": int(m.group(2)), "function": m.group(3)}
            for m in map(_FRAME.match, lines[1:])
            if m
        ]
        threads.append(
            {"thread": lines[0].split(" (")[0], "main": lines[0].startswith("Current"), "frames": frames[::-1]}
        )
    threads.sort(key=lambda t: not t["main"])
    return threads


def read_dump(path: str) -> dict | None:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def read_dumps(directory: str) -> list[dict]:
    """The dumps in ``directory`` (``rank*.dump.json``), by rank."""
    found = [read_dump(p) for p in glob.glob(os.path.join(directory, "rank*.dump.json"))]
    return sorted((d for d in found if d is not None and "rank" in d), key=lambda d: d["rank"])


def _stdlib(path: str) -> bool:
    return path.startswith(_STDLIB) and "site-packages" not in path


def where(dump: dict) -> str:
    """``file:line in function`` of the main thread's innermost frame outside the communicator (and,
    when that is in Python's standard library, the frame that called into it)."""
    for t in dump.get("stacks", []):
        if t.get("main"):
            frames = [f for f in t["frames"] if _OURS not in f["file"] and not f["file"].endswith(_RUNTIME)]
            if frames:
                f = frames[-1]
                text = f"{f['file']}:{f['line']} in {f['function']}"
                if _stdlib(f["file"]):
                    caller = next((c for c in reversed(frames) if not _stdlib(c["file"])), None)
                    if caller is not None:
                        text += f", called from {caller['file']}:{caller['line']} in {caller['function']}"
                return text
    return "unknown"


def _last(dump: dict) -> dict | None:
    recs = dump.get("records") or []
    return max(recs, key=lambda r: r["start"]) if recs else None


def behind(dumps: list[dict]) -> list[int]:
    """The ranks that hold the others up (see the module docstring)."""
    live = [d for d in dumps if not d.get("missing")]
    idle = [d["rank"] for d in live if _last(d) is None or _last(d)["end"] is not None]
    waiting = [d for d in live if d["rank"] not in idle]
    if idle and waiting:
        return idle
    missing = [d["rank"] for d in dumps if d.get("missing")]
    if missing or not waiting:
        return missing or idle
    groups: dict[str, int] = {}
    for d in waiting:
        g = _last(d)["group"]
        groups[g] = groups.get(g, 0) + 1
    group = max(groups, key=groups.get)
    seqs = {d["rank"]: max((r["seq"] for r in d["records"] if r["group"] == group), default=-1) for d in live}
    low = min(seqs.values())
    return [r for r, s in seqs.items() if s == low and low < max(seqs.values())]


def _child_lines(dump: dict) -> list[str]:
    return [
        f"    child pid {c['pid']} (its Python): now at {where({'stacks': c['stacks']})}"
        for c in dump.get("child_stacks") or []
    ]


def format_report(dumps: list[dict], why: str) -> str:
    """One report: the rank(s) behind first, then every rank's state and place."""
    now = time.time()
    slow = behind(dumps)
    head = f"disttrain: hang: {why}; " + (
        f"rank {', '.join(map(str, slow))} is behind" if slow else "no rank is clearly behind"
    )
    lines = [head]
    for d in sorted(dumps, key=lambda d: (d["rank"] not in slow, d["rank"])):
        tag = "BEHIND " if d["rank"] in slow else ""
        if d.get("missing"):
            lines.append(f"  {tag}rank {d['rank']}: no dump (busy without releasing the GIL, or gone)")
            lines += _child_lines(d)
            continue
        who = f"rank {d['rank']}@{d.get('host', '?')}"
        last = _last(d)
        if d.get("no_records"):
            state = "did not answer (holding the GIL?); faulthandler's stack"
        elif last is None:
            state = "no collective yet"
        elif last["end"] is None:
            state = (
                f"waiting in {last['op']}#{last['seq']} (group {last['group']}, {last['bytes']} bytes) for "
                f"{now - last['start']:.1f}s, called at {last['site']}"
            )
        else:
            state = f"not in a collective; last {last['op']}#{last['seq']} (group {last['group']}) at {last['site']}"
        lines.append(f"  {tag}{who}: {state}; now at {where(d)}")
        for c in d.get("children") or []:
            lines.append(f"    child {c['name']} pid {c['pid']}: state {c['state']}, waiting in {c['wchan']}")
        lines += _child_lines(d)
    lines.append("HINT: the rank behind is stuck at the line shown (compute, I/O, a rank-dependent branch)")
    return "\n".join(lines)
