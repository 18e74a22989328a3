"""An elastic training script in Horovod's style (hvd.elastic.run, TorchState, a commit every batch).

    disttrain launch --min-np 1 --max-np 3 --host-discovery-script ./hosts.sh \\
        tests/cases/hvd_elastic.py --batches 30 --steps-log /tmp/log.jsonl --params-out /tmp/params.json

Every rank trains on the same batch (batch ``b`` is drawn from seed ``b``), so the averaged
gradient equals one process's and the final parameters do not depend on the world sizes seen:
``expected_params`` gives them. Each rank appends one JSON line per step to ``--steps-log`` (pid, its
worker id, the batch number after the step, world size, the resets this state has seen), which
tests/test_horovod_elastic.py reads to check that no committed step is lost or repeated.
Each rank also draws one sample index a step from an ``hvd.elastic.ElasticSampler`` (logged, not
trained on: the model's batch stays the same on every rank); with ``--commit-samples K`` the state
is committed only when the world's processed count divides by K, so every reset falls where the
remainder divides by the next world's size and no sample is padded twice.
``--kill-host H --kill-at B``: the first worker on host H SIGKILLs itself in the middle of step B
(after backward, before the gradients' allreduce completes), once per job (``--kill-marker``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

import torch

import disttrain.horovod as hvd

LR = 0.05


def batch_of(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + b)
    x = torch.randn(8, 4, generator=g)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1


def new_model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1)


def expected_params(batches: int) -> dict[str, list]:
    """One process, no Horovod: what every elastic run must end with."""
    model = new_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for b in range(batches):
        x, y = batch_of(b)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return {k: v.tolist() for k, v in model.state_dict().items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--steps-log", required=True)
    p.add_argument("--params-out", required=True)
    p.add_argument("--sleep", type=float, default=0.1)
    p.add_argument("--kill-host", default=None)
    p.add_argument("--kill-at", type=int, default=-1)
    p.add_argument("--kill-marker", default=None)
    p.add_argument("--samples", type=int, default=60, help="dataset length of the ElasticSampler")
    p.add_argument("--commit-samples", type=int, default=0, help="commit when the processed count divides by it")
    args = p.parse_args()

    hvd.init()
    model = new_model()
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), named_parameters=model.named_parameters()
    )
    me = os.environ.get("DISTTRAIN_ELASTIC_ID", "solo")
    host = os.environ.get("HOROVOD_HOSTNAME", "")

    def record(state, sample: int) -> None:
        row = {"pid": os.getpid(), "id": me, "host": host, "batch": state.batch, "size": hvd.size()}
        row.update(rank=hvd.rank(), rendezvous=state.rendezvous, epoch=state.epoch, sample=sample)
        row["backend"] = hvd.basics.context().backend
        with open(args.steps_log, "a") as f:
            f.write(json.dumps(row) + "\n")

    def maybe_kill(state) -> None:
        if host != args.kill_host or state.batch != args.kill_at or os.environ["HOROVOD_LOCAL_RANK"] != "0":
            return
        try:
            os.close(os.open(args.kill_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)

    @hvd.elastic.run
    def train(state):
        state.rendezvous += 1
        samples, i = iter(state.sampler), 0  # this world's share of what is left of the epoch
        while state.batch < args.batches:
            sample = next(samples, None)
            if sample is None:  # the epoch is done
                state.epoch += 1
                state.sampler.set_epoch(state.epoch)
                samples, i = iter(state.sampler), 0
                continue
            x, y = batch_of(state.batch)  # the model's batch: the same on every rank (see above)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            maybe_kill(state)
            opt.step()
            state.batch += 1
            state.sampler.record_batch(i, 1)
            i += 1
            record(state, sample)
            time.sleep(args.sleep)
            if not args.commit_samples or state.sampler.processed_num % args.commit_samples == 0:
                state.commit()

    sampler = hvd.elastic.ElasticSampler(range(args.samples), shuffle=True, seed=7)
    state = hvd.elastic.TorchState(model, opt, batch=0, rendezvous=0, epoch=0, sampler=sampler)
    state.register_reset_callbacks([lambda: None])
    train(state)
    if hvd.rank() == 0:
        with open(args.params_out, "w") as f:
            json.dump({k: v.tolist() for k, v in model.state_dict().items()}, f)


if __name__ == "__main__":
    main()
