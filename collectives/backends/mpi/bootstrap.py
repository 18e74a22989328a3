"""How MPI starts and ends in a job of the ``mpi`` backend (see ``backend.py``): under an MPI launcher
(``mpiexec``, ``srun --mpi=pmi2``) MPICH already has its PMI connection; otherwise rank 0 starts our PMI
server (``pmi.py``), every rank finds it through the job's store and hands MPICH a socket already
authenticated to it (``PMI_FD``), so MPI_COMM_WORLD is the whole job. At exit, MPI is finalised unless a
transport error left it unhealthy (finalize would wait on the dead), and the shared-memory segments MPICH
leaves behind are reported to our PMI server, which unlinks them once every rank is gone.

Called by ``MPIBackend.create`` (every rank, once, before anything else initialises MPI).
"""

from __future__ import annotations

import atexit
import os
import socket

from ...env import DistEnv
from ...errors import CollectivesError
from ..loopback import pin_one_host_job
from . import pmi

HEALTHY = True  # False after a transport error (set by the backend): skip MPI_Finalize at exit
_MPI = None  # the mpi4py.MPI module, once imported by init_mpi
_PMI_KEY = "collectives/mpi/pmi"
_PMI_ADDR = None  # host:port of that server, on every rank
_PMI_PROC = None  # rank 0's PMI server process, when no MPI launcher started the job
_PMI_TOKEN = ""  # proves our own segment report to that server


def init_mpi(env: DistEnv, store, timeout: float):
    """Import mpi4py.MPI (which initialises MPI), first wiring PMI when no MPI launcher did."""
    global _MPI
    if _MPI is not None:
        return _MPI
    import sys

    if "mpi4py.MPI" not in sys.modules:
        pin_one_host_job(env)  # MPICH's UCX/libfabric listeners on lo when every rank is here
    if "mpi4py.MPI" not in sys.modules and not mpi_launched() and env.world_size > 1:
        _connect_pmi(env, store, timeout)
    import faulthandler

    import mpi4py

    mpi4py.rc.finalize = False  # we finalize in a Python atexit hook, while our PMI server still runs
    # MPI_Init holds the GIL and MPICH's start-up barriers have no timeout: a peer stopped inside
    # it would hang this rank for good. A C-level watchdog ends it instead (stacks printed, exit 1);
    # our PMI server's log names the rank that was behind.
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        from mpi4py import MPI
    finally:
        faulthandler.cancel_dump_traceback_later()

    _MPI = MPI
    atexit.register(_finalize)
    return MPI


def mpi_launched() -> bool:
    """True when an MPI launcher (mpiexec, srun --mpi) gave this process its PMI connection."""
    return any(k in os.environ for k in ("PMI_FD", "PMI_PORT", "PMIX_RANK", "PMI_RANK"))


def _finalize() -> None:
    if _MPI is not None and HEALTHY and _MPI.Is_initialized() and not _MPI.Is_finalized():
        mine = _mapped_segments()
        if _PMI_ADDR is not None and mine:
            # MPICH leaves some per-communicator segments in /dev/shm; our PMI server unlinks
            # them once every rank has exited (MPICH's exit handlers still use them).
            try:
                host, port = _PMI_ADDR.rsplit(":", 1)
                with socket.create_connection((host, int(port)), timeout=5) as s:
                    s.sendall(pmi.segments_line(_PMI_TOKEN, mine))
                    s.recv(64)  # the ack: recorded before this rank's finalize can end the server
            except OSError:
                pass
        _MPI.Finalize()


def _mapped_segments() -> set[str]:
    try:
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f if "/dev/shm/mpich_shm_" in line}
    except OSError:
        return set()


def _connect_pmi(env: DistEnv, store, timeout: float) -> None:
    if env.rank == 0:
        local = env.local_world_size == env.world_size
        host = "127.0.0.1" if local else (env.master_addr or socket.gethostname())
        # Nodes for MPICH's shared-memory paths: consecutive ranks with one host are one node.
        mapping = pmi.process_mapping(store, env, timeout)
        try:
            bind = pmi.bind_address(host, local)
        except RuntimeError as exc:
            raise CollectivesError(f"rank {env.where}: {exc}") from None
        port = _start_pmi_server(env.world_size, bind, mapping, store, timeout)
        store.set(_PMI_KEY, f"{host}:{port}")
    else:
        pmi.process_mapping(store, env, timeout)
    import datetime

    store.wait([_PMI_KEY], datetime.timedelta(seconds=timeout))
    global _PMI_ADDR, _PMI_TOKEN
    _PMI_ADDR = store.get(_PMI_KEY).decode()
    _PMI_TOKEN = store.get(f"{_PMI_KEY}/token").decode()
    # This rank's 256-bit id, the only way into the PMI server: proven here, in Python, and the
    # connected socket handed to MPICH (PMI_FD), so no id MPICH could parse is ever guessable.
    pmi_id = store.get(f"{_PMI_KEY}/id/{env.rank}").decode()
    try:
        fd = pmi.connect_rank(_PMI_ADDR, pmi_id, env.rank, timeout)
    except RuntimeError as exc:
        raise CollectivesError(str(exc)) from None
    for stale in ("PMI_PORT", "PMI_ID"):
        os.environ.pop(stale, None)
    os.environ.update(PMI_FD=str(fd), PMI_RANK=str(env.rank), PMI_SIZE=str(env.world_size))


def _start_pmi_server(size: int, bind: str, mapping: str, store, timeout: float = 300.0) -> int:
    """Rank 0: start the PMI server; each rank's PMI id and the job token go into the store."""
    global _PMI_PROC
    # No atexit hook: MPICH's own exit handlers still talk to the server after Python's have
    # run; the server exits once every rank closed its connection, or soon after we are gone.
    try:
        _PMI_PROC, port, ids, token = pmi.spawn(size, bind, mapping, barrier_timeout=timeout)
    except RuntimeError as exc:
        raise CollectivesError(str(exc)) from None
    for rank, pmi_id in enumerate(ids):
        store.set(f"{_PMI_KEY}/id/{rank}", str(pmi_id))
    store.set(f"{_PMI_KEY}/token", token)
    return port
