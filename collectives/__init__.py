"""collectives: one small communicator API over real transports.

    comm = collectives.init("torch")          # every rank, once
    comm.allreduce(grad, ReduceOp.AVG)        # in place, blocking
    h = comm.allreduce(bucket, async_op=True) # overlap; h.wait() before use

Never imports ``disttrain`` or ``launcher``.
"""

from .communicator import Communicator, init
from .env import DistEnv, read_env
from .errors import (
    BackendUnavailableError,
    CollectiveAbortedError,
    CollectiveMismatchError,
    CollectivesError,
    CollectiveTimeoutError,
    InvalidTensorError,
    PeerDiedError,
)
from .types import ReduceOp, Work

__all__ = [
    "BackendUnavailableError",
    "CollectiveAbortedError",
    "CollectiveMismatchError",
    "CollectiveTimeoutError",
    "CollectivesError",
    "Communicator",
    "DistEnv",
    "InvalidTensorError",
    "PeerDiedError",
    "ReduceOp",
    "Work",
    "init",
    "read_env",
]
