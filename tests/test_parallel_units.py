"""Single-process pieces of running users' models: unit discovery (ZeRO-3 and activation checkpointing),
activation checkpointing, synchronised BatchNorm's math, tied-name discovery, ParallelConfig."""

import types

import pytest
import torch
import torch.nn as nn

from disttrain.config import ParallelConfig
from disttrain.parallel.buffers import aliases, persistent_buffers, untrained_state
from disttrain.parallel.sync_batchnorm import SyncBatchNorm, apply_sync_batchnorm
from disttrain.parallel.units import apply_activation_checkpointing, find_units
from tests.cases.hf_strategies import build_model, dataset, loss_sum

pytestmark = pytest.mark.unit


def test_default_units_are_transformer_blocks_or_top_level_children():
    gpt2 = build_model("gpt2")
    assert [n for n, _ in find_units(gpt2)] == ["transformer.h.0", "transformer.h.1"]  # _no_split_modules
    resnet = build_model("resnet")
    kinds = {type(m).__name__ for _, m in find_units(resnet)}
    assert kinds == {"ResNetConvLayer", "ResNetShortCut"}, kinds
    stack = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 8), nn.Linear(8, 4)]), nn.ReLU())
    assert [n for n, _ in find_units(stack)] == ["1.0", "1.1"]  # a stack of identical blocks
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Conv1d(8, 2, 1))
    assert [n for n, _ in find_units(plain)] == ["0", "2"]  # top-level children with parameters


def test_units_from_class_names_and_path_globs():
    gpt2 = build_model("gpt2")
    assert [n for n, _ in find_units(gpt2, ["GPT2MLP"])] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert [n for n, _ in find_units(gpt2, ["transformer.h.*", "transformer.h.0.attn"])] == [
        "transformer.h.0",
        "transformer.h.1",
    ]  # outermost only
    with pytest.raises(ValueError, match="(?s)matches.*HINT"):
        find_units(gpt2, ["NoSuchBlock"])


def test_activation_checkpointing_recomputes_units_with_the_same_gradients():
    x, y = dataset("gpt2")
    grads = []
    calls = []
    for ac in (False, True):
        model = build_model("gpt2")
        n = [0]
        model.transformer.h[0].attn.register_forward_hook(lambda *a, n=n: n.__setitem__(0, n[0] + 1))
        if ac:
            apply_activation_checkpointing(find_units(model))
        s, _ = loss_sum("gpt2", model, x[:4], y[:4])
        s.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        calls.append(n[0])
    assert calls == [1, 2]  # the checkpointed block ran again in backward
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=0, atol=1e-6)


def test_sync_batchnorm_on_one_rank_is_torch_batchnorm():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(4 * 6 * 6))
    ours = nn.Sequential(*[m for m in __import__("copy").deepcopy(ref)])
    one = types.SimpleNamespace(world_size=1, rank=0)  # no peers: the allreduce is skipped
    assert apply_sync_batchnorm(ours, one) == 2 and isinstance(ours[1], SyncBatchNorm)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for _ in range(3):
        x = torch.randn(5, 3, 8, 8)
        a, b = ref(x), ours(x)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        w = torch.randn_like(a)  # a loss that depends on the normalised values (a plain sum of squares would not)
        (a * w).sum().backward()
        (b * w).sum().backward()
    for p, q in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(v, ours.state_dict()[k], rtol=1e-5, atol=1e-6, msg=k)
    ref.eval(), ours.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(ref(x), ours(x), rtol=1e-5, atol=1e-5)


def test_tied_and_untrained_state_names():
    gpt2 = build_model("gpt2")
    assert aliases(gpt2) == {"lm_head.weight": "transformer.wte.weight"}
    resnet = build_model("resnet")
    names = [n for n, _ in persistent_buffers(resnet)]
    assert names and all(n.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked") for n in names)
    resnet.classifier[1].weight.requires_grad_(False)
    assert "classifier.1.weight" in [n for n, _ in untrained_state(resnet)]
    lin = nn.Linear(2, 2)
    lin.register_buffer("mask", torch.ones(2), persistent=False)
    assert persistent_buffers(lin) == []  # non-persistent buffers are the model's to rebuild


def test_parallel_config_sections():
    cfg = ParallelConfig.model_validate(
        {
            "strategy": "zero3",
            "zero": {"units": ["GPT2Block"]},
            "sync_batchnorm": True,
            "activation_checkpointing": True,
        }
    )
    assert cfg.zero.units == ["GPT2Block"] and cfg.broadcast_buffers
    with pytest.raises(ValueError):
        ParallelConfig.model_validate({"zero": {"unit": ["x"]}})


def test_activation_checkpointing_updates_batchnorm_statistics_once():
    x, y = dataset("resnet")
    stats = []
    for ac in (False, True):
        model = build_model("resnet")
        if ac:
            apply_activation_checkpointing(find_units(model))
        s, _ = loss_sum("resnet", model, x[:8], y[:8])
        s.backward()
        stats.append({n: b.clone() for n, b in persistent_buffers(model)})
    for n, b in stats[0].items():
        torch.testing.assert_close(b, stats[1][n], rtol=0, atol=1e-6)
