"""Model/optimizer helpers and object collectives: ``broadcast_parameters``,
``broadcast_optimizer_state``, ``broadcast_object``, ``allgather_object``.

Objects travel as JSON, not pickles. Horovod pickled arbitrary objects with cloudpickle, which
runs code from whatever bytes arrive; here an object may be built from None, bool, int, float
(inf/nan too), str, list, tuple, set, frozenset, dict (any keys of those types) and torch tensors, which covers
optimizer hyperparameters, metrics, configs and small state. Anything else raises
:class:`HorovodError` on the sending rank before anything is sent.
"""

from __future__ import annotations

import base64
import collections
import json

import torch

from collectives.objects import from_words, to_words

from .basics import rank
from .exceptions import HorovodError
from .ops import allgather, broadcast_, broadcast_async_, synchronize
from .process_sets import global_process_set

_object_calls: dict[tuple[str, int | None], int] = collections.defaultdict(int)


def _object_name(kind: str, name: str | None, process_set) -> str:
    """Unnamed object collectives are named by their call count per set (every member calls
    them in the same order); Horovod used the object's type name, which differs when a
    non-root rank passes None."""
    if name:
        return name
    key = (kind, process_set.process_set_id)
    _object_calls[key] += 1
    return f"{kind}.{_object_calls[key]}"


