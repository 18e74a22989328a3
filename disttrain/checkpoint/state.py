"""Trainer-level state that is not a tensor of the model: step, RNG streams, data position,
learning-rate position and the resolved config, as JSON (byte tensors as base64).

The data position is the step (``GlobalBatchSampler``: batch ``s`` is a pure function of
the seed and ``s``), and so is the lr schedule position, so both reshard to any world size.

The ``model`` record says what a consolidated file needs beyond the tensors: the other names of
tied parameters and buffers (``aliases``: GPT-2's ``lm_head.weight`` -> ``transformer.wte.weight``),
the model's class, and for a transformers ``PreTrainedModel`` its config as JSON (what
``disttrain ckpt export`` writes as ``config.json``). Never a pickle.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import sys
from typing import Protocol

import numpy as np
import torch

from ..data.stream import StreamSampler
from ..parallel.buffers import aliases, untrained_state
from ..parallel.strategy import Strategy
from .errors import CheckpointFormatError

log = logging.getLogger(__name__)


class TrainingRun(Protocol):
    """What the checkpointer reads and sets on the run it saves (the trainer, or the Python API's run)."""

    cfg: object  # the ExperimentConfig (run.seed, train.steps, parallel, model_dump)
    comm: object  # the Communicator
    strategy: Strategy
    model: object  # the user's nn.Module (names, aliases, transformers config)
    sampler: object  # seed, batch
    run_dir: object
    schedule: object  # disttrain.schedule.Schedule: state_dict / load_state_dict
    step: int
    stop_requested: bool

    def lr(self, step: int) -> float: ...

    def notify_checkpoint(self, step: int, path: str) -> None: ...


def untrained_names(model) -> list[str]:
    """Names of the buffers and frozen parameters this rank's ``model`` holds (sorted)."""
    return sorted(n for n, _ in untrained_state(model))


def merge_untrained(shared: dict, local_states: list[dict]) -> None:
    """Rank 0, at commit: the model record's ``untrained`` list becomes the union of every rank's
    (each rank's ``local`` state carries its own: pipeline stages hold different frozen parameters)."""
    record = shared.get("model")
    if isinstance(record, dict):
        names = set(record.get("untrained") or [])
        for st in local_states:
            names.update(st.get("untrained") or [])
        record["untrained"] = sorted(names)


def model_record(model) -> dict:
    """JSON description of ``model`` for consolidation and export (class, tied names, transformers config)."""
    cls = type(model)
    rec: dict = {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "aliases": aliases(model),
        # buffers and frozen parameters: model state no optimizer steps (ckpt reshard --check); a
        # pipeline rank holds only its stages, so the commit takes the union of every rank's list
        "untrained": untrained_names(model),
    }
    tf = sys.modules.get("transformers")  # only a model built with transformers can be one of its models
    if tf is not None and isinstance(model, tf.PreTrainedModel):
        config = json.loads(model.config.to_json_string(use_diff=False))
        config["architectures"] = [cls.__name__]
        rec["transformers"] = {"architecture": cls.__name__, "version": tf.__version__, "config": config}
    return rec


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng() -> dict:
    """This rank's RNG streams: torch CPU (and CUDA), numpy, python ``random``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    out = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": {
            "kind": kind,
            "keys": base64.b64encode(keys.astype("<u4").tobytes()).decode(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(_unb64(rng["torch"]))
    n = rng["numpy"]
    keys = np.frombuffer(base64.b64decode(n["keys"]), dtype="<u4").astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in rng["cuda"]])


def capture(trainer: TrainingRun, static: dict | None = None) -> dict:
    """The JSON state of ``trainer`` shared by every rank (rank 0's copy goes in state.json).
    ``static``: a caller's cache (a dict, empty at first) for the parts a run never changes (its
    config and model record), made once instead of at every call (peer copies capture every step)."""
    cfg = trainer.cfg
    if static is None:
        static = {}
    if not static:
        static.update(config=cfg.model_dump(mode="json"), model=model_record(trainer.model))
    return {
        "step": trainer.step,
        "data": {
            "position": trainer.step,
            "sampler_seed": trainer.sampler.seed,
            "global_batch": trainer.sampler.batch,
            # a stream: samples consumed, and the dataset's own state there when it has one
            **(trainer.sampler.data_state(trainer.step) if isinstance(trainer.sampler, StreamSampler) else {}),
        },
        "lr_schedule": {"step": trainer.step, "lr": trainer.lr(trainer.step)},
        "scheduler": json.loads(json.dumps(trainer.schedule.state_dict(), default=repr)),
        "world_size": trainer.comm.world_size,
        "config": static["config"],
        "model": static["model"],
    }


_MT_WORDS = 624  # numpy's and python's Mersenne Twister state


def _need(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise CheckpointFormatError(f"{where}: {what}\nHINT: not a state disttrain writes; it was not used")


def _b64_len(v: object, n: int | None, where: str, what: str) -> None:
    _need(isinstance(v, str), where, f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(v, validate=True)
    except ValueError:
        raw = None
    _need(raw is not None and (n is None or len(raw) == n), where, f"{what} is not {n} bytes of base64")


def _is_int(v: object, lo: int = 0, hi: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)


def _check_rng(rng: object, where: str) -> None:
    _need(isinstance(rng, dict), where, "an RNG record must be a JSON object")
    _b64_len(rng.get("torch"), torch.get_rng_state().numel(), where, "rng.torch")
    n = rng.get("numpy")
    _need(isinstance(n, dict) and n.get("kind") == "MT19937", where, "rng.numpy must be an MT19937 record")
    _b64_len(n.get("keys"), 4 * _MT_WORDS, where, "rng.numpy.keys")
    _need(_is_int(n.get("pos"), 0, _MT_WORDS) and _is_int(n.get("has_gauss"), 0, 1), where, "rng.numpy.pos/has_gauss")
    _need(isinstance(n.get("gauss"), (int, float)), where, "rng.numpy.gauss must be a number")
    p = rng.get("python")
    _need(isinstance(p, dict) and _is_int(p.get("version")), where, "rng.python must be a record with a version")
    st = p.get("state")
    _need(
        isinstance(st, list) and len(st) == _MT_WORDS + 1 and all(_is_int(x, 0, 2**32 - 1) for x in st),
        where,
        f"rng.python.state must be {_MT_WORDS + 1} 32-bit integers",
    )
    _need(p.get("gauss_next") is None or isinstance(p.get("gauss_next"), float), where, "rng.python.gauss_next")
    cuda = rng.get("cuda", [])
    _need(isinstance(cuda, list), where, "rng.cuda must be a list")
    for c in cuda:
        _b64_len(c, None, where, "rng.cuda[i]")


def check(obj: object, where: str) -> dict:
    """Type-check a state.json read from disk before anything uses it: what :func:`apply` and the
    ``ckpt`` commands read has the type they expect, RNG records decode to streams of the right
    size. Raises CheckpointFormatError naming ``where``."""
    _need(isinstance(obj, dict), where, "not a JSON object")
    _need(_is_int(obj.get("step")), where, f"'step' must be an integer >= 0, got {obj.get('step')!r}")
    for key in ("data", "lr_schedule", "config", "model"):
        _need(isinstance(obj.get(key, {}), dict), where, f"{key!r} must be a JSON object")
    seed = obj.get("data", {}).get("sampler_seed")
    _need(seed is None or _is_int(seed), where, "'data.sampler_seed' must be an integer")
    _need(_is_int(obj.get("world_size", 1), 1), where, "'world_size' must be an integer >= 1")
    rngs = obj.get("rng", [])
    _need(isinstance(rngs, list), where, "'rng' must be a list, one record per rank")
    for rng in rngs:
        if rng:
            _check_rng(rng, where)
    return obj


def apply(trainer: TrainingRun, state: dict, rank_rng: list[dict]) -> None:
    """Restore step/data position and this rank's RNG (rank r takes saved rank r's streams;
    ranks that did not exist when it was saved are re-seeded from (seed, step, rank))."""
    trainer.step = int(state["step"])
    trainer.schedule.load_state_dict(state.get("scheduler"))
    seed = state.get("data", {}).get("sampler_seed")
    if seed is not None and seed != trainer.sampler.seed:
        log.warning(
            "checkpoint data order was seeded with %s, this run uses %s: the data order changes",
            seed,
            trainer.sampler.seed,
        )
    if isinstance(trainer.sampler, StreamSampler):  # continue at the exact sample of the stream
        trainer.sampler.load_data_state(trainer.step, state.get("data", {}))
    r = trainer.comm.rank
    if r < len(rank_rng) and rank_rng[r]:
        restore_rng(rank_rng[r])
    else:
        s = (trainer.cfg.run.seed * 1_000_003 + trainer.step) * 1009 + r
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)
