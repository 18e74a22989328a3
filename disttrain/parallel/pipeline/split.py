"""Splitting any model into pipeline stages.

A model is seen as an ordered list of *units* (each one module path, or a few that belong
together such as GPT-2's ``wte``/``wpe``/``drop``); a stage is a contiguous run of units.

* Known families have their units and a stage forward in ``families.py``: transformers
  Llama-style causal LMs and GPT-2, and any model declaring ``pipeline_stages()`` (the demo
  GPT). Stages are balanced by parameter count unless ``parallel.pipeline.split`` says where
  they begin.
* Any other model: ``split: [paths]`` lists the module paths where stages 2..n begin; the
  units are the model's children, opened up along the way to each split path (so
  ``blocks.2`` makes ``blocks.0``, ``blocks.1``, ... units), and a stage runs its units in
  order, each on the previous one's output; ``stage_forward: "pkg.mod:fn"`` (called as
  ``fn(stage, x)``) covers models whose forward is not a plain sequence.
* ``split: "pkg.mod:fn"``: ``fn(model, num_stages)`` returns the stage modules itself; each
  is called as ``stage_module(x)``.

Each rank keeps only its own stages' modules (the others are dropped from the model, so
their memory is freed); parameter names stay those of the single-process model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch.nn as nn

from ..tensor.plan import PlanError, import_target
from .families import Unit, family


class PipelineStage(nn.Module):
    """One stage (or virtual chunk) of the model: its units, run by ``forward_fn(stage, x)``."""

    def __init__(self, root: nn.Module, units: list[Unit], index: int, count: int, forward_fn):
        super().__init__()
        self.index, self.count, self.unit_names = index, count, units
        mods = dict(root.named_modules())
        self.parts = nn.ModuleList(nn.ModuleList(mods[p] for p in u) for u in units)
        self._root = [root]  # not a submodule: the stage owns only its units
        self._forward = forward_fn

    @property
    def root(self) -> nn.Module:
        return self._root[0]

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1

    def units(self):
        """[(unit paths, [modules])] in order."""
        return [(u, list(m)) for u, m in zip(self.unit_names, self.parts)]

    def forward(self, x):
        return self._forward(self, x)


class _UserStage(nn.Module):
    """A stage module returned by a split target: called as ``module(x)``."""

    def __init__(self, module: nn.Module, index: int, count: int):
        super().__init__()
        self.module, self.index, self.count = module, index, count

    def forward(self, x):
        return self.module(x)


def sequential_forward(stage: PipelineStage, x):
    """The default: each unit's modules in order, each on the previous output."""
    for _, mods in stage.units():
        for m in mods:
            x = m(x)
    return x


def _expanded_units(model: nn.Module, split: list[str]) -> list[Unit]:
    """The model's children, opened up along the path to every split point."""
    out: list[Unit] = []

    def walk(prefix: str, mod: nn.Module):
        for name, child in mod.named_children():
            path = f"{prefix}{name}"
            if any(s.startswith(path + ".") for s in split):
                walk(path + ".", child)
            else:
                out.append((path,))

    walk("", model)
    return out


