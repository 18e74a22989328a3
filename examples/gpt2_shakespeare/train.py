"""GPT-2 on Shakespeare with your own training loop: disttrain brings the processes, the strategy
(DDP or ZeRO, from the YAML), the global-batch sampler, checkpoints, resume and preemption.

    python examples/gpt2_shakespeare/train.py examples/gpt2_shakespeare/gpt2.yaml train.steps=50
    disttrain launch --nproc-per-node 2 examples/gpt2_shakespeare/train.py examples/gpt2_shakespeare/gpt2.yaml
    torchrun --nproc-per-node 2 examples/gpt2_shakespeare/train.py examples/gpt2_shakespeare/gpt2.yaml
    mpiexec -n 2 python examples/gpt2_shakespeare/train.py examples/gpt2_shakespeare/gpt2.yaml launch.backend=mpi

This script builds the model, data and step itself (the YAML's targets are not imported); it
reads their sizes from the YAML's model.kwargs and data.kwargs, so both ways train the same thing.
"""

import sys

from shakespeare_gpt2 import build_model, lm_step, shakespeare

import disttrain


def main() -> int:
    run = disttrain.init(sys.argv[1], sys.argv[2:])
    train_set, eval_set = shakespeare(**run.cfg.data.kwargs)
    # The optimizer is the YAML's optim section, so overrides such as optim.lr=1e-3 apply here too.
    model, _ = run.setup(build_model(**run.cfg.model.kwargs))
    for batch in run.batches(train_set):
        loss_sum, count = lm_step(model, batch)
        run.backward(loss_sum, count)
        run.step()
    result = run.evaluate(eval_set, lm_step, max_samples=256)
    if run.is_main:
        print(f"eval loss {result['eval_loss']:.4f} after {run.global_step} steps", flush=True)
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
