"""Rank functions for streaming datasets (torch IterableDataset, no __len__): disttrain.fit on a
stream, with and without the dataset's own state_dict, and the three entry paths' refusal of a
stream without train.steps."""

from __future__ import annotations

import torch
from torch.utils.data import IterableDataset

import disttrain
from tests.cases.user_api import VOCAB, Tiny

SEQ = 6
READS = [0]  # samples this process's datasets produced (DataLoader workers count in their own copies)


def sample(i: int) -> dict[str, torch.Tensor]:
    READS[0] += 1
    ids = torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(1000 + i))
    return {"input_ids": ids, "labels": (ids + 1) % VOCAB}


class Stream(IterableDataset):
    """Samples 0..n-1 in order, then the stream ends (the trainer starts another pass)."""

    def __init__(self, n: int = 37):
        self.n = n

    def __iter__(self):
        for i in range(self.n):
            yield sample(i)


class StatefulStream(Stream):
    """The same stream, able to say where it is and to continue there (torchdata's Stateful protocol)."""

    def __init__(self, n: int = 37):
        super().__init__(n)
        self._next, self._start = 0, 0

    def __iter__(self):
        i, self._start = self._start, 0
        while i < self.n:
            self._next = i + 1
            yield sample(i)
            i += 1

    def state_dict(self) -> dict:
        return {"next": self._next}

    def load_state_dict(self, state: dict) -> None:
        self._start = int(state["next"])


def step(model, batch):
    from disttrain.loss import cross_entropy_step

    return cross_entropy_step(model, batch)


def make(stateful: bool = False):
    """data.target: (train, eval) streams."""
    return (StatefulStream() if stateful else Stream()), Stream(12)


def fit(config: str, overrides: list[str], stateful: bool) -> dict:
    torch.manual_seed(0)
    model = Tiny()
    summary = disttrain.fit(model=model, data=make(stateful), config=config, argv=overrides)
    return {
        "summary": summary,
        "params": {n: p.detach().reshape(-1).tolist() for n, p in model.named_parameters()},
        "reads": READS[0],
    }


def _own_loop(run) -> None:
    run.setup(Tiny())
    next(run.batches(make()[0]))


def refusals(yaml: str) -> dict[str, str]:
    """The error of each entry path given a stream and no train.steps: YAML data.target, fit's parts,
    the own loop's run.batches (one process)."""
    from disttrain import config as config_mod
    from disttrain import session
    from disttrain.api import Run
    from disttrain.data import as_data
    from disttrain.errors import DisttrainError
    from disttrain.trainer import Trainer

    cfg = config_mod.load(yaml, [])
    comm = session.init_communicator(cfg)
    out = {}
    attempts = {
        "yaml": lambda: session.build_trainer(cfg, comm),
        "fit": lambda: Trainer(cfg, comm, Tiny(), as_data(make())),
        "loop": lambda: _own_loop(Run(session.Session(cfg, comm))),
    }
    for path, attempt in attempts.items():
        try:
            attempt()
            out[path] = "no error"
        except DisttrainError as exc:
            out[path] = str(exc)
    comm.close()
    return out
