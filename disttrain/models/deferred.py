"""Deferred initialisation: build a model with no memory, then materialise only what a rank keeps.

``record_build(factory)`` calls the model factory on the meta device under a dispatch mode that logs
every op touching a meta tensor (factory ops, in-place initialisers, the out-of-place ops that compute
buffers such as rotary tables). The model that comes back has meta parameters and buffers and costs
nothing. ``Recording.replay(sink)`` later runs the same ops on the CPU in the same order, from the
random generator state the factory started from, so every value equals an eager build's on the same
seed (the equivalence tests rely on this). Each tensor is materialised whole only for the span of
ops that decide its final value: an initialiser whose result a later full overwrite discards (a
``Linear``'s own ``reset_parameters`` before the model's ``_init_weights``) runs on a scratch tensor
that is freed at once (it must still draw from the generator). When a tensor's last op has run the
sink receives its final value and keeps what the rank needs (a ZeRO-3 shard, a tensor-parallel slice,
the whole tensor, or nothing for another pipeline stage's weights); the full value is then dropped.
So the peak beyond the rank's own share is about one tensor.

A factory that cannot run on meta (it reads a value with ``.item()``, loads a file, mixes devices)
makes ``record_build`` fall back to the eager build, with a warning naming why.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

log = logging.getLogger(__name__)

# In-place ops that write every element of their target without reading it.
_OVERWRITES = {
    "normal_",
    "uniform_",
    "zero_",
    "fill_",
    "random_",
    "bernoulli_",
    "exponential_",
    "geometric_",
    "log_normal_",
    "cauchy_",
    "copy_",
}


def _key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (aliases and views share it)."""
    return t.untyped_storage()._cdata


def _is_meta(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_meta


@dataclass(frozen=True)
class _Ref:
    """A meta tensor as the log keeps it: its storage and its geometry (never the tensor object,
    which a strategy may later turn into a real one)."""

    key: int
    nbytes: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype

    @staticmethod
    def of(t: torch.Tensor) -> _Ref:
        return _Ref(_key(t), t.untyped_storage().nbytes(), tuple(t.shape), t.stride(), t.storage_offset(), t.dtype)

    def on(self, base: torch.Tensor) -> torch.Tensor:
        """This tensor over ``base``, the real storage as flat bytes."""
        return base.view(self.dtype).as_strided(self.shape, self.stride, self.offset)


@dataclass
class _Op:
    func: object
    args: tuple
    kwargs: dict
    out: list[_Ref]  # the meta tensors the op returned, in order
    writes: int | None = None  # storage written in place (the op's first argument), if any
    full: bool = False  # that write covers the whole storage and reads nothing of it
    reads: set[int] = field(default_factory=set)  # meta storages read (other than an in-place self)
    creates: list[int] = field(default_factory=list)  # meta storages first produced here

    def touched(self) -> set[int]:
        return self.reads | set(self.creates) | ({self.writes} if self.writes is not None else set())


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[_Op] = []
        self.storages: dict[int, torch.UntypedStorage] = {}  # keeps every key unique while recording lives

    def _ref(self, x):
        if not _is_meta(x):
            return x
        self.storages.setdefault(_key(x), x.untyped_storage())
        return _Ref.of(x)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat_in = [x for x in tree_flatten((args, kwargs))[0] if _is_meta(x)]
        flat_out = [x for x in tree_flatten(out)[0] if _is_meta(x)]
        if not flat_in and not flat_out:
            return out
        known = set(self.storages)
        op = _Op(func, tree_map(self._ref, args), tree_map(self._ref, kwargs), [self._ref(x) for x in flat_out])
        name = func._schema.name.split("::")[-1]
        inplace = name.endswith("_") or func._schema.is_mutable
        first = args[0] if args else None
        if inplace and _is_meta(first):
            op.writes = _key(first)
            op.full = name in _OVERWRITES and first.numel() * first.element_size() == first.untyped_storage().nbytes()
        for x in flat_in:
            k = _key(x)
            if k != op.writes or not inplace:
                op.reads.add(k)
        for x in flat_out:
            k = _key(x)
            if k not in known and k not in op.creates:
                op.creates.append(k)
        self.ops.append(op)
        return out


@dataclass
class Pending:
    """How a model still to be materialised gets its values: a recording (None: the model is real
    already), and pretrained weights to load over it. ``state``: first name -> every name of each
    tensor ``state_dict()`` holds (parameters, then persistent buffers), with ``shapes``."""

    recording: Recording | None
    state: dict[str, list[str]]
    shapes: dict[str, tuple[int, ...]]
    pretrained: str | None = None
    strict: bool = True


# Model -> what is pending for it, until materialised.
_PENDING: weakref.WeakKeyDictionary[nn.Module, Pending] = weakref.WeakKeyDictionary()


def pending(model: nn.Module) -> Pending | None:
    """What a model built by :func:`record_build` (or given pretrained weights) still needs, else None."""
    return _PENDING.get(model)


def forget(model: nn.Module) -> None:
    _PENDING.pop(model, None)


def state_names(model: nn.Module) -> tuple[dict[str, list[str]], dict[str, tuple[int, ...]]]:
    """first name -> all names, and shapes, of the tensors ``model.state_dict()`` holds."""
    names: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for n, t in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(t), []).append(n)
        tensors[id(t)] = t
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for b, t in mod._buffers.items():
            if t is not None and b not in mod._non_persistent_buffers_set:
                names.setdefault(id(t), []).append(f"{mod_name}.{b}" if mod_name else b)
                tensors[id(t)] = t
    return {ns[0]: ns for ns in names.values()}, {ns[0]: tuple(tensors[k].shape) for k, ns in names.items()}