# -- the object codec --------------------------------------------------------------------------
def _enc(obj, path: str):
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        return {
            "__tensor__": [
                str(t.dtype).removeprefix("torch."),
                list(t.shape),
                base64.b64encode(
                    t.reshape(-1).view(torch.uint8).clone().numpy().tobytes() if t.numel() else b""
                ).decode(),
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [_enc(v, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_enc(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        tag = "__frozenset__" if isinstance(obj, frozenset) else "__set__"
        return {tag: [_enc(v, f"{path} element") for v in obj]}
    if isinstance(obj, dict):
        return {"__dict__": [[_enc(k, f"{path} key"), _enc(v, f"{path}[{k!r}]")] for k, v in obj.items()]}
    raise HorovodError(
        f"cannot send {type(obj).__name__} at {path or 'the top level'}: objects travel as JSON "
        "(None, bool, int, float, str, list, tuple, set, frozenset, dict, torch.Tensor)\n"
        "HINT: Horovod pickled arbitrary objects; disttrain.horovod does not unpickle bytes from other "
        "processes. Convert the object to those types (e.g. a dataclass with dataclasses.asdict)"
    )


def _dec(obj):
    if isinstance(obj, list):
        return [_dec(v) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            dtype, shape, data = obj["__tensor__"]
            raw = bytearray(base64.b64decode(data))
            dt = getattr(torch, dtype)
            if not raw:
                return torch.empty(shape, dtype=dt)
            return torch.frombuffer(raw, dtype=dt).reshape(shape).clone()
        if "__tuple__" in obj:
            return tuple(_dec(v) for v in obj["__tuple__"])
        if "__set__" in obj:
            return {_dec_key(v) for v in obj["__set__"]}
        if "__frozenset__" in obj:
            return frozenset(_dec_key(v) for v in obj["__frozenset__"])
        return {_dec_key(k): _dec(v) for k, v in obj["__dict__"]}
    return obj


def _dec_key(k):
    k = _dec(k)
    return tuple(k) if isinstance(k, list) else k


def encode_object(obj) -> bytes:
    return json.dumps(_enc(obj, ""), separators=(",", ":")).encode()


def decode_object(raw: bytes):
    return _dec(json.loads(raw.decode()))


# -- object collectives --------------------------------------------------------------------------
def broadcast_object(obj, root_rank: int = 0, name: str | None = None, process_set=global_process_set):
    """All members: ``root_rank``'s ``obj`` (JSON-able values and tensors; see the module doc)."""
    name = _object_name("broadcast_object", name, process_set)
    me = rank()
    if me == root_rank:
        raw = encode_object(obj)
        size = torch.tensor([len(raw)], dtype=torch.int64)
    else:
        size = torch.zeros(1, dtype=torch.int64)
    broadcast_(size, root_rank, name + ".sz", process_set)
    n = int(size.item())
    t = to_words(raw) if me == root_rank else torch.zeros((n + 3) // 4, dtype=torch.int32)
    broadcast_(t, root_rank, name + ".t", process_set)
    return obj if me == root_rank else decode_object(from_words(t, n))


def allgather_object(obj, name: str | None = None, process_set=global_process_set) -> list:
    """All members: every member's ``obj``, in set-rank order."""
    name = _object_name("allgather_object", name, process_set)
    raw = encode_object(obj)
    sizes = allgather(torch.tensor([len(raw)], dtype=torch.int64), name=name + ".sz", process_set=process_set)
    words = allgather(to_words(raw), name=name + ".t", process_set=process_set)
    out, offset = [], 0
    for n in sizes.tolist():
        w = (n + 3) // 4
        out.append(decode_object(from_words(words[offset : offset + w], n)))
        offset += w
    return out


# -- model and optimizer ---------------------------------------------------------------------------
def broadcast_parameters(params, root_rank: int, prefix: str | None = None) -> None:
    """All ranks: overwrite ``params`` in place with ``root_rank``'s. ``params`` is a
    ``state_dict()`` (broadcast in sorted key order), ``named_parameters()`` or ``parameters()``."""
    if isinstance(params, dict):
        params = sorted(params.items())
    elif isinstance(params, (list, tuple)) or hasattr(params, "__iter__"):
        params = [p if isinstance(p, tuple) else (None, p) for p in params]
    else:
        raise ValueError(f"invalid params of type: {type(params)}")
    handles = []
    for name, p in params:
        if not isinstance(p, torch.Tensor):
            continue
        full = f"{prefix}{name}" if prefix and name else name
        handles.append(broadcast_async_(p.data if isinstance(p, torch.nn.Parameter) else p, root_rank, full))
    for h in handles:
        synchronize(h)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int, model=None) -> None:
    """All ranks: make every rank's optimizer state (tensors and hyperparameters) ``root_rank``'s.

    As in Horovod, a fresh optimizer is given state first by one step with zero gradients
    (without the gradient allreduce when it is a DistributedOptimizer)."""
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("cannot broadcast torch.optim.LBFGS state")
    state_dict = optimizer.state_dict()
    if len(state_dict["state"]) == 0:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        _plain_step(optimizer)
        state_dict = optimizer.state_dict()
    if len(state_dict["state"]) == 0:
        return  # a stateless optimizer: nothing to broadcast, as in Horovod
    tensors, scalars, setters = [], {}, {}
    occurrences: dict = collections.defaultdict(int)
    for index, group in enumerate(state_dict["param_groups"]):
        for key, value in group.items():
            if key == "params":
                continue
            k = f"{key}.{index}"
            scalars[k] = value
            setters[k] = lambda v, index=index, key=key: optimizer.param_groups[index].__setitem__(key, v)
        for pid in group["params"]:
            if pid not in state_dict["state"]:
                continue
            for name, value in state_dict["state"][pid].items():
                occurrences[name] += 1
                k = f"{name}.{occurrences[name]}"
                if torch.is_tensor(value):
                    tensors.append((k, value))
                else:
                    scalars[k] = value
                    setters[k] = lambda v, pid=pid, name=name: state_dict["state"][pid].__setitem__(name, v)
    # optimizer.state_dict() shares tensors with optimizer.state, so in-place broadcasts land there.
    broadcast_parameters(tensors, root_rank)
    for k, v in broadcast_object(scalars, root_rank, name="optimizer.scalars").items():
        setters[k](v)  # state_dict()["state"] shares its per-parameter dicts with optimizer.state


def _plain_step(optimizer) -> None:
    from . import optimizer as _opt

    if type(optimizer).__module__ == _opt.__name__:  # DistributedOptimizer: skip the gradient allreduce
        super(optimizer.__class__, optimizer).step()
    else:
        optimizer.step()
