"""A PMI-1 server for MPICH, run as its own small process by rank 0 of an ``mpi`` job that
no MPI launcher started (see ``collectives/backends/mpi/backend.py``).

Why a process: MPI_Init runs inside ``import mpi4py.MPI`` holding the GIL, so a server
thread in rank 0 could not answer rank 0's own MPI_Init. Standard library only, so it
starts in milliseconds. It prints its port, then serves until every rank closed its connection
or, at most 10 s after, its parent went away (stdin closed). When a rank's connection
closes without ``finalize``, barriers fail, so nobody waits on the dead.

Only the job's ranks get in. Rank 0 draws one random 256-bit id per rank, hands them to the
server on stdin (never on a command line) and to each rank through the job's authenticated
store. Each rank connects in Python (:func:`connect_rank`), opens with
``cmd=initack pmiid=<its id>``, and hands the connected socket to MPICH through ``PMI_FD``
(as hydra's proxy does), so MPICH never needs ``PMI_PORT`` and a 31-bit ``PMI_ID`` that a
stranger could guess while ranks start. A connection whose first line is not an unused id of ours (or our
own ``collectives_segments`` report with the job token) within :data:`HELLO_TIMEOUT` (one
deadline for the whole line, however slowly its bytes come) is closed and logged and counts
for nothing: it cannot fail a barrier, end the server, or take a rank's place. At most
``size`` rank connections, each id once; keys are write-once;
lines are bounded; at most :data:`MAX_PENDING` strangers are held at a time. A barrier that
not every rank reaches within the job's timeout fails, naming the ranks that never arrived.
A segment path is unlinked only if it is exactly MPICH's name in /dev/shm and a regular
file of ours there (``lstat``).

    python pmi.py SIZE BIND_ADDR PROCESS_MAPPING      (then one JSON line on stdin)
"""

from __future__ import annotations

import collections
import json
import os
import re
import secrets
import socket
import stat
import subprocess
import sys
import threading
import time

_DEBUG = bool(os.environ.get("COLLECTIVES_PMI_DEBUG"))
MAX_LINE = 4096  # MPICH's PMIU_MAXLINE is 1024
HELLO_TIMEOUT = 10.0  # for a connection's whole first line
MAX_PENDING = 64  # connections that have not yet proven they are a rank; the oldest goes first
SHM_DIR = "/dev/shm"
_SEGMENT = re.compile(r"mpich_shm_[0-9a-f]{1,16}_[0-9]{1,10}")  # MPICH: "/mpich_shm_%x_%d"


def _log(msg: str) -> None:
    print(f"collectives PMI server: {msg}", file=sys.stderr, flush=True)


def segment_name(path: str) -> str | None:
    """The bare name when ``path`` is exactly ``/dev/shm/<MPICH segment name>``, else None."""
    head, _, name = path.rpartition("/")
    return name if head == SHM_DIR and _SEGMENT.fullmatch(name) else None