def set_pretrained(model: nn.Module, path: str, strict: bool) -> None:
    """Load ``path`` into ``model`` when it is materialised (see :mod:`disttrain.parallel.materialize`)."""
    p = _PENDING.get(model)
    if p is None:
        state, shapes = state_names(model)
        p = _PENDING[model] = Pending(None, state, shapes)
    p.pretrained, p.strict = path, strict


class Recording:
    """The ops that built a meta model, and the generator state they started from."""

    def __init__(self, model: nn.Module, ops: list[_Op], storages: dict, rng: torch.Tensor):
        self.ops, self.rng, self._storages = ops, rng, storages
        # Every name (parameters, then buffers; aliases included) of each storage the model keeps.
        self.names: dict[int, list[str]] = {}
        self.refs: dict[str, _Ref] = {}
        for n, t in [*model.named_parameters(remove_duplicate=False), *_named_buffers(model)]:
            if t.is_meta:
                self._storages.setdefault(_key(t), t.untyped_storage())
                self.refs[n] = _Ref.of(t)
                self.names.setdefault(_key(t), []).append(n)

    def key_of(self, name: str) -> int | None:
        ref = self.refs.get(name)
        return None if ref is None else ref.key

    def replay(self, sink: Callable[[int, torch.Tensor], None], skip: set[str] = frozenset()) -> None:
        """Run the recorded ops on the CPU from the recorded generator state; call ``sink(key, value)``
        once per kept storage (``names[key]``) as soon as its value is final (``value``: the storage as
        flat bytes; :meth:`view` cuts a named tensor out of it). Storages all of whose names are in
        ``skip`` (loaded from elsewhere) are not computed. Leaves the generator where an eager build
        would. Local; no communication."""
        ops = self.ops
        last_use: dict[int, int] = {}
        first_read: dict[int, int] = {}  # storage -> first op that reads it into another tensor
        for i, op in enumerate(ops):
            for k in op.touched():
                last_use[k] = i
            for k in op.reads:
                first_read.setdefault(k, i)
        start: dict[int, int] = {}  # storage -> the op from which its value matters
        for i, op in enumerate(ops):
            for k in op.creates:
                start.setdefault(k, i)
            if op.full and op.writes is not None and first_read.get(op.writes, len(ops)) >= i:
                start[op.writes] = i
        skipped = {k for k, ns in self.names.items() if all(n in skip for n in ns)}
        real: dict[int, torch.Tensor] = {}  # storage -> its real bytes
        torch.set_rng_state(self.rng)
        for i, op in enumerate(ops):
            touched = op.touched()
            if touched and touched <= skipped:
                continue
            w = op.writes
            self._run(op, real, scratch=w is not None and (i < start.get(w, 0) or w in skipped))
            for k in touched:
                if start.get(k, 0) > i:  # a later full overwrite decides its value: not kept until then
                    real.pop(k, None)
                elif last_use[k] == i:
                    done = real.pop(k, None)
                    if k in self.names and done is not None and k not in skipped:
                        sink(k, done)
        for k in self.names:  # kept storages no op touched: zeros
            if k not in last_use and k not in skipped:
                sink(k, torch.zeros(self._storages[k].nbytes(), dtype=torch.uint8))

    def view(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Tensor ``name`` inside its storage's ``value`` (flat bytes, as handed to the sink)."""
        return self.refs[name].on(value)

    @staticmethod
    def _run(op: _Op, real: dict[int, torch.Tensor], scratch: bool) -> None:
        """One op on real tensors. ``scratch``: its in-place target's value is discarded later, so it
        runs on a throwaway buffer (it must still draw from the generator)."""
        throwaway: dict[int, torch.Tensor] = {}

        def to_real(x):
            if isinstance(x, torch.device) and x.type == "meta":
                return torch.device("cpu")
            if not isinstance(x, _Ref):
                return x
            if scratch and x.key == op.writes:
                if x.key not in throwaway:
                    throwaway[x.key] = torch.empty(x.nbytes, dtype=torch.uint8)
                return x.on(throwaway[x.key])
            if x.key not in real:  # first use whose value matters (earlier writes were discarded)
                real[x.key] = torch.zeros(x.nbytes, dtype=torch.uint8)
            return x.on(real[x.key])

        args, kwargs = tree_map(to_real, op.args), tree_map(to_real, op.kwargs)
        out = op.func(*args, **kwargs)
        if op.func._schema.name.split("::")[-1].startswith("empty") and isinstance(out, torch.Tensor):
            out.zero_()  # every rank must hold the same bytes (an eager build broadcasts rank 0's)
        reals = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        for ref, r in zip(op.out, reals):
            if ref.key not in real and not (scratch and ref.key == op.writes):
                s = r.untyped_storage()
                real[ref.key] = torch.empty(0, dtype=torch.uint8).set_(s, 0, (s.nbytes(),), (1,))


def _named_buffers(model: nn.Module):
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for name, buf in mod._buffers.items():
            if buf is not None:
                yield (f"{mod_name}.{name}" if mod_name else name), buf


@contextlib.contextmanager
def _transformers_initialise_on_meta():
    """transformers skips a model's own initialisation when it sees a meta device (it expects a checkpoint
    to fill the weights); while recording it must run, so that replay initialises as an eager build."""
    import sys

    mu = sys.modules.get("transformers.modeling_utils")
    if mu is None:
        try:
            import transformers.modeling_utils as mu
        except ImportError:
            yield
            return
    probe = getattr(mu, "get_torch_context_manager_or_global_device", None)
    if probe is None:
        yield
        return
    mu.get_torch_context_manager_or_global_device = lambda: None
    try:
        yield
    finally:
        mu.get_torch_context_manager_or_global_device = probe


def record_build(factory: Callable[[], nn.Module], what: str, transformers: bool = True) -> nn.Module:
    """Call ``factory()`` on the meta device, recording how it initialises; returns the meta model (its
    recording is :func:`pending` until materialised). If the factory cannot run on meta, the eager
    model, with a warning naming ``what`` and why. Local; call after seeding, as for an eager build."""
    rng = torch.get_rng_state()
    rec = _Recorder()
    try:
        hf = _transformers_initialise_on_meta() if transformers else contextlib.nullcontext()
        with torch.device("meta"), hf, rec:
            model = factory()
    except Exception as exc:  # noqa: BLE001 -- any failure on meta means: build it eagerly
        log.warning(
            "%s: deferred initialisation not possible (%s: %s); building the whole model", what, type(exc).__name__, exc
        )
        torch.set_rng_state(rng)
        return factory()
    if not isinstance(model, nn.Module):
        torch.set_rng_state(rng)
        return factory()
    real = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if not t.is_meta]
    if real:
        log.warning(
            "%s: deferred initialisation not possible (%s is created off the meta device); building the whole model",
            what,
            real[0],
        )
        torch.set_rng_state(rng)
        return factory()
    state, shapes = state_names(model)
    _PENDING[model] = Pending(Recording(model, rec.ops, rec.storages, rng), state, shapes)
    return model
