"""Horovod's elastic API (``hvd.elastic``): training that survives hosts leaving and joining.

    import disttrain.horovod as hvd
    hvd.init()
    state = hvd.elastic.TorchState(model, optimizer, epoch=0, batch=0)

    @hvd.elastic.run
    def train(state): ...                 # commit() every batch or few

    train(state)

    disttrain launch --min-np 2 --max-np 4 --host-discovery-script ./hosts.sh train.py

``state`` holds ``State``, ``ObjectState`` and ``TorchState``; ``runner`` the ``run`` loop and
``reset``; ``sampler`` the ``ElasticSampler``. The driver side is ``launcher/driver.py``, the worker's place in it
``disttrain/horovod/rendezvous.py``. docs/horovod.md lists what differs from Horovod.
"""

from ..exceptions import HorovodInternalError, HostsUpdatedInterrupt
from .runner import reset, run
from .sampler import ElasticSampler
from .state import ObjectState, State, TorchState

__all__ = [
    "ElasticSampler",
    "HorovodInternalError",
    "HostsUpdatedInterrupt",
    "ObjectState",
    "State",
    "TorchState",
    "reset",
    "run",
]
