"""Helpers to compare a multi-rank result with a single process's."""

from __future__ import annotations

import torch


def max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), f"parameter names differ: {sorted(a)} vs {sorted(b)}"
    return max(float((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max()) for k in a)


def assert_equivalent(ref: dict, other: dict, atol: float, what: str) -> None:
    diff = max_param_diff(ref["params"], other["params"])
    assert diff <= atol, f"{what}: parameters differ from one process by {diff:.3g} (tolerance {atol})"
    for i, (l1, l2) in enumerate(zip(ref["losses"], other["losses"])):
        assert abs(l1 - l2) <= max(atol, 1e-5 * abs(l1)) * 10, f"{what}: loss at log {i}: {l1} vs {l2}"
