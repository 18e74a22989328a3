"""``model.pretrained`` reads a sharded transformers directory straight into each rank's part.

The directory is written by transformers' ``save_pretrained(max_shard_size=...)`` of a tiny Llama
initialised on another seed than the run's (so a load that did not happen shows). Under ZeRO-3,
tp2 and pp2 on 2 ranks, the loss of the first forward equals ``from_pretrained``'s in one process
(tolerance 1e-5: the same weights; only tp's split matmuls and vocab-parallel loss sum in another
order). A file that does not fit the model is an error naming the key, or with
``model.pretrained_strict: false`` a listed warning and the rest loaded. A disttrain checkpoint
(saved by a ZeRO-3 run on 2 ranks, one step after that load) loads from its run directory under
ZeRO-3 and from its step directory under tp2, and its `disttrain ckpt export` output loads back
through ``model.pretrained``: each gives the exported model's ``from_pretrained`` first-step loss.
"""

import json
import os

import pytest
import torch

from tests.support.harness import RankFailure, spawn

pytestmark = pytest.mark.timeout(300)
TARGET = "tests.cases.deferred:llama"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    import transformers

    from tests.cases.deferred import llama

    path = str(tmp_path_factory.mktemp("llama"))
    torch.manual_seed(123)
    llama().save_pretrained(path, max_shard_size="20KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 2  # really sharded
    ref = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = ref(ids).logits
    loss = float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)))
    return path, ids.tolist(), loss


@pytest.mark.parametrize("strategy,tp,pp", [("zero3", 1, 1), ("ddp", 2, 1), ("ddp", 1, 2)])
def test_pretrained_matches_from_pretrained(sharded, strategy, tp, pp):
    path, ids, want = sharded
    args = {"target": TARGET, "kwargs": {}, "strategy": strategy, "tp": tp, "pp": pp}
    losses = spawn(
        "tests.cases.deferred:first_loss_case", 2, args={**args, "model": {"pretrained": path}, "batch": ids}
    )
    for rank, got in enumerate(losses):
        assert abs(got - want) <= 1e-5, f"{strategy} tp{tp} pp{pp} rank {rank}: {got} vs from_pretrained {want}"
    fresh = spawn("tests.cases.deferred:first_loss_case", 1, args={**args, "tp": 1, "pp": 1, "batch": ids})
    assert abs(fresh[0] - want) > 1e-3  # without the load the loss differs: the test sees a load


def test_pretrained_mismatch_names_the_key(sharded, tmp_path):
    """A file from a wider model: strict is an error naming the key; non-strict lists it and loads the rest."""
    from tests.cases.deferred import llama

    torch.manual_seed(0)
    llama(layers=3).save_pretrained(str(tmp_path))
    args = {"target": TARGET, "kwargs": {}, "strategy": "zero3", "batch": sharded[1]}
    with pytest.raises(RankFailure) as err:
        spawn("tests.cases.deferred:first_loss_case", 2, args={**args, "model": {"pretrained": str(tmp_path)}})
    assert "unexpected key 'model.layers.2." in str(err.value) and "pretrained_strict" in str(err.value)
    loose = {"pretrained": str(tmp_path), "pretrained_strict": False}
    losses = spawn("tests.cases.deferred:first_loss_case", 2, args={**args, "model": loose})
    assert losses[0] == losses[1]


def test_pretrained_from_a_consolidated_file(sharded, tmp_path):
    """A single .safetensors state dict (what `disttrain ckpt consolidate` writes; `ckpt export` writes
    it as DIR/model.safetensors) loads the same under ZeRO-3."""
    import transformers
    from safetensors.torch import save_file

    path, ids, want = sharded
    model = transformers.LlamaForCausalLM.from_pretrained(path)
    file = str(tmp_path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, file)
    args = {"target": TARGET, "kwargs": {}, "strategy": "zero3", "batch": ids}
    for got in spawn("tests.cases.deferred:first_loss_case", 2, args={**args, "model": {"pretrained": file}}):
        assert abs(got - want) <= 1e-5


@pytest.fixture(scope="module")
def saved(sharded, tmp_path_factory):
    """A disttrain checkpoint of the Llama after one ZeRO-3 step from the sharded directory (2 ranks),
    its `ckpt export` directory, and the first-step loss of that export through `from_pretrained` in one
    process: the reference every way of loading the checkpoint must give."""
    import transformers

    from disttrain.checkpoint.cli import main as ckpt

    path, ids, before = sharded
    run_dir = str(tmp_path_factory.mktemp("saved-run"))
    step_dir = spawn("tests.cases.deferred:save_case", 2, args={"run_dir": run_dir, "pretrained": path})[0]
    out = str(tmp_path_factory.mktemp("exported") / "llama")
    assert ckpt(["export", step_dir, out]) == 0
    ref = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    t = torch.tensor(ids)
    with torch.no_grad():
        logits = ref(t).logits
    loss = float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), t[:, 1:].reshape(-1)))
    assert abs(loss - before) > 1e-4  # the step moved the weights: a load of the checkpoint shows
    return run_dir, step_dir, out, loss


@pytest.mark.parametrize("source,strategy,tp", [("run", "zero3", 1), ("step", "ddp", 2)])
def test_pretrained_from_a_disttrain_checkpoint(sharded, saved, source, strategy, tp):
    """A run directory (its newest checkpoint) under ZeRO-3 and a step directory under tp2 give the
    exported model's first-step loss."""
    run_dir, step_dir, _, want = saved
    args = {"target": TARGET, "kwargs": {}, "strategy": strategy, "tp": tp, "batch": sharded[1]}
    model = {"pretrained": run_dir if source == "run" else step_dir}
    for rank, got in enumerate(spawn("tests.cases.deferred:first_loss_case", 2, args={**args, "model": model})):
        assert abs(got - want) <= 1e-5, f"{source} dir, {strategy} tp{tp}, rank {rank}: {got} vs {want}"


def test_ckpt_export_loads_back_through_pretrained(sharded, saved):
    """`disttrain ckpt export` output read back through `model.pretrained` (ZeRO-3, 2 ranks): the same
    first-step loss as `from_pretrained` of that output in one process."""
    _, _, out, want = saved
    args = {"target": TARGET, "kwargs": {}, "strategy": "zero3", "batch": sharded[1], "model": {"pretrained": out}}
    for rank, got in enumerate(spawn("tests.cases.deferred:first_loss_case", 2, args=args)):
        assert abs(got - want) <= 1e-5, f"rank {rank}: {got} vs {want}"
