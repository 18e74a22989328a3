"""The strategy contracts declare exactly what the trainer calls: every method the pipeline step
(``parallel.pipeline.step.run_step_fn``) calls on its strategy is a member of
:class:`MicroBatchScheduler`, and the pipeline strategy implements each with the declared signature."""

import ast
import inspect

import pytest

from disttrain.parallel import model_parallel, strategy
from disttrain.parallel.pipeline import step

pytestmark = pytest.mark.unit


def _methods_called_on(fn, name: str) -> set[str]:
    tree = ast.parse(inspect.getsource(fn))
    return {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == name
    }


def _declared(protocol) -> set[str]:
    return {n for n, v in vars(protocol).items() if inspect.isfunction(v) and not n.startswith("_")}


def test_micro_batch_scheduler_declares_what_the_pipeline_step_calls():
    called = _methods_called_on(step.run_step_fn, "strategy")
    assert called and called <= _declared(strategy.MicroBatchScheduler) | _declared(strategy.Strategy), called
    assert _declared(strategy.MicroBatchScheduler) == called  # and nothing the trainer never calls


def test_the_pipeline_strategy_implements_the_contract_with_its_signatures():
    impls = [
        c
        for c in vars(model_parallel).values()
        if inspect.isclass(c) and c.__module__ == model_parallel.__name__ and getattr(c, "schedules_micro_batches", 0)
    ]
    assert impls
    for cls in impls:
        for name in _declared(strategy.MicroBatchScheduler):
            want = inspect.signature(getattr(strategy.MicroBatchScheduler, name))
            got = inspect.signature(getattr(cls, name))
            assert list(got.parameters) == list(want.parameters), (cls.__name__, name, got, want)
