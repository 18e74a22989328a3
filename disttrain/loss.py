"""Step functions: one micro-batch's forward and loss, ``(model, batch) -> (loss_sum, count[, metrics])``.

``loss_sum`` is the loss *summed* over ``count`` units (samples, or tokens that are not
padding); ``metrics`` are sums too (e.g. correct predictions). The trainer adds counts over
every rank and micro-batch and divides once, so the gradient is the global-batch mean
whatever the layout. The user's own step comes from ``loss.target``; the built-in one is
cross-entropy over ``(input, target)`` pairs or ``{..., "labels": target}`` dicts, reading the
logits of tensor, tuple, dict and transformers ``ModelOutput`` outputs.

Under tensor parallel a step function gets whole logits, unless it is a :class:`SplitLogitsStep`
(``@disttrain.loss.split_logits``): then the output head's logits stay split by vocabulary and the
step scores them with ``disttrain.parallel.tensor.vocab.cross_entropy``. The built-in step is one.

Causal language models: transformers' convention is that ``labels`` equal ``input_ids`` and the
loss shifts them (position t predicts token t+1). The built-in step does the same for ``{...,
"labels"}`` batches of a transformers causal LM (``loss.shift_labels``); ``(input, target)`` pairs
are taken as aligned already.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .parallel.tensor.vocab import cross_entropy as vocab_cross_entropy
from .targets import UserCodeError, import_target

if TYPE_CHECKING:
    from .config.loss import LossConfig

StepFn = Callable[[nn.Module, Any], tuple]


class StepOutputError(UserCodeError):
    """A step function or model returned something the trainer cannot read."""


@dataclasses.dataclass
class StepResult:
    loss_sum: torch.Tensor
    count: float
    metrics: dict[str, float]


def read_step_output(out: Any) -> StepResult:
    """``(loss_sum, count)`` or ``(loss_sum, count, metrics)`` -> StepResult."""
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 3) or not isinstance(out[0], torch.Tensor):
        raise StepOutputError(
            f"the step function returned {type(out).__name__}, expected (loss_sum, count) or "
            "(loss_sum, count, metrics) with loss_sum a tensor summed over count units"
        )
    metrics = {k: float(v) for k, v in (out[2] if len(out) == 3 and out[2] else {}).items()}
    return StepResult(out[0], float(out[1]), metrics)


HINT = (
    "HINT: set loss.target to a step function (model, batch) -> (loss_sum, count) that runs your "
    "model and returns its loss summed over count units"
)


def read_logits(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, the first item of a tuple, or ``logits`` of a dict or
    transformers ModelOutput. Anything else is an error that names the type and points to loss.target."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):  # transformers' ModelOutput is an OrderedDict
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        raise StepOutputError(
            f"the built-in cross-entropy step cannot read a model output of type {type(output).__qualname__} "
            f"with keys {sorted(output)} (it needs 'logits')\n{HINT}"
        )
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise StepOutputError(
        f"the built-in cross-entropy step cannot read a model output of type {type(output).__qualname__}\n{HINT}"
    )


def shift_left(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``labels`` moved one position left along the last dim, the last position ``ignore_index``: the
    target of position t is token t+1, as transformers' causal-LM loss pads and shifts."""
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def cross_entropy_step(model: nn.Module, batch: Any, ignore_index: int = -100, shift_labels: bool = False):
    """The built-in step: cross-entropy summed over every target that is not ``ignore_index``;
    a classifier (one prediction per sample) also reports ``accuracy``. ``shift_labels``: the
    ``labels`` of a dict batch are the input tokens (a causal LM), shifted here."""
    if isinstance(batch, Mapping) and "labels" in batch:
        target = batch["labels"]
        output = model(**{k: v for k, v in batch.items() if k != "labels"})
        if shift_labels:
            target = shift_left(target, ignore_index)
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, target = batch
        output = model(inputs)
    else:
        raise StepOutputError(
            f"the built-in cross-entropy step takes (input, target) pairs or dicts with 'labels'; got a batch "
            f"of type {type(batch).__qualname__}\n{HINT}"
        )
    logits = read_logits(output)
    flat = target.reshape(-1)
    if logits.shape[:-1].numel() != flat.numel():
        raise StepOutputError(
            f"the built-in cross-entropy step got logits of shape {tuple(logits.shape)} for targets of shape "
            f"{tuple(target.shape)} (one row of logits per target expected)\n{HINT}"
        )
    # Logits split by vocabulary across tp (a vocab-parallel head) are scored without gathering them.
    loss_sum = vocab_cross_entropy(logits, flat, reduction="sum", ignore_index=ignore_index)
    valid = flat != ignore_index
    metrics = {}
    if logits.dim() == 2:
        metrics["accuracy"] = ((logits.argmax(-1) == flat) & valid).sum()
    return loss_sum, valid.sum(), metrics


class SplitLogitsStep:
    """A step function that reads logits split by vocabulary across the tp ranks (each rank holds a
    slice of the last dim) and scores them with ``disttrain.parallel.tensor.vocab.cross_entropy``.
    Under tensor parallel its output head's logits are never gathered; a plain step function gets
    whole logits. Build one with :func:`split_logits`."""

    def __init__(self, fn: StepFn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, model: nn.Module, batch: Any):
        return self.fn(model, batch)


def split_logits(fn: StepFn) -> SplitLogitsStep:
    """Decorator: ``fn`` reads vocabulary-split logits under tensor parallel (see SplitLogitsStep)."""
    return SplitLogitsStep(fn)


def is_causal_lm(model: nn.Module) -> bool:
    """True when ``model`` is, or wraps (peft), a transformers causal language model."""
    try:
        from transformers import PreTrainedModel
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return False
    names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            return type(m).__name__ in names or type(m).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    return False


class CrossEntropyStep(SplitLogitsStep):
    """The built-in step (``cross_entropy_step``) with the ``loss`` section's settings;
    ``shift_labels`` None: decided for the model by :meth:`for_model`."""

    def __init__(self, ignore_index: int = -100, shift_labels: bool | None = None):
        self.ignore_index, self.shift_labels = ignore_index, shift_labels
        super().__init__(self._step)

    def _step(self, model: nn.Module, batch: Any):
        return cross_entropy_step(model, batch, self.ignore_index, bool(self.shift_labels))

    def for_model(self, model: nn.Module) -> CrossEntropyStep:
        """This step with ``shift_labels`` decided: on for a transformers causal LM when not set."""
        if self.shift_labels is not None:
            return self
        return CrossEntropyStep(self.ignore_index, is_causal_lm(model))


def build_step(cfg: LossConfig, import_path: list[str]) -> StepFn:
    """The step function of the ``loss`` section: ``loss.target`` with ``loss.kwargs``, or the built-in one."""
    if cfg.target:
        fn = import_target(cfg.target, import_path)
        return functools.partial(fn, **cfg.kwargs) if cfg.kwargs else fn
    return CrossEntropyStep(cfg.ignore_index, cfg.shift_labels)
