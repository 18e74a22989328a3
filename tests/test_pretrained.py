"""``model.pretrained`` reads a sharded transformers directory straight into each rank's part.

The directory is written by transformers' ``save_pretrained(max_shard_size=...)`` of a tiny Llama
initialised on another seed than the run's (so a load that did not happen shows). Under ZeRO-3,
tp2 and pp2 on 2 ranks, the loss of the first forward equals ``from_pretrained``'s in one process
(tolerance 1e-5: the same weights; only tp's split matmuls and vocab-parallel loss sum in another
order). A file that does not fit the model is an error naming the key, or with
``model.pretrained_strict: false`` a listed warning and the rest loaded.
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
