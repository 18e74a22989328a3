"""A PMI-1 server for MPICH, run as its own small process by rank 0 of an ``mpi`` job that
no MPI launcher started (see ``collectives/backends/mpi.py``).

Why a process: MPI_Init runs inside ``import mpi4py.MPI`` holding the GIL, so a server
thread in rank 0 could not answer rank 0's own MPI_Init. Standard library only, so it
starts in milliseconds. It prints its port, then serves until every rank closed its connection
or, at most 10 s after, its parent went away (stdin closed). When a rank's connection
closes without ``finalize``, barriers fail, so nobody waits on the dead.

    python _pmi.py SIZE BIND_ADDR PROCESS_MAPPING
"""

from __future__ import annotations

import os
import socket
import sys
import threading

_DEBUG = bool(os.environ.get("COLLECTIVES_PMI_DEBUG"))


class _PMIServer:
    """The PMI-1 wire protocol (what hydra's ``mpiexec`` speaks to its ranks), as much of it as MPICH's MPI_Init/Finalize use: a key-value
    space, barriers, and the job's size and node mapping. One thread per rank connection.

    A barrier fails (rc=1) as soon as any rank's connection closed without ``finalize``, so
    a dead rank makes MPI_Init/Finalize fail instead of waiting forever.
    """

    def __init__(self, size: int, bind: str, mapping: str):
        self.size, self.mapping, self.closed = size, mapping, 0
        self.kvsname = f"kvs_{os.getpid()}_0"
        self.segments: set[str] = set()  # MPICH derives node-local resource names from it
        self._kvs: dict[str, str] = {}
        self._cv = threading.Condition()
        self._arrived, self._generation, self._lost = 0, 0, False
        self._sock = socket.create_server((bind, 0), backlog=size + 8)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, name="pmi-server", daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self._sock.accept()
            threading.Thread(target=self._serve, args=(conn,), name="pmi-conn", daemon=True).start()

    def _note_segments(self) -> None:
        """Remember the MPICH shared-memory segments rank 0 (our parent) maps, to unlink them
        at the end should a rank die before MPI_Finalize (MPICH unlinks them only there)."""
        try:
            with open(f"/proc/{os.getppid()}/maps") as f:
                for line in f:
                    path = line.split()[-1]
                    if path.startswith("/dev/shm/mpich_shm_"):
                        self.segments.add(path)
        except OSError:
            pass

    def _barrier(self) -> int:
        with self._cv:
            gen = self._generation
            self._arrived += 1
            if self._arrived == self.size:
                self._arrived, self._generation = 0, gen + 1
                self._cv.notify_all()
            else:
                self._cv.wait_for(lambda: self._generation != gen or self._lost)
            return 0 if self._generation != gen else 1

    def _serve(self, conn: socket.socket) -> None:
        f = conn.makefile("rwb")
        finalized, aux = False, False
        try:
            for line in f:
                if _DEBUG:
                    print("<<", line, file=sys.stderr, flush=True)
                d = dict(kv.split("=", 1) for kv in line.decode().split() if "=" in kv)
                cmd = d.get("cmd")
                if cmd == "collectives_segments":  # from collectives' mpi backend, not MPICH
                    with self._cv:
                        self.segments.update(
                            p for p in d.get("paths", "").split(",") if p.startswith("/dev/shm/mpich_shm_")
                        )
                    aux = True
                    break
                if cmd == "initack":
                    out = [
                        "cmd=initack rc=0",
                        f"cmd=set size={self.size}",
                        f"cmd=set rank={d['pmiid']}",
                        "cmd=set debug=0",
                    ]
                elif cmd == "init":
                    out = ["cmd=response_to_init pmi_version=1 pmi_subversion=1 rc=0"]
                elif cmd == "get_maxes":
                    out = ["cmd=maxes rc=0 kvsname_max=256 keylen_max=256 vallen_max=1024"]
                elif cmd == "get_appnum":
                    out = ["cmd=appnum rc=0 appnum=0"]
                elif cmd == "get_my_kvsname":
                    out = [f"cmd=my_kvsname rc=0 kvsname={self.kvsname}"]
                elif cmd == "get_universe_size":
                    out = [f"cmd=universe_size rc=0 size={self.size}"]
                elif cmd == "put":
                    with self._cv:
                        self._kvs[d["key"]] = d.get("value", "")
                    out = ["cmd=put_result rc=0"]
                elif cmd == "get":
                    value = self.mapping if d.get("key") == "PMI_process_mapping" else self._kvs.get(d.get("key"))
                    out = [
                        f"cmd=get_result rc=0 value={value}"
                        if value is not None
                        else "cmd=get_result rc=-1 msg=key_not_found"
                    ]
                elif cmd == "barrier_in":
                    out = [f"cmd=barrier_out rc={self._barrier()}"]
                    self._note_segments()
                elif cmd == "finalize":
                    finalized = True
                    out = ["cmd=finalize_ack rc=0"]
                elif cmd == "abort":
                    break
                else:
                    out = [f"cmd={cmd} rc=-1 msg=unsupported_by_collectives_pmi"]
                if _DEBUG:
                    print(">>", out, file=sys.stderr, flush=True)
                f.write(("\n".join(out) + "\n").encode())
                f.flush()
                if finalized:
                    break
        except (OSError, ValueError):
            pass
        finally:
            conn.close()
            if not aux:
                with self._cv:
                    self.closed += 1
                    if not finalized:
                        self._lost = True
                    self._cv.notify_all()


def main() -> None:
    size, bind, mapping = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    server = _PMIServer(size, bind, mapping)
    print(server.port, flush=True)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    # Serve until every rank has closed its connection: MPICH still talks to PMI from its
    # exit handlers, after MPI_Finalize. Once the parent (rank 0) is gone, wait at most 10 s.
    with server._cv:
        while server.closed < size:
            server._cv.wait(timeout=0.2)
            server._note_segments()
            if stop.is_set():
                server._cv.wait_for(lambda: server.closed >= size, timeout=10.0)
                break
    for path in server.segments:  # normally already gone (MPI_Finalize unlinks them)
        try:
            os.unlink(path)
        except OSError:
            pass


if __name__ == "__main__":
    main()
