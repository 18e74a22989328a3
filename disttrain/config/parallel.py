"""The ``parallel:`` section: strategy, mesh, pipeline, tensor-parallel plan and ZeRO units.

Components under ``disttrain/parallel/`` take these types; this module imports only ``section``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .section import Section


class MeshConfig(Section):
    dp: int | Literal["auto"] = Field(
        "auto",
        description="Data-parallel degree: model replicas, each on its "
        "own share of the global batch; 'auto' = world size / (tp * pp).",
    )
    tp: int = Field(1, ge=1, description="Tensor-parallel degree: ranks that split each layer's weights (Megatron).")
    pp: int = Field(1, ge=1, description="Pipeline-parallel degree: stages the blocks are split into.")

    @model_validator(mode="after")
    def _dp_positive(self) -> MeshConfig:
        if isinstance(self.dp, int) and self.dp < 1:
            raise ValueError(f"mesh.dp must be >= 1 or 'auto', got {self.dp}")
        return self


class PipelineConfig(Section):
    schedule: Literal["gpipe", "1f1b", "interleaved"] = Field(
        "1f1b",
        description="Micro-batch schedule: gpipe, 1f1b, or interleaved (1F1B over virtual_stages chunks per rank).",
    )
    microbatches: int = Field(
        4, ge=1, description="Micro-batches per step per replica when pp > 1 (more: smaller bubble)."
    )
    virtual_stages: int = Field(
        1, ge=1, description="Model chunks per pp rank (interleaved schedule): bubble (p-1)/(v*m+p-1)."
    )
    split: list[str] | str | None = Field(
        None,
        description="Module paths where stages 2.. begin (e.g. ['model.layers.2']), or a target "
        "'pkg.mod:fn' called as fn(model, num_stages) -> stage modules; default: balanced, for known families.",
    )
    stage_forward: str | None = Field(
        None,
        description="Target 'pkg.mod:fn' called as fn(stage, x) to run a stage whose units are not a plain "
        "sequence (default: in order, or the family's own).",
    )
    stages: list[list[int]] | None = Field(
        None, description="Blocks of each stage of the built-in GPT, e.g. [[0, 1], [2, 3]] (older form of split)."
    )


class TensorParallelConfig(Section):
    plan: dict[str, str] | None = Field(
        None,
        description="Module-path globs -> style (colwise, rowwise, vocab, replicate, sequence, colwise_gather, "
        "colwise_qkv, colwise_packed); default: the model's own plan (transformers _tp_plan / base_model_tp_plan).",
    )
    parallelize: str | None = Field(
        None, description="Target 'pkg.mod:fn' called as fn(model, mesh) instead of a plan, for what a plan cannot say."
    )
    loss_parallel: bool | None = Field(
        None,
        description="Keep the output head's logits split by vocabulary and score them with the vocab-parallel "
        "cross-entropy (never gathered). Default: on for the built-in loss, off for a loss.target step function "
        "and the own loop (they get whole logits; a step decorated with disttrain.loss.split_logits, or this "
        "set to true, keeps them split).",
    )


class ZeroConfig(Section):
    units: list[str] | None = Field(
        None,
        description="ZeRO-3 units (gathered one at a time) and activation-checkpointing units: module class "
        "names (GPT2Block) or module-path globs (transformer.h.*); default: the model's transformer blocks "
        "(transformers' _no_split_modules, or a ModuleList of identical blocks), else its top-level children.",
    )


class ParallelConfig(Section):
    strategy: Literal["ddp", "zero1", "zero2", "zero3"] = Field("ddp", description="How gradients/state are shared.")
    bucket_mb: float = Field(25.0, gt=0, description="Gradient bucket size in MiB.")
    first_bucket_mb: float = Field(
        1.0, gt=0, description="Size of the first (small) bucket, so communication starts early."
    )
    grad_dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Dtype gradients are communicated in.")
    overlap: bool = Field(True, description="Launch bucket allreduces from autograd hooks during backward.")
    mesh: MeshConfig = Field(default_factory=MeshConfig, description="Device mesh: dp x tp x pp = world size.")
    pipeline: PipelineConfig = Field(
        default_factory=PipelineConfig, description="Pipeline schedule (used when pp > 1)."
    )
    tp: TensorParallelConfig = Field(
        default_factory=TensorParallelConfig, description="Tensor-parallel plan (used when mesh.tp > 1)."
    )
    zero: ZeroConfig = Field(default_factory=ZeroConfig, description="ZeRO units (ZeRO-3, activation checkpointing).")
    sync_batchnorm: bool = Field(
        False,
        description="Replace BatchNorm layers by a synchronised BatchNorm: train-mode statistics of the global "
        "batch (as one process would compute them), identical running statistics on every rank.",
    )
    broadcast_buffers: bool = Field(
        True,
        description="After each step every rank takes rank 0's buffers (BatchNorm running statistics), as torch "
        "DDP does; skipped with sync_batchnorm (they never drift).",
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each unit's (see zero.units) activations in backward instead of storing them."
    )

    @model_validator(mode="after")
    def _model_parallel_flags(self) -> ParallelConfig:
        if self.mesh.tp > 1 or self.mesh.pp > 1:
            flags = {"sync_batchnorm": self.sync_batchnorm, "activation_checkpointing": self.activation_checkpointing}
            for flag, on in flags.items():
                if on:
                    raise ValueError(
                        f"{flag} is not supported with tensor/pipeline parallelism (mesh tp={self.mesh.tp}, "
                        f"pp={self.mesh.pp})\nHINT: set parallel.{flag}: false, or mesh tp: 1 and pp: 1"
                    )
        return self
