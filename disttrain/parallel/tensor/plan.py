"""Tensor-parallel plans: which module gets which style, and applying them.

A plan maps module-path globs (``fnmatch`` over ``model.named_modules()`` names, ``*``
matching a layer index) to a style:

=================  =====================================================================
``colwise``        nn.Linear / transformers Conv1D, output features split (input replicated)
``rowwise``        nn.Linear / Conv1D, input features split (pairs after a colwise layer)
``vocab``          nn.Embedding split by token id (vocab-parallel embedding)
``replicate``      any module: stays whole on every tp rank (says so explicitly)
``sequence``       any module between a rowwise and the next colwise layer (norms, dropout):
                   runs on a sequence shard (Megatron sequence parallelism; turns it on)
``colwise_gather`` colwise, then the output allgathered (a head whose logits a loss needs whole)
``colwise_qkv``    colwise on a fused q/k/v projection (three chunks, each split by heads)
``colwise_packed`` colwise on a fused gate/up projection (two chunks)
``divide:a,b``     any module: its integer attributes ``a`` and ``b`` are widths of a split
                   layer its forward reads (a reshape by an embedding width): divided by tp
=================  =====================================================================

A projection wrapped by a peft LoRA layer takes its style with its adapters (:mod:`.lora`).

The parent of a colwise layer has its head counts (``HEAD_ATTRS``) divided by tp, and the
common width names (``WIDTH_ATTRS``: ``embed_dim``, ``hidden_size``, ...) where they divide. If
such a module's first forward under tp raises, the error is a :class:`PlanError` naming the
module and the width attributes it holds, with the ``divide:`` entry that may fix it.

transformers' names are accepted as written in its models' plans (``colwise_gather_output``,
``embedding_rowwise``, ``sequence_parallel``, ``packed_colwise``, ``local_colwise``, ...).

Where the plan comes from (:func:`resolve_plan`): ``parallel.tp.plan`` in the YAML; else the
model's own (transformers ``model._tp_plan`` or ``config.base_model_tp_plan``; the built-in
GPT's ``_tp_plan``; a user's model may declare ``_tp_plan`` the same way); else a built-in
plan for a known family (transformers GPT-2). A bad plan raises :class:`PlanError` (a
ConfigError: exit 2) naming the key, the glob and the module type.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import logging

import torch.nn as nn

from ...errors import ConfigError
from ..mesh import DeviceMesh
from .lora import is_lora_layer, lora_problem, parallel_lora
from .parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPContext,
    VocabParallelEmbedding,
    apply_sequence_region,
)

log = logging.getLogger(__name__)

STYLES = ("colwise", "rowwise", "vocab", "replicate", "sequence", "colwise_gather", "colwise_qkv", "colwise_packed")
ALIASES = {
    "colwise_gather_output": "colwise_gather",
    "colwise_rep": "colwise_gather",
    "local_colwise": "colwise",
    "local_rowwise": "rowwise",
    "embedding_rowwise": "vocab",
    "vocab_embedding": "vocab",
    "sequence_parallel": "sequence",
    "packed_colwise": "colwise_packed",
    "local_packed_colwise": "colwise_packed",
    "colwise_heads": "colwise_qkv",
    "replicated": "replicate",
}
PARTITIONS = {"colwise": 1, "colwise_gather": 1, "colwise_qkv": 3, "colwise_packed": 2}
# Head-count attributes a module keeps next to its projections; divided by tp on the parent of
# a colwise layer (GPT-2 splits its fused qkv by ``split_size``).
HEAD_ATTRS = (
    "num_heads",
    "n_head",
    "n_heads",
    "num_attention_heads",
    "num_key_value_heads",
    "num_kv_heads",
    "n_kv_heads",
    "split_size",
    "all_head_size",
)

# Width attributes a module may read in its forward to split or reshape a colwise layer's output;
# divided by tp on the parent of a colwise layer where they divide evenly.
WIDTH_ATTRS = ("embed_dim", "hidden_size", "inner_dim", "d_model", "intermediate_size", "qkv_dim", "kv_dim")
DIVIDE = "divide:"

GPT2_PLAN = {  # transformers GPT-2 declares none; Conv1D layers, a fused c_attn, the head tied to wte
    "transformer.wte": "vocab",
    "transformer.h.*.attn.c_attn": "colwise_qkv",
    "transformer.h.*.attn.c_proj": "rowwise",
    "transformer.h.*.mlp.c_fc": "colwise",
    "transformer.h.*.mlp.c_proj": "rowwise",
    "lm_head": "colwise_gather",
}
FAMILY_PLANS = {"GPT2LMHeadModel": GPT2_PLAN}


class PlanError(ConfigError):
    """A tensor-parallel plan that does not fit the model (exit 2: a configuration error)."""

    def __init__(self, message: str):
        super().__init__([message])


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _is_linear(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Linear):
        return True
    conv1d = _conv1d_type() if type(mod).__name__ == "Conv1D" else None
    return conv1d is not None and isinstance(mod, conv1d)


def resolve_plan(model: nn.Module, plan: dict[str, str] | None) -> tuple[dict[str, str], str, bool]:
    """(plan, where it came from, strict): strict plans (the user's) must match every glob."""
    if plan:
        return dict(plan), "parallel.tp.plan", True
    name = type(model).__name__
    own = getattr(model, "_tp_plan", None)
    if own:
        return dict(own), f"the model's own plan ({name}._tp_plan)", False
    config = getattr(model, "config", None)
    base = getattr(config, "base_model_tp_plan", None)
    if base:
        prefix = getattr(model, "base_model_prefix", "")
        if prefix and isinstance(getattr(model, prefix, None), nn.Module):
            base = {f"{prefix}.{k}": v for k, v in base.items()}
        return dict(base), f"the model's own plan ({name}.config.base_model_tp_plan)", False
    if name in FAMILY_PLANS:
        return dict(FAMILY_PLANS[name]), f"disttrain's plan for {name}", False
    raise PlanError(
        f"parallel.tp.plan: {name} declares no tensor-parallel plan and none is configured"
        "\nHINT: set parallel.tp.plan, e.g. {'blocks.*.attn.q': colwise, 'blocks.*.attn.out': rowwise}, "
        "or parallel.tp.parallelize: 'pkg.mod:fn'"
    )


def _canonical(style: str, key: str, glob: str) -> str:
    if style.startswith(DIVIDE):
        attrs = [a for a in style[len(DIVIDE) :].split(",") if a]
        if not attrs or not all(a.isidentifier() for a in attrs):
            raise PlanError(f"{key}: {glob!r}: {style!r} names no attributes\nHINT: e.g. 'divide:hidden,width'")
        return style
    s = ALIASES.get(style, style)
    if s not in STYLES:
        raise PlanError(f"{key}: {glob!r}: unknown style {style!r}\nHINT: known styles: {', '.join(STYLES)}")
    return s


def _check(name: str, mod: nn.Module, style: str, parent: nn.Module, key: str, glob: str, tp: int) -> None:
    where = f"{key}: {glob!r} -> {style}: {name!r} is a {type(mod).__name__}"
    if style == "vocab":
        if not isinstance(mod, nn.Embedding):
            raise PlanError(f"{where}, which {style} cannot apply to\nHINT: {style} applies to nn.Embedding")
        if mod.num_embeddings < tp:
            raise PlanError(f"{where} of {mod.num_embeddings} rows, fewer than tp={tp}")
        return
    if style in ("replicate", "sequence"):
        return
    if style.startswith(DIVIDE):
        for attr in style[len(DIVIDE) :].split(","):
            v = mod.__dict__.get(attr)
            if not isinstance(v, int) or isinstance(v, bool) or v % tp:
                raise PlanError(f"{where}: attribute {attr!r} is {v!r}, not an integer that divides by tp={tp}")
        return
    if is_lora_layer(mod):  # peft LoRA around a projection: the base is split, the adapters with it
        why = lora_problem(mod, style)
        if why:
            raise PlanError(f"{where}: {why}")
        mod = mod.base_layer
    if not _is_linear(mod):
        raise PlanError(
            f"{where}, which {style} cannot apply to\nHINT: {style} applies to nn.Linear and transformers' Conv1D; "
            "name the projections inside it (e.g. '...q_proj'), or use replicate/sequence"
        )
    w = mod.weight
    n_in, n_out = (w.shape[1], w.shape[0]) if isinstance(mod, nn.Linear) else (w.shape[0], w.shape[1])
    if style == "rowwise":  # uneven splits are fine: the colwise layer before it splits the same way
        if n_in < tp:
            raise PlanError(f"{where} with {n_in} input features, fewer than tp={tp}")
        return
    parts = PARTITIONS[style]
    if n_out % parts or n_out // parts < tp:
        raise PlanError(f"{where} with {n_out} output features, which do not split into {parts} chunks x tp={tp}")
    if style != "colwise_gather":
        for attr in HEAD_ATTRS:
            v = parent.__dict__.get(attr)
            if isinstance(v, int) and not isinstance(v, bool) and v % tp:
                raise PlanError(
                    f"{where}: its parent {type(parent).__name__} keeps {attr} = {v}, which does not divide by "
                    f"tp={tp}\nHINT: choose tp dividing {attr}"
                )
    head_dim = getattr(parent, "head_dim", None)
    if isinstance(head_dim, int) and head_dim > 0 and (n_out // parts) % (head_dim * tp):
        raise PlanError(
            f"{where}: {n_out // parts // head_dim} heads of head_dim {head_dim} "
            f"({type(parent).__name__}.head_dim) do not split across tp={tp}\nHINT: choose tp dividing the head count"
        )


def _adjust_heads(parent: nn.Module, name: str, tp: int, done: dict[int, tuple]) -> None:
    if id(parent) in done:
        return
    changed = {}
    for attr in HEAD_ATTRS + WIDTH_ATTRS:  # head counts' divisibility was checked by _check
        v = parent.__dict__.get(attr)
        if isinstance(v, int) and not isinstance(v, bool) and (attr in HEAD_ATTRS or v % tp == 0):
            setattr(parent, attr, v // tp)
            changed[attr] = v
    done[id(parent)] = (parent, name.rpartition(".")[0], changed)


def _divide(mod: nn.Module, name: str, attrs: list[str], tp: int, done: dict[int, tuple]) -> None:
    changed = done.get(id(mod), (mod, name, {}))[2]
    for attr in attrs:  # checked by _check
        changed[attr] = mod.__dict__[attr]
        setattr(mod, attr, mod.__dict__[attr] // tp)
    done[id(mod)] = (mod, name, changed)


def _report_first_forward(mod: nn.Module, name: str, changed: dict[str, int], tp: int) -> None:
    """An exception in ``mod``'s first forward under tp is most likely a width it reads that the plan
    did not divide: re-raise it as a PlanError naming the module and its width attributes."""
    original = mod.forward

    def first(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except PlanError:
            raise
        except Exception as exc:
            ints = {
                k: v for k, v in vars(mod).items() if isinstance(v, int) and not isinstance(v, bool) and k[0] != "_"
            }
            raise PlanError(
                f"tensor parallel (tp={tp}): {type(mod).__name__} {name!r} failed in its first forward "
                f"({type(exc).__name__}: {exc}); divided for tp: {changed} (were); its integer attributes now: "
                f"{ints}\nHINT: if its forward reads another width of the split layers, name it in the plan: "
                f"parallel.tp.plan: {{'{name}': 'divide:ATTR'}}"
            ) from exc
        finally:
            mod.forward = original

    mod.forward = first


def apply_tp_plan(
    model: nn.Module,
    ctx: TPContext,
    plan: dict[str, str],
    key: str = "parallel.tp.plan",
    strict: bool = True,
    loss_parallel: bool = True,
) -> nn.Module:
    """Replace the modules named by ``plan`` by their tensor-parallel versions, in place.
    Every rank of the tp group calls it after building the same full model (same seed).
    With ``loss_parallel``, a gathered output head (the model's last layer) keeps its logits
    split by vocabulary instead (the loss is then vocab-parallel). Local: no communication.
    Raises PlanError before changing anything if the plan is bad."""
    modules = dict(model.named_modules())
    named = [n for n in modules if n]
    chosen: dict[str, tuple[str, str]] = {}  # module name -> (style, glob)
    styles = {g: _canonical(s, key, g) for g, s in plan.items()}
    for glob, style in styles.items():
        names = [n for n in named if fnmatch.fnmatchcase(n, glob)]
        if not names:
            if strict:
                close = difflib.get_close_matches(glob, named, n=3)
                raise PlanError(
                    f"{key}: {glob!r} matches no module of {type(model).__name__}"
                    + (f"\nHINT: did you mean {', '.join(map(repr, close))}?" if close else "")
                )
            log.debug("%s: %r matches nothing in %s", key, glob, type(model).__name__)
        for n in names:
            parent_name = n.rpartition(".")[0]
            _check(n, modules[n], style, modules[parent_name] if parent_name else model, key, glob, ctx.size)
            chosen[n] = (style, glob)
    leaves = [
        n
        for n in named
        if not any(True for _ in modules[n].children()) and any(True for _ in modules[n].parameters(recurse=False))
    ]
    if loss_parallel and leaves and chosen.get(leaves[-1], ("",))[0] == "colwise_gather":
        chosen[leaves[-1]] = ("colwise", chosen[leaves[-1]][1])
    ctx.sequence_parallel = any(s == "sequence" for s, _ in chosen.values())
    if ctx.size == 1:
        return model
    shared: dict = {}  # tied parameters stay one object after splitting
    heads_done: dict[int, tuple] = {}  # module -> (module, name, {attribute: value before})
    for n, (style, _glob) in chosen.items():
        mod = modules[n]
        parent_name, _, attr = n.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        if style == "replicate":
            continue
        if style.startswith(DIVIDE):
            _divide(mod, n, style[len(DIVIDE) :].split(","), ctx.size, heads_done)
            continue
        if style == "sequence":
            apply_sequence_region(mod, ctx)
            continue
        if style == "vocab":
            new = VocabParallelEmbedding(mod, ctx, shared)
        elif is_lora_layer(mod):
            new = parallel_lora(mod, style, PARTITIONS.get(style, 1), ctx, shared)
            if style not in ("rowwise", "colwise_gather"):
                _adjust_heads(parent, n, ctx.size, heads_done)
        elif style == "rowwise":
            new = RowParallelLinear(mod, ctx, shared)
        else:
            new = ColumnParallelLinear(mod, ctx, PARTITIONS[style], style == "colwise_gather", shared)
            if style != "colwise_gather":
                _adjust_heads(parent, n, ctx.size, heads_done)
            elif id(parent) not in heads_done:
                heads_done[id(parent)] = (parent, parent_name, {})
        setattr(parent, attr, new)
    for mod, name, changed in heads_done.values():
        _report_first_forward(mod, name, changed, ctx.size)
    return model


_ACTIVE: list[TPContext] = []  # the strategy's context while a parallelize hook runs


def apply_plan(model: nn.Module, mesh: DeviceMesh, plan: dict[str, str]) -> nn.Module:
    """For ``parallel.tp.parallelize`` hooks: apply ``plan`` to (part of) ``model`` with the
    strategy's tp context (its dropout streams included). Every tp rank, locally."""
    ctx = _ACTIVE[-1] if _ACTIVE else TPContext(mesh.group("tp"), mesh.size("tp"), mesh.index("tp"))
    return apply_tp_plan(model, ctx, plan, "parallel.tp.parallelize", strict=True, loss_parallel=False)


def import_target(spec: str, key: str):
    """``"pkg.mod:fn"`` -> the callable, or PlanError naming ``key``."""
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise PlanError(f"{key}: {spec!r} is not 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise PlanError(f"{key}: cannot import {spec!r} ({type(exc).__name__}: {exc})") from None
    if not callable(fn):
        raise PlanError(f"{key}: {spec!r} is not callable")
    return fn


def apply_tensor_parallel(
    model: nn.Module,
    mesh: DeviceMesh,
    ctx: TPContext,
    plan: dict[str, str] | None = None,
    parallelize: str | None = None,
    loss_parallel: bool = True,
) -> nn.Module:
    """Every rank, once: tensor-parallelise ``model`` by ``parallelize`` (``fn(model, mesh)``, which
    does all of it) or by the plan (configured, or the model's own). With ``loss_parallel`` a
    gathered head keeps its logits split by vocabulary (the loss is vocab-parallel). Local."""
    if parallelize:
        fn = import_target(parallelize, "parallel.tp.parallelize")
        _ACTIVE.append(ctx)
        try:
            out = fn(model, mesh)
        finally:
            _ACTIVE.pop()
        return model if out is None else out
    resolved, key, strict = resolve_plan(model, plan)
    return apply_tp_plan(model, ctx, resolved, key, strict, loss_parallel)
