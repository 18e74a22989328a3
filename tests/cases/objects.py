"""Rank bodies for tests/test_collectives_objects.py: bytes and JSON objects over a backend."""

import collectives
from collectives import objects


def objects_case(backend: str):
    comm = collectives.init(backend)
    me, world = comm.rank, comm.world_size
    try:
        mine = bytes(range(me * 5 % 256)) + "é".encode() * me  # rank 0 sends nothing; lengths not multiples of 4
        gathered = objects.allgather_bytes(comm, mine)
        last = world - 1
        sent = b"\x00\xffroot" * 3 + b"!" if me == last else None
        got = objects.broadcast_bytes(comm, sent, src=last)
        empty = objects.broadcast_bytes(comm, b"" if me == 0 else None, src=0)
        records = objects.allgather_json(comm, {"rank": me, "names": ["a" * me], "nested": {"x": [me, None]}})
        plan = objects.broadcast_json(comm, {"step": 7, "ok": True, "text": "ünï"} if me == 0 else None, src=0)
        return {
            "gathered": [g.hex() for g in gathered],
            "broadcast": got.hex(),
            "empty": empty.hex(),
            "records": records,
            "plan": plan,
        }
    finally:
        comm.close()