def unlink_segment(name: str) -> bool:
    """Unlink /dev/shm/``name`` if it is a regular file owned by us; True when it did.

    /dev/shm is sticky: once we saw the entry is ours, nobody else can swap it before the unlink.
    """
    if not _SEGMENT.fullmatch(name):
        return False
    dfd = os.open(SHM_DIR, os.O_RDONLY | os.O_DIRECTORY)
    try:
        st = os.lstat(name, dir_fd=dfd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            _log(f"not unlinking {SHM_DIR}/{name}: not a regular file of uid {os.getuid()}")
            return False
        os.unlink(name, dir_fd=dfd)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(dfd)


def bind_address(host: str, local: bool) -> str:
    """Where the server listens: loopback for a one-host job, else the address ranks are told
    (``host``), which must be an address of this machine that other hosts can reach. Never every
    interface: a host name that resolves to loopback or elsewhere raises RuntimeError."""
    if local:
        return "127.0.0.1"
    hint = "\nHINT: set MASTER_ADDR to this host's address on the network the ranks share"
    try:
        addr = socket.gethostbyname(host)
    except OSError as exc:
        raise RuntimeError(f"the PMI server cannot resolve {host!r} ({exc}){hint}") from None
    if addr.startswith("127."):  # e.g. Debian's 127.0.1.1 for the host name: other hosts cannot reach it
        raise RuntimeError(f"{host!r} resolves to {addr}, which the other hosts cannot reach{hint}")
    try:
        with socket.socket() as s:
            s.bind((addr, 0))  # succeeds only for an address of this machine (namespace)
    except OSError as exc:
        raise RuntimeError(f"{host!r} resolves to {addr}, not an address of this machine ({exc}){hint}") from None
    return addr


def credentials(size: int) -> tuple[list[str], str]:
    """One random 256-bit id per rank (sent by our Python, not MPICH: no ``atoi`` limit), and a job token."""
    return [secrets.token_hex(32) for _ in range(size)], secrets.token_hex(32)


def connect_rank(address: str, pmi_id: str, rank: int, timeout: float) -> int:
    """A rank's connection to the server, opened and proven in Python: the ``initack`` with
    this rank's id and the server's four answer lines. Returns the socket's descriptor for
    MPICH's ``PMI_FD`` (kept open for the life of the process). Raises RuntimeError."""
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        sock.sendall(f"cmd=initack pmiid={pmi_id}\n".encode())
        f = sock.makefile("rb", buffering=0)
        lines = [f.readline(MAX_LINE + 1) for _ in range(4)]
        got = [dict(kv.split("=", 1) for kv in ln.decode().split() if "=" in kv) for ln in lines]
        if got[0].get("rc") != "0" or got[2].get("rank") != str(rank):
            raise RuntimeError(f"the PMI server at {address} refused rank {rank} (said {lines!r})")
    except (OSError, ValueError) as exc:
        sock.close()
        raise RuntimeError(f"rank {rank}: cannot join the PMI server at {address} ({exc})") from None
    except RuntimeError:
        sock.close()
        raise
    sock.settimeout(None)
    return sock.detach()


def spawn(
    size: int, bind: str, mapping: str, *, stderr=None, barrier_timeout: float = 300.0
) -> tuple[subprocess.Popen, int, list[str], str]:
    """Start the server process (called by rank 0): (process, port, per-rank PMI ids, job token).

    The ids and token go to the server on its stdin, which then stays open: its EOF tells
    the server that rank 0 is gone.
    """
    ids, token = credentials(size)
    proc = subprocess.Popen(
        [sys.executable, "-I", os.path.abspath(__file__), str(size), bind, mapping],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
    )
    try:
        creds = {"ids": ids, "token": token, "barrier_timeout": barrier_timeout}
        proc.stdin.write((json.dumps(creds) + "\n").encode())
        proc.stdin.flush()
    except OSError:  # it died at once; the readline below says so
        pass
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        raise RuntimeError(f"the PMI server for the mpi backend did not start (said {line!r})")
    return proc, int(line), ids, token


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def segments_line(token: str, paths) -> bytes:
    """The report a rank sends (on a connection of its own) of the MPICH segments it maps;
    the server answers ``cmd=collectives_segments_ack rc=0`` once it has recorded them."""
    return f"cmd=collectives_segments token={token} paths={','.join(sorted(paths))}\n".encode()


class _PMIServer:
    """The PMI-1 wire protocol (what hydra's ``mpiexec`` speaks to its ranks), as much of it as
    MPICH's MPI_Init/Finalize use: a key-value space, barriers, and the job's size and node
    mapping. One thread per connection; a connection is a rank only once its first line
    carried an unused id of ours.

    A barrier fails (rc=1) as soon as any rank's connection closed without ``finalize``, so
    a dead rank makes MPI_Init/Finalize fail instead of waiting forever.
    """

    def __init__(self, size: int, bind: str, mapping: str, ids: list[str], token: str, barrier_timeout: float = 300.0):
        self.size, self.mapping, self.closed = size, mapping, 0
        self.barrier_timeout = barrier_timeout
        self._peer_of: dict[int, str] = {}  # rank -> address, for the barrier's report
        self._in_barrier: set[int] = set()
        self._requests: dict[int, tuple[int, str]] = {}  # rank -> (requests made, the last one)
        self.started, self.reported = time.monotonic(), False
        self.kvsname = f"kvs_{os.getpid()}_0"
        self.segments: set[str] = set()  # bare names in /dev/shm; MPICH derives them from the kvsname
        self.rejected = 0
        self._rank_of = {str(i): r for r, i in enumerate(ids)}  # unused ids; an id leaves when used
        self._token = token
        self._kvs: dict[str, str] = {}
        self._cv = threading.Condition()
        self._pending: collections.OrderedDict[socket.socket, str] = collections.OrderedDict()
        self._arrived, self._generation, self._lost = 0, 0, False
        self._sock = socket.create_server((bind, 0), backlog=max(size + 8, 128))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, name="pmi-server", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, addr = self._sock.accept()
            except OSError as exc:  # EMFILE and friends: shed the oldest stranger and go on
                _log(f"accept failed ({exc.strerror}); dropping the oldest unproven connection")
                self._drop_oldest()
                threading.Event().wait(0.05)
                continue
            peer = f"{addr[0]}:{addr[1]}"
            with self._cv:
                if len(self._pending) >= MAX_PENDING:
                    self._drop_oldest_locked()
                self._pending[conn] = peer
            try:
                threading.Thread(target=self._serve, args=(conn, peer), name="pmi-conn", daemon=True).start()
            except RuntimeError:
                with self._cv:
                    self._pending.pop(conn, None)
                conn.close()

    def _drop_oldest(self) -> None:
        with self._cv:
            self._drop_oldest_locked()

    def _drop_oldest_locked(self) -> None:
        if self._pending:
            old, _ = self._pending.popitem(last=False)
            try:
                old.shutdown(socket.SHUT_RDWR)  # its thread sees EOF and logs it
            except OSError:
                pass

    def _reject(self, peer: str, why: str) -> None:
        self.rejected += 1
        if self.rejected <= 100 or self.rejected % 1000 == 0:
            _log(f"rejected connection from {peer}: {why} ({self.rejected} so far)")

    def _note_segments(self) -> None:
        """Remember the MPICH shared-memory segments rank 0 (our parent) maps, to unlink them
        at the end should a rank die before MPI_Finalize (MPICH unlinks them only there)."""
        try:
            with open(f"/proc/{os.getppid()}/maps") as f:
                for line in f:
                    name = segment_name(line.split()[-1])
                    if name is not None:
                        self.segments.add(name)
        except OSError:
            pass

    def started_up(self) -> bool:
        """Every rank got through MPI_Init's first PMI barrier."""
        return self._generation > 0

    def report_startup(self, why: str) -> None:
        """Say which ranks held MPI start-up back: those with the fewest PMI requests (a rank
        stopped inside MPI_Init talks to nobody; MPICH's shared-memory barrier then spins on
        the others, so only this server can tell who is behind). Logged once."""
        with self._cv:
            if self.reported or self.started_up():
                return
            self.reported = True
            progress = {r: self._requests.get(r, (0, "never connected")) for r in range(self.size)}
        least = min(n for n, _ in progress.values())
        behind = [r for r, (n, _) in progress.items() if n == least]
        ahead = max(progress.values())
        names = ", ".join(f"rank {r} ({self._peer_of.get(r, 'never connected')})" for r in behind)
        _log(
            f"MPI start-up did not finish ({why}): {names} did not arrive: last PMI request "
            f"{progress[behind[0]][1] or 'none'!r} ({least} made), while others got to {ahead[1]!r} "
            f"({ahead[0]} made)"
        )

    def _barrier(self, rank: int) -> int:
        """rc 0 once every rank arrived; 1 when a rank was lost, or when some never arrived within
        ``barrier_timeout`` (logged with their ranks, e.g. a rank stopped inside MPI_Init)."""
        with self._cv:
            gen = self._generation
            self._arrived += 1
            self._in_barrier.add(rank)
            if self._arrived == self.size:
                self._arrived, self._generation = 0, gen + 1
                self._in_barrier.clear()
                self._cv.notify_all()
            elif not self._cv.wait_for(lambda: self._generation != gen or self._lost, self.barrier_timeout):
                missing = sorted(set(range(self.size)) - self._in_barrier)
                where = ", ".join(f"rank {r} ({self._peer_of.get(r, 'never connected')})" for r in missing)
                _log(f"barrier: {where} did not arrive within {self.barrier_timeout:g}s; failing it on every rank")
                self._lost = True
                self._cv.notify_all()
            return 0 if self._generation != gen else 1

    @staticmethod
    def _fields(line: bytes) -> dict[str, str]:
        return dict(kv.split("=", 1) for kv in line.decode().split() if "=" in kv)

    def _hello(self, f, conn: socket.socket, peer: str) -> tuple[int | None, dict | None]:
        """Read the first line within HELLO_TIMEOUT: (rank, fields) for a rank, (None, None) otherwise."""
        conn.settimeout(HELLO_TIMEOUT)
        # One deadline for the whole line: a peer that trickles a byte at a time is cut off then.
        cutoff = threading.Timer(HELLO_TIMEOUT, _shutdown, args=(conn,))
        cutoff.daemon = True
        cutoff.start()
        try:
            line = f.readline(MAX_LINE + 1)
        except (OSError, ValueError) as exc:
            self._reject(peer, f"no first line ({exc or 'timed out'})")
            return None, None
        finally:
            cutoff.cancel()
            with self._cv:
                self._pending.pop(conn, None)
        if not line.endswith(b"\n"):
            self._reject(peer, "no complete first line" if len(line) <= MAX_LINE else "first line too long")
            return None, None
        try:
            d = self._fields(line)
        except (UnicodeDecodeError, ValueError):
            self._reject(peer, "garbage")
            return None, None
        if d.get("cmd") == "collectives_segments":
            # Compared as bytes: compare_digest refuses str with non-ASCII characters (TypeError).
            if secrets.compare_digest(d.get("token", "").encode(), self._token.encode()):
                names = {n for p in d.get("paths", "").split(",") if p and (n := segment_name(p)) is not None}
                with self._cv:
                    self.segments.update(names)
                # Acknowledged once recorded: the rank waits for this line before it finalizes,
                # so the server cannot see every rank close before the report is in.
                try:
                    f.write(b"cmd=collectives_segments_ack rc=0\n")
                    f.flush()
                except OSError:
                    pass
            else:
                self._reject(peer, "segment report without the job token")
            return None, None
        pmiid = d.get("pmiid", "")
        with self._cv:
            rank = self._rank_of.pop(pmiid, None) if d.get("cmd") == "initack" else None
            if rank is not None:
                self._peer_of[rank] = peer
        if rank is None:
            self._reject(peer, f"not a rank of this job (first line {line[:60]!r})")
            return None, None
        conn.settimeout(None)
        return rank, d

    def _serve(self, conn: socket.socket, peer: str) -> None:
        f = conn.makefile("rwb")
        rank, d = self._hello(f, conn, peer)
        if rank is None:
            f.close()
            conn.close()
            return
        finalized = False
        try:
            while True:
                if _DEBUG:
                    print("<<", rank, d, file=sys.stderr, flush=True)
                with self._cv:
                    n, _ = self._requests.get(rank, (0, ""))
                    self._requests[rank] = (n + 1, " ".join(filter(None, (d.get("cmd"), d.get("key")))))
                out = self._answer(rank, d)
                if out is None:  # abort
                    break
                if _DEBUG:
                    print(">>", out, file=sys.stderr, flush=True)
                f.write(("\n".join(out) + "\n").encode())
                f.flush()
                if d.get("cmd") == "finalize":
                    finalized = True
                    break
                line = f.readline(MAX_LINE + 1)
                if not line:
                    break
                if not line.endswith(b"\n"):
                    _log(f"rank {rank} sent a line over {MAX_LINE} bytes; closing its connection")
                    break
                d = self._fields(line)
        except (OSError, ValueError):
            pass
        finally:
            f.close()
            conn.close()
            with self._cv:
                self.closed += 1
                if not finalized:
                    self._lost = True
                self._cv.notify_all()

    def _answer(self, rank: int, d: dict[str, str]) -> list[str] | None:
        cmd = d.get("cmd")
        if cmd == "initack":
            return ["cmd=initack rc=0", f"cmd=set size={self.size}", f"cmd=set rank={rank}", "cmd=set debug=0"]
        if cmd == "init":
            return ["cmd=response_to_init pmi_version=1 pmi_subversion=1 rc=0"]
        if cmd == "get_maxes":
            return ["cmd=maxes rc=0 kvsname_max=256 keylen_max=256 vallen_max=1024"]
        if cmd == "get_appnum":
            return ["cmd=appnum rc=0 appnum=0"]
        if cmd == "get_my_kvsname":
            return [f"cmd=my_kvsname rc=0 kvsname={self.kvsname}"]
        if cmd == "get_universe_size":
            return [f"cmd=universe_size rc=0 size={self.size}"]
        if cmd == "put":
            key, value = d.get("key", ""), d.get("value", "")
            with self._cv:
                old = self._kvs.setdefault(key, value)
            if old != value:  # write-once: nobody rewrites another rank's business card
                _log(f"rank {rank} tried to overwrite key {key[:60]!r}; refused")
                return ["cmd=put_result rc=-1 msg=duplicate_key"]
            return ["cmd=put_result rc=0"]
        if cmd == "get":
            key = d.get("key")
            value = self.mapping if key == "PMI_process_mapping" else self._kvs.get(key)
            if value is None:
                return ["cmd=get_result rc=-1 msg=key_not_found"]
            return [f"cmd=get_result rc=0 value={value}"]
        if cmd == "barrier_in":
            out = [f"cmd=barrier_out rc={self._barrier(rank)}"]
            self._note_segments()
            return out
        if cmd == "finalize":
            return ["cmd=finalize_ack rc=0"]
        if cmd == "abort":
            return None
        return [f"cmd={cmd} rc=-1 msg=unsupported_by_collectives_pmi"]


def main() -> None:
    size, bind, mapping = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    raw = b""  # the raw fd, not sys.stdin: a daemon thread must not hold the buffer's lock at exit
    while not raw.endswith(b"\n") and len(raw) < (64 << 20):
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        raw += chunk
    creds = json.loads(raw)
    ids, token = [str(i) for i in creds["ids"]], str(creds["token"])
    if len(ids) != size or len(set(ids)) != size or len(token) < 32:
        sys.exit("collectives PMI server: bad credentials on stdin")
    server = _PMIServer(size, bind, mapping, ids, token, float(creds.get("barrier_timeout", 300.0)))
    print(server.port, flush=True)
    stop = threading.Event()

    def watch_parent() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        stop.set()

    threading.Thread(target=watch_parent, daemon=True).start()
    # Serve until every rank has closed its connection: MPICH still talks to PMI from its
    # exit handlers, after MPI_Finalize. Once the parent (rank 0) is gone, wait at most 10 s.
    with server._cv:
        while server.closed < size:
            server._cv.wait(timeout=0.2)
            server._note_segments()
            if time.monotonic() - server.started > server.barrier_timeout:
                server._cv.release()  # report_startup takes it
                try:
                    server.report_startup(f"within {server.barrier_timeout:g}s")
                finally:
                    server._cv.acquire()
            if stop.is_set():
                server._cv.release()
                try:
                    server.report_startup("rank 0 is gone")
                finally:
                    server._cv.acquire()
                server._cv.wait_for(lambda: server.closed >= size, timeout=10.0)
                break
    for name in server.segments:  # normally already gone (MPI_Finalize unlinks them)
        unlink_segment(name)


if __name__ == "__main__":
    main()


def process_mapping(store, env, timeout: float) -> str:
    """Every rank puts its host in the store; rank 0 returns MPICH's PMI_process_mapping of them (the others "")."""
    import datetime

    store.set(f"collectives/mpi/host/{env.rank}", env.host)
    if env.rank != 0:
        return ""
    keys = [f"collectives/mpi/host/{r}" for r in range(env.world_size)]
    store.wait(keys, datetime.timedelta(seconds=timeout))
    hosts = [store.get(k).decode() for k in keys]
    blocks, node = [], 0
    for i, h in enumerate(hosts):
        if i and h == hosts[i - 1]:
            blocks[-1][2] += 1
        else:
            blocks.append([node, 1, 1])
            node += 1
    return "(vector," + ",".join(f"({a},{b},{c})" for a, b, c in blocks) + ")"
