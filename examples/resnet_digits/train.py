"""The ResNet on digits with your own loop (a plain cross-entropy step written out).

python examples/resnet_digits/train.py examples/resnet_digits/resnet.yaml train.steps=30 optim.lr=0.1
disttrain launch --nproc-per-node 2 examples/resnet_digits/train.py examples/resnet_digits/resnet.yaml
torchrun --nproc-per-node 2 examples/resnet_digits/train.py examples/resnet_digits/resnet.yaml
"""

import sys

import torch.nn.functional as F
from digits_resnet import build_model, digits

import disttrain


def step(model, batch):
    images, labels = batch
    logits = model(images).logits
    loss_sum = F.cross_entropy(logits, labels, reduction="sum")
    return loss_sum, len(labels), {"accuracy": (logits.argmax(-1) == labels).sum()}


def main() -> int:
    run = disttrain.init(sys.argv[1], sys.argv[2:])
    train_set, eval_set = digits()
    # The optimizer is the YAML's optim section, so overrides such as optim.lr=0.1 apply here too.
    model, _ = run.setup(build_model(**run.cfg.model.kwargs))
    for batch in run.batches(train_set):
        loss_sum, count, _ = step(model, batch)
        run.backward(loss_sum, count)
        run.step()
    result = run.evaluate(eval_set, step)
    if run.is_main:
        print(f"eval accuracy {result['eval_accuracy']:.2%} after {run.global_step} steps", flush=True)
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
