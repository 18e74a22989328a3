"""The CPU one peer copy costs, sender and holder together (one process: a real replica store on
loopback, its server threads in this process, so ``process_time`` counts both sides).

    python benchmarks/replica_copy.py --json results/replica_copy.json [--mib 4]

Rows, alternated in turns in the same run (the peer first):

* ``set (before)``: what a copy to one holder cost before bulk frames: the xxh3 pass, then
  ``StoreClient.set`` of the bytes (HMAC-SHA256 on both sides, the bytes copied on both sides);
* ``tag + set_bulk (remote)``: the end-to-end tag once (``disttrain.fault.tag``) and a bulk frame
  (no hash on either side, no user-space copy);
* ``new segment + adopt (own host)``: a new file in the agent's private directory, the snapshot
  memcpy into it, the tag, and the agent's adoption (no bytes on a socket);
* ``reused segment + adopt (own host)``: the same into a file written before (what a rank does: it
  rotates ``KEEP + 1`` files), so no fresh pages.

A copy goes to the own agent and ``replicas`` other hosts, so before: (1 + replicas) x row 1; now
row 3 + replicas x (row 2 - its tag).
"""

from __future__ import annotations

import argparse
import mmap
import os
import secrets
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import print_table, write_json  # noqa: E402
from disttrain.checkpoint import checksum  # noqa: E402
from disttrain.fault import tag  # noqa: E402
from launcher.replica_store import ReplicaStore, replica_secret  # noqa: E402
from launcher.store import StoreClient  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", default="results/replica_copy.json")
    p.add_argument("--mib", type=int, default=4)
    p.add_argument("--turns", type=int, default=30)
    a = p.parse_args()
    n = a.mib << 20
    secret = replica_secret(secrets.token_hex(32), "bench")
    server = ReplicaStore(secret, "127.0.0.1", max_bytes=1 << 30, job="bench").start()
    c = StoreClient(server.address, secret, timeout=30, prefix="", job="bench")
    key = os.urandom(32)
    state = torch.randn(n // 4).view(torch.uint8).numpy()  # the "model": what a snapshot copies (as stage does)
    staging = torch.empty(n, dtype=torch.uint8)

    def before() -> None:
        np.copyto(staging.numpy(), state)
        data = memoryview(staging.numpy())
        checksum.digest(data)
        c.set("c/0/1/d/0", data)

    def remote() -> None:
        np.copyto(staging.numpy(), state)
        data = memoryview(staging.numpy())
        tag.sign(key, 0, 1, data)
        c.set_bulk("c/0/1/d/0", data)

    def own_host() -> None:
        name = f"seg-{secrets.token_hex(8)}"
        fd = os.open(os.path.join(server.shm_dir, name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.ftruncate(fd, n)
        buf = torch.frombuffer(mmap.mmap(fd, n, mmap.MAP_SHARED | mmap.MAP_POPULATE), dtype=torch.uint8)
        os.close(fd)
        np.copyto(buf.numpy(), state)
        tag.sign(key, 0, 1, memoryview(buf.numpy()))
        c.adopt(name, n, ["c/0/2/d/0"])

    reused: list = []

    def own_host_reused() -> None:
        if not reused:  # one file, rewritten each time (the replica rotates KEEP + 1 of them)
            name = f"seg-{secrets.token_hex(8)}"
            fd = os.open(os.path.join(server.shm_dir, name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.ftruncate(fd, n)
            reused[:] = [
                name,
                torch.frombuffer(mmap.mmap(fd, n, mmap.MAP_SHARED | mmap.MAP_POPULATE), dtype=torch.uint8),
            ]
            os.close(fd)
        name, buf = reused
        np.copyto(buf.numpy(), state)
        tag.sign(key, 0, 1, memoryview(buf.numpy()))
        c.adopt(name, n, ["c/0/3/d/0"])

    rows = {
        "set (before)": before,
        "tag + set_bulk (remote)": remote,
        "new segment + adopt (own host)": own_host,
        "reused segment + adopt (own host)": own_host_reused,
    }
    cpu: dict[str, list[float]] = {k: [] for k in rows}
    wall: dict[str, list[float]] = {k: [] for k in rows}
    for f in rows.values():  # warm up
        f()
    for _ in range(a.turns):
        for k, f in rows.items():
            c0, w0 = time.process_time(), time.perf_counter()
            f()
            cpu[k].append(time.process_time() - c0)
            wall[k].append(time.perf_counter() - w0)
    c.close()
    server.close()
    tag_ms = (
        statistics.median(
            [
                (lambda t0: (tag.sign(key, 0, 1, memoryview(staging.numpy())), time.perf_counter() - t0)[1])(
                    time.perf_counter()
                )
                for _ in range(10)
            ]
        )
        * 1e3
    )
    out = []
    for k in rows:
        out.append({"path": k, "cpu_ms": statistics.median(cpu[k]) * 1e3, "wall_ms": statistics.median(wall[k]) * 1e3})
    base = out[0]["cpu_ms"]
    table = [[r["path"], f"{r['cpu_ms']:.2f}", f"{r['wall_ms']:.2f}", f"{base / r['cpu_ms']:.1f}x"] for r in out]
    title = f"One {a.mib} MiB peer copy to one holder, both sides' CPU (median of {a.turns} alternated turns)"
    print_table(title, ["path", "cpu ms", "wall ms", "vs before"], table)
    print(f"tag ({tag.ALGORITHM}) alone: {tag_ms:.2f} ms")
    write_json(a.json, {"mib": a.mib, "tag_algorithm": tag.ALGORITHM, "tag_ms": tag_ms, "rows": out})


if __name__ == "__main__":
    main()