def balance(costs: list[int], stages: int) -> list[int]:
    """Start index of each stage in a contiguous split of ``costs`` minimising the largest stage."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    starts, i = [], n
    for k in range(stages, 0, -1):
        i = cut[k][i]
        starts.append(i)
    return starts[::-1]


def plan_stages(model: nn.Module, num_stages: int, split: list[str] | None) -> tuple[list[list[Unit]], Callable]:
    """Every rank, locally and identically: the units of each stage, and the family forward."""
    fam = family(model)
    if fam is None and not split:
        raise PlanError(
            f"parallel.pipeline.split: {type(model).__name__} is not a known family (transformers Llama/Qwen2/"
            "Mistral or GPT-2) and declares no pipeline_stages(), so the stages need to be named"
            f"\nHINT: set parallel.pipeline.split to the {num_stages - 1} module paths where stages 2.. begin, "
            "e.g. ['blocks.2'], or a target 'pkg.mod:fn' returning the stage modules"
        )
    units, forward = fam if fam is not None else (_expanded_units(model, split), sequential_forward)
    if split:
        split = list(split)
        if len(split) == num_stages and split[0] == units[0][0]:
            split = split[1:]
        if len(split) != num_stages - 1:
            raise PlanError(
                f"parallel.pipeline.split: {len(split)} paths for {num_stages} stages"
                f"\nHINT: list the {num_stages - 1} module paths where stages 2..{num_stages} begin"
            )
        heads = [u[0] for u in units]
        starts = [0]
        for path in split:
            if path not in heads:
                close = [h for h in heads if fnmatch.fnmatchcase(h, path + "*")][:3] or heads[1:4]
                raise PlanError(
                    f"parallel.pipeline.split: {path!r} does not begin a unit of {type(model).__name__}"
                    f"\nHINT: stages can begin at e.g. {', '.join(map(repr, close))}"
                )
            starts.append(heads.index(path))
        if starts != sorted(set(starts)):
            raise PlanError(f"parallel.pipeline.split: {split} is not in model order, or repeats a path")
    else:
        if len(units) < num_stages:
            raise PlanError(
                f"parallel.pipeline: {type(model).__name__} has {len(units)} pipeline units, fewer than "
                f"{num_stages} stages\nHINT: use fewer stages (pp x virtual_stages <= {len(units)})"
            )
        mods = dict(model.named_modules())
        costs = [sum(p.numel() for path in u for p in mods[path].parameters()) for u in units]
        starts = balance(costs, num_stages)
    bounds = starts + [len(units)]
    return [units[bounds[i] : bounds[i + 1]] for i in range(num_stages)], forward


def build_stages(
    model: nn.Module,
    num_stages: int,
    mine: list[int],
    split: list[str] | str | None = None,
    stage_forward: str | None = None,
    stage_params: dict[int, set[str]] | None = None,
    logical: dict[int, str] | None = None,
) -> list[nn.Module]:
    """Every rank: the stage modules with global indices ``mine`` (in order); the model keeps
    only their modules. Fills ``stage_params`` (stage -> names of the parameters it holds, by
    ``logical``: id -> name) for every stage, so tied weights across stages can be found.
    Local, no communication; the same split on every rank."""
    logical = logical if logical is not None else {id(p): n for n, p in model.named_parameters()}
    stage_params = stage_params if stage_params is not None else {}
    if isinstance(split, str):
        fn = import_target(split, "parallel.pipeline.split")
        stages = list(fn(model, num_stages))
        if len(stages) != num_stages or not all(isinstance(s, nn.Module) for s in stages):
            raise PlanError(
                f"parallel.pipeline.split: {split} returned {len(stages)} objects; expected {num_stages} modules"
            )
        for i, st in enumerate(stages):
            stage_params[i] = {logical.get(id(p), f"stage{i}.{n}") for n, p in st.named_parameters()}
        return [_UserStage(stages[i], i, num_stages) for i in mine]
    plan, forward = plan_stages(model, num_stages, split)
    if stage_forward:
        forward = import_target(stage_forward, "parallel.pipeline.stage_forward")
    mods = dict(model.named_modules())
    for i, units in enumerate(plan):
        stage_params[i] = {logical[id(p)] for u in units for path in u for p in mods[path].parameters()}
    keep = {p for i in mine for u in plan[i] for p in u}
    _drop_others(model, [p for i in range(num_stages) if i not in mine for u in plan[i] for p in u], keep)
    return [PipelineStage(model, plan[i], i, num_stages, forward) for i in mine]


class TiedNames(nn.Module):
    """What is left of a module another stage runs when it shares parameters with this rank's modules
    (an LM head tied to the embedding): those parameters under their names, no computation. The
    model then still names every tied parameter it holds (``state_dict``, checkpoints' aliases)."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("a module of another pipeline stage was called on this rank")


def _drop_others(model: nn.Module, paths: list[str], keep: set[str]) -> None:
    mods = dict(model.named_modules())
    kept = {id(p) for path in keep for p in mods[path].parameters()}
    for path in paths:
        if path in keep:
            continue
        parent, _, attr = path.rpartition(".")
        shared = [(n, p) for n, p in mods[path].named_parameters(remove_duplicate=False) if id(p) in kept]
        mods[parent if parent else ""]._modules[attr] = _tied_names(shared) if shared else None


def _tied_names(shared: list[tuple[str, nn.Parameter]]) -> TiedNames:
    root = TiedNames()
    for name, p in shared:
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if part not in m._modules:
                m._modules[part] = TiedNames()
            m = m._modules[part]
        m.register_parameter(leaf, p)
    return root
