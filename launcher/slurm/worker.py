"""srun mode: every srun task is one worker, and this module makes it one of ours.

    srun -N2 --ntasks-per-node=4 python -m disttrain.worker run.yaml

``setup_worker()`` (called by every srun-started worker before it connects) exports our
contract (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` =
first node, ``MASTER_PORT`` derived from the job id, ``DISTTRAIN_RESTART_COUNT`` =
``SLURM_RESTART_COUNT``) and, on rank 0 (which block distribution puts on the first node),
opens the job's authenticated store. The job secret: :mod:`launcher.slurm.secret`.
"""

from __future__ import annotations

import logging
import os
import time

from .. import environment as E
from .errors import SlurmEnvError
from .place import (
    ADDR_OVERRIDE,
    PORT_OVERRIDE,
    SlurmPlace,
    check_against_config,
    contract_env,
    job_tag,
    read_slurm_env,
    store_endpoint,
)
from .secret import job_secret

log = logging.getLogger(__name__)
CHECKED_OUT = "slurm/checked_out"  # tasks done with the job's store (rank 0 closes it after all)


class SlurmWorker:
    """What ``setup_worker`` set up; rank 0 holds the store until ``close()`` (or process exit)."""

    def __init__(self, place: SlurmPlace, server=None, secret_path: str | None = None):
        self.place, self.server, self.secret_path = place, server, secret_path

    def close(self, linger: float = 30.0) -> None:
        """Every task, after its communicator closed: check out of the job's store. Rank 0, which
        hosts the store, keeps it up until every task has checked out (at most ``linger`` seconds),
        so no peer loses the store in the middle of its own teardown."""
        self._check_out(linger)
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.secret_path:
            try:
                os.remove(self.secret_path)
            except OSError:
                pass
            self.secret_path = None

    def _check_out(self, linger: float) -> None:
        from ..store import StoreError, connect_from_env

        try:
            client = connect_from_env(min(linger, 10.0))
            if client is None:
                return
            try:
                done = client.add(CHECKED_OUT, 1)
                deadline = time.monotonic() + linger
                while self.server is not None and done < self.place.world_size and time.monotonic() < deadline:
                    time.sleep(0.02)
                    done = client.add(CHECKED_OUT, 0)
                if self.server is not None and done < self.place.world_size:
                    log.warning(
                        "%s: %d of %d tasks checked out of the store after %.0fs; closing it anyway",
                        self.place.where,
                        done,
                        self.place.world_size,
                        linger,
                    )
            finally:
                client.close()
        except (StoreError, OSError) as exc:  # the store is gone already: nothing left to wait for
            log.debug("%s: check-out skipped: %s", self.place.where, exc)


def setup_worker(
    secret_dir: str | None = None,
    *,
    nodes: int | None = None,
    ntasks_per_node: int | None = None,
    env: dict | None = None,
    timeout: float = 120.0,
) -> SlurmWorker | None:
    """Called by every worker before it connects. Does nothing (returns None) unless srun started
    it directly: someone else (our agent, torchrun) already set ``RANK`` and ``WORLD_SIZE``.

    Exports the contract into ``env`` (default ``os.environ``); rank 0 opens the job's store,
    the others only need it to be there when they connect (their clients retry).
    """
    env = os.environ if env is None else env
    if not env.get("SLURM_PROCID") or (E.RANK in env and E.WORLD_SIZE in env):
        return None
    place = read_slurm_env(env)
    check_against_config(place, nodes, ntasks_per_node)
    if place.rank == 0 and env.get("SLURMD_NODENAME") and env["SLURMD_NODENAME"] != place.first_node:
        raise SlurmEnvError(
            f"{place.where}: rank 0 runs on {env['SLURMD_NODENAME']}, not on the first node "
            f"{place.first_node}, where the others look for the store. HINT: srun "
            "--distribution=block (the default), or export DISTTRAIN_MASTER_ADDR"
        )
    addr, port = store_endpoint(place, env)
    one_node = place.nnodes == 1 and not env.get(ADDR_OVERRIDE)
    if one_node:  # every task computes the same: the store (and the transports) stay on loopback
        addr = "127.0.0.1"
    secret, secret_path = job_secret(place, secret_dir, place.rank == 0, timeout, env)
    server = None
    if place.rank == 0:
        from ..store import StoreError, StoreServer

        try:
            server = StoreServer(
                secret, "127.0.0.1" if one_node else "0.0.0.0", port, advertise=addr, job=job_tag(place)
            ).start()
        except StoreError as exc:
            raise SlurmEnvError(
                f"{place.where}: {exc} (port {port} is derived from the job id). HINT: export "
                f"{PORT_OVERRIDE}=<a free port> in the batch script"
            ) from None
    env.update(contract_env(place, addr, port, secret))
    log.info("%s: srun-started worker; store %s:%d", place.where, addr, port)
    return SlurmWorker(place, server, secret_path)
